"""GEM environments as tinker-cookbook RL environments.

`tinker_cookbook.rl.train.main` (cookbook 0.6.1, used unmodified) trains on an `RLDataset` of
`EnvGroupBuilder`s, each making a group of single-use `Env`s whose total rewards are centred
within the group (GRPO-style). This module maps GEM onto those types:

* `GemCookbookEnv` wraps one GEM env. Its observations are a chat conversation rendered by a
  cookbook renderer; each sampled reply is parsed with `renderer.parse_response`. A reply that
  does not parse cleanly (no stop token: truncated at `max_tokens`, or malformed) is sent to GEM
  as an empty action, so the env's own invalid-action / format-error path scores it (except with
  an `answer_prefix` prefill, where GEM always sees prefix + reply, as in the low-level trainer's
  `chat_boxed` template). Multi-turn games keep the conversation: the reply and GEM's next observation are appended, so with a
  renderer that has the extension property (e.g. `qwen3_instruct`) a whole episode packs into one
  training Datum.
* `GemEnvGroupBuilder` makes `group_size` GEM envs in one state with
  `gemtinker.envs.groups.make_group_gem_envs`, so the group plays one task.
* `GemRLDataset` / `GemDatasetBuilder` hand out `groups_per_batch` builders per batch with
  distinct seeds for every group of every batch.

Everything here talks to the model only through the cookbook (and so the `tinker` SDK): it runs
unchanged against gemtinker's embedded server or hosted Tinker.

Modules: `prompts` (templates, prefill, renderer choice), `env` (`GemCookbookEnv`), `dataset`
(group builder, dataset, dataset builder), `train` (`python -m gemtinker.cookbook_train`: the
cookbook `Config` for GEM's keys, and the backend). GEM env groups themselves are built by
`gemtinker.envs.groups`. Nothing is imported here, so `train`'s `--help` does not load the
cookbook's modules.
"""
