"""The packed learner equals the plain unpacked computation (fp32, tiny model).

Batches with shared prefixes of every shape (RL groups, multi-turn chains, a datum that is a
strict prefix of another, duplicates, nothing shared) go through both learners. Small limits
force branch rows (trees larger than a row), several micro-batches and many logit chunks.

In fp32, per-datum logprobs and loss metrics agree within 1e-5 relative. LoRA gradients agree
within 3e-5 (norm-relative): summing the same terms in another order moves fp32 gradients by up
to 1.5e-5 where positive and negative advantages cancel (measured over 120 random batches;
batches that share nothing, where only the chunking differs, reach 8e-6). The float64 test is
the exactness check: there both learners agree within 1e-6, the fp32 rounding of the masters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import zlib

import numpy as np
import pytest
import torch

from gemtinker.engine import EngineError, TrainDatum
from gemtinker.engine.learner import LearnerLimits
from gemtinker.engine.packing import pack

LOSSES = ["cross_entropy", "importance_sampling", "ppo", "cispo", "dro"]


def _datum(tokens: np.ndarray, rng, loss: str, prompt_len: int) -> TrainDatum:
    n = len(tokens) - 1
    inputs: dict[str, np.ndarray] = {"target_tokens": tokens[1:]}
    if loss == "cross_entropy":
        w = np.ones(n, np.float32)
        w[: max(prompt_len - 1, 0)] = 0.0  # SFT: no loss on the prompt
        inputs["weights"] = w
    else:
        adv = np.zeros(n, np.float32)
        adv[max(prompt_len - 1, 0):] = rng.normal(size=n - max(prompt_len - 1, 0))
        inputs["advantages"] = adv
        inputs["logprobs"] = rng.normal(-3.0, 0.5, size=n).astype(np.float32)
    return TrainDatum(tokens[:-1], inputs)


def _group_batch(rng, vocab, loss):
    out = []
    for _ in range(3):
        prompt = rng.integers(0, vocab, 14)
        for _ in range(4):
            reply = rng.integers(0, vocab, rng.integers(3, 9))
            out.append(_datum(np.concatenate([prompt, reply]), rng, loss, len(prompt)))
    return out


def _chain_batch(rng, vocab, loss):
    """Two episodes: each turn's tokens extend the previous turn's (conversation re-sent)."""
    out = []
    shared_instructions = rng.integers(0, vocab, 10)
    for _ in range(2):
        convo = np.concatenate([shared_instructions, rng.integers(0, vocab, 4)])
        for _ in range(4):
            reply = rng.integers(0, vocab, 5)
            full = np.concatenate([convo, reply])
            out.append(_datum(full, rng, loss, len(convo)))
            convo = np.concatenate([full, rng.integers(0, vocab, 3)])
    return out


def _prefix_batch(rng, vocab, loss):
    """A datum that is a strict prefix of another, an exact duplicate, and a loner."""
    long = rng.integers(0, vocab, 30)
    return [
        _datum(long, rng, loss, 6),
        _datum(long[:17], rng, loss, 6),
        _datum(long.copy(), rng, loss, 9),
        _datum(rng.integers(0, vocab, 12), rng, loss, 3),
    ]


def _wide_group_batch(rng, vocab, loss):
    """Groups whose replies overflow a SMALL row: branch rows, two replies that share their
    start (a subtree inside a branch row), and a duplicated reply."""
    out = []
    for _ in range(2):
        prompt = rng.integers(0, vocab, 12)
        replies = [rng.integers(0, vocab, rng.integers(12, 21)) for _ in range(5)]
        replies.append(np.concatenate([replies[1][:4], rng.integers(0, vocab, 9)]))
        replies.append(replies[3].copy())
        out += [_datum(np.concatenate([prompt, r]), rng, loss, len(prompt)) for r in replies]
    return out


def _unshared_batch(rng, vocab, loss):
    return [_datum(rng.integers(0, vocab, rng.integers(5, 25)), rng, loss, 4) for _ in range(7)]


BATCHES = {
    "group": _group_batch, "wide_group": _wide_group_batch, "chain": _chain_batch, "prefix": _prefix_batch,
    "unshared": _unshared_batch,
}


@contextlib.contextmanager
def _mode(engine, packed: bool, limits: LearnerLimits | None = None):
    learner, old_limits = engine.learner, engine.learner.limits
    if limits is not None:
        learner.limits = limits
    if not packed:
        engine.learner = None
    try:
        yield
    finally:
        engine.learner = learner
        learner.limits = old_limits


def _run(engine, aid, datums, loss, packed, limits=None):
    params = engine._get(aid).weights.named_tensors()
    for p in params.values():
        p.grad = None
    with _mode(engine, packed, limits):
        res = engine.forward_backward(aid, datums, loss)
    grads = {k: p.grad.clone() for k, p in params.items() if p.grad is not None}
    for p in params.values():
        p.grad = None
    return res, grads


def _assert_rel(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 1e-5):
    err = float((a - b).norm())
    scale = float(b.norm())
    assert err <= tol * max(scale, 1e-6), f"{what}: |diff| {err:.3g} vs |ref| {scale:.3g}"


SMALL = LearnerLimits(max_tokens=96, branch_tokens=64, max_row_tokens=40, logit_chunk=7, min_shared=1)
# one branch row per pass (rows hold at most 40 tokens)
LONE_BRANCHES = dataclasses.replace(SMALL, branch_tokens=40)


def _grid(limits: dict[str, LearnerLimits | None]) -> list:
    """(limits, batch, loss) cases. The fast tier keeps a Latin square: every batch and every loss
    once under each limits; `make test` (the `integration` marker) runs the full grid."""
    cases = []
    for li, (limits_id, lim) in enumerate(limits.items()):
        for bi, batch in enumerate(sorted(BATCHES)):
            for lo, loss in enumerate(LOSSES):
                fast = (bi + li) % len(LOSSES) == lo
                cases.append(pytest.param(lim, batch, loss, id=f"{limits_id}-{batch}-{loss}",
                                          marks=() if fast else pytest.mark.integration))
    return cases


@pytest.mark.parametrize(("limits", "batch", "loss"), _grid({"default": None, "small": SMALL}))
def test_packed_equals_unpacked(tiny_engine, new_adapter, loss, batch, limits):
    aid = new_adapter(seed=3, rank=4)
    rng = np.random.default_rng(zlib.crc32(f"{loss}/{batch}".encode()))
    datums = BATCHES[batch](rng, tiny_engine.vocab_size, loss)
    ref, ref_grads = _run(tiny_engine, aid, datums, loss, packed=False)
    got, got_grads = _run(tiny_engine, aid, datums, loss, packed=True, limits=limits)
    for i, (o_ref, o_got) in enumerate(zip(ref.outputs, got.outputs)):
        assert o_got["logprobs"].shape == o_ref["logprobs"].shape
        _assert_rel(torch.from_numpy(o_got["logprobs"]), torch.from_numpy(o_ref["logprobs"]), f"datum {i} logprobs")
    assert ref.metrics.keys() == got.metrics.keys()
    for k in ref.metrics:
        assert got.metrics[k] == pytest.approx(ref.metrics[k], rel=1e-5, abs=1e-6), k
    assert ref_grads.keys() == got_grads.keys() and ref_grads
    for k in ref_grads:
        _assert_rel(got_grads[k], ref_grads[k], f"grad {k}", 3e-5)


@pytest.fixture(scope="module")
def f64_engine():
    """The tiny model in float64, LoRA deltas too: packed and unpacked results then differ only
    by the final rounding of gradients to the fp32 masters, so any packing error would show."""
    from gemtinker.engine import Engine, LoraSpec
    from gemtinker.engine.models import TINY_MODEL_NAME

    eng = Engine(TINY_MODEL_NAME, device="cpu", dtype=torch.float64)
    eng.create_adapter("a", LoraSpec(rank=4, seed=7))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, b in eng._get("a").weights.tensors.values():
            b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
    yield eng
    eng.close()


@pytest.mark.parametrize(("limits", "batch", "loss"), _grid({"small": SMALL}))
def test_packed_equals_unpacked_float64(f64_engine, limits, batch, loss):
    rng = np.random.default_rng(zlib.crc32(f"f64/{loss}/{batch}".encode()))
    datums = BATCHES[batch](rng, f64_engine.vocab_size, loss)
    ref, ref_grads = _run(f64_engine, "a", datums, loss, packed=False)
    got, got_grads = _run(f64_engine, "a", datums, loss, packed=True, limits=limits)
    for o_ref, o_got in zip(ref.outputs, got.outputs):
        _assert_rel(torch.from_numpy(o_got["logprobs"]), torch.from_numpy(o_ref["logprobs"]), "logprobs", 1e-6)
    for k in ref_grads:
        _assert_rel(got_grads[k], ref_grads[k], f"grad {k}", 1e-6)


def test_a_lone_branch_row_reads_only_the_trunk_keys_it_sees(f64_engine):
    """An RL group with long replies: a trunk row (the prompt and the first reply), then a branch
    row per other reply, each in a pass of its own, whose attention reads only the prompt's keys
    of the trunk (the grid tests above cover passes of several branch rows, which read the union
    of what their rows see). It agrees with the unpacked learner to float64 rounding, and with reading the
    whole trunk row under the mask."""
    rng = np.random.default_rng(11)
    vocab = f64_engine.vocab_size
    prompt = rng.integers(0, vocab, 12)
    datums = [_datum(np.concatenate([prompt, rng.integers(0, vocab, 30)]), rng, "importance_sampling", 12)
              for _ in range(4)]
    ref, ref_grads = _run(f64_engine, "a", datums, "importance_sampling", packed=False)
    got, got_grads = _run(f64_engine, "a", datums, "importance_sampling", packed=True, limits=LONE_BRANCHES)
    learner = f64_engine.learner
    stats = learner.last_stats
    assert stats["branch_rows"] >= 3 and stats["narrow_branch_passes"] == stats["branch_rows"], stats
    for o_ref, o_got in zip(ref.outputs, got.outputs):
        _assert_rel(torch.from_numpy(o_got["logprobs"]), torch.from_numpy(o_ref["logprobs"]), "logprobs", 1e-6)
    for k in ref_grads:
        _assert_rel(got_grads[k], ref_grads[k], f"grad {k}", 1e-6)

    learner.narrow_branches = False
    try:
        wide, wide_grads = _run(f64_engine, "a", datums, "importance_sampling", packed=True, limits=LONE_BRANCHES)
        assert learner.last_stats["narrow_branch_passes"] == 0
    finally:
        learner.narrow_branches = True
    for o_wide, o_got in zip(wide.outputs, got.outputs):
        _assert_rel(torch.from_numpy(o_got["logprobs"]), torch.from_numpy(o_wide["logprobs"]), "logprobs", 1e-9)
    for k in wide_grads:
        _assert_rel(got_grads[k], wide_grads[k], f"grad {k}", 1e-9)


@pytest.mark.parametrize("batch", ["wide_group", "unshared"])
def test_rows_of_different_lengths_run_without_padding(f64_engine, batch):
    """A pass whose rows differ in length runs its linears on the real tokens only
    (attention.RowLayout): with small limits every pass of these batches does (trunk and
    branch passes, plain rows). The results equal both the padded passes' and the unpacked
    learner's to float64 rounding, and the decoder ran exactly the packed tokens."""
    rng = np.random.default_rng(zlib.crc32(f"unpad/{batch}".encode()))
    datums = BATCHES[batch](rng, f64_engine.vocab_size, "importance_sampling")
    learner = f64_engine.learner
    assert learner.unpad_rows  # the tiny model attends through attention.grouped_sdpa_forward
    ref, ref_grads = _run(f64_engine, "a", datums, "importance_sampling", packed=False)
    got, got_grads = _run(f64_engine, "a", datums, "importance_sampling", packed=True, limits=SMALL)
    flat = learner.last_stats
    learner.unpad_rows = False
    try:
        padded, padded_grads = _run(f64_engine, "a", datums, "importance_sampling", packed=True, limits=SMALL)
        pad_stats = learner.last_stats
    finally:
        learner.unpad_rows = True
    assert flat["padded_tokens"] == flat["packed_tokens"] < pad_stats["padded_tokens"], (flat, pad_stats)
    for o_ref, o_pad, o_got in zip(ref.outputs, padded.outputs, got.outputs):
        _assert_rel(torch.from_numpy(o_got["logprobs"]), torch.from_numpy(o_ref["logprobs"]), "logprobs", 1e-6)
        _assert_rel(torch.from_numpy(o_got["logprobs"]), torch.from_numpy(o_pad["logprobs"]), "logprobs", 1e-9)
    for k in ref_grads:
        _assert_rel(got_grads[k], ref_grads[k], f"grad {k}", 1e-6)
        _assert_rel(got_grads[k], padded_grads[k], f"grad {k}", 1e-9)


