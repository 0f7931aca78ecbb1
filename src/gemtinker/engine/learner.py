"""The learner: forward and forward_backward over prefix-shared, memory-bounded micro-batches.

One call's datums are packed into trie rows (`packing.py`): tokens that several datums share as a
prefix are computed once, under a tree attention mask with the original position ids. Rows are
grouped into micro-batches that bound the padded token count; a micro-batch whose rows differ in
length runs its linears on the real tokens only (`attention.RowLayout`).

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
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .attention import RowLayout, runs_grouped_sdpa
from .lora import low_precision_compute
from .losses import LossDef, MetricTotals, compute_loss
from .packing import PackedBatch, PackedRow, group_rows, pack
from .validation import CheckedDatum


@dataclass(frozen=True)
class LearnerLimits:
    """Sizes that bound time and memory of one micro-batch.

    max_tokens: padded tokens per micro-batch of plain or trunk rows (rows x longest row).
        Activations kept for the decoder's backward scale with it: for SmolLM2-135M with bf16
        matmuls and an fp32 residual stream about 1.3 GB at 1024 tokens, 0.8 GB at 512, 2.6 GB
        at 2048, at the same throughput (rows are short anyway).
    branch_tokens: padded tokens per micro-batch of branch rows. A trunk's activations stay
        alive while its branches run, so a call keeps those of up to max_tokens + branch_tokens.
        Branch passes used to get what the trunk left of max_tokens: an RL group's 255-token
        replies then ran one per pass beside their 405-token trunk. Two per pass ran 8 datums
        of bench/train.py's batch c 9-14% faster (3 alternations; four per pass 1-3% more),
        for 0.4 GiB more peak heap (0.94 -> 1.35 GiB): a pass's fixed cost (about a hundred
        small ops per layer, each way) is shared by more tokens.
    max_row_tokens: longest packed row, unless one datum is longer (see packing.py: attention
        cost grows with the square of a row's length). Branch rows carry what does not fit
        without copying the shared start, so short rows cost no extra tokens: 256 ran batches
        a and b of bench/train.py 5% and 12% faster than 512 (fp32, 2 reps each), with the
        same tokens computed and a smaller trunk kept alive while its branches run.
    logit_chunk: nodes per unembedding chunk; each chunk holds a few (chunk x vocab) fp32
        tensors, about 0.2 GB each at 1024 nodes and a 49k vocabulary.
    min_shared: leading tokens two datums must share to go into one row.
    """

    max_tokens: int = 512
    branch_tokens: int = 512
    max_row_tokens: int = 256
    logit_chunk: int = 512
    min_shared: int = 8


@dataclass(frozen=True)
class _Part:
    """Positions [lo, hi) of one datum, computed in row `slot` of a pass."""

    datum: int
    lo: int
    hi: int
    slot: int


@dataclass
class _Entries:
    """A pass's entries, part by part: which node, which target, which loss inputs."""

    node: np.ndarray  # (E,) flat node index into the pass's hidden states (row start + node)
    target: np.ndarray  # (E,) token id
    inputs: dict[str, torch.Tensor]  # loss inputs, each (E,)
    pieces: list[tuple[int, slice, slice]]  # (datum, its flat output cells, the entries holding them)


def _row_tensors(
    rows: list[PackedRow], need_mask: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Token ids, position ids and the (B, 1, L, L) tree mask (None when plain causal suffices
    and `need_mask` is false)."""
    length = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    pos = torch.zeros(len(rows), length, dtype=torch.long)
    plain = not need_mask
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
    datums: list[CheckedDatum], parts: list[_Part], starts: list[int], nodes_of: list[np.ndarray], loss: LossDef
) -> _Entries:
    nodes, targets, pieces = [], [], []
    keys = [k for k in loss.required if k != "target_tokens"]
    with_weights = any("weights" in datums[p.datum].inputs for p in parts)
    cols: dict[str, list[torch.Tensor]] = {k: [] for k in keys + (["weights"] if with_weights else [])}
    start = 0
    for p in parts:
        d = datums[p.datum]
        tgt = d.inputs["target_tokens"]
        k = 1 if tgt.ndim == 1 else tgt.shape[1]
        cells = slice(p.lo * k, p.hi * k)
        nodes.append(np.repeat(starts[p.slot] + nodes_of[p.datum][p.lo:p.hi], k))
        targets.append(tgt.reshape(-1)[cells].numpy())
        for key in keys:
            cols[key].append(d.inputs[key].reshape(-1)[cells])
        if with_weights:
            w = d.inputs.get("weights")
            cols["weights"].append(torch.ones(cells.stop - cells.start) if w is None else w.reshape(-1)[cells])
        n = cells.stop - cells.start
        pieces.append((p.datum, cells, slice(start, start + n)))
        start += n
    return _Entries(
        np.concatenate(nodes), np.concatenate(targets), {k: torch.cat(v) for k, v in cols.items()}, pieces
    )


class _PadKV:
    """Passed as the decoder's cache (transformers hands it each layer's keys and values after
    RoPE) in a pass without padding: pads them into the rows that attention runs on."""

    def __init__(self, layout: RowLayout | None) -> None:
        self.layout = layout

    def _pad(self, key_states, value_states):
        if self.layout is None:
            return key_states, value_states
        return self.layout.pad(key_states), self.layout.pad(value_states)

    def update(self, key_states, value_states, layer_idx, **_):
        return self._pad(key_states, value_states)


class _RecordKV(_PadKV):
    """The cache of a trunk pass: also keeps each layer's (padded) keys and values, in the
    autograd graph, for the branch passes."""

    def __init__(self, layout: RowLayout | None) -> None:
        super().__init__(layout)
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(self, key_states, value_states, layer_idx, **_):
        key_states, value_states = self._pad(key_states, value_states)
        self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
        return key_states, value_states


class _TrunkKV(_PadKV):
    """The cache of a branch pass: each branch row's attention sees its trunk row's keys and
    values (selected per row by `trunk_slot`; only the trunk positions `visible` when given)
    before its own."""

    def __init__(self, keys: dict[int, torch.Tensor], values: dict[int, torch.Tensor], trunk_slot: torch.Tensor,
                 visible: torch.Tensor | None = None, layout: RowLayout | None = None):
        super().__init__(layout)
        self.keys, self.values, self.trunk_slot, self.visible = keys, values, trunk_slot, visible

    def update(self, key_states, value_states, layer_idx, **_):
        key_states, value_states = self._pad(key_states, value_states)
        k = self.keys[layer_idx].index_select(0, self.trunk_slot)
        v = self.values[layer_idx].index_select(0, self.trunk_slot)
        if self.visible is not None:
            k, v = k.index_select(2, self.visible), v.index_select(2, self.visible)
        k, v = k.to(key_states.dtype), v.to(value_states.dtype)
        return torch.cat([k, key_states], dim=2), torch.cat([v, value_states], dim=2)


def _exp_shifted_(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn `logits` (nodes x vocab) in place into exp(logits - rowmax); returns (row sums of
    that, rowmax). logsumexp = log(sum) + rowmax, the softmax is the tensor over its row sum.
    torch.logsumexp computes the same through a (nodes x vocab) temporary."""
    rowmax = logits.amax(dim=-1, keepdim=True)
    sums = logits.sub_(rowmax).exp_().sum(dim=-1)
    return sums, rowmax.squeeze(-1)


def _logsumexp_(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dimension; overwrites `logits` (no autograd)."""
    sums, rowmax = _exp_shifted_(logits)
    return sums.log_().add_(rowmax)


class _TargetLogprob(torch.autograd.Function):
    """lp[e] = logits[node[e], target[e]] - logsumexp(logits[node[e]]) for each entry e.

    The same values as indexing a log-softmax, in two passes fewer over the (chunk x vocab)
    logits: the forward turns them in place into exp(logits - rowmax), which the backward scales
    into the gradient, d lp[e] / d logits[n] = onehot(target[e]) - softmax(logits[n]) for
    n = node[e]: softmax times minus each node's summed entry gradients, plus those gradients at
    the targets. Autograd's log-softmax allocates three (chunk x vocab) temporaries for it; the
    logsumexp-then-recompute version before this one read and wrote the logits four times more
    (measured in docs/learner-2026-12-06.md). The logits are consumed: call `target_logprob`."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, node: torch.Tensor, target: torch.Tensor):
        picked = logits[node, target]
        sums, rowmax = _exp_shifted_(logits)
        ctx.mark_dirty(logits)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, sums, node, target)
        return picked - (sums.log() + rowmax)[node], logits

    @staticmethod
    def backward(ctx, grad: torch.Tensor | None, _grad_exp: None):
        exp_shifted, sums, node, target = ctx.saved_tensors
        if grad is None:
            return None, None, None
        per_node = torch.zeros_like(sums).index_add_(0, node, grad)
        g = exp_shifted.mul_((-per_node / sums)[:, None])  # not needed again
        g.index_put_((node, target), grad, accumulate=True)
        return g, None, None


def target_logprob(logits: torch.Tensor, node: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`_TargetLogprob`: the entries' logprobs; `logits` (not a view) is overwritten."""
    return _TargetLogprob.apply(logits, node, target)[0]


class Learner:
    """Computes target logprobs, the loss and (optionally) LoRA gradients for one call.

    `model` is the HF causal LM to run (its LoRA wrappers read the active adapter); `loss_name`
    and `cfg` were resolved and `datums` validated by the caller.
    """

    def __init__(self, model: nn.Module, device: torch.device, limits: LearnerLimits | None = None,
                 share_prefixes: bool = True, compute_dtype: torch.dtype | None = None):
        self.model = model
        self.device = device
        # None: compute in the model's dtype. bf16: the decoder's linears run in bf16 with fp32
        # outputs (lora.low_precision_compute); attention, norms, the residual stream, the
        # unembedding's forward and the log-softmax stay fp32; the unembedding's backward (the
        # hidden states' gradient: no logprob depends on it) is bf16. Measured on SmolLM2 beside
        # the fp32 sampler (80 sampled replies, adapter after 4 Adam steps): mean logprob gap
        # (kl_v1) 1.9e-3 with everything under bf16 autocast, 1.1e-3 with an fp32 unembedding,
        # 3.7e-4 with fp32 attention as well; the unembedding is about a fifth of the matmul work.
        self.compute_dtype = compute_dtype
        self.limits = limits or LearnerLimits()
        self.share_prefixes = share_prefixes
        self.branch_rows = True  # False: a tree too big for a row is split with copies of its start
        self.narrow_branches = True  # False: a branch pass reads all of its trunk row's keys
        # False: a pass whose rows differ in length pads all of them (see attention.RowLayout)
        self.unpad_rows = runs_grouped_sdpa(model)
        self.last_stats: dict[str, int] = {}

    def run(
        self, datums: list[CheckedDatum], loss: LossDef, loss_name: str, cfg: Mapping[str, float], backward: bool
    ) -> tuple[list[np.ndarray], dict[str, float]]:
        lim = self.limits
        packed = pack([d.tokens.numpy() for d in datums], lim.max_row_tokens, lim.min_shared,
                      self.share_prefixes, self.branch_rows)
        flat_out = [np.empty(d.inputs["target_tokens"].numel(), dtype=np.float32) for d in datums]
        totals = MetricTotals()
        self._padded = self._scored = self._grad_nodes = self._narrow_passes = 0
        branches_of: dict[int, list[int]] = defaultdict(list)
        for r, row in enumerate(packed.rows):
            if row.trunk >= 0:
                branches_of[row.trunk].append(r)
        trunks = [r for r, row in enumerate(packed.rows) if row.trunk < 0]
        for group in group_rows([packed.rows[r] for r in trunks], lim.max_tokens):
            rows = [trunks[g] for g in group]
            branches = [b for r in rows for b in branches_of[r]]
            self._trunk_pass(datums, packed, rows, branches, loss, loss_name, cfg, backward, flat_out, totals)
        datum_tokens = sum(d.tokens.shape[0] for d in datums)
        self.last_stats = {
            "datum_tokens": datum_tokens,
            "packed_tokens": packed.packed_tokens,
            "padded_tokens": self._padded,  # tokens the decoder's linears ran on
            # nodes run through the unembedding, and those of them that also ran its backward
            "scored_nodes": self._scored,
            "gradient_nodes": self._grad_nodes,
            "rows": len(packed.rows),
            "branch_rows": len(packed.rows) - len(trunks),
            "narrow_branch_passes": self._narrow_passes,  # branch passes that read only the trunk keys they see
        }
        outputs = [out.reshape(tuple(d.inputs["target_tokens"].shape)) for out, d in zip(flat_out, datums)]
        return outputs, totals.result(datum_tokens)

    @contextlib.contextmanager
    def _low_precision(self) -> Iterator[None]:
        if self.compute_dtype is None:
            yield
            return
        with low_precision_compute(self.compute_dtype):
            yield

    def _layout(self, ids: torch.Tensor, pos: torch.Tensor, rows: list[PackedRow]
                ) -> tuple[torch.Tensor, torch.Tensor, RowLayout | None, list[int]]:
        """A pass's ids and position ids, flat when its rows differ in length (and the model's
        attention takes a layout); its layout; each row's first token in the hidden states."""
        length = ids.shape[1]
        if not self.unpad_rows or all(len(r) == length for r in rows):
            return ids, pos, None, [b * length for b in range(len(rows))]
        layout = RowLayout.of([len(r) for r in rows], self.device)
        real = layout.token_slot.cpu()
        return ids.reshape(-1)[real][None], pos.reshape(-1)[real][None], layout, layout.starts

    def _decoder(self, ids, pos, mask, cache, backward: bool, layout: RowLayout | None = None) -> torch.Tensor:
        dev = self.device
        self._padded += ids.numel()
        if layout is not None and cache is None:
            cache = _PadKV(layout)
        extra = {} if layout is None else {"row_layout": layout}
        with torch.set_grad_enabled(backward), self._low_precision():
            return self.model.get_decoder()(
                input_ids=ids.to(dev), position_ids=pos.to(dev),
                attention_mask=None if mask is None else mask.to(dev), cache=cache, use_cache=cache is not None,
                **extra,
            ).last_hidden_state

    def _trunk_pass(
        self, datums, packed: PackedBatch, rows: list[int], branches: list[int], loss: LossDef, loss_name: str,
        cfg, backward: bool, flat_out: list[np.ndarray], totals: MetricTotals,
    ) -> None:
        """Plain or trunk rows, then the branch rows that hang from them, then one backward."""
        prows = [packed.rows[r] for r in rows]
        ids, pos, mask = _row_tensors(prows, need_mask=bool(branches))
        ids, pos, layout, starts = self._layout(ids, pos, prows)
        slot = {r: s for s, r in enumerate(rows)}
        parts = [_Part(i, 0, datums[i].tokens.shape[0], slot[r]) for r in rows for i in packed.rows[r].datums]
        # a branch datum's positions before its split are nodes of the trunk
        parts += [_Part(i, 0, packed.split_of[i], slot[packed.rows[b].trunk]) for b in branches
                  for i in packed.rows[b].datums]
        record = _RecordKV(layout) if branches else None
        hidden = self._decoder(ids, pos, mask, record, backward, layout)
        ent = _gather_entries(datums, parts, starts, packed.nodes_of, loss)
        grad_hidden = self._score(hidden, ent, loss, loss_name, cfg, backward, flat_out, totals)
        if not branches:
            if grad_hidden is not None:
                hidden.backward(grad_hidden)
            return

        # The trunk's keys and values become leaves of the branch passes; their gradients
        # collect there and join the trunk's own backward at the end.
        assert record is not None and mask is not None
        keys = {i: k.detach().requires_grad_(backward) for i, k in record.keys.items()}
        values = {i: v.detach().requires_grad_(backward) for i, v in record.values.items()}
        # The trunk's activations stay alive while its branches run (LearnerLimits.branch_tokens);
        # a branch row longer than the budget still runs, alone.
        for group in group_rows([packed.rows[b] for b in branches], self.limits.branch_tokens):
            brows = [packed.rows[branches[g]] for g in group]
            b_ids, b_pos, own = _row_tensors(brows, need_mask=True)
            assert own is not None
            b_ids, b_pos, b_layout, b_starts = self._layout(b_ids, b_pos, brows)
            trunk_slot = torch.tensor([slot[row.trunk] for row in brows])
            attach = torch.tensor([row.attach for row in brows])
            seen = mask[trunk_slot, 0, attach]  # (B, trunk length): the attach node and its ancestors
            visible = None
            if self.narrow_branches:
                # Attention reads only the trunk keys some row of the pass sees: the CPU kernels'
                # time grows with every key, masked or not (an RL group's reply row, alone in its
                # pass: 406 keys instead of 512).
                visible = seen.any(0).nonzero().squeeze(1)
                seen = seen[:, visible]
                self._narrow_passes += 1
            full = torch.cat([seen[:, None, None, :].expand(-1, 1, own.shape[2], -1), own], dim=-1)
            for b, row in enumerate(brows):
                full[b, 0, len(row):, : seen.shape[1]] = False  # padding sees only itself
            cache = _TrunkKV(keys, values, trunk_slot.to(self.device),
                             None if visible is None else visible.to(self.device), b_layout)
            b_hidden = self._decoder(b_ids, b_pos, full, cache, backward, b_layout)
            b_slot = {branches[g]: s for s, g in enumerate(group)}
            b_parts = [_Part(i, packed.split_of[i], datums[i].tokens.shape[0], b_slot[branches[g]])
                       for g in group for i in packed.rows[branches[g]].datums]
            b_ent = _gather_entries(datums, b_parts, b_starts, packed.nodes_of, loss)
            b_grad = self._score(b_hidden, b_ent, loss, loss_name, cfg, backward, flat_out, totals)
            if b_grad is not None:
                b_hidden.backward(b_grad)
            del b_hidden
        if backward:
            outs, grads = ([hidden], [grad_hidden]) if grad_hidden is not None else ([], [])
            for layer, k in keys.items():
                for leaf, orig in ((k, record.keys[layer]), (values[layer], record.values[layer])):
                    if leaf.grad is not None:
                        outs.append(orig)
                        grads.append(leaf.grad)
            if outs:
                torch.autograd.backward(outs, grads)

    def _score(
        self, hidden: torch.Tensor, ent: _Entries, loss: LossDef, loss_name: str, cfg, backward: bool,
        flat_out: list[np.ndarray], totals: MetricTotals,
    ) -> torch.Tensor | None:
        """Logprobs of a pass's entries and the loss, chunk by chunk with each chunk's backward
        through the unembedding; returns the gradient for `hidden` (None if nothing needs one)."""
        dev = self.device
        flat = hidden.detach().reshape(-1, hidden.shape[-1])
        if backward:
            flat.requires_grad_(True)

        # Order nodes so those whose entries carry gradient come first; chunks never mix the two.
        grad_entry = loss.gradient_mask(ent.inputs, len(ent.node)).numpy() if backward else np.zeros(len(ent.node), bool)
        grad_nodes = np.unique(ent.node[grad_entry])
        other_nodes = np.setdiff1d(np.unique(ent.node), grad_nodes, assume_unique=True)
        node_order = np.concatenate([grad_nodes, other_nodes])
        self._scored += len(node_order)
        self._grad_nodes += len(grad_nodes)
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
            # The logits in the model's dtype (they are what the loss sees); with a low-precision
            # learner the unembedding's backward (the hidden-state gradient) runs in its dtype.
            with torch.set_grad_enabled(with_grad), self._low_precision():
                logits = lm_head(flat[torch.from_numpy(node_order[a:b]).to(dev)])
                lp = target_logprob(logits, local, tgt) if with_grad else \
                    logits[local, tgt] - _logsumexp_(logits)[local]
                del logits
                total, metrics = compute_loss(loss_name, lp, chunk_inputs, cfg)
                if with_grad:
                    total.backward()
            entry_lp[sel_t] = lp.detach().float().cpu()
            totals.add(metrics, len(sel))
        for datum, cells, entries in ent.pieces:
            flat_out[datum][cells] = entry_lp[entries].numpy()
        if backward and flat.grad is not None:
            return flat.grad.view_as(hidden)
        return None
