"""Custom losses through the real SDK: `forward_backward_custom` with a callable (client-side), and
`create_custom_loss` losses the server runs from their traced graph (custom_loss.py), including
graphs a hostile client writes by hand."""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from support.server import API_KEY, MODEL, SEQ_A, SEQ_B, forward_logprobs
import tinker
from gemtinker.server import start_local
from tinker import types

pytestmark = pytest.mark.integration  # a real (tiny) torch engine behind HTTP, or a server subprocess: `make test` only

BETA = 0.5


def dpo(logprobs, chosen, rejected, ref_margin):
    """DPO on one datum holding a chosen and a rejected continuation (masks say which tokens)."""
    margin = (logprobs * chosen).sum() - (logprobs * rejected).sum() - ref_margin
    loss = -F.logsigmoid(BETA * margin)
    return loss, {"custom/margin:mean": margin, "custom/acc:mean": (margin > 0).float()}


def _f32(xs: list[float]) -> types.TensorData:
    return types.TensorData(data=xs, dtype="float32", shape=[len(xs)])


def _pair_datum(tokens: list[int], split: int, ref_margin: float) -> types.Datum:
    n = len(tokens) - 1
    chosen = [1.0 if i < split else 0.0 for i in range(n)]
    rejected = [0.0 if i < split else 1.0 for i in range(n)]
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": tokens[1:], "chosen": _f32(chosen), "rejected": _f32(rejected),
            "ref_margin": types.TensorData(data=[ref_margin], dtype="float32", shape=[]),
        },
    )


DATA = [_pair_datum(SEQ_A, 4, 0.3), _pair_datum(SEQ_B, 5, -0.2)]
RANKS = {"logprobs": 1, "chosen": 1, "rejected": 1, "ref_margin": 0}


def _step(tc, loss) -> types.ForwardBackwardOutput:
    out = tc.forward_backward_custom(DATA, loss).result()
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    return out


@pytest.fixture(scope="module")
def chunky_server(tmp_path_factory):
    """One datum per forward_backward request: a loss's datums arrive in several requests."""
    with start_local(models=[MODEL], root=tmp_path_factory.mktemp("chunky"),
                     client_config={"fwdbwd_max_chunk_len": 1}) as srv:
        yield srv


@pytest.mark.parametrize("where", ["server", "chunky_server"])
def test_server_side_dpo_matches_client_side(request, where):
    server = request.getfixturevalue(where)
    sc = tinker.ServiceClient(base_url=server.base_url, api_key=API_KEY)
    try:
        handle = sc.create_custom_loss(dpo, RANKS).result()
        assert handle.loss_id is not None and handle.loss_id.startswith(sc.holder.get_session_id())
        local = dataclasses.replace(handle, loss_id=None)  # the same traced graph, run by the SDK
        a = sc.create_lora_training_client(base_model=MODEL, rank=4, seed=5).result()
        b = sc.create_lora_training_client(base_model=MODEL, rank=4, seed=5).result()
        before = forward_logprobs(a, SEQ_A)
        out_a, out_b = _step(a, handle), _step(b, local)
        for key in ("loss:sum", "custom/margin:mean", "custom/acc:mean", "surrogate_loss:sum"):
            assert out_a.metrics[key] == pytest.approx(out_b.metrics[key], abs=1e-5), key
        # the loss is the DPO loss of the logprobs the pass returned
        lps = [np.asarray(o["logprobs"].data) for o in out_a.loss_fn_outputs]
        margins = [lps[0][:4].sum() - lps[0][4:].sum() - 0.3, lps[1][:5].sum() - lps[1][5:].sum() + 0.2]
        want = sum(float(-F.logsigmoid(torch.tensor(BETA * m))) for m in margins)
        assert out_a.metrics["loss:sum"] == pytest.approx(want, abs=1e-4)
        for oa, ob in zip(out_a.loss_fn_outputs, out_b.loss_fn_outputs):
            np.testing.assert_allclose(oa["logprobs"].data, ob["logprobs"].data, atol=1e-5)
        after_a, after_b = forward_logprobs(a, SEQ_A), forward_logprobs(b, SEQ_A)
        assert np.abs(after_a - before).max() > 1e-3  # the step changed the weights
        np.testing.assert_allclose(after_a, after_b, atol=1e-5)
        np.testing.assert_allclose(forward_logprobs(a, SEQ_B), forward_logprobs(b, SEQ_B), atol=1e-5)
    finally:
        sc.close("success")


