"""Sampling: the scheduler that batches `Engine.sample` calls, and the pieces it runs.

- `scheduler`: `SamplingScheduler`, the queue and the background loop: who joins a step, the
  generic path's whole batches, rerunning a failed batch's requests one at a time.
- `batch`: `FastBatch`, one step of the fast path (admit, decode one token, retire).
- `prefill`: the admission plan (`PrefillLead`, `PrefillChunk`, `SharedStart`), no tensors.
- `kv`: the KV buffer and its rows (`DecodeRow`, `KVRows`).
- `fast_decoder`: the lean Llama-family decoder over that buffer (`FastDecoder`, `Plan`).
- `generic`: whole batches through the Hugging Face decoder, for other architectures.
- `ops`: what both decoders share: stop rules, logit shaping, token draws, logprob summaries.
- `prompt_extras`, `prefix_cache`, `request`: the rarer prompt outputs, the cross-request K/V
  cache, and the request both paths run.

Nothing is re-exported here; import from the module that owns a name (the engine imports
`scheduler.SamplingScheduler`).
"""
