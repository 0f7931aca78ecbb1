"""The rarer SampleRequest options through the real SDK (issue 16): `topk_sample_logprobs`,
`target_prompt_logprobs` (dense and sparse CSR) and `prompt_alt_tokens_k`, on both sampler paths
(the fast continuous-batching one and the generic HF-decoder one), each checked against an
independent full log-softmax of the tiny model run through transformers; and their refusals.
"""

from __future__ import annotations

import concurrent.futures as cf

import numpy as np
import pytest
import tinker
import torch
from tinker import types

from support.server import API_KEY, MODEL, SEQ_A, SEQ_B

from gemtinker.server import start_local
from gemtinker.server.sample_options import MAX_PROMPT_ALT_TOKENS_K, MAX_TARGET_COLUMNS, MAX_TOPK_SAMPLE_LOGPROBS

pytestmark = pytest.mark.integration  # a real (tiny) torch engine behind HTTP, or a server subprocess: `make test` only

# 1e-5 absolute, plus 1e-6 relative: logits are fp32, so a logprob near -21 carries ~2e-6 of
# rounding (one ulp), and the fast decoder sums in another order than transformers (seen: 1.05e-5).
TOL, RTOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    with start_local(models=[MODEL], root=tmp_path_factory.mktemp("sampleopts")) as s:
        yield s


@pytest.fixture(scope="module")
def sampler(srv):
    sc = tinker.ServiceClient(base_url=srv.base_url, api_key=API_KEY)
    yield sc.create_sampling_client(base_model=MODEL).result()
    sc.close("success")


@pytest.fixture(params=["fast", "generic"])
def path(request, srv, sampler):
    """Runs the test on one sampler path (the generic one is the fallback for other models)."""
    sched = srv.service.engine_for(MODEL)._scheduler
    was = sched.use_fast
    sched.use_fast = request.param == "fast"
    yield request.param
    sched.use_fast = was


def _ref_logprobs(srv, tokens: list[int]) -> torch.Tensor:
    """Full log-softmax at every position of `tokens`, by the HF model itself (no sampler code)."""
    eng = srv.service.engine_for(MODEL)
    with eng.compute_lock, torch.inference_mode():
        logits = eng.model(torch.tensor([tokens], device=eng.device)).logits[0]
    return torch.log_softmax(logits.double(), dim=-1).cpu()


def _fails(fut, *needles: str) -> None:
    with pytest.raises(tinker.RequestFailedError) as e:
        fut.result(timeout=120)
    assert e.value.category == "user", e.value
    for n in needles:
        assert n in str(e.value), e.value


def test_topk_sample_logprobs_match_full_softmax(srv, sampler, path):
    k, prompt = 5, SEQ_A[:6]
    params = types.SamplingParams(max_tokens=6, seed=3, temperature=3.0, stop=[])
    res = sampler.sample(types.ModelInput.from_ints(prompt), 2, params, topk_sample_logprobs=k).result(timeout=120)
    for seq in res.sequences:
        assert len(seq.tokens) == 6 and len(seq.topk_logprobs) == 6
        ref = _ref_logprobs(srv, prompt + seq.tokens)
        for i, top in enumerate(seq.topk_logprobs):
            dist = ref[len(prompt) - 1 + i]  # the distribution token i was drawn from
            ids = [t for t, _ in top]
            got = np.array([lp for _, lp in top])
            assert len(top) == k and len(set(ids)) == k
            np.testing.assert_allclose(got, torch.topk(dist, k).values.numpy(), atol=TOL, rtol=RTOL)
            np.testing.assert_allclose(got, dist[ids].numpy(), atol=TOL, rtol=RTOL)
            assert seq.logprobs[i] == pytest.approx(float(dist[seq.tokens[i]]), abs=TOL, rel=RTOL)
    plain = sampler.sample(types.ModelInput.from_ints(prompt), 1, params).result(timeout=120)
    assert plain.sequences[0].topk_logprobs is None  # not asked, not sent


def _targets(rng: np.random.Generator, rows: int, k: int, vocab: int, fill: float) -> np.ndarray:
    ids = rng.integers(0, vocab, (rows, k))
    ids[rng.random((rows, k)) > fill] = -1
    ids[0, 0] = 7  # at least one id
    return ids


