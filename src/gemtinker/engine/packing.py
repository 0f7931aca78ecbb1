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
2.5 s in rows of 512, 3.4 s in rows of 1024). Hence datums that share nothing never share a
row, and a tree larger than `max_row_tokens` does not grow one long row: the rest of it goes
into *branch rows*. A branch row holds only the tokens after a shared start that lives in its
*trunk* row; its nodes attend to the trunk's keys and values at the attach node's ancestors
(computed once, in the trunk's pass) plus their own ancestors in the branch. An RL group whose
prompt and replies overflow one row becomes a trunk (the prompt and the first reply) and one
branch per further reply, and no token is computed twice.
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
    # A branch row's trunk (row index) and the trunk node its roots hang from; -1 for a plain row.
    trunk: int = -1
    attach: int = -1

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
    # datum index -> (N,) node of each of its positions: positions < split_of[i] are nodes of the
    # trunk of row_of[i] (a branch row), the rest nodes of row_of[i] itself
    nodes_of: list[np.ndarray]
    split_of: list[int]

    @property
    def packed_tokens(self) -> int:
        return sum(len(r) for r in self.rows)

    def trunk_of(self, i: int) -> int:
        """Row holding datum i's positions before split_of[i] (its own row when it has no trunk)."""
        row = self.rows[self.row_of[i]]
        return row.trunk if row.trunk >= 0 else self.row_of[i]


def _common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def pack(
    token_lists: list[np.ndarray], max_row_tokens: int, min_shared: int = 1, share: bool = True,
    branch: bool = True,
) -> PackedBatch:
    """Merge datums into trie rows.

    Datums are visited in lexicographic token order, where the longest prefix a datum shares
    with any earlier one is the one it shares with its predecessor. With at least `min_shared`
    tokens shared, a datum's new nodes go, in this order of preference, (1) into the row that
    holds its predecessor's last shared node, (2) into that node's trunk row, each while the row
    stays within `max_row_tokens`, (3) into a new branch row hanging from the deepest shared node
    that lies in a trunk (`branch=True`), or (4) into a new plain row with its own copy of the
    shared start. A datum longer than the cap gets a row of its own length. `share=False` gives
    every datum a plain row of its own.
    """
    seqs = [tuple(int(t) for t in toks) for toks in token_lists]
    order = sorted(range(len(seqs)), key=lambda i: seqs[i])
    rows: list[PackedRow] = []
    row_of = [0] * len(seqs)
    split_of = [0] * len(seqs)
    nodes_of: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(seqs)
    prev: int | None = None
    for i in order:
        seq = seqs[i]
        shared = _common_prefix(seqs[prev], seq) if (share and prev is not None) else 0
        nodes = np.empty(len(seq), dtype=np.int64)
        if prev is None or shared < min_shared:
            r, start, split, parent = _new_row(rows), 0, 0, -1
        else:
            prev_row, prev_split = rows[row_of[prev]], split_of[prev]
            trunk_index = prev_row.trunk if prev_row.trunk >= 0 else row_of[prev]
            trunk = rows[trunk_index]
            new = len(seq) - shared
            in_prev_row = shared > prev_split  # is the last shared node in the predecessor's row?
            if in_prev_row and len(prev_row) + new <= max_row_tokens:
                r, start, split = row_of[prev], shared, prev_split
            elif not in_prev_row and len(trunk) + new <= max_row_tokens:
                r, start, split = trunk_index, shared, 0
            else:
                # the deepest shared node inside the trunk: a branch can attach there
                depth = shared if not in_prev_row else (prev_split if prev_row.trunk >= 0 else shared)
                if branch and depth >= min_shared:
                    r = _new_row(rows)
                    rows[r].trunk, rows[r].attach = trunk_index, int(nodes_of[prev][depth - 1])
                    start = split = depth
                else:
                    r, start, split = _new_row(rows), 0, 0
            nodes[:start] = nodes_of[prev][:start]
            # the parent of the first new node, in `row`; -1 for a root (a branch root hangs from `attach`)
            parent = int(nodes[start - 1]) if start > split else -1
        row = rows[r]
        for pos in range(start, len(seq)):
            node = len(row.tokens)
            row.tokens.append(seq[pos])
            row.positions.append(pos)
            row.parents.append(parent)
            nodes[pos] = node
            parent = node
        row.datums.append(i)
        row_of[i] = r
        split_of[i] = split
        nodes_of[i] = nodes
        prev = i
    return PackedBatch(rows, row_of, nodes_of, split_of)


def _new_row(rows: list[PackedRow]) -> int:
    rows.append(PackedRow())
    return len(rows) - 1


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