def distill(logprobs, target_dist):
    """Cross-entropy against a target distribution over K candidate tokens per position."""
    loss = -(logprobs * target_dist).sum()
    return loss, {"custom/top_lp:mean": logprobs.max(dim=1).values.mean()}


def test_rank_two_logprobs_match_client_side(service_client):
    n, k = len(SEQ_A) - 1, 3
    targets = [[SEQ_A[i + 1], (SEQ_A[i + 1] + 1) % 1000, 5] for i in range(n)]
    dist = np.random.default_rng(0).dirichlet(np.ones(k), size=n).astype(np.float32)
    data = [types.Datum(model_input=types.ModelInput.from_ints(SEQ_A[:-1]), loss_fn_inputs={
        "target_tokens": types.TensorData(data=sum(targets, []), dtype="int64", shape=[n, k]),
        "target_dist": types.TensorData(data=dist.reshape(-1).tolist(), dtype="float32", shape=[n, k])})]
    handle = service_client.create_custom_loss(distill, {"logprobs": 2, "target_dist": 2}).result()
    local = dataclasses.replace(handle, loss_id=None)
    a = service_client.create_lora_training_client(base_model=MODEL, rank=4, seed=8).result()
    b = service_client.create_lora_training_client(base_model=MODEL, rank=4, seed=8).result()
    out_a, out_b = (tc.forward_backward_custom(data, loss).result() for tc, loss in ((a, handle), (b, local)))
    assert out_a.loss_fn_outputs[0]["logprobs"].shape == [n, k]
    for key in ("loss:sum", "custom/top_lp:mean"):
        assert out_a.metrics[key] == pytest.approx(out_b.metrics[key], abs=1e-5), key
    for tc in (a, b):
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    np.testing.assert_allclose(forward_logprobs(a, SEQ_A), forward_logprobs(b, SEQ_A), atol=1e-5)


def test_forward_backward_custom_with_a_callable(service_client):
    """The SDK's client-side path: a forward, the callable on the logprobs, a weighted backward."""
    tc = service_client.create_lora_training_client(base_model=MODEL, rank=4, seed=3).result()
    data = [types.Datum(model_input=types.ModelInput.from_ints(SEQ_A[:-1]),
                        loss_fn_inputs={"target_tokens": SEQ_A[1:]})]

    def mean_nll(data, logprobs_list):
        loss = -torch.stack([lp.mean() for lp in logprobs_list]).sum()
        return loss, {"nll": float(loss)}

    before = forward_logprobs(tc, SEQ_A)
    out = tc.forward_backward_custom(data, mean_nll).result()
    assert out.metrics["loss:sum"] == pytest.approx(-before.mean(), abs=1e-4)
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    assert forward_logprobs(tc, SEQ_A).mean() > before.mean()


def ppo_like(logprobs, old, adv):
    ratio = torch.exp(logprobs - old.detach())
    clipped = torch.clamp(ratio, 0.8, 1.2)
    loss = -torch.minimum(ratio * adv, clipped * adv).sum() / logprobs.shape[0]
    return loss, {"custom/clip:mean": ((ratio < 0.8) | (ratio > 1.2)).to(torch.float32).mean()}


def masked_tail(logprobs, mask):
    kept = torch.where(mask > 0, logprobs, torch.zeros_like(logprobs))[1:]
    return -kept.sum() + 0.1 * F.softplus(-logprobs).mean(), {"custom/kept:sum": (mask[1:] > 0).float().sum()}


