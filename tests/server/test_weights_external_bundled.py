"""The cookbook weights round trip for the bundled SmolLM2 (tied embeddings), fp32.

With `train_unembed=False` the adapter leaves lm_head (= the shared embedding) alone, so the
cookbook's `build_hf_model` can merge it; `build_lora_adapter` and `gemtinker export --peft` load
in PEFT. All three give the engine sampler's logprobs on the same weights within 1e-4.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tinker
import torch
from tinker import types

from support.server import API_KEY, datum_ce
# A sibling test module (same folder): its helpers could move to tests/support/ once the weights work settles.
from test_server_weights_external import SEQUENCES, _assert_close, _base, _engine_logprobs, _hf_logprobs, _peft

from gemtinker import DEFAULT_MODEL
from gemtinker.cli.weights import export_main
from gemtinker.engine.models import resolve_model
from gemtinker.server import start_local

pytestmark = pytest.mark.integration  # a real (tiny) torch engine behind HTTP, or a server subprocess: `make test` only


@pytest.mark.slow
def test_cookbook_round_trip_of_the_bundled_model_without_unembed(tmp_path, monkeypatch):
    from safetensors import safe_open
    from tinker_cookbook import weights
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("TINKER_API_KEY", API_KEY)  # weights.download makes its own clients
    model_dir = resolve_model(DEFAULT_MODEL).path
    root = tmp_path / "srv"
    with start_local(models=[DEFAULT_MODEL], root=root) as srv:
        sc = tinker.ServiceClient(base_url=srv.base_url, api_key=API_KEY)
        try:
            tc = sc.create_lora_training_client(base_model=DEFAULT_MODEL, rank=4, seed=3,
                                                train_unembed=False).result()
            for _ in range(2):
                tc.forward_backward([datum_ce(s) for s in SEQUENCES], "cross_entropy")
                tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
            sampler_path = tc.save_weights_for_sampler("s").result().path
            want = _engine_logprobs(sc, sampler_path)
            path = tc.save_weights_external("final").result().path
            adapter = weights.download(tinker_path=path, output_dir=str(tmp_path / "dl"), base_url=srv.base_url)
        finally:
            sc.close("success")
    assert max(np.abs(w - b).max() for w, b in zip(want, _hf_logprobs(_base(model_dir)))) > 1e-2  # it matters

    with safe_open(str(Path(adapter) / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert not any("unembed" in k or "lm_head" in k for k in keys), sorted(keys)[:5]
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight" in keys

    weights.build_hf_model(base_model=str(model_dir), adapter_path=adapter, output_path=str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    _assert_close(_hf_logprobs(merged), want)
    del merged
    weights.build_lora_adapter(base_model=str(model_dir), adapter_path=adapter, output_path=str(tmp_path / "peft"))
    assert "lm_head" not in json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["target_modules"]
    _assert_close(_hf_logprobs(_peft(model_dir, tmp_path / "peft")), want)

    assert export_main([sampler_path, "--root", str(root), "--peft", str(tmp_path / "export")]) == 0
    _assert_close(_hf_logprobs(_peft(model_dir, tmp_path / "export")), want)
