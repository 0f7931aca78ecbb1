"""End-to-end flow through the real `tinker` SDK (sync API) against an in-process server."""

from __future__ import annotations

import concurrent.futures as cf

import numpy as np
import pytest
from tinker import types

from support.server import (
    MODEL, SEQ_A, SEQ_B, datum_ce, datum_rl, forward_logprobs, rest_client,
)

pytestmark = pytest.mark.integration  # a real (tiny) torch engine behind HTTP, or a server subprocess: `make test` only


def server_caps(sc):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sc.get_server_capabilities()


def test_capabilities_list_the_served_model(service_client):
    caps = server_caps(service_client)
    assert [m.model_name for m in caps.supported_models] == [MODEL]


def test_every_loss_matches_its_definition(service_client):
    tc = service_client.create_lora_training_client(base_model=MODEL, rank=4, user_metadata={"renderer_name": "x"}).result()
    lp = forward_logprobs(tc, SEQ_A)
    n = len(lp)
    adv = np.linspace(-1.0, 1.0, n)
    # Sampling logprobs equal to the current ones: every ratio is exactly 1.
    d = datum_rl(SEQ_A, lp.tolist(), adv.tolist())
    expected = {
        "importance_sampling": (-adv.sum(), {}),
        "ppo": (-adv.sum(), {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),
        "cispo": (-(lp * adv).sum(), {}),
        "dro": (-(lp * adv).sum(), {"beta": 0.1}),
    }
    futures = {name: tc.forward_backward([d], name, cfg or None) for name, (_, cfg) in expected.items()}
    ce = tc.forward_backward([datum_ce(SEQ_A)], "cross_entropy")
    for name, fut in futures.items():
        out = fut.result()
        assert out.metrics["loss:sum"] == pytest.approx(expected[name][0], rel=1e-3, abs=1e-3), name
        np.testing.assert_allclose(out.loss_fn_outputs[0]["logprobs"].data, lp, atol=1e-4)
    out = ce.result()
    assert out.metrics["loss:sum"] == pytest.approx(-lp.sum(), rel=1e-4)
    assert tc.optim_step(types.AdamParams(learning_rate=1e-3)).result() is not None


def test_cross_entropy_loss_falls_over_ten_steps(service_client):
    # A fixed LoRA seed: with a random init, lr 5e-3 made the last steps rise now and then.
    tc = service_client.create_lora_training_client(base_model=MODEL, rank=8, seed=11).result()
    batch = [datum_ce(SEQ_A), datum_ce(SEQ_B)]
    losses = []
    for _ in range(10):
        fb = tc.forward_backward(batch, "cross_entropy")
        opt = tc.optim_step(types.AdamParams(learning_rate=5e-3))  # submitted before fb finishes
        losses.append(fb.result().metrics["loss:sum"])
        opt.result()
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_sampler_logprobs_match_forward_and_stop_sequences(service_client):
    tc = service_client.create_lora_training_client(base_model=MODEL, rank=4).result()
    tc.forward_backward([datum_ce(SEQ_A)], "cross_entropy")
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    saved = tc.save_weights_for_sampler("sampler-1").result()
    assert saved.path == f"tinker://{tc.model_id}/sampler_weights/sampler-1"
    sc = service_client.create_sampling_client(model_path=saved.path).result()
    assert sc.get_base_model() == MODEL
    prompt = SEQ_B[:5]

    res = sc.sample(types.ModelInput.from_ints(prompt), num_samples=4,
                    sampling_params=types.SamplingParams(max_tokens=6, temperature=1.0, seed=3)).result()
    assert len(res.sequences) == 4 and len({s.sequence_id for s in res.sequences}) == 4
    for seq in res.sequences:
        assert 1 <= len(seq.tokens) <= 6 and len(seq.logprobs) == len(seq.tokens)
        lp = forward_logprobs(tc, prompt + seq.tokens)[len(prompt) - 1:]
        np.testing.assert_allclose(seq.logprobs, lp, atol=1e-4)

    # Greedy decoding, then stop on the token it produced third: every sample must end there.
    greedy = types.SamplingParams(max_tokens=8, temperature=0.0, stop=[])
    full = sc.sample(types.ModelInput.from_ints(prompt), 1, greedy).result().sequences[0].tokens
    stop_tok = full[2]
    cut = full.index(stop_tok) + 1
    stopped = sc.sample(types.ModelInput.from_ints(prompt), 2,
                        types.SamplingParams(max_tokens=8, temperature=0.0, stop=[stop_tok])).result()
    for seq in stopped.sequences:
        assert seq.stop_reason == "stop" and seq.tokens == full[:cut]

    plp = sc.compute_logprobs(types.ModelInput.from_ints(SEQ_A)).result()
    assert plp[0] is None and len(plp) == len(SEQ_A)
    np.testing.assert_allclose(plp[1:], forward_logprobs(tc, SEQ_A), atol=1e-4)


def test_ephemeral_sampler_is_a_frozen_snapshot(service_client):
    tc = service_client.create_lora_training_client(base_model=MODEL, rank=4).result()
    before = tc.save_weights_and_get_sampling_client().result()
    lp0 = before.compute_logprobs(types.ModelInput.from_ints(SEQ_A)).result()
    for _ in range(2):
        tc.forward_backward([datum_ce(SEQ_A)], "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=2e-2))
    after = tc.save_weights_and_get_sampling_client().result()
    lp1 = after.compute_logprobs(types.ModelInput.from_ints(SEQ_A)).result()
    assert sum(lp1[1:]) > sum(lp0[1:]) + 1e-3  # trained on SEQ_A
    assert before.compute_logprobs(types.ModelInput.from_ints(SEQ_A)).result() == pytest.approx(lp0, abs=1e-5)
    base = service_client.create_sampling_client(base_model=MODEL).result()
    assert base.compute_logprobs(types.ModelInput.from_ints(SEQ_A)).result() == pytest.approx(lp0, abs=1e-4)


def test_only_the_newest_ephemeral_samplers_are_kept_and_an_older_one_fails_clearly(service_client):
    from gemtinker.server.service import MAX_EPHEMERAL_SAMPLERS

    tc = service_client.create_lora_training_client(base_model=MODEL, rank=4).result()
    clients = [tc.save_weights_and_get_sampling_client().result() for _ in range(MAX_EPHEMERAL_SAMPLERS + 1)]
    prompt = types.ModelInput.from_ints(SEQ_A)
    for kept in clients[1:]:
        assert len(kept.compute_logprobs(prompt).result()) == len(SEQ_A)
    with pytest.raises(Exception, match=f"no longer available.*{MAX_EPHEMERAL_SAMPLERS} newest"):
        clients[0].compute_logprobs(prompt).result()
    assert len(clients[-1].compute_logprobs(prompt).result()) == len(SEQ_A)  # the server still serves


def test_save_state_and_resume_with_optimizer(service_client):
    tc = service_client.create_lora_training_client(base_model=MODEL, rank=4).result()
    adam = types.AdamParams(learning_rate=1e-2)
    for _ in range(2):
        tc.forward_backward([datum_ce(SEQ_A)], "cross_entropy")
        tc.optim_step(adam)
    state = tc.save_state("state-1").result()
    assert state.path == f"tinker://{tc.model_id}/weights/state-1"
    saved_lp = forward_logprobs(tc, SEQ_A)

    resumed = service_client.create_training_client_from_state_with_optimizer(state.path).result()
    fresh_opt = service_client.create_training_client_from_state(state.path).result()
    np.testing.assert_allclose(forward_logprobs(resumed, SEQ_B), forward_logprobs(tc, SEQ_B), atol=1e-5)
    # The same next step on the original and the resumed client: identical only if Adam's
    # moments were restored; a fresh optimizer takes a different step.
    for c in (tc, resumed, fresh_opt):
        c.forward_backward([datum_ce(SEQ_B)], "cross_entropy")
        c.optim_step(adam).result()
    ref = forward_logprobs(tc, SEQ_B)
    np.testing.assert_allclose(forward_logprobs(resumed, SEQ_B), ref, atol=1e-4)
    assert np.abs(forward_logprobs(fresh_opt, SEQ_B) - ref).max() > 1e-3

    # Legacy in-place load_state (deprecated in the SDK) goes back to the saved weights.
    assert np.abs(forward_logprobs(tc, SEQ_A) - saved_lp).max() > 1e-4
    with pytest.warns(FutureWarning):
        tc.load_state(state.path).result()
    np.testing.assert_allclose(forward_logprobs(tc, SEQ_A), saved_lp, atol=1e-5)


def test_rest_client_lists_looks_up_and_deletes(server, service_client):
    tc = service_client.create_lora_training_client(base_model=MODEL, rank=4, user_metadata={"renderer_name": "role_colon"}).result()
    a = tc.save_state("keep").result().path
    b = tc.save_weights_for_sampler("drop").result().path
    rc = rest_client(server)
    run = rc.get_training_run(tc.model_id).result()
    assert run.base_model == MODEL and run.lora_rank == 4 and run.user_metadata == {"renderer_name": "role_colon"}
    assert rc.get_training_run_by_tinker_path(a).result().training_run_id == tc.model_id
    runs = rc.list_training_runs(limit=100).result()
    assert tc.model_id in [r.training_run_id for r in runs.training_runs]
    ckpts = {c.tinker_path: c for c in rc.list_checkpoints(tc.model_id).result().checkpoints}
    assert ckpts[a].checkpoint_type == "training" and ckpts[b].checkpoint_type == "sampler"
    assert ckpts[a].checkpoint_id == "weights/keep" and ckpts[a].size_bytes > 0
    assert a in [c.tinker_path for c in rc.list_user_checkpoints().result().checkpoints]
    info = rc.get_weights_info_by_tinker_path(a).result()
    assert info.base_model == MODEL and info.lora_rank == 4
    rc.delete_checkpoint_from_tinker_path(b).result()
    assert b not in [c.tinker_path for c in rc.list_checkpoints(tc.model_id).result().checkpoints]
    with pytest.raises(Exception, match="not found"):
        service_client.create_sampling_client(model_path=b).result()
    session = rc.get_session(tc.model_id.split(":")[0]).result()
    assert tc.model_id in session.training_run_ids


def test_two_training_clients_at_once(service_client):
    a = service_client.create_lora_training_client(base_model=MODEL, rank=4, seed=1).result()
    b = service_client.create_lora_training_client(base_model=MODEL, rank=4, seed=2).result()
    b_before = forward_logprobs(b, SEQ_B)

    def train(tc, seq, lr):
        for _ in range(3):
            tc.forward_backward([datum_ce(seq)], "cross_entropy")
            tc.optim_step(types.AdamParams(learning_rate=lr)).result()
        return forward_logprobs(tc, seq)

    with cf.ThreadPoolExecutor(2) as pool:
        fa = pool.submit(train, a, SEQ_A, 1e-2)
        fb = pool.submit(train, b, SEQ_B, 0.0)  # lr 0: b must not move, whatever a does
        fa.result()
        np.testing.assert_allclose(fb.result(), b_before, atol=1e-5)


def test_stop_strings_with_several_samples(server, service_client):
    sc = service_client.create_sampling_client(base_model=MODEL).result()
    tok = server.service.engine_for(MODEL).tokenizer  # white-box: the server's own tokenizer
    prompt = types.ModelInput.from_ints(SEQ_A[:4])
    full = sc.sample(prompt, 1, types.SamplingParams(max_tokens=8, temperature=0.0, stop=[])).result().sequences[0].tokens
    # First generated token whose text is new (a random tiny model often repeats one token).
    k = next(i for i in range(len(full)) if tok.decode(full[i:i + 1]).strip()
             and tok.decode(full[i:i + 1]) not in tok.decode(full[:i]))
    stop = tok.decode(full[k:k + 1])
    res = sc.sample(prompt, 3, types.SamplingParams(max_tokens=8, temperature=0.0, stop=stop)).result()
    assert len(res.sequences) == 3
    for seq in res.sequences:
        assert seq.stop_reason == "stop" and seq.tokens == full[: len(seq.tokens)] and len(seq.tokens) <= k + 1
        assert stop in tok.decode(seq.tokens)