def test_row_layout_pads_and_unpads():
    from gemtinker.engine.attention import RowLayout

    layout = RowLayout.of([3, 1, 2])
    assert layout.starts == [0, 3, 4]
    flat = torch.arange(6.0).reshape(1, 1, 6, 1).expand(1, 2, 6, 1)  # (1, heads, tokens, head_dim)
    padded = layout.pad(flat)
    assert padded.shape == (3, 2, 3, 1)
    assert padded[:, 0, :, 0].tolist() == [[0, 1, 2], [3, 3, 3], [4, 5, 4]]  # padding repeats a row's first token
    assert torch.equal(layout.unpad(padded.transpose(1, 2)), flat.transpose(1, 2))


def test_two_column_targets_and_forward(tiny_engine, new_adapter):
    """(N, K) cross-entropy targets with per-column weights, and forward without gradients."""
    aid = new_adapter(seed=4, rank=4)
    rng = np.random.default_rng(1)
    vocab = tiny_engine.vocab_size
    prompt = rng.integers(0, vocab, 9)
    datums = []
    for _ in range(3):
        toks = np.concatenate([prompt, rng.integers(0, vocab, 4)])
        tgt = rng.integers(0, vocab, (len(toks), 3))
        w = rng.random((len(toks), 3)).astype(np.float32)
        w[:5] = 0
        datums.append(TrainDatum(toks, {"target_tokens": tgt, "weights": w}))
    ref, ref_grads = _run(tiny_engine, aid, datums, "cross_entropy", packed=False)
    got, got_grads = _run(tiny_engine, aid, datums, "cross_entropy", packed=True, limits=SMALL)
    for o_ref, o_got in zip(ref.outputs, got.outputs):
        assert o_got["logprobs"].shape == (13, 3)
        _assert_rel(torch.from_numpy(o_got["logprobs"]), torch.from_numpy(o_ref["logprobs"]), "logprobs")
    for k in ref_grads:
        _assert_rel(got_grads[k], ref_grads[k], f"grad {k}", 3e-5)
    fwd = tiny_engine.forward(aid, datums, "cross_entropy")
    for o_ref, o_fwd in zip(ref.outputs, fwd.outputs):
        _assert_rel(torch.from_numpy(o_fwd["logprobs"]), torch.from_numpy(o_ref["logprobs"]), "forward")
    assert all(p.grad is None for p in tiny_engine._get(aid).weights.named_tensors().values())


