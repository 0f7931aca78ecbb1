"""The plain learner: one padded row per datum, full-vocabulary logits for a whole micro-batch.

This was the engine's learner before prefix-shared packing (learner.py). It stays as the
reference that the packed learner is tested against (tests/engine/test_learner.py) and measured against
(bench/train.py); `Engine(learner="unpacked")` selects it.

Teacher-forced log-probabilities of target tokens, batched with right padding.

Right padding never changes the real positions' results (attention is causal and padded keys
come after every real query), and the unembedding only runs on real positions, so padded
batches cost little extra and per-datum logprobs match an unbatched forward.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from .losses import LossDef, MetricTotals, compute_loss
from .packing import group_by_length
from .validation import CheckedDatum


def micro_batches(datums: list[CheckedDatum], max_tokens: int) -> list[list[int]]:
    """Group datum indices (sorted by length) so padded size B * T_max stays under max_tokens."""
    return group_by_length([d.tokens.shape[0] for d in datums], max_tokens)


def hidden_states(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    b, t = input_ids.shape
    position_ids = torch.arange(t, device=input_ids.device).unsqueeze(0).expand(b, t)
    out = model.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    )
    return out.last_hidden_state


def target_logprobs(
    model: nn.Module, datums: list[CheckedDatum], device: torch.device
) -> list[torch.Tensor]:
    """Per datum: log p(target_tokens[i] | tokens[:i+1]) with the shape of target_tokens (fp32)."""
    lengths = [d.tokens.shape[0] for d in datums]
    t_max = max(lengths)
    ids = torch.zeros(len(datums), t_max, dtype=torch.long)
    mask = torch.zeros(len(datums), t_max, dtype=torch.long)
    for r, d in enumerate(datums):
        ids[r, : lengths[r]] = d.tokens
        mask[r, : lengths[r]] = 1
    ids, mask = ids.to(device), mask.to(device)
    h = hidden_states(model, ids, None if bool(mask.all()) else mask)
    h = h[mask.bool()]  # (M, H): real positions, datum by datum
    logits = model.get_output_embeddings()(h)  # (M, V)
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    # One gather over all real positions. Slicing `logits` per datum instead would make autograd
    # materialise a zero-filled (M, V) gradient per datum: the dominant cost for large vocabularies.
    targets = [d.inputs["target_tokens"] for d in datums]
    k_max = max(1 if t.ndim == 1 else t.shape[1] for t in targets)
    index = torch.zeros(logits.shape[0], k_max, dtype=torch.long)
    start = 0
    for n, tgt in zip(lengths, targets):
        index[start : start + n, : (1 if tgt.ndim == 1 else tgt.shape[1])] = tgt.reshape(n, -1)
        start += n
    lp_all = logits.gather(1, index.to(device)) - lse  # (M, k_max); padded columns unused
    out: list[torch.Tensor] = []
    start = 0
    for n, tgt in zip(lengths, targets):
        block = lp_all[start : start + n]
        out.append(block[:, 0] if tgt.ndim == 1 else block[:, : tgt.shape[1]])
        start += n
    return out


def run_unpacked(
    model: nn.Module, device: torch.device, max_tokens: int, datums: list[CheckedDatum], loss: LossDef,
    loss_name: str, cfg: Mapping[str, float], backward: bool,
) -> tuple[list[np.ndarray], dict[str, float]]:
    """Same contract as `Learner.run`: per-datum logprobs and summed metrics."""
    outputs: list[np.ndarray] = [np.empty(0, dtype=np.float32)] * len(datums)
    totals = MetricTotals()
    for idx in micro_batches(datums, max_tokens):
        group = [datums[i] for i in idx]
        with torch.set_grad_enabled(backward):
            lps = target_logprobs(model, group, device)
            flat_lp = torch.cat(lps)
            flat_in = {
                k: torch.cat([d.inputs[k] for d in group]).to(device) for k in loss.required if k != "target_tokens"
            }
            if any("weights" in d.inputs for d in group):  # missing weights = 1
                flat_in["weights"] = torch.cat([
                    d.inputs.get("weights", torch.ones(d.inputs["target_tokens"].shape)) for d in group
                ]).to(device)
            total, metrics = compute_loss(loss_name, flat_lp, flat_in, cfg)
            if backward:
                total.backward()
        totals.add(metrics, int(flat_lp.shape[0]))
        for i, lp in zip(idx, lps):
            outputs[i] = lp.detach().float().cpu().numpy()
    return outputs, totals.result(sum(d.tokens.shape[0] for d in datums))
