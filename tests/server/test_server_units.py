"""Fast unit tests of the protocol pieces: path safety, seq_id ordering, protobuf codec."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
from tinker import types
from tinker.proto import request_conv, response_conv

from support.waiting import async_wait_until, settle

from gemtinker.engine.types import ForwardResult, SampledSequence, SampleResult
from gemtinker.server import codec
from gemtinker.server.errors import UserError
from gemtinker.server.ordering import ModelQueue
from gemtinker.server.paths import checkpoint_dir, parse_tinker_path


@pytest.mark.parametrize("bad", ["tinker://../../etc", "tinker://../weights/x", "tinker://a/weights/..",
                                 "tinker://a/weights/../../x", "tinker://a/other/x", "tinker://a/weights/",
                                 "file:///etc/passwd", "tinker://a/weights/x/y", "tinker://.hidden/weights/x"])
def test_bad_paths_are_refused(bad, tmp_path):
    with pytest.raises(UserError):
        checkpoint_dir(tmp_path, parse_tinker_path(bad))


def test_good_path_maps_inside_root(tmp_path):
    tp = parse_tinker_path("tinker://abc:train:0/sampler_weights/000010")
    assert (tp.run_id, tp.kind, tp.name) == ("abc:train:0", "sampler", "000010")
    assert checkpoint_dir(tmp_path, tp) == tmp_path.resolve() / "abc:train:0" / "sampler_weights" / "000010"


def _op(ran: list, seq: int, fail: bool = False):
    async def run():
        await asyncio.sleep(0)
        ran.append(seq)
        if fail:
            raise RuntimeError("boom")
    return run


def test_queue_runs_in_seq_order_dedupes_and_survives_failures():
    async def main() -> None:
        ran: list = []
        skipped: list = []
        q = ModelQueue("m", first_seq=1, gap_timeout_s=3600)  # no hole is skipped here

        # Chunks arrive with the first one last; seq 3 fails; 4 is a retry duplicate.
        assert q.submit(3, "r3", _op(ran, 3, fail=True), skipped.append) == "r3"
        q.submit(2, "r2", _op(ran, 2), skipped.append)
        q.submit(4, "r4", _op(ran, 4), skipped.append)
        assert q.submit(4, "r4-again", _op(ran, 40), skipped.append) == "r4"
        await settle()
        assert ran == []  # waiting for seq 1
        q.submit(1, "r1", _op(ran, 1), skipped.append)
        await async_wait_until(lambda: len(ran) >= 4, "the four queued ops ran")
        await settle()
        assert ran == [1, 2, 3, 4] and skipped == []
        q.close("bye")

    asyncio.run(main())


def test_queue_skips_a_hole_after_the_gap_timeout():
    async def main() -> None:
        ran: list = []
        skipped: list = []
        q = ModelQueue("m", first_seq=1, gap_timeout_s=0.01)
        # A hole (seq 1 never comes) is skipped after the gap timeout.
        q.submit(2, "r2", _op(ran, 2), skipped.append)
        await async_wait_until(lambda: ran == [2], "seq 2 ran past the hole")
        q.submit(1, "r1", _op(ran, 1), skipped.append)  # too late: failed, not run
        await settle()
        assert ran == [2] and len(skipped) == 1 and "moved past" in skipped[0]
        q.close("bye")

    asyncio.run(main())


def test_forward_backward_request_roundtrip():
    data = [
        types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                    loss_fn_inputs={"target_tokens": [2, 3, 4], "logprobs": [-1.0, -2.0, -3.0],
                                    "advantages": [0.5, 0.0, -0.5]}),
    ]
    req = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(
            data=data, loss_fn="ppo", loss_fn_config={"clip_low_threshold": 0.7}),
        model_id="s:train:0", seq_id=7)
    body = request_conv.forward_backward_request_to_proto(req).SerializeToString()
    got = codec.decode_forward_backward(body)
    data = got.datums()
    assert (got.model_id, got.seq_id, got.loss_fn, got.forward_only) == ("s:train:0", 7, "ppo", False)
    assert got.loss_fn_config == {"clip_low_threshold": pytest.approx(0.7)}
    assert data[0].tokens.tolist() == [1, 2, 3]
    assert data[0].inputs["target_tokens"].dtype == np.int64
    np.testing.assert_allclose(data[0].inputs["advantages"], [0.5, 0.0, -0.5])
    codec.validate_datums(data, "ppo", vocab_size=10)
    with pytest.raises(UserError, match="out of the vocabulary"):
        codec.validate_datums(data, "ppo", vocab_size=4)


def test_forward_output_and_sample_response_decode_in_the_sdk():
    res = ForwardResult(outputs=[{"logprobs": np.array([-1.0, -2.0], np.float32)},
                                 {"logprobs": np.array([-0.5], np.float32)}],
                        metrics={"loss:sum": 3.5, "bad_key": 1.0})
    out = response_conv.deserialize_forward_backward_output(codec.encode_forward_output(res))
    assert out.metrics == {"loss:sum": 3.5}  # keys without exactly one ':' would break the SDK
    assert [list(o["logprobs"].data) for o in out.loss_fn_outputs] == [[-1.0, -2.0], [-0.5]]

    sres = SampleResult(sequences=[SampledSequence([5, 6], [-0.1, -0.2], "stop"),
                                   SampledSequence([7], [-0.3], "length")],
                        prompt_logprobs=[None, -1.5, -2.5])
    sr = response_conv.deserialize_sample_response(codec.encode_sample_result(sres, 3, True, 0))
    assert [s.tokens for s in sr.sequences] == [[5, 6], [7]]
    assert [s.stop_reason for s in sr.sequences] == ["stop", "length"]
    assert sr.sequences[0].logprobs == pytest.approx([-0.1, -0.2])
    assert sr.prompt_logprobs[0] is None or math.isnan(sr.prompt_logprobs[0])
    assert sr.prompt_logprobs[1:] == pytest.approx([-1.5, -2.5])
