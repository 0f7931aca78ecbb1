"""Attention for the engine's Hugging Face models: transformers' SDPA path, except that on the
CPU a grouped-query layer given a mask reads its grouped keys and values directly.

transformers copies every key/value head once per query head it serves (`repeat_kv`) whenever
an attention mask is given, because CUDA's fused kernels then fall back to the math kernel. The
CPU's flash kernel takes the grouped heads itself (`enable_gqa`), with the same numbers. Every
learner pass with a tree mask used to copy its keys and values (SmolLM2-135M: 3 heads for 9),
and keep the copies for the backward. Measured on 8 datums of bench/train.py's batch c (bf16
learner, 3 alternations in one process): 8.6, 10.2, 10.4 s against 10.2, 10.7, 12.7 s, peak
heap 1.19-1.23 GiB against 1.35 GiB, logprobs equal (max difference 0.0).

A learner pass whose rows differ in length can run without padding (`RowLayout`): its linears,
norms and MLPs see only real tokens, laid end to end, and attention alone pads them into rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

NAME = "gemtinker_sdpa"


@dataclass(frozen=True)
class RowLayout:
    """A pass of rows of different lengths, run as one sequence of their real tokens.

    The decoder sees a (1, tokens) batch: every row's tokens, end to end, with their own
    position ids. Attention, the only place rows must stay apart, pads queries (here) and keys
    (the learner's cache) into (rows, length) slots and runs under the pass's (rows, 1, length,
    keys) mask; its output returns to the flat layout. Linears, norms and MLPs then skip the
    padding slots: one make-run step (bench/train.py batch a) pads 993 tokens to 1134.

    slot_token: (rows * length,) the flat token in each slot. A padding slot names its row's
        first token: any real token will do, because the mask lets a padding query see only
        its own slot and its output is dropped, so no gradient flows through it.
    token_slot: (tokens,) the slot of each flat token.
    """

    rows: int
    length: int
    slot_token: torch.Tensor
    token_slot: torch.Tensor

    @classmethod
    def of(cls, lengths: list[int], device: torch.device | str = "cpu") -> RowLayout:
        rows, length = len(lengths), max(lengths)
        n = torch.tensor(lengths)
        starts = torch.cumsum(n, 0) - n
        j = torch.arange(length)
        slot_token = torch.where(j[None, :] < n[:, None], starts[:, None] + j[None, :], starts[:, None])
        token_slot = torch.cat([b * length + torch.arange(k) for b, k in enumerate(lengths)])
        return cls(rows, length, slot_token.reshape(-1).to(device), token_slot.to(device))

    @property
    def starts(self) -> list[int]:
        """Each row's first flat token."""
        return self.slot_token.view(self.rows, self.length)[:, 0].tolist()

    def pad(self, states: torch.Tensor) -> torch.Tensor:
        """(1, heads, tokens, head_dim) -> (rows, heads, length, head_dim)."""
        flat = states[0].transpose(0, 1)
        return flat.index_select(0, self.slot_token).view(self.rows, self.length, *flat.shape[1:]).transpose(1, 2)

    def unpad(self, out: torch.Tensor) -> torch.Tensor:
        """(rows, length, heads, head_dim) -> (1, tokens, heads, head_dim)."""
        return out.reshape(self.rows * self.length, *out.shape[2:]).index_select(0, self.token_slot)[None]


def grouped_sdpa_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         is_causal: bool | None = None, row_layout: RowLayout | None = None,
                         **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface. With `row_layout` the queries come flat and
    the keys and values padded (the learner's cache pads them); the output goes back flat."""
    if row_layout is None:
        return _grouped_sdpa(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    out, _ = _grouped_sdpa(module, row_layout.pad(query), key, value, attention_mask, dropout, scaling, is_causal,
                           **kwargs)
    return row_layout.unpad(out), None


def _grouped_sdpa(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    grouped = getattr(module, "num_key_value_groups", 1) > 1
    if (query.device.type != "cpu" or attention_mask is None or not grouped or query.shape[2] == 1
            or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def runs_grouped_sdpa(model: nn.Module) -> bool:
    """Whether `model` attends through `grouped_sdpa_forward` (so it accepts a `row_layout`)."""
    return getattr(model.config, "_attn_implementation", None) == NAME


def use_grouped_sdpa(model: nn.Module) -> bool:
    """Switch a model that runs transformers' SDPA attention to `grouped_sdpa_forward`; True if
    switched (models on another attention implementation are left as they are)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(NAME, grouped_sdpa_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # masks are built as for SDPA
    model.set_attn_implementation(NAME)
    return True