@pytest.mark.parametrize("form", ["dense", "sparse"])
def test_target_prompt_logprobs_match_full_softmax(srv, sampler, path, form):
    vocab = srv.service.engine_for(MODEL).vocab_size
    ids = _targets(np.random.default_rng(1), len(SEQ_A) - 1, 6, vocab, fill=0.7 if form == "dense" else 0.1)
    ids[3, 2] = SEQ_A[4]  # the prompt's own next token too
    t = torch.tensor(ids)
    td = types.TensorData.from_torch(t) if form == "dense" else types.TensorData.from_torch_sparse(t, pad_value=-1)
    assert (td.sparse_crow_indices is not None) == (form == "sparse")
    res = sampler.sample(types.ModelInput.from_ints(SEQ_A), 1, types.SamplingParams(max_tokens=2, seed=0),
                         include_prompt_logprobs=True, target_prompt_logprobs=td).result(timeout=120)
    out = res.target_prompt_logprobs
    assert out is not None and out.dtype == "float32" and list(out.shape) == list(ids.shape)
    if form == "sparse":  # same layout back: the same CSR indices
        assert out.sparse_crow_indices == td.sparse_crow_indices and out.sparse_col_indices == td.sparse_col_indices
    got = out.to_numpy(pad_value=0)
    ref = _ref_logprobs(srv, SEQ_A)[:-1]  # row i scored at prompt position i + 1
    want = np.where(ids >= 0, ref.gather(1, torch.tensor(ids).clamp(min=0)).numpy(), 0.0)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=RTOL)
    assert got[3, 2] == pytest.approx(res.prompt_logprobs[4], abs=TOL)


