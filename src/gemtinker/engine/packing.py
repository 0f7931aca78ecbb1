"""Prefix-shared packing of training datums: a token trie per row, with a tree attention mask.

RL batches repeat themselves: a group's samples share their prompt, a multi-turn episode's turns
share the growing conversation, every turn of a game shares its instructions. A datum's hidden
state at position i depends only on its tokens[:i+1] (causal attention, position ids = i), so
datums that agree on their first k tokens have identical hidden states there. Packing merges
them into a trie: each distinct prefix becomes one node, computed once. A node attends to its
ancestors and itself (the tree mask) and keeps its original position id (its depth), so every
node's hidden state equals the unpacked one. Gradients through a shared node sum over the
datums that share it, which is what the unpacked batch computes too.

Rows are kept short on purpose. CPU attention kernels do not skip masked blocks, so a row's
attention cost grows with the square of its length whatever the mask hides (measured on a
2-core CPU, SmolLM2-135M bf16 decoder forward+backward per 2048 tokens: 2.0 s in rows of 256,
2.5 s in rows of 512, 3.4 s in rows of 1024). Hence: datums that share nothing never share a
row, and a tree larger than `max_row_tokens` is split, each part carrying its own copy of the
shared start.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class PackedRow:
    """One row of the packed batch: distinct trie nodes in an order where parents come first."""

    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)  # depth of the node = original position id
    parents: list[int] = field(default_factory=list)  # index of the parent node in this row, -1 for a root
    datums: list[int] = field(default_factory=list)  # datum indices placed in this row

    def __len__(self) -> int:
        return len(self.tokens)

    def ancestor_mask(self) -> np.ndarray:
        """(L, L) bool: entry [q, k] is True when node k is node q or one of its ancestors."""
        n = len(self.tokens)
        mask = np.zeros((n, n), dtype=bool)
        for q, p in enumerate(self.parents):  # parents come first, so their rows are complete
            if p >= 0:
                mask[q] = mask[p]
            mask[q, q] = True
        return mask


@dataclass
class PackedBatch:
    rows: list[PackedRow]
    row_of: list[int]  # datum index -> row index
    nodes_of: list[np.ndarray]  # datum index -> (N,) node index of each of its positions, in its row

    @property
    def packed_tokens(self) -> int:
        return sum(len(r) for r in self.rows)


def _common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def pack(token_lists: list[np.ndarray], max_row_tokens: int, min_shared: int = 1, share: bool = True) -> PackedBatch:
    """Merge datums into trie rows.

    Datums are visited in lexicographic token order, where the longest prefix a datum shares
    with any earlier one is the one it shares with its predecessor. A datum joins the current
    row when it shares at least `min_shared` leading tokens with the previous datum and its new
    nodes still fit in `max_row_tokens`; otherwise it opens a new row (a datum longer than the cap
    gets a row of its own length). `share=False` gives every datum a plain row of its own.
    """
    seqs = [tuple(int(t) for t in toks) for toks in token_lists]
    order = sorted(range(len(seqs)), key=lambda i: seqs[i])
    rows: list[PackedRow] = []
    row_of = [0] * len(seqs)
    nodes_of: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(seqs)
    prev: int | None = None
    for i in order:
        seq = seqs[i]
        shared = _common_prefix(seqs[prev], seq) if (share and prev is not None) else 0
        row = rows[-1] if rows else None
        if row is None or shared < min_shared or len(row) + len(seq) - shared > max_row_tokens:
            row = PackedRow()
            rows.append(row)
            shared = 0
        # Reuse the predecessor's nodes for the shared prefix; add new nodes for the rest.
        nodes = np.empty(len(seq), dtype=np.int64)
        if shared:
            nodes[:shared] = nodes_of[prev][:shared]  # type: ignore[index]
        parent = int(nodes[shared - 1]) if shared else -1
        for pos in range(shared, len(seq)):
            node = len(row.tokens)
            row.tokens.append(seq[pos])
            row.positions.append(pos)
            row.parents.append(parent)
            nodes[pos] = node
            parent = node
        row.datums.append(i)
        row_of[i] = len(rows) - 1
        nodes_of[i] = nodes
        prev = i
    return PackedBatch(rows, row_of, nodes_of)


def group_by_length(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped into micro-batches (sorted by length) whose padded size
    count x longest stays within `max_tokens` (a longer item goes alone)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur and (len(cur) + 1) * lengths[i] > max_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def group_rows(rows: list[PackedRow], max_tokens: int) -> list[list[int]]:
    """Row indices grouped into micro-batches (see group_by_length)."""
    return group_by_length([len(r) for r in rows], max_tokens)
