"""gemtinker: train LLM agents on GEM environments through the Tinker API.

Layers (imports go one way: recipes -> tinker SDK -> server -> engine):
  engine/   PyTorch + transformers: models, LoRA adapters, losses, optimizer, sampler, checkpoints
  server/   the Tinker HTTP protocol in front of the engine
  envs/     GEM environment glue (construction, templates, offline datasets)
  recipes/  training loops written only against the `tinker` SDK
"""

# The bundled SmolLM2-135M-Instruct, dequantised from a Q4_1 GGUF file: not the hub repo's weights,
# so it has an id of its own that no real hub repo uses (see engine/models.py).
DEFAULT_MODEL = "gemtinker/SmolLM2-135M-Instruct-Q4_1"

__version__ = "0.1.0"
