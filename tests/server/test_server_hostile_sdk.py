"""Issue 14's failure classes with good clients running beside them.

For every hostile request of bench/hostile.py (raw HTTP) and for each one the `tinker` SDK itself
can send, the bad request gets a clear 4xx or `user` error while good SDK clients sample and
train concurrently; every good request succeeds, and the server still serves afterwards.
(The slow and half-open connections of the same issue are in test_server_slow_clients.py.)
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tinker
from tinker import types

from support.server import API_KEY, MODEL, SEQ_A, datum_ce

from gemtinker.server import start_local

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import hostile  # noqa: E402  (bench/hostile.py: the hostile clients of bench/load.py)

pytestmark = pytest.mark.integration  # a real (tiny) torch engine behind HTTP, or a server subprocess: `make test` only

VOCAB = 49152


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    with start_local(models=[MODEL], root=tmp_path_factory.mktemp("hostile-sdk")) as s:
        yield s


@pytest.fixture(scope="module")
def tc(sc):
    return sc.create_lora_training_client(base_model=MODEL, rank=4, seed=3).result()


@pytest.fixture(scope="module")
def sampler(sc):
    return sc.create_sampling_client(base_model=MODEL).result()


@pytest.fixture(scope="module")
def attacker(srv):
    client = hostile.HostileClient(srv.port, API_KEY, MODEL, VOCAB, seed=1, tally=hostile.Tally(), header_timeout_s=20)
    client.setup()
    return client


@contextlib.contextmanager
def good_traffic(sampler, tc) -> Iterator[None]:
    """Good SDK clients sampling (3 threads) and training (1) for as long as the block runs and
    until each has finished at least one call after it began; any failure fails the test."""
    stop, errors, done = threading.Event(), [], {"sample": 0, "train": 0}
    lock = threading.Lock()

    def loop(kind: str) -> None:
        while True:
            try:
                if kind == "sample":
                    res = sampler.sample(types.ModelInput.from_ints([5, 6, 7]), 2,
                                         types.SamplingParams(max_tokens=4, temperature=1.0)).result(timeout=120)
                    assert len(res.sequences) == 2
                else:
                    assert tc.forward_backward([datum_ce(SEQ_A)], "cross_entropy").result(timeout=120).metrics
            except Exception as e:  # noqa: BLE001 - reported by the test
                errors.append(f"{kind}: {type(e).__name__}: {e}")
            with lock:
                done[kind] += 1
            if stop.is_set():
                return

    threads = [threading.Thread(target=loop, args=(k,), daemon=True) for k in ("sample", "sample", "sample", "train")]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        before = dict(done)
        deadline = time.time() + 120
        while any(done[k] <= before[k] for k in done) and time.time() < deadline:
            time.sleep(0.05)  # each kind finishes a call that overlapped the bad requests
        stop.set()
        for t in threads:
            t.join(timeout=180)
    assert not errors, errors
    assert all(n > 0 for n in done.values()), done


# ------------------------------------------------------------------ raw HTTP, every attack
EXPECTED = {  # attack -> what its error message says
    "sample seed 2**64": "sampling_params.seed must be an integer in 0..2**64-1",
    "prompt token 10**30": "token id 1000000000000000000000000000000 is out of the vocabulary",
    "token id >= vocab": f"token id {VOCAB + 7} is out of the vocabulary",
    "lora seed 2**64": "lora_config.seed must be an integer in 0..2**64-1",
    "protobuf dense of 7 bytes": "7 bytes is not a whole number of 4-byte elements",
    "sparse [1, 250000000]": "more than this server's limit",
    "limit beyond int64": "limit",
    "offset beyond int64": "offset",
    "lone surrogate": "lone UTF-16 surrogate",
    "ttl 1e12": "ttl_seconds must be a number of seconds in 1..315360000",
    "cross-site Host": "is not a loopback name",
    "text/plain JSON": "takes a JSON body (Content-Type: application/json)",
    "checkpoint name x\\n": "invalid checkpoint name",
    "other key deletes a checkpoint": "belongs to another API key",
    "model for an unknown session": "is unknown or finished",
    "other key takes a model id": "belongs to another API key",
}


def test_every_attack_has_an_expected_message():
    assert set(EXPECTED) == set(hostile.HostileClient.ATTACKS)


@pytest.mark.parametrize("attack", sorted(hostile.HostileClient.ATTACKS))
def test_each_hostile_request_is_a_client_error_while_good_clients_run(srv, sampler, tc, attacker, attack):
    with good_traffic(sampler, tc):
        for _ in range(2):
            seq0 = attacker.model_seq
            status, out = attacker.attacks()[attack]()
            if status != 200:
                attacker.model_seq = seq0
            outcome, message = attacker.answer(status, out)
            assert not hostile.Tally.bad(outcome), (attack, outcome, out)
            assert EXPECTED[attack] in message, (attack, outcome, message)
    listed = json.dumps(attacker._request("GET", f"/api/v1/training_runs/{attacker.model_id}/checkpoints",
                                                  ctype=None)[1])
    assert attacker.victim in listed  # no attack removed the victim checkpoint


# ------------------------------------------------------------------ through the SDK
def _user_error(e: BaseException, needle: str) -> None:
    text = str(e)
    assert needle in text, text
    assert getattr(e, "status_code", 400) < 500 and "'category': 'server'" not in text and "server error" not in text


def test_sdk_sample_seed_beyond_uint64(sampler, tc):
    with good_traffic(sampler, tc):
        with pytest.raises(Exception) as ei:
            sampler.sample(types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(max_tokens=4, seed=2**64)).result()
    _user_error(ei.value, "sampling_params.seed must be an integer in 0..2**64-1")


def test_sdk_prompt_token_beyond_any_integer_type(sampler, tc):
    with good_traffic(sampler, tc):
        with pytest.raises(Exception) as ei:
            sampler.sample(types.ModelInput.from_ints([1, 10**30]), 1, types.SamplingParams(max_tokens=4)).result()
    _user_error(ei.value, "token id 1000000000000000000000000000000 is out of the vocabulary")


def test_sdk_lora_seed_beyond_uint64(sc, sampler, tc):
    with good_traffic(sampler, tc):
        with pytest.raises(Exception) as ei:
            sc.create_lora_training_client(base_model=MODEL, rank=4, seed=2**64).result()
    _user_error(ei.value, "lora_config.seed must be an integer in 0..2**64-1")


@pytest.mark.parametrize("call", ["checkpoints limit", "checkpoints offset", "runs limit", "runs offset"])
def test_sdk_listing_page_beyond_int64(srv, sampler, tc, call):
    rest = tinker.RestClient(base_url=srv.base_url, api_key=API_KEY)
    what, field = call.split()
    fn = rest.list_user_checkpoints if what == "checkpoints" else rest.list_training_runs
    with good_traffic(sampler, tc):
        with pytest.raises(tinker.BadRequestError) as ei:
            fn(**{field: 10**20}).result()
    _user_error(ei.value, field)
    assert fn().result()


def test_sdk_checkpoint_ttl_beyond_ten_years(srv, sampler, tc):
    with good_traffic(sampler, tc):
        with pytest.raises(tinker.RequestFailedError) as ei:
            tc.save_state("ttl-sdk", ttl_seconds=10**12).result()
    _user_error(ei.value, "ttl_seconds must be a number of seconds in 1..315360000")
    rest = tinker.RestClient(base_url=srv.base_url, api_key=API_KEY)
    assert rest.list_user_checkpoints().result() is not None
    assert rest.list_training_runs().result().training_runs


def test_sdk_another_key_cannot_delete_a_checkpoint(srv, sampler, tc):
    path = tc.save_state("sdk-owned").result().path
    other = tinker.RestClient(base_url=srv.base_url, api_key="tml-someone-else")
    with good_traffic(sampler, tc):
        with pytest.raises(tinker.PermissionDeniedError) as ei:
            other.delete_checkpoint_from_tinker_path(path).result()
    _user_error(ei.value, "belongs to another API key")
    rest = tinker.RestClient(base_url=srv.base_url, api_key=API_KEY)
    assert path in {c.tinker_path for c in rest.list_checkpoints(tc.model_id).result().checkpoints}


def test_sdk_lone_surrogate_in_metadata_never_reaches_a_batch(srv, sc, sampler, tc):
    """The SDK may refuse to encode a lone surrogate itself; if it sends one, the server's answer
    is a 400 that names it. Either way nothing else is harmed."""
    with good_traffic(sampler, tc):
        with pytest.raises(Exception) as ei:
            sc.create_lora_training_client(base_model=MODEL, rank=4, user_metadata={"k": "x\udbff"}).result()
    e = ei.value
    assert isinstance(e, UnicodeEncodeError) or "lone UTF-16 surrogate" in str(e), repr(e)
