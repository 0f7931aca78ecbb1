"""Protocol, error and capacity tests of the server over a fake engine (tests/support/fake_engine.py).

These check what the server does with requests (parsing, refusals, seq_id slots, caps), never
what a model computes, so they run against the `EngineAPI` Protocol with no model loaded: each
server here starts in well under a second. Moved from test_server_hardening.py and
test_server_errors.py, where they started the real torch engine.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import tinker
from support.fake_engine import FakeEngine
from tinker import types

from support.server import API_KEY, MODEL, SEQ_A, datum_ce

from gemtinker.server import start_local

BODY_LIMIT = 256 << 10
CONTEXT = 4096  # the fake's max_len, as the tiny Llama's


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    # Small limits so the tests can reach them cheaply.
    with start_local(models=[MODEL], root=tmp_path_factory.mktemp("fake"), engine_factory=FakeEngine,
                     max_body_bytes=BODY_LIMIT, max_num_samples=16, max_queued_sequences=16,
                     max_queued_train_bytes=64 << 10) as s:
        yield s


def _raw(srv, path: str, body: bytes, ctype: str = "application/json") -> tuple[int, dict, dict]:
    req = urllib.request.Request(srv.base_url + path, data=body, method="POST",
                                 headers={"Content-Type": ctype, "X-API-Key": API_KEY})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            raw = r.read()
            if "protobuf" in r.headers.get("content-type", ""):
                return r.status, dict(r.headers), {"proto_bytes": len(raw)}
            return r.status, dict(r.headers), json.loads(raw)
    except urllib.error.HTTPError as e:
        raw = e.read()
        assert raw, f"{path}: empty {e.code} body (the SDK would retry it as a network glitch)"
        return e.code, dict(e.headers), json.loads(raw)


def _poll(srv, rid: str) -> dict:
    status, _, out = _raw(srv, "/api/v1/retrieve_future", json.dumps({"request_id": rid}).encode())
    assert status == 200
    return out


def test_the_server_runs_on_the_fake_engine(srv, tc):
    out = tc.forward_backward([datum_ce(SEQ_A)], "cross_entropy").result()
    assert out.metrics["loss:sum"] > 0
    engine = srv.service.engine_for(MODEL)
    assert isinstance(engine, FakeEngine) and "forward_backward" in engine.calls


def test_undecodable_protobuf_is_a_user_error(srv):
    status, _, out = _raw(srv, "/api/v1/forward_backward", b"\xff\xff\xff\xff garbage", "application/x-protobuf")
    assert status == 200
    res = _poll(srv, out["request_id"])
    assert res["category"] == "user" and "not a valid ForwardBackwardRequest protobuf" in res["error"]


def test_unknown_training_model_id(srv, tc):
    # A forward_backward for a model id that was never created: a failed future, not a hang.
    req = tinker.proto.tinker_public_pb2.ForwardBackwardRequest(model_id="ghost:train:0", seq_id=1, loss_fn="cross_entropy")
    status, _, out = _raw(srv, "/api/v1/forward_backward", req.SerializeToString(), "application/x-protobuf")
    res = _poll(srv, out["request_id"])
    assert res["category"] == "user" and "unknown model id 'ghost:train:0'" in res["error"]
    assert tc.forward_backward([datum_ce(SEQ_A)], "cross_entropy").result().metrics


def test_absurd_num_samples_and_max_tokens(sc):
    sampler = sc.create_sampling_client(base_model=MODEL).result()
    prompt = types.ModelInput.from_ints([1, 2, 3])
    with pytest.raises(tinker.RequestFailedError, match=r"num_samples must be an integer in 1\.\.16 \(this server's limit\), got 17"):
        sampler.sample(prompt, 17, types.SamplingParams(max_tokens=2)).result()
    with pytest.raises(tinker.RequestFailedError, match=rf"max_tokens=1000000 exceeds the model's context length of {CONTEXT}"):
        sampler.sample(prompt, 1, types.SamplingParams(max_tokens=1_000_000)).result()
    # A long max_tokens that the context still holds is fine (it stops at "length").
    assert len(sampler.sample(prompt, 2, types.SamplingParams(max_tokens=3)).result().sequences) == 2


# Values that break naive field handling: wrong types, huge numbers, path tricks, deep objects.
WEIRD = [None, True, -1, 2**70, 1e308, "x", "../../etc", [], [1, "a"], {}, {"type": {"a": []}}]


def test_type_confused_fields_never_make_a_5xx(srv, sc, tc):
    sampler = sc.create_sampling_client(base_model=MODEL).result()
    session = tc.model_id.split(":")[0]
    # Training ops go to a model of their own, each at the seq_id its queue waits for, so none
    # waits for a gap and the SDK client `tc` keeps its own seq_id numbering.
    status, _, out = _raw(srv, "/api/v1/create_model", json.dumps(
        {"session_id": session, "model_seq_id": 77, "base_model": MODEL, "lora_config": {"rank": 4}}).encode())
    fz_model = _poll(srv, out["request_id"])["model_id"]
    good = {
        "create_session": {"tags": [], "user_metadata": {}, "sdk_version": "0.38.0"},
        "session_heartbeat": {"session_id": session},
        "create_model": {"session_id": session, "model_seq_id": 99, "base_model": MODEL, "lora_config": {"rank": 4}},
        "get_info": {"model_id": tc.model_id},
        "optim_step": {"model_id": fz_model, "seq_id": 0, "adam_params": {"learning_rate": 1e-4}},
        "save_weights": {"model_id": fz_model, "seq_id": 0, "path": "fz", "overwrite": True},
        "save_weights_for_sampler": {"model_id": fz_model, "seq_id": 0, "path": "fz", "overwrite": True},
        "load_weights": {"session_id": session, "model_seq_id": 98, "path": f"tinker://{tc.model_id}/weights/none"},
        "create_sampling_session": {"session_id": session, "sampling_session_seq_id": 50, "base_model": MODEL},
        "asample": {"sampling_session_id": sampler._sampling_session_id,
                    "seq_id": 1, "num_samples": 1, "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2]}]},
                    "sampling_params": {"max_tokens": 2, "temperature": 1.0}, "topk_prompt_logprobs": 0},
        "retrieve_future": {"request_id": "req-x", "allow_metadata_only": False},
        "weights_info": {"tinker_path": f"tinker://{tc.model_id}/weights/none"},
        "unload_model": {"model_id": "nobody:train:0"},
    }
    seq = iter(range(1_000_000, 2_000_000))
    failures = []
    for endpoint, body in good.items():
        for key in body:
            for weird in WEIRD:
                mutated = {**body, key: weird}
                if endpoint == "asample" and key != "seq_id":
                    mutated["seq_id"] = next(seq)  # not a dedupe hit of an earlier mutation
                if mutated.get("model_id") == fz_model and key != "seq_id":
                    mutated["seq_id"] = srv.service._queues[fz_model].next_seq
                status, _, out = _raw(srv, f"/api/v1/{endpoint}", json.dumps(mutated).encode())
                if status >= 500:
                    failures.append(f"{endpoint}.{key}={weird!r}: HTTP {status} {out}")
                    continue
                if status == 200 and isinstance(out, dict) and isinstance(out.get("request_id"), str) and endpoint != "retrieve_future":
                    res = _poll(srv, out["request_id"])
                    if res.get("category") == "server":
                        failures.append(f"{endpoint}.{key}={weird!r}: server error {res['error']}")
    assert not failures, "\n".join(failures)
    for bad_nested in ({"max_tokens": "3"}, {"stop": {"a": 1}}, {"temperature": "hot"}, {"top_k": [1]}, {"seed": "s"}, [1]):
        body = {**good["asample"], "seq_id": next(seq), "sampling_params": bad_nested}
        status, _, out = _raw(srv, "/api/v1/asample", json.dumps(body).encode())
        assert status == 200, out
        res = _poll(srv, out["request_id"])
        assert res.get("category") == "user", (bad_nested, res)
    assert tc.forward_backward([datum_ce(SEQ_A)], "cross_entropy").result().metrics


def test_training_queue_byte_cap_is_retryable_and_never_blocks_the_next_op(srv, tc):
    from tinker.proto import tinker_public_pb2 as pb

    def fb(seq_id: int) -> bytes:
        msg = pb.ForwardBackwardRequest(model_id=tc.model_id, seq_id=seq_id, loss_fn="cross_entropy")
        d = msg.data.add()
        d.model_input.add().encoded_text.tokens = b"\1\0\0\0" * 20_000  # ~80 KB, over the 64 KiB cap
        return msg.SerializeToString()

    far = 50_000  # a seq_id far ahead waits in the queue: over the cap it is refused with 429
    status, headers, out = _raw(srv, "/api/v1/forward_backward", fb(far), "application/x-protobuf")
    assert status == 429 and "retry shortly" in out["error"] and "retry-after" in {k.lower() for k in headers}
    assert srv.service.queued_train_bytes == 0
    # The SDK's own ops (seq_id == next) always get in, whatever their size.
    assert tc.forward_backward([datum_ce(SEQ_A)], "cross_entropy").result().metrics
