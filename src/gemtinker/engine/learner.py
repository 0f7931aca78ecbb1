"""The learner: forward and forward_backward over prefix-shared, memory-bounded micro-batches.

One call's datums are packed into trie rows (`packing.py`): tokens that several datums share as a
prefix are computed once, under a tree attention mask with the original position ids. Rows are
grouped into micro-batches that bound the padded token count.

Log-probabilities are computed in chunks of nodes, and the loss's backward through the
unembedding runs chunk by chunk, right after that chunk's forward: every Tinker loss is a sum
over target positions of a function of that position's logprob, so a chunk's gradient is known
as soon as its logprobs are. No (tokens x vocab) tensor outlives its chunk, and positions whose
gradient is exactly zero (weight 0; RL losses at advantage 0) are scored without autograd.
The decoder's backward then runs once, from the accumulated gradient of its output.

Each (datum, position, target) is an "entry". Several entries can sit on one node: datums that
share a prefix but continue differently, or (N, K) cross-entropy targets. Each gets its own
logprob, loss inputs and gradient, so results equal the unpacked computation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .lora import low_precision_compute
from .losses import LossDef, MetricTotals, compute_loss
from .packing import PackedRow, group_rows, pack
from .validation import CheckedDatum


@dataclass(frozen=True)
class LearnerLimits:
    """Sizes that bound time and memory of one micro-batch.

    max_tokens: padded tokens per micro-batch (rows x longest row). Activations kept for the
        decoder's backward scale with it: for SmolLM2-135M with bf16 matmuls and an fp32
        residual stream about 1.3 GB at 1024 tokens, 0.8 GB at 512, 2.6 GB at 2048, at the
        same throughput (rows are short anyway).
    max_row_tokens: longest packed row, unless one datum is longer (see packing.py: attention
        cost grows with the square of a row's length).
    logit_chunk: nodes per unembedding chunk; each chunk holds a few (chunk x vocab) fp32
        tensors, about 0.2 GB each at 1024 nodes and a 49k vocabulary.
    min_shared: leading tokens two datums must share to go into one row.
    """

    max_tokens: int = 512
    max_row_tokens: int = 512
    logit_chunk: int = 512
    min_shared: int = 8


@dataclass
class _Entries:
    """The micro-batch's entries, datum by datum: which node, which target, which loss inputs."""

    node: np.ndarray  # (E,) flat node index into the (rows x longest row) hidden states
    target: np.ndarray  # (E,) token id
    inputs: dict[str, torch.Tensor]  # loss inputs, each (E,)
    datum_slices: list[tuple[int, slice]]  # datum index -> its entries


def _row_tensors(rows: list[PackedRow]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Token ids, position ids and the (B, 1, L, L) tree mask (None when plain causal suffices)."""
    length = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    pos = torch.zeros(len(rows), length, dtype=torch.long)
    plain = True
    for b, row in enumerate(rows):
        n = len(row)
        ids[b, :n] = torch.tensor(row.tokens)
        pos[b, :n] = torch.tensor(row.positions)
        plain = plain and n == length and row.parents == list(range(-1, n - 1))
    if plain:  # every row one full-length chain: the causal kernel needs no mask
        return ids, pos, None
    mask = torch.zeros(len(rows), 1, length, length, dtype=torch.bool)
    for b, row in enumerate(rows):
        n = len(row)
        mask[b, 0, :n, :n] = torch.from_numpy(row.ancestor_mask())
        pad = torch.arange(n, length)
        mask[b, 0, pad, pad] = True  # padding attends to itself only, so no row is all -inf
    return ids, pos, mask


def _gather_entries(
    datums: list[CheckedDatum], indices: list[int], row_slot: dict[int, int], length: int,
    nodes_of: list[np.ndarray], loss: LossDef,
) -> _Entries:
    nodes, targets, slices = [], [], []
    keys = [k for k in loss.required if k != "target_tokens"]
    with_weights = any("weights" in datums[i].inputs for i in indices)
    cols: dict[str, list[torch.Tensor]] = {k: [] for k in keys + (["weights"] if with_weights else [])}
    start = 0
    for i in indices:
        d = datums[i]
        tgt = d.inputs["target_tokens"]
        k = 1 if tgt.ndim == 1 else tgt.shape[1]
        flat_nodes = row_slot[i] * length + nodes_of[i]
        nodes.append(np.repeat(flat_nodes, k))
        targets.append(tgt.reshape(-1).numpy())
        for key in keys:
            cols[key].append(d.inputs[key].reshape(-1))
        if with_weights:
            w = d.inputs.get("weights")
            cols["weights"].append(torch.ones(tgt.numel()) if w is None else w.reshape(-1))
        slices.append((i, slice(start, start + tgt.numel())))
        start += tgt.numel()
    return _Entries(
        np.concatenate(nodes), np.concatenate(targets), {k: torch.cat(v) for k, v in cols.items()}, slices
    )


class Learner:
    """Computes target logprobs, the loss and (optionally) LoRA gradients for one call.

    `model` is the HF causal LM to run (its LoRA wrappers read the active adapter); `loss_name`
    and `cfg` were resolved and `datums` validated by the caller.
    """

    def __init__(self, model: nn.Module, device: torch.device, limits: LearnerLimits | None = None,
                 share_prefixes: bool = True, compute_dtype: torch.dtype | None = None):
        self.model = model
        self.device = device
        # None: compute in the model's dtype. bf16: linears run in bf16 (lora.low_precision_compute),
        # attention under autocast, the residual stream, norms and log-softmax in fp32.
        self.compute_dtype = compute_dtype
        self.limits = limits or LearnerLimits()
        self.share_prefixes = share_prefixes
        self.last_stats: dict[str, int] = {}

    def run(
        self, datums: list[CheckedDatum], loss: LossDef, loss_name: str, cfg: Mapping[str, float], backward: bool
    ) -> tuple[list[np.ndarray], dict[str, float]]:
        lim = self.limits
        packed = pack([d.tokens.numpy() for d in datums], lim.max_row_tokens, lim.min_shared, self.share_prefixes)
        outputs: list[np.ndarray] = [np.empty(0, dtype=np.float32)] * len(datums)
        totals = MetricTotals()
        padded = 0
        for group in group_rows(packed.rows, lim.max_tokens):
            rows = [packed.rows[r] for r in group]
            padded += len(rows) * max(len(r) for r in rows)
            self._micro_batch(datums, rows, packed.nodes_of, loss, loss_name, cfg, backward, outputs, totals)
        datum_tokens = sum(d.tokens.shape[0] for d in datums)
        self.last_stats = {
            "datum_tokens": datum_tokens,
            "packed_tokens": packed.packed_tokens,
            "padded_tokens": padded,
            "rows": len(packed.rows),
        }
        return outputs, totals.result(datum_tokens)

    @contextlib.contextmanager
    def _low_precision(self) -> Iterator[None]:
        if self.compute_dtype is None:
            yield
            return
        with low_precision_compute(self.compute_dtype), torch.autocast(self.device.type, dtype=self.compute_dtype):
            yield

    def _micro_batch(
        self, datums, rows: list[PackedRow], nodes_of, loss: LossDef, loss_name: str, cfg, backward: bool,
        outputs: list[np.ndarray], totals: MetricTotals,
    ) -> None:
        ids, pos, mask = _row_tensors(rows)
        length = ids.shape[1]
        row_slot = {i: b for b, row in enumerate(rows) for i in row.datums}
        indices = [i for row in rows for i in row.datums]
        ent = _gather_entries(datums, indices, row_slot, length, nodes_of, loss)

        dev = self.device
        with torch.set_grad_enabled(backward), self._low_precision():
            hidden = self.model.get_decoder()(
                input_ids=ids.to(dev), position_ids=pos.to(dev),
                attention_mask=None if mask is None else mask.to(dev), use_cache=False,
            ).last_hidden_state
        flat = hidden.detach().reshape(-1, hidden.shape[-1])
        if backward:
            flat.requires_grad_(True)

        # Order nodes so those whose entries carry gradient come first; chunks never mix the two.
        grad_entry = loss.gradient_mask(ent.inputs, len(ent.node)).numpy() if backward else np.zeros(len(ent.node), bool)
        grad_nodes = np.unique(ent.node[grad_entry])
        other_nodes = np.setdiff1d(np.unique(ent.node), grad_nodes, assume_unique=True)
        node_order = np.concatenate([grad_nodes, other_nodes])
        rank = np.empty(flat.shape[0], dtype=np.int64)
        rank[node_order] = np.arange(len(node_order))
        entry_rank = rank[ent.node]
        entry_order = np.argsort(entry_rank, kind="stable")
        sorted_rank = entry_rank[entry_order]

        chunk = self.limits.logit_chunk
        bounds = [(a, min(a + chunk, len(grad_nodes)), True) for a in range(0, len(grad_nodes), chunk)]
        bounds += [(a, min(a + chunk, len(node_order)), False) for a in range(len(grad_nodes), len(node_order), chunk)]
        lm_head = self.model.get_output_embeddings()
        entry_lp = torch.empty(len(ent.node), dtype=torch.float32)
        for a, b, with_grad in bounds:
            lo, hi = np.searchsorted(sorted_rank, [a, b])
            sel = entry_order[lo:hi]
            sel_t = torch.from_numpy(sel)
            local = torch.from_numpy(sorted_rank[lo:hi] - a).to(dev)
            tgt = torch.from_numpy(ent.target[sel]).to(dev)
            chunk_inputs = {k: v[sel_t].to(dev) for k, v in ent.inputs.items()}
            with torch.set_grad_enabled(with_grad), self._low_precision():
                logits = lm_head(flat[torch.from_numpy(node_order[a:b]).to(dev)])
                if logits.dtype in (torch.bfloat16, torch.float16):
                    logits = logits.float()
                lse = torch.logsumexp(logits, dim=-1)
                lp = logits[local, tgt] - lse[local]
                del logits
                total, metrics = compute_loss(loss_name, lp, chunk_inputs, cfg)
                if with_grad:
                    total.backward()
            entry_lp[sel_t] = lp.detach().float().cpu()
            totals.add(metrics, len(sel))
        if backward and flat.grad is not None:
            hidden.backward(flat.grad.view_as(hidden))

        for i, sl in ent.datum_slices:
            shape = tuple(datums[i].inputs["target_tokens"].shape)
            outputs[i] = entry_lp[sl].numpy().reshape(shape)