def test_packing_computes_shared_prefixes_once():
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, 100, 20)
    seqs = [np.concatenate([prompt, rng.integers(0, 100, 5)]) for _ in range(4)]
    packed = pack(seqs + [seqs[0][:22]], max_row_tokens=1000)
    assert len(packed.rows) == 1 and packed.packed_tokens == 20 + 4 * 5
    row = packed.rows[0]
    mask = row.ancestor_mask()
    for i, seq in enumerate(seqs):
        nodes = packed.nodes_of[i]
        assert [row.tokens[n] for n in nodes] == list(seq)
        assert [row.positions[n] for n in nodes] == list(range(len(seq)))
        # the last node sees exactly this datum's nodes
        assert set(np.flatnonzero(mask[nodes[-1]])) == set(nodes.tolist())
    # nothing shared -> separate rows
    assert len(pack([rng.integers(0, 100, 9) + 1000 * k for k in range(3)], 1000).rows) == 3
    # a tree over the row cap: without branch rows each part keeps a copy of the shared start
    split = pack(seqs, max_row_tokens=32, branch=False)
    assert len(split.rows) == 2 and split.packed_tokens == 2 * (20 + 2 * 5)
    # with them the overflow hangs from the trunk's last prompt node, and nothing is computed twice
    branched = pack(seqs, max_row_tokens=32)
    trunk = branched.rows[0]
    assert branched.packed_tokens == 20 + 4 * 5 and len(branched.rows) == 3
    for i, seq in enumerate(seqs):
        row = branched.rows[branched.row_of[i]]
        split_at = branched.split_of[i]
        nodes = branched.nodes_of[i]
        assert [trunk.tokens[n] for n in nodes[:split_at]] == list(seq[:split_at])
        assert [row.tokens[n] for n in nodes[split_at:]] == list(seq[split_at:])
        if row.trunk >= 0:
            assert row.trunk == 0 and split_at == 20 and row.attach == nodes[19]
            assert trunk.positions[row.attach] == 19 and row.positions[nodes[20]] == 20


