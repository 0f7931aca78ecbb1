"""The Engine facade: everything a Tinker-compatible service does, in-process.

CONTRACT (the server codes against exactly this; keep it stable):

    engine = Engine(base_model=None, device=None, dtype=None)   # None -> bundled default model
    engine.base_model           -> str   (name as given / hub id of the default)
    engine.tokenizer            -> transformers tokenizer of the base model
    engine.vocab_size           -> int

    # LoRA adapters, one per training client, all over the one frozen base model
    engine.create_adapter(adapter_id, LoraSpec, metadata=None) -> AdapterInfo
    engine.remove_adapter(adapter_id)
    engine.adapter_info(adapter_id) -> AdapterInfo

    # training (gradients accumulate over forward_backward calls until optim_step)
    engine.forward_backward(adapter_id, list[TrainDatum], loss_fn: str, loss_fn_config: dict|None) -> ForwardResult
    engine.forward(adapter_id, list[TrainDatum], loss_fn, loss_fn_config) -> ForwardResult   # no grad
    engine.optim_step(adapter_id, AdamConfig) -> dict[str, float]     # metrics, e.g. grad_norm

    # checkpoints: directories written atomically (safetensors + JSON metadata)
    engine.save_state(adapter_id, path, include_optimizer=True, metadata=None)
    engine.load_state(adapter_id, path, with_optimizer: bool) -> AdapterInfo
        # creates adapter `adapter_id` (must not exist) with the LoRA config stored in the checkpoint
    engine.save_sampler_weights(adapter_id, path, metadata=None)
    engine.read_checkpoint_metadata(path) -> dict

    # samplers: frozen weight snapshots; later training never changes an existing sampler
    engine.snapshot_sampler(adapter_id) -> sampler_id   (in memory)
    engine.load_sampler(path) -> sampler_id             (from save_sampler_weights / save_state dir)
    engine.base_sampler() -> sampler_id                 (base model, no adapter)
    engine.release_sampler(sampler_id)

    # sampling: thread-safe; concurrent callers are batched together by the engine
    engine.sample(sampler_id, prompt_tokens: list[int], num_samples: int, SamplingConfig,
                  prompt_logprobs: bool = False, topk_prompt_logprobs: int = 0) -> SampleResult

Every input error raises EngineError (subclass) with a message naming the datum/field, and
leaves state unchanged. All methods are safe to call from several threads.
"""