def entropy_like(logprobs, w):
    p = F.softmax(logprobs, dim=-1)
    top = logprobs.max(dim=-1)
    return -(p * F.log_softmax(logprobs, dim=-1) * w).sum() + top.values.sum() * 0.01, {}


@pytest.mark.parametrize("fn,ranks", [(dpo, RANKS), (distill, {"logprobs": 2, "target_dist": 2}),
                                      (ppo_like, {"logprobs": 1, "old": 1, "adv": 1}),
                                      (masked_tail, {"logprobs": 1, "mask": 1}),
                                      (entropy_like, {"logprobs": 2, "w": 2})])
def test_the_server_interpreter_agrees_with_torch(fn, ranks):
    """Without a server: the SDK's encoding of a traced loss, rebuilt by custom_loss.py, computes
    what calling the function does (value, metrics and gradient)."""
    from tinker.lib.public_interfaces.custom_loss import encode_graph, trace_loss

    from gemtinker.server.custom_loss import check_inputs, compile_graph, run_graph

    handle = trace_loss(fn, ranks, "s")
    wire = json.loads(encode_graph(handle).model_dump_json())
    inputs = check_inputs(handle.name, [x.model_dump() for x in handle.inputs])
    nodes = compile_graph(handle.name, inputs, wire["nodes"])
    gen = torch.Generator().manual_seed(0)
    args = [-torch.rand((6, 3) if rank == 2 else (6,) if rank == 1 else (), generator=gen) for _, rank in inputs]
    lp_a, lp_b = args[0].clone().requires_grad_(True), args[0].clone().requires_grad_(True)
    want, want_m = fn(lp_a, *args[1:])
    got, got_m = run_graph(handle.name, nodes, [lp_b, *args[1:]])
    want.backward()
    got.backward()
    assert float(got) == pytest.approx(float(want), abs=1e-6)
    assert {k: float(v) for k, v in got_m.items()} == pytest.approx({k: float(v) for k, v in want_m.items()})
    torch.testing.assert_close(lp_b.grad, lp_a.grad)


