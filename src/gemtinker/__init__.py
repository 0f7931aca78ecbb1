"""gemtinker: train LLM agents on GEM environments through the Tinker API.

Layers (imports go one way: recipes -> tinker SDK -> server -> engine):
  engine/   PyTorch + transformers: models, LoRA adapters, losses, optimizer, sampler, checkpoints
  server/   the Tinker HTTP protocol in front of the engine
  envs/     GEM environment glue (construction, templates, offline datasets)
  recipes/  training loops written only against the `tinker` SDK
"""

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

__version__ = "0.1.0"
