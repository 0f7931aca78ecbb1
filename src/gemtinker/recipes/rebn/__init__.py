"""Multi-turn REINFORCE with Return Batch Normalisation on GEM envs, over the Tinker API.

Written only against the `tinker` SDK, so the same loop trains on the embedded gemtinker server,
another gemtinker server, or hosted Tinker. One step:

  sampler <- save_weights_and_get_sampling_client()      (current policy)
  episodes <- num_env envs played concurrently until >= batch_size turns are collected
  returns (gamma) -> ReBN over all turns -> sub-sample batch_size turns -> one Datum per turn
  forward_backward(importance_sampling) + optim_step(Adam), both submitted before either is awaited

What it does beyond GEM's reference script (cheap, same algorithm):
  * an env or sampling error loses one episode, is counted (env/errors*), and training goes on;
    a run that only fails stops with the error instead of looping;
  * reproducible: episodes are collected in rounds (one per env) until the batch is full, and
    every sampling request carries a seed derived from (seed, step, env, round, turn), so the
    same seed replays a run's sampled tokens on the same machine;
  * turns whose advantage is exactly 0 (e.g. a batch with no return spread) are not sent, and a
    step with no signal skips the update (Adam would otherwise still move the weights);
  * ReBN with a one-turn or constant batch gives zeros, not NaN;
  * periodic checkpoints (state + sampler weights) and exact resume of the step counter and
    seeds; episodes are seeded deterministically from (seed, step, env, episode);
  * optional held-out evaluation on seeds disjoint from training;
  * optional asynchronous sample/learn (`async_steps=k`): the next batches are collected while a
    step trains, with samplers at most k updates old (rebn/async_loop.py); off by default.

Modules: `config` (the keys and their checks), `credit` (returns, ReBN advantages, Datums),
`loop` (the training loop), `async_loop` (the background sampler of `async_steps`).
"""

from gemtinker.recipes.rebn.config import Config, config_from_argv, dump_config, learning_rate_at, resolve_log_dir, validate
from gemtinker.recipes.rebn.credit import build_batch
from gemtinker.recipes.rebn.loop import heldout_comparison, merge_fb_metrics, run, train

__all__ = [
    "Config",
    "build_batch",
    "config_from_argv",
    "dump_config",
    "heldout_comparison",
    "learning_rate_at",
    "merge_fb_metrics",
    "resolve_log_dir",
    "run",
    "train",
    "validate",
]