# ------------------------------------------------------------------ hostile graphs
def _post(server, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"{server.base_url}/api/v1/{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "X-API-Key": API_KEY})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _create(server, session_id: str, seq: int, nodes: list[dict], inputs=None) -> dict:
    """create_custom_loss as a hand-written request; the future's result."""
    rid = _post(server, "create_custom_loss", {
        "session_id": session_id, "custom_loss_seq_id": seq, "name": "evil",
        "inputs": inputs or [{"name": "logprobs", "rank": 1}], "graph": {"format": 1, "nodes": nodes},
    })["request_id"]
    for _ in range(50):
        res = _post(server, "retrieve_future", {"request_id": rid})
        if res.get("type") != "try_again":
            return res
    raise AssertionError("create_custom_loss never finished")


def _graph(*body: dict, out: str) -> list[dict]:
    return [{"op": "placeholder", "name": "logprobs", "target": "logprobs"}, *body,
            {"op": "output", "name": "output", "target": "output",
             "args": [{"tuple": [{"ref": out}, {"dict": {}}]}]}]


def _call(name: str, target: str, *args, op: str = "call_function", **kwargs) -> dict:
    return {"op": op, "name": name, "target": target, "args": list(args), "kwargs": kwargs}


LP = {"ref": "logprobs"}
HOSTILE = {
    "os.system": (_graph(_call("x", "os.system", "touch /tmp/gemtinker-pwned"), out="logprobs"), "os.system"),
    "open": (_graph(_call("x", "builtins.open", "/etc/passwd"), out="logprobs"), "builtins.open"),
    "open_short": (_graph(_call("x", "open", "/etc/passwd"), out="logprobs"), "'open'"),
    "eval": (_graph(_call("x", "builtins.eval", "1+1"), out="logprobs"), "builtins.eval"),
    "import": (_graph(_call("x", "builtins.__import__", "os"), out="logprobs"), "__import__"),
    "torch.load": (_graph(_call("x", "torch.load", "/tmp/x.pt"), out="logprobs"), "torch.load"),
    "class": (_graph(_call("x", "getattr", LP, "__class__"), out="logprobs"), "__class__"),
    "globals": (_graph(_call("x", "getattr", LP, "__globals__"), out="logprobs"), "__globals__"),
    "method_dunder": (_graph(_call("x", "__reduce_ex__", LP, 2, op="call_method"), out="logprobs"),
                      "__reduce_ex__"),
    "numpy_method": (_graph(_call("x", "numpy", LP, op="call_method"), out="logprobs"), "'numpy'"),
    "call_module": (_graph({"op": "call_module", "name": "x", "target": "os", "args": [LP], "kwargs": {}},
                           out="logprobs"), "call_module"),
    "get_attr": (_graph({"op": "get_attr", "name": "x", "target": "secret", "args": [], "kwargs": {}},
                        out="logprobs"), "get_attr"),
    "pickle": (_graph(_call("x", "torch.tensor", {"pickle": "gASVAAAAAAAAAAA="}), out="logprobs"), "pickle"),
    "forward_ref": (_graph(_call("x", "torch.exp", {"ref": "later"}), out="logprobs"), "later"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_graphs_are_refused_at_creation(server, service_client, case):
    nodes, needle = HOSTILE[case]
    res = _create(server, service_client.holder.get_session_id(), 1000 + sorted(HOSTILE).index(case), nodes)
    assert res.get("category") == "user", res
    assert "node 'x'" in res["error"] or "'later'" in res["error"], res["error"]
    assert needle in res["error"], res["error"]


def test_huge_allocations_are_refused_when_run_and_the_server_keeps_serving(server, service_client):
    sid = service_client.holder.get_session_id()
    tc = service_client.create_lora_training_client(base_model=MODEL, rank=4, seed=1).result()
    big = [{"tuple": [100_000, 100_000]}]
    cases = {
        "zeros": _graph(_call("x", "torch.zeros", *big), _call("y", "operator.add", LP, {"ref": "x"}), out="y"),
        "arange": _graph(_call("x", "torch.arange", 10**12), _call("y", "operator.add", LP, {"ref": "x"}), out="y"),
        "repeat": _graph(_call("x", "repeat", LP, 10**6, 10**3, op="call_method"), out="x"),
        "outer": _graph(_call("x", "unsqueeze", LP, 1, op="call_method"),
                        _call("y", "expand", {"ref": "x"}, 10, 10**7, op="call_method"), out="y"),
        "arange_kw": _graph(_call("x", "torch.arange", end=10**12), out="logprobs"),
        "arange_tensor": _graph(_call("n", "torch.tensor", 10**12), _call("x", "torch.arange", {"ref": "n"}),
                                out="logprobs"),
        "cat": _graph(_call("x", "unsqueeze", LP, 1, op="call_method"),
                      _call("y", "expand", {"ref": "x"}, 10, 400_000, op="call_method"),
                      _call("z", "torch.cat", [{"ref": "y"}] * 20), out="z"),
        "matmul_work": _graph(_call("x", "torch.ones", 2000, 2000), _call("y", "torch.matmul", {"ref": "x"}, {"ref": "x"}),
                              *[_call(f"m{i}", "torch.matmul", {"ref": "x"}, {"ref": "x"}) for i in range(3)],
                              out="logprobs"),
        "tensor_values": _graph(_call("x", "getattr", LP, "values"), out="logprobs"),  # a bound method
        "out_kwarg": _graph(_call("x", "torch.exp", LP, out=LP), out="logprobs"),
        "int_pow": _graph(_call("x", "operator.pow", 10, 10**9), out="logprobs"),
        "str_mul": _graph(_call("x", "operator.mul", "a", 10**9), out="logprobs"),
    }
    data = [types.Datum(model_input=types.ModelInput.from_ints(SEQ_A[:-1]),
                        loss_fn_inputs={"target_tokens": SEQ_A[1:]})]
    for seq, (case, nodes) in enumerate(cases.items()):
        made = _create(server, sid, 2000 + seq, nodes)
        assert made.get("loss_id"), (case, made)
        t0 = time.time()
        with pytest.raises(tinker.RequestFailedError, match=r"node '(x|y|z|m\d)' (is refused|failed)") as e:
            tc.forward_backward(data, "custom", {"loss_id": made["loss_id"]}).result()
        assert time.time() - t0 < 30, case
        assert any(w in str(e.value) for w in ("limit", "out of range", "string", "out=", "only tensor attributes")), (case, e.value)
    # still serving, and the refused ops left no gradient behind
    before = forward_logprobs(tc, SEQ_A)
    tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    np.testing.assert_allclose(forward_logprobs(tc, SEQ_A), before, atol=1e-6)


def test_a_loss_is_bound_to_its_session(server, service_client):
    handle = service_client.create_custom_loss(dpo, RANKS).result()
    other = tinker.ServiceClient(base_url=server.base_url, api_key=API_KEY)
    try:
        tc = other.create_lora_training_client(base_model=MODEL, rank=4).result()
        with pytest.raises(tinker.RequestFailedError, match="belongs to another session"):
            tc.forward_backward(DATA, "custom", {"loss_id": handle.loss_id}).result()
        with pytest.raises(tinker.RequestFailedError, match="unknown custom loss"):
            tc.forward_backward(DATA, "custom", {"loss_id": "nope"}).result()
    finally:
        other.close("success")


def test_bad_inputs_name_the_datum(service_client):
    def needs_mask(logprobs, mask):  # never sent a mask below
        loss = -(logprobs * mask).sum()
        return loss, {}

    handle = service_client.create_custom_loss(needs_mask, {"logprobs": 1, "mask": 1}).result()
    tc = service_client.create_lora_training_client(base_model=MODEL, rank=4).result()
    data = [types.Datum(model_input=types.ModelInput.from_ints(SEQ_A[:-1]),
                        loss_fn_inputs={"target_tokens": SEQ_A[1:]})]
    with pytest.raises(tinker.RequestFailedError, match=r"datum 0 has no loss_fn_inputs\['mask'\]"):
        tc.forward_backward(data, "custom", {"loss_id": handle.loss_id}).result()


WEIRD = [None, True, -1, 2**70, 1e308, "x", "../../etc", [], [1, "a"], {}, {"type": {"a": []}}, {"ref": "logprobs"},
         [{"ref": []}], [{"dtype": []}], [{"device": {}}], [{"float": [1]}], [{"memory_format": {}}], [{"slice": 3}]]


def test_type_confused_create_custom_loss_is_a_user_error(server, service_client):
    sid = service_client.holder.get_session_id()
    nodes = _graph(_call("x", "torch.exp", LP), out="x")
    body = {"session_id": sid, "custom_loss_seq_id": 0, "name": "fz",
            "inputs": [{"name": "logprobs", "rank": 1}], "graph": {"format": 1, "nodes": nodes}}
    seq = iter(range(3000, 10_000))
    failures = []

    def check(what: str, mutated: dict) -> None:
        try:
            rid = _post(server, "create_custom_loss", {**mutated, "custom_loss_seq_id": next(seq)})["request_id"]
        except urllib.error.HTTPError as e:
            if e.code >= 500:
                failures.append(f"{what}: HTTP {e.code}")
            return
        res = _post(server, "retrieve_future", {"request_id": rid})
        if res.get("category") == "server" or res.get("type") == "try_again":
            failures.append(f"{what}: {res}")

    for key in body:
        for weird in WEIRD:
            check(f"{key}={weird!r}", {**body, key: weird})
    for i in range(len(nodes)):
        for key in ("op", "name", "target", "args", "kwargs"):
            for weird in WEIRD:
                bad = [dict(n) for n in nodes]
                bad[i][key] = weird
                check(f"node {i}.{key}={weird!r}", {**body, "graph": {"format": 1, "nodes": bad}})
    assert not failures, "\n".join(failures)
