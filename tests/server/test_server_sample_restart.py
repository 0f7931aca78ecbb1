"""Samples in flight when the server dies (issue 16: no call hangs): the SDK collects sample results
through its `retrieve_futures` poller, which only learns of request ids the server's completion
queue lists. A server SIGKILLed mid-sample and restarted on the same root and port lists those
samples as failed, so the client's futures fail promptly saying the server restarted; samples the
old run finished are still listed as finished; and a new sampling client works."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import tinker
from tinker import types

from support.killable import Server
from support.server import API_KEY, MODEL, SEQ_A, free_port
from support.waiting import async_wait_until, wait_until

from gemtinker.server import sample_sessions
from gemtinker.server.futures import FutureTable, Result
from gemtinker.server.store import Store

pytestmark = pytest.mark.integration  # a real (tiny) torch engine behind HTTP, or a server subprocess: `make test` only

PROMPT = types.ModelInput.from_ints(SEQ_A[:5])
# Long enough that the tiny model is still decoding when the kill lands, just after it is accepted.
SLOW = types.SamplingParams(max_tokens=3500, temperature=1.0, seed=3)
QUICK = types.SamplingParams(max_tokens=4, temperature=1.0, seed=3)
FAIL_WITHIN_S = 30.0


@pytest.mark.slow  # SIGKILLs and restarts a child-process server, like test_faults: `make test` only
def test_a_sample_in_flight_across_a_server_kill_fails_promptly(tmp_path):
    root, port = tmp_path / "root", free_port()
    srv = Server(root, port)
    try:
        sc = tinker.ServiceClient(base_url=srv.url, api_key=API_KEY)
        sampler = sc.create_sampling_client(base_model=MODEL).result()
        assert len(sampler.sample(PROMPT, 1, QUICK).result().sequences) == 1  # poller is up
        slow = sampler.sample(PROMPT, 4, SLOW)
        journal = root / sample_sessions.SAMPLE_JOURNAL
        wait_until(lambda: journal.read_text().count('{"w"') >= 2, "the server to accept the slow sample", timeout_s=60)
        assert not slow.future().done(), "the slow sample finished before the kill; raise SLOW.max_tokens"
        srv.kill()
        srv = Server(root, port)
        t0 = time.time()
        try:
            slow.result(timeout=FAIL_WITHIN_S + 30)
            raise AssertionError("a sample cut short by the restart returned a result")
        except Exception as e:  # the SDK's RequestFailedError
            waited = time.time() - t0
            # Either the journal reports the cut-short request ("…the server restarted…"), or the
            # SDK resubmitted it first and the new server answers that the sampler was "lost in a
            # restart": both name the restart, neither hangs.
            assert "restart" in str(e), f"unclear error: {type(e).__name__}: {e}"
        assert waited < FAIL_WITHIN_S, f"the failure took {waited:.1f}s"
        print(f"in-flight sample failed {waited:.2f}s after the restarted server answered")
        # The old client's poller is not broken: its next sample ends too (a base-model sampler
        # does not outlive a restart, so with a clear error rather than a result).
        try:
            sampler.sample(PROMPT, 2, QUICK).result(timeout=60)
        except Exception as e:
            assert "restart" in str(e), f"unclear error: {type(e).__name__}: {e}"
        fresh = tinker.ServiceClient(base_url=srv.url, api_key=API_KEY).create_sampling_client(
            base_model=MODEL).result()
        assert len(fresh.sample(PROMPT, 2, QUICK).result(timeout=60).sequences) == 2
    finally:
        srv.kill()


def test_restored_queues_report_what_the_previous_run_did(tmp_path, monkeypatch):
    """White-box over the journal: a completion listed before the restart but not yet seen keeps
    its cursor (seen ones are skipped by cursor, acknowledged ones not restored), one resolved but
    not yet listed is reported finished, one still running is reported failed (and
    retrieve_future answers the error); the journal stays bounded."""
    journal = tmp_path / "queues.jsonl"

    def listed(sessions, *rids: str) -> bool:  # the finished requests are on their queues
        on_queues = {c["request_id"] for log in sessions._logs.values() for _, c in log.events}
        return set(rids) <= on_queues

    async def go() -> None:
        store = Store(tmp_path / "s.db")
        futures = FutureTable(store)
        q = sample_sessions.SampleSessions(futures, long_poll_s=0.2, journal=journal)
        target = {"sampling_session_id": "s:sample:0", "cloned_sampler_id": 0}
        seen, unseen, stored, running = (futures.new() for _ in range(4))
        for i, rid in enumerate((seen, unseen, stored, running)):
            q.watch("s:sample:0", i, rid)
        futures.resolve(seen, Result.proto(b"1"))
        await async_wait_until(lambda: listed(q, seen), "`seen` listed")
        first = await q.retrieve({"target": target, "prev_cursor": 0, "timeout": 0})
        assert [c["request_id"] for c in first["completions"]] == [seen]
        futures.resolve(unseen, Result.proto(b"22"))
        await async_wait_until(lambda: listed(q, unseen), "`unseen` listed")
        # `stored` finishes in the store but the run dies before listing it
        store.put_future(stored, "proto", b"333")
        q._journal.close()

        again = sample_sessions.SampleSessions(FutureTable(store), long_poll_s=0.2, journal=journal)
        got = await again.retrieve({"target": target, "prev_cursor": first["cursor"], "timeout": 0})
        states = {c["request_id"]: c["state"] for c in got["completions"]}
        assert states == {unseen: "finished", stored: "finished", running: "failed"}
        err = await FutureTable(store).wait(running, 0)
        assert err is not None and "server restarted" in json.loads(err.payload)["error"]
        # a third run still knows what the second restored until its client acknowledges it
        again._journal.close()
        third = sample_sessions.SampleSessions(FutureTable(store), long_poll_s=0.2, journal=journal)
        later = await third.retrieve({"target": target, "prev_cursor": first["cursor"], "timeout": 0})
        assert {c["request_id"] for c in later["completions"]} == set(states)
        done = await third.retrieve({"target": target, "prev_cursor": later["cursor"], "timeout": 0})
        assert done["completions"] == []
        # the journal is rewritten from memory before it outgrows what is live
        monkeypatch.setattr(sample_sessions, "JOURNAL_COMPACT_LINES", 20)
        sixty = []
        for i in range(60):
            rid = futures.new()
            sixty.append(rid)
            third.watch("s:sample:0", 100 + i, rid)
            futures.resolve(rid, Result.proto(b"p"))
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        await async_wait_until(lambda: listed(third, *sixty), "the 60 samples listed")
        acked = await third.retrieve({"target": target, "prev_cursor": done["cursor"], "timeout": 0})
        assert len(acked["completions"]) == 60
        await third.retrieve({"target": target, "prev_cursor": acked["cursor"], "timeout": 0})
        last = futures.new()
        third.watch("s:sample:0", 500, last)  # an append after the acks triggers a rewrite
        assert len(journal.read_text().splitlines()) <= 20
        # acknowledged completions are not restored; the rewrite kept the running sample
        third.close()
        fourth = sample_sessions.SampleSessions(FutureTable(store), long_poll_s=0.2, journal=journal)
        rest = await fourth.retrieve({"target": target, "prev_cursor": 0, "timeout": 0})
        assert [(c["request_id"], c["state"]) for c in rest["completions"]] == [(last, "failed")]

    asyncio.run(go())