def _chi2_p(counts: np.ndarray, expected: np.ndarray) -> float:
    """Pearson chi-square p-value (categories with expected >= 5), via the regularized gamma."""
    stat = float(((counts - expected) ** 2 / expected).sum())
    df = len(counts) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def _binned(p: np.ndarray, draws: np.ndarray, bins: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Counts and expected counts of `draws` in `bins` bins of about equal probability mass
    (tokens sorted by probability), with bins expecting under 5 draws merged into one."""
    order = np.argsort(-p)
    start = np.cumsum(p[order]) - p[order]
    bin_of = np.empty(len(p), dtype=np.int64)
    bin_of[order] = np.minimum((start * bins).astype(np.int64), bins - 1)
    mass = np.bincount(bin_of, weights=p, minlength=bins)
    counts = np.bincount(bin_of[draws], minlength=bins).astype(np.float64)
    expected = mass * len(draws)
    small = expected < 5
    if small.any():
        counts = np.append(counts[~small], counts[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    keep = expected > 0
    return counts[keep], expected[keep]


def test_prompt_alt_tokens_follow_the_tempered_distribution(srv, sampler, path):
    """Draws at every prompt position, pooled over 5 seeded requests of k=100, pass a chi-square
    test against softmax(logits / T); uniform draws, or draws that ignore T, fail it."""
    temp, k, seeds = 3.0, MAX_PROMPT_ALT_TOKENS_K, range(5)
    draws, lps = [], []
    for seed in seeds:
        params = types.SamplingParams(max_tokens=1, seed=seed, temperature=temp)
        res = sampler.sample(types.ModelInput.from_ints(SEQ_A), 1, params, prompt_alt_tokens_k=k).result(timeout=120)
        alt = res.prompt_alt_tokens
        assert alt is not None and list(alt.tokens.shape) == [len(SEQ_A) - 1, k] == list(alt.logprobs.shape)
        draws.append(alt.tokens.to_numpy())
        lps.append(alt.logprobs.to_numpy())
    draws_a, lps_a = np.concatenate(draws, axis=1), np.concatenate(lps, axis=1)
    ref = _ref_logprobs(srv, SEQ_A)[:-1]
    # Reported logprobs are the model's at temperature 1, as prompt_logprobs.
    np.testing.assert_allclose(lps_a, ref.gather(1, torch.tensor(draws_a)).numpy(), atol=TOL, rtol=RTOL)
    tempered = torch.softmax(ref * 1.0 / temp, dim=-1).numpy()  # log-softmax / T = logits / T + const
    untempered = ref.exp().numpy()
    rng = np.random.default_rng(0)
    n = draws_a.shape[1]
    stats = {"server": [], "uniform": [], "ignores T": []}
    for i in range(draws_a.shape[0]):
        p = tempered[i] / tempered[i].sum()
        q = untempered[i] / untempered[i].sum()
        for name, d in (("server", draws_a[i]), ("uniform", rng.integers(0, len(p), n)),
                        ("ignores T", rng.choice(len(q), n, p=q))):
            stats[name].append(_binned(p, d))
    pvals = {name: _chi2_p(np.concatenate([c for c, _ in rows]), np.concatenate([e for _, e in rows]))
             for name, rows in stats.items()}
    assert pvals["server"] > 1e-3, pvals
    assert pvals["uniform"] < 1e-12 and pvals["ignores T"] < 1e-12, pvals
    # A seed repeats its draws.
    again = sampler.sample(types.ModelInput.from_ints(SEQ_A), 1,
                           types.SamplingParams(max_tokens=1, seed=0, temperature=temp),
                           prompt_alt_tokens_k=k).result(timeout=120)
    np.testing.assert_array_equal(again.prompt_alt_tokens.tokens.to_numpy(), draws[0])


def test_prompt_alt_tokens_at_temperature_zero_are_the_argmax(srv, sampler, path):
    res = sampler.sample(types.ModelInput.from_ints(SEQ_A), 1, types.SamplingParams(max_tokens=1, temperature=0.0),
                         prompt_alt_tokens_k=3).result(timeout=120)
    best = _ref_logprobs(srv, SEQ_A)[:-1].argmax(dim=-1).numpy()
    np.testing.assert_array_equal(res.prompt_alt_tokens.tokens.to_numpy(), np.repeat(best[:, None], 3, axis=1))


def test_all_options_together_on_a_one_token_prompt(srv, sampler, path):
    res = sampler.sample(types.ModelInput.from_ints([5]), 2, types.SamplingParams(max_tokens=3, seed=1),
                         topk_sample_logprobs=2, prompt_alt_tokens_k=3).result(timeout=120)
    assert list(res.prompt_alt_tokens.tokens.shape) == [0, 3]
    assert all(len(s.topk_logprobs) == len(s.tokens) for s in res.sequences)


def _bad_csr(rows: int, k: int) -> dict[str, types.TensorData]:
    def td(data, crow, col, shape=None):
        return types.TensorData(data=np.asarray(data, np.int64), dtype="int64", shape=shape or [rows, k],
                                sparse_crow_indices=crow, sparse_col_indices=col)
    return {
        "sparse column index 9 is out of range": td([5], [0, 1, *[1] * (rows - 1)], [9]),
        "sparse_crow_indices must rise": td([5, 6], [0, 2, 1, *[2] * (rows - 2)], [0, 1]),
        "sparse_crow_indices has length": td([5], [0, 1, 1], [0]),
        "sparse_col_indices has 2 entries but data has 1": td([5], [0, 1, *[1] * (rows - 1)], [0, 1]),
        "strictly increase within each row": td([5, 6], [0, 2, *[2] * (rows - 1)], [1, 1]),
        "rows; a prompt of": td([5], [0, *[1] * (rows + 1)], [0], shape=[rows + 1, k]),
    }


def test_malformed_requests_fail_alone(srv, sampler, path):
    """Each bad value fails only its own request, with a `user` error naming the field, while
    good requests submitted beside it succeed."""
    rows, k, vocab = len(SEQ_A) - 1, 4, srv.service.engine_for(MODEL).vocab_size
    prompt = types.ModelInput.from_ints(SEQ_A)
    params = types.SamplingParams(max_tokens=4, temperature=1.0, seed=2)
    dense = np.full((rows, k), -1, np.int64)
    bad: dict[str, dict] = {f"target_prompt_logprobs|{msg}": {"target_prompt_logprobs": t}
                            for msg, t in _bad_csr(rows, k).items()}
    bad.update({
        f"topk_sample_logprobs must be an integer in 0..{MAX_TOPK_SAMPLE_LOGPROBS}":
            {"topk_sample_logprobs": MAX_TOPK_SAMPLE_LOGPROBS + 1},
        f"prompt_alt_tokens_k must be an integer in 0..{MAX_PROMPT_ALT_TOKENS_K}":
            {"prompt_alt_tokens_k": MAX_PROMPT_ALT_TOKENS_K + 1},
        f"K must be in 1..{MAX_TARGET_COLUMNS}":
            {"target_prompt_logprobs": types.TensorData.from_numpy(np.zeros((rows, MAX_TARGET_COLUMNS + 1), np.int64))},
        "names no token id": {"target_prompt_logprobs": types.TensorData.from_numpy(dense)},
        f"token id {vocab} is not -1 (nothing) or in 0..{vocab - 1}":
            {"target_prompt_logprobs": types.TensorData.from_numpy(np.where(np.eye(rows, k) > 0, vocab, -1))},
        "token id -2 is not -1": {"target_prompt_logprobs": types.TensorData.from_numpy(np.full((rows, k), -2))},
    })
    with cf.ThreadPoolExecutor(4) as pool:
        good = [pool.submit(lambda: sampler.sample(prompt, 2, params, topk_sample_logprobs=2).result(timeout=120))
                for _ in range(4)]
        futs = {msg: sampler.sample(prompt, 1, params, **kw) for msg, kw in bad.items()}
        for msg, fut in futs.items():
            _fails(fut, *msg.split("|"))
        assert all(len(f.result().sequences) == 2 for f in good)


def test_record_stability_info_is_refused_by_name(srv, sampler):
    sc = tinker.ServiceClient(base_url=srv.base_url, api_key=API_KEY)
    tc = sc.create_lora_training_client(base_model=MODEL, rank=4).result()
    path = tc.save_weights_for_sampler("stability").result().path
    prompt = types.ModelInput.from_ints(SEQ_A)
    params = types.SamplingParams(max_tokens=2, seed=0)
    recording = tc.create_sampling_client(path, record_stability_info=True)
    _fails(recording.sample(prompt, 1, params), "record_stability_info is not offered by this server")
    assert len(tc.create_sampling_client(path).sample(prompt, 1, params).result(timeout=120).sequences) == 1
    sc.close("success")


# ------------------------------------------------------------------ the older fields, through the SDK
def test_prompt_logprobs_topk_prompt_logprobs_and_last_n(srv, sampler, path):
    ref = _ref_logprobs(srv, SEQ_A)[:-1]
    prompt = types.ModelInput.from_ints(SEQ_A)
    params = types.SamplingParams(max_tokens=1, seed=0)
    res = sampler.sample(prompt, 1, params, include_prompt_logprobs=True, topk_prompt_logprobs=3).result(timeout=120)
    assert res.prompt_logprobs[0] is None and res.topk_prompt_logprobs[0] is None
    want = ref.gather(1, torch.tensor(SEQ_A[1:]).unsqueeze(1)).squeeze(1).numpy()
    np.testing.assert_allclose(res.prompt_logprobs[1:], want, atol=TOL, rtol=RTOL)
    for i, top in enumerate(res.topk_prompt_logprobs[1:]):
        np.testing.assert_allclose([lp for _, lp in top], torch.topk(ref[i], 3).values.numpy(), atol=TOL, rtol=RTOL)
    last = sampler.sample(prompt, 1, params, include_prompt_logprobs=True, topk_prompt_logprobs=3,
                          prompt_logprobs_last_n=4).result(timeout=120)
    n_skip = len(SEQ_A) - 4
    assert last.prompt_logprobs[:n_skip] == [None] * n_skip and last.topk_prompt_logprobs[:n_skip] == [None] * n_skip
    np.testing.assert_allclose(last.prompt_logprobs[n_skip:], res.prompt_logprobs[n_skip:], atol=TOL, rtol=RTOL)
    for got, full in zip(last.topk_prompt_logprobs[n_skip:], res.topk_prompt_logprobs[n_skip:]):
        assert [t for t, _ in got] == [t for t, _ in full]
        np.testing.assert_allclose([lp for _, lp in got], [lp for _, lp in full], atol=TOL, rtol=RTOL)
    _fails(sampler.sample(prompt, 1, params, include_prompt_logprobs=True, prompt_logprobs_last_n=len(SEQ_A)),
           "prompt_logprobs_last_n must be in 1..")


def test_sampling_params_shape_the_draws(srv, sampler, path):
    """temperature 0 is greedy; top_k=1 and a tiny top_p leave only the best token; a seed
    repeats a sample; max_tokens and stop end it."""
    prompt = types.ModelInput.from_ints(SEQ_B[:5])

    def toks(**kw):
        return sampler.sample(prompt, 1, types.SamplingParams(**{"max_tokens": 6, "stop": [], **kw})).result(
            timeout=120).sequences[0].tokens

    greedy = toks(temperature=0.0)
    assert toks(temperature=5.0, top_k=1, seed=1) == greedy
    assert toks(temperature=5.0, top_p=1e-6, seed=2) == greedy
    hot = toks(temperature=5.0, seed=7)
    assert hot == toks(temperature=5.0, seed=7) and hot != greedy  # at T=5 the tiny model's draws vary
    assert len(toks(temperature=0.0, max_tokens=2)) == 2
    stopped = sampler.sample(prompt, 1, types.SamplingParams(max_tokens=6, temperature=0.0, stop=[greedy[1]])).result(
        timeout=120).sequences[0]
    assert stopped.stop_reason == "stop" and stopped.tokens == greedy[: greedy.index(greedy[1]) + 1]


def test_options_beside_plain_requests_change_nothing_else(srv, sampler, path):
    """Requests with the new options submitted together with plain ones: every seeded plain
    request gets the tokens it gets alone, and the options' outputs stay exact."""
    plain_p = types.ModelInput.from_ints(SEQ_B[:5])
    plain_params = types.SamplingParams(max_tokens=5, seed=5, temperature=3.0)
    alone = sampler.sample(plain_p, 2, plain_params).result(timeout=120)
    ids = np.full((len(SEQ_A) - 1, 2), -1, np.int64)
    ids[:, 0] = np.arange(len(SEQ_A) - 1) * 101
    sched = srv.service.engine_for(MODEL)._scheduler
    sched.max_requests_in_batch = 0
    futs = []
    for i in range(3):
        futs.append(("plain", SEQ_B[:5], sampler.sample(plain_p, 2, plain_params)))
        futs.append(("topk", SEQ_A[: 3 + i], sampler.sample(types.ModelInput.from_ints(SEQ_A[: 3 + i]), 2,
                                                            types.SamplingParams(max_tokens=4, seed=i, temperature=3.0),
                                                            topk_sample_logprobs=3)))
        futs.append(("prompt", SEQ_A, sampler.sample(types.ModelInput.from_ints(SEQ_A), 1,
                                                     types.SamplingParams(max_tokens=3, seed=i),
                                                     target_prompt_logprobs=types.TensorData.from_numpy(ids),
                                                     prompt_alt_tokens_k=4)))
    ref_a = _ref_logprobs(srv, SEQ_A)[:-1]
    for kind, prompt, fut in futs:
        res = fut.result(timeout=120)
        if kind == "plain":
            assert [s.tokens for s in res.sequences] == [s.tokens for s in alone.sequences]
            assert all(s.topk_logprobs is None for s in res.sequences) and res.prompt_alt_tokens is None
        elif kind == "topk":
            for seq in res.sequences:
                assert len(seq.topk_logprobs) == len(seq.tokens)
                ref = _ref_logprobs(srv, prompt + seq.tokens)[len(prompt) - 1:]
                for dist, top in zip(ref, seq.topk_logprobs):
                    np.testing.assert_allclose([lp for _, lp in top], dist[[t for t, _ in top]].numpy(),
                                               atol=TOL, rtol=RTOL)
                    np.testing.assert_allclose([lp for _, lp in top], torch.topk(dist, 3).values.numpy(),
                                               atol=TOL, rtol=RTOL)
            assert res.target_prompt_logprobs is None
        else:
            want = np.where(ids >= 0, ref_a.gather(1, torch.tensor(ids).clamp(min=0)).numpy(), 0.0)
            np.testing.assert_allclose(res.target_prompt_logprobs.to_numpy(), want, atol=TOL, rtol=RTOL)
            alt = res.prompt_alt_tokens
            want_alt = ref_a.gather(1, torch.tensor(alt.tokens.to_numpy())).numpy()
            np.testing.assert_allclose(alt.logprobs.to_numpy(), want_alt, atol=TOL, rtol=RTOL)
    assert sched.max_requests_in_batch > 1  # they did share batches
