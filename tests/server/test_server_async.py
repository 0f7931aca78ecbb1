"""The SDK's async API, many concurrent samples, and forward_backward split into chunks that
arrive out of order (the server must run them in seq_id order and accumulate)."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest
import tinker
from tinker import types

from support.server import API_KEY, MODEL, SEQ_A, SEQ_B, datum_ce
from gemtinker.server import start_local

# The *_async methods are deprecated in favour of awaiting the returned futures; both are exercised.
# integration: a real (tiny) torch engine behind HTTP: `make test` only
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.integration]


@pytest.fixture(scope="module")
def chunky_server(tmp_path_factory):
    # Two datums per chunk: a 5-datum forward_backward becomes 3 concurrent requests.
    with start_local(models=[MODEL], root=tmp_path_factory.mktemp("srv"), client_config={"fwdbwd_max_chunk_len": 2}) as srv:
        yield srv


def test_async_flow_and_chunked_forward_backward(chunky_server, caplog):
    caplog.set_level(logging.INFO, logger="gemtinker.server")
    async def main() -> None:
        sc = tinker.ServiceClient(base_url=chunky_server.base_url, api_key=API_KEY)
        tc = await sc.create_lora_training_client_async(base_model=MODEL, rank=4)
        batch = [datum_ce(SEQ_A), datum_ce(SEQ_B), datum_ce(SEQ_A[2:]), datum_ce(SEQ_B[1:]), datum_ce(SEQ_A[:6])]
        whole = await (await tc.forward_async(batch, "cross_entropy"))
        singles = [await (await tc.forward_async([d], "cross_entropy")) for d in batch]
        assert len(whole.loss_fn_outputs) == 5
        for got, one in zip(whole.loss_fn_outputs, singles):
            np.testing.assert_allclose(got["logprobs"].data, one.loss_fn_outputs[0]["logprobs"].data, atol=1e-5)
        assert whole.metrics["loss:sum"] == pytest.approx(sum(s.metrics["loss:sum"] for s in singles), rel=1e-5)

        # Gradients of the 3 chunks accumulate into one step: equal to one client doing the
        # same batch unchunked? Compare against a fresh client stepping on per-datum calls.
        ref = await sc.create_lora_training_client_async(base_model=MODEL, rank=4, seed=0)
        tc2 = await sc.create_lora_training_client_async(base_model=MODEL, rank=4, seed=0)
        fb_futs = [await ref.forward_backward_async([d], "cross_entropy") for d in batch]
        opt_ref = await ref.optim_step_async(types.AdamParams(learning_rate=1e-2))
        fb = tc2.forward_backward(batch, "cross_entropy")  # the non-deprecated style: await the APIFuture
        opt = tc2.optim_step(types.AdamParams(learning_rate=1e-2))
        for f in fb_futs:
            await f
        await opt_ref
        out = await fb
        await opt
        assert len(out.loss_fn_outputs) == 5
        a = await (await ref.forward_async([datum_ce(SEQ_A)], "cross_entropy"))
        b = await (await tc2.forward_async([datum_ce(SEQ_A)], "cross_entropy"))
        np.testing.assert_allclose(a.loss_fn_outputs[0]["logprobs"].data, b.loss_fn_outputs[0]["logprobs"].data, atol=1e-4)

        sampler = await tc2.save_weights_and_get_sampling_client_async()
        params = types.SamplingParams(max_tokens=4, temperature=1.0)
        results = await asyncio.gather(*[
            sampler.sample_async(types.ModelInput.from_ints(SEQ_B[: 3 + i % 4]), num_samples=2, sampling_params=params)
            for i in range(12)
        ])
        assert all(len(r.sequences) == 2 for r in results)
        lps = await sampler.compute_logprobs_async(types.ModelInput.from_ints(SEQ_A))
        np.testing.assert_allclose(lps[1:], b.loss_fn_outputs[0]["logprobs"].data, atol=1e-4)
        saved = await (await tc2.save_state_async("async-state"))
        tc3 = await sc.create_training_client_from_state_with_optimizer_async(saved.path)
        assert tc3.model_id.endswith(":train:3")
        await sc.close_async("success") if hasattr(sc, "close_async") else sc.close("success")

    asyncio.run(main())
    # The 5-datum calls really went out as chunks of 2 + 2 + 1.
    assert "forward_backward[cross_entropy,2]" in caplog.text and "forward_backward[cross_entropy,1]" in caplog.text
