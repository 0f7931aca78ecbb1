"""Groups and datasets: `GemEnvGroupBuilder` (one GEM task, `group_size` envs),
`GemRLDataset` (distinct seeds per group and batch) and `GemDatasetBuilder` (the cookbook's
`dataset_builder`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import chz
from tinker_cookbook import renderers
from tinker_cookbook.rl.types import Env, EnvGroupBuilder, RLDataset, RLDatasetBuilder
from tinker_cookbook.tokenizer_utils import get_tokenizer

from gemtinker.envs.groups import group_prototype, make_group_gem_envs
from gemtinker.recipes.cookbook.env import GemCookbookEnv, with_suffix
from gemtinker.recipes.cookbook.prompts import PROMPT_TEMPLATES, default_renderer_name, resolve_answer_prefix



@dataclass(frozen=True)
class GemEnvGroupBuilder(EnvGroupBuilder):
    """`group_size` copies of one GEM task. Holds only names and numbers (picklable, so the
    cookbook's rollout executors can ship it); the envs are built in `make_envs`."""

    env_id: str
    env_kwargs_json: str | None
    seed: int
    group_size: int
    renderer: renderers.Renderer
    prompt_type: str = "general"
    system_prompt: str | None = None
    math_dataset: str = "auto"
    answer_prefix: str = ""

    async def make_envs(self) -> Sequence[Env]:
        gem_envs, obs, info = make_group_gem_envs(
            self.env_id, self.env_kwargs_json, self.seed, self.group_size, self.math_dataset
        )
        obs = with_suffix(obs, info)
        return [
            GemCookbookEnv(e, obs, self.renderer, self.prompt_type, self.system_prompt, self.answer_prefix)
            for e in gem_envs
        ]

    def logging_tags(self) -> list[str]:
        # "rg:simple_equations" -> metrics under env/rg/... and env/simple_equations/...
        return [t for t in self.env_id.split(":") if t]


class GemRLDataset(RLDataset):
    """`n_batches` batches of `groups_per_batch` groups; group g of batch b uses seed
    `seed + b * groups_per_batch + g`, so no two groups of a run share a seed."""

    def __init__(
        self,
        *,
        env_id: str,
        env_kwargs_json: str | None,
        renderer: renderers.Renderer,
        group_size: int,
        groups_per_batch: int,
        n_batches: int,
        seed: int,
        prompt_type: str = "general",
        system_prompt: str | None = None,
        math_dataset: str = "auto",
        answer_prefix: str = "",
    ) -> None:
        if group_size < 1 or groups_per_batch < 1 or n_batches < 0:
            raise ValueError(
                f"need group_size >= 1, groups_per_batch >= 1, n_batches >= 0; got "
                f"{group_size}, {groups_per_batch}, {n_batches}"
            )
        self.env_id = env_id
        self.env_kwargs_json = env_kwargs_json
        self.renderer = renderer
        self.group_size = group_size
        self.groups_per_batch = groups_per_batch
        self.n_batches = n_batches
        self.seed = seed
        self.prompt_type = prompt_type
        self.system_prompt = system_prompt
        self.math_dataset = math_dataset
        self.answer_prefix = answer_prefix

    def seed_for(self, batch: int, group: int) -> int:
        return self.seed + batch * self.groups_per_batch + group

    def get_batch(self, index: int) -> Sequence[EnvGroupBuilder]:
        if not 0 <= index < self.n_batches:
            raise IndexError(f"batch {index} out of range (dataset has {self.n_batches} batches)")
        return [
            GemEnvGroupBuilder(
                env_id=self.env_id,
                env_kwargs_json=self.env_kwargs_json,
                seed=self.seed_for(index, g),
                group_size=self.group_size,
                renderer=self.renderer,
                prompt_type=self.prompt_type,
                system_prompt=self.system_prompt,
                math_dataset=self.math_dataset,
                answer_prefix=self.answer_prefix,
            )
            for g in range(self.groups_per_batch)
        ]

    def __len__(self) -> int:
        return self.n_batches


# Test-set seeds start far from training seeds so evaluation tasks are not trained on.
TEST_SEED_OFFSET = 1_000_000_000


@chz.chz
class GemDatasetBuilder(RLDatasetBuilder):
    env_id: str
    model_name_for_tokenizer: str
    renderer_name: str | None = None
    prompt_type: str = "general"
    group_size: int
    groups_per_batch: int
    n_batches: int = 100
    env_kwargs_json: str | None = None
    seed: int = 0
    system_prompt: str | None = None
    # Where `math:*` questions come from: auto | generated | hub | a local file (gemtinker.envs).
    math_dataset: str = "auto"
    # Groups in the test set the cookbook evaluates every `eval_every` steps (0: no test set).
    n_test_groups: int = 0
    test_group_size: int = 1
    # Prefill for every assistant reply: "" (none), "boxed" (`\boxed{`), or literal text.
    answer_prefix: str = ""

    async def __call__(self) -> tuple[RLDataset, RLDataset | None]:
        if self.prompt_type not in PROMPT_TEMPLATES:
            raise ValueError(f"prompt_type must be one of {sorted(PROMPT_TEMPLATES)}, got {self.prompt_type!r}")
        # Fail early (before any rollout) on a bad env id, kwargs or math dataset.
        group_prototype(self.env_id, self.env_kwargs_json, self.math_dataset)
        tokenizer = get_tokenizer(self.model_name_for_tokenizer)
        renderer_name = self.renderer_name or default_renderer_name(self.model_name_for_tokenizer, tokenizer)
        renderer = renderers.get_renderer(renderer_name, tokenizer, model_name=self.model_name_for_tokenizer)
        common = dict(
            env_id=self.env_id,
            env_kwargs_json=self.env_kwargs_json,
            renderer=renderer,
            prompt_type=self.prompt_type,
            system_prompt=self.system_prompt,
            math_dataset=self.math_dataset,
            answer_prefix=resolve_answer_prefix(self.answer_prefix),
        )
        train = GemRLDataset(
            group_size=self.group_size,
            groups_per_batch=self.groups_per_batch,
            n_batches=self.n_batches,
            seed=self.seed,
            **common,
        )
        test = None
        if self.n_test_groups > 0:
            test = GemRLDataset(
                group_size=self.test_group_size,
                groups_per_batch=self.n_test_groups,
                n_batches=1,
                seed=self.seed + TEST_SEED_OFFSET,
                **common,
            )
        return train, test