@pytest.mark.parametrize("limits", [None, SMALL], ids=["default", "small"])
def test_stats_count_each_unembedded_node_once(tiny_engine, new_adapter, limits):
    """`last_stats` (what bench/train.py's FLOP count reads): every distinct token prefix is one
    node through the unembedding, and only nodes under a nonzero advantage run its backward."""
    aid = new_adapter(seed=6, rank=4)
    rng = np.random.default_rng(4)
    datums = _wide_group_batch(rng, tiny_engine.vocab_size, "importance_sampling")
    _run(tiny_engine, aid, datums, "importance_sampling", packed=True, limits=limits)
    stats = tiny_engine.learner.last_stats
    nodes = {tuple(d.tokens[: i + 1]) for d in datums for i in range(len(d.tokens))}
    grad_nodes = {tuple(d.tokens[: i + 1]) for d in datums for i in np.flatnonzero(d.inputs["advantages"])}
    assert stats["scored_nodes"] == stats["packed_tokens"] == len(nodes)
    assert stats["gradient_nodes"] == len(grad_nodes) < len(nodes)
    with _mode(tiny_engine, packed=True, limits=limits):
        tiny_engine.forward(aid, datums, "importance_sampling")
    assert tiny_engine.learner.last_stats["gradient_nodes"] == 0


def test_bad_datum_refused_before_any_state_changes(tiny_engine, new_adapter):
    aid = new_adapter(seed=5, rank=4)
    rng = np.random.default_rng(2)
    good = _group_batch(rng, tiny_engine.vocab_size, "importance_sampling")
    bad = _datum(rng.integers(0, tiny_engine.vocab_size, 10), rng, "importance_sampling", 2)
    bad.inputs["advantages"] = bad.inputs["advantages"][:-1]
    params = tiny_engine._get(aid).weights.named_tensors()
    with pytest.raises(EngineError, match="datum 12"):
        tiny_engine.forward_backward(aid, good + [bad], "importance_sampling")
    assert all(p.grad is None for p in params.values())
