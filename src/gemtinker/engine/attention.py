"""Attention for the engine's Hugging Face models: transformers' SDPA path, except that on the
CPU a grouped-query layer given a mask reads its grouped keys and values directly.

transformers copies every key/value head once per query head it serves (`repeat_kv`) whenever
an attention mask is given, because CUDA's fused kernels then fall back to the math kernel. The
CPU's flash kernel takes the grouped heads itself (`enable_gqa`), with the same numbers. Every
learner pass with a tree mask used to copy its keys and values (SmolLM2-135M: 3 heads for 9),
and keep the copies for the backward. Measured on 8 datums of bench/train.py's batch c (bf16
learner, 3 alternations in one process): 8.6, 10.2, 10.4 s against 10.2, 10.7, 12.7 s, peak
heap 1.19-1.23 GiB against 1.35 GiB, logprobs equal (max difference 0.0).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

NAME = "gemtinker_sdpa"


def grouped_sdpa_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    grouped = getattr(module, "num_key_value_groups", 1) > 1
    if (query.device.type != "cpu" or attention_mask is None or not grouped or query.shape[2] == 1
            or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


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
