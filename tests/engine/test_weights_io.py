"""Adapters out (PEFT folder, merged HF model) and in (PEFT folder -> tinker:// checkpoints):
every route gives the engine's own logprobs, within 1e-4 in fp32."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from gemtinker.engine import AdamConfig, EngineError, SamplingConfig, TrainDatum
from gemtinker.engine.models import TINY_MODEL_NAME, resolve_model
from gemtinker.engine.weights_io import (
    PEFT_CONFIG,
    fit_to_model,
    lora_modules_of,
    read_checkpoint,
    read_peft,
    write_checkpoint,
    write_peft,
)
from gemtinker.cli.weights import export_main, import_main

TOL = 1e-4
SEQUENCES = [[5, 17, 300, 42, 9, 1000, 7, 7, 3], [200, 11, 12], [4000, 3, 3, 3, 3, 98, 12, 6, 1, 77, 5]]


def _datum(seq: list[int]) -> TrainDatum:
    toks = np.array(seq)
    return TrainDatum(toks[:-1], {"target_tokens": toks[1:], "weights": np.ones(len(seq) - 1, np.float32)})


def _engine_logprobs(engine, adapter_id: str) -> list[np.ndarray]:
    out = engine.forward(adapter_id, [_datum(s) for s in SEQUENCES], "cross_entropy")
    return [o["logprobs"] for o in out.outputs]


def _sampler_logprobs(engine, sampler_id: str) -> list[np.ndarray]:
    res = [engine.sample(sampler_id, s, 1, SamplingConfig(max_tokens=0), prompt_logprobs=True) for s in SEQUENCES]
    return [np.array(r.prompt_logprobs[1:]) for r in res]


@torch.no_grad()
def _hf_logprobs(model) -> list[np.ndarray]:
    out = []
    for s in SEQUENCES:
        ids = torch.tensor([s])
        logits = model(input_ids=ids).logits.float()
        lp = torch.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
        out.append(lp.numpy())
    return out


def _assert_close(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=TOL, rtol=0)


def _base_model(name: str = TINY_MODEL_NAME):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(resolve_model(name).path, dtype=torch.float32).eval()


def _peft_model(folder, name: str = TINY_MODEL_NAME):
    from peft import PeftModel

    with warnings.catch_warnings():  # the tied lm_head warning: expected, see weights_io
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(_base_model(name), str(folder)).eval()


def _trained(engine, new_adapter, **spec) -> str:
    """An adapter after two Adam steps (A and B both moved away from their init)."""
    aid = new_adapter(rank=4, seed=3, **spec)
    for _ in range(2):
        engine.forward_backward(aid, [_datum(s) for s in SEQUENCES], "cross_entropy")
        engine.optim_step(aid, AdamConfig(learning_rate=2e-2))
    return aid


@pytest.mark.parametrize("spec", [{}, {"train_mlp": False, "train_unembed": False}], ids=["all", "attn-only"])
def test_export_peft_and_merged_match_the_engine(tiny_engine, new_adapter, tmp_path, spec):
    from transformers import AutoModelForCausalLM

    aid = _trained(tiny_engine, new_adapter, **spec)
    tiny_engine.save_state(aid, tmp_path / "ckpt")
    want = _engine_logprobs(tiny_engine, aid)
    _assert_close(_sampler_logprobs(tiny_engine, tiny_engine.load_sampler(tmp_path / "ckpt")), want)
    base = _hf_logprobs(_base_model())
    assert max(np.abs(w - b).max() for w, b in zip(want, base)) > 1e-2  # the adapter matters

    assert export_main([str(tmp_path / "ckpt"), "--peft", str(tmp_path / "peft"), "--merged", str(tmp_path / "merged")]) == 0
    config = json.loads((tmp_path / "peft" / PEFT_CONFIG).read_text())
    assert config["base_model_name_or_path"] == TINY_MODEL_NAME and config["r"] == 4 and config["lora_alpha"] == 32
    expected_targets = {"q_proj", "k_proj", "v_proj", "o_proj"} | (
        set() if spec else {"gate_proj", "up_proj", "down_proj", "lm_head"})
    assert set(config["target_modules"]) == expected_targets
    _assert_close(_hf_logprobs(_peft_model(tmp_path / "peft")), want)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    _assert_close(_hf_logprobs(merged), want)
    # A delta on the tied unembedding unties it; the input embedding keeps the base weight.
    assert merged.config.tie_word_embeddings is bool(spec)


def test_import_peft_round_trip_through_the_sdk(tiny_engine, new_adapter, tmp_path):
    import tinker

    from gemtinker.server import start_local

    aid = _trained(tiny_engine, new_adapter)
    tiny_engine.save_sampler_weights(aid, tmp_path / "ckpt")
    want = _engine_logprobs(tiny_engine, aid)
    write_peft(read_checkpoint(tmp_path / "ckpt"), tmp_path / "peft")

    root = tmp_path / "server"
    with start_local(models=[TINY_MODEL_NAME], root=root) as server:
        # Imported while the server runs: it finds the new rows and directories on first use.
        assert import_main([str(tmp_path / "peft"), "--root", str(root), "--name", "from-peft"]) == 0
        rest = tinker.RestClient(base_url=server.base_url, api_key="tml-local")
        runs = [r for r in rest.list_training_runs().result().training_runs if r.training_run_id.startswith("import-")]
        assert len(runs) == 1 and runs[0].base_model == TINY_MODEL_NAME
        train_path = f"tinker://{runs[0].training_run_id}/weights/from-peft"
        sampler_path = f"tinker://{runs[0].training_run_id}/sampler_weights/from-peft"

        client = tinker.ServiceClient(base_url=server.base_url, api_key="tml-local")
        sampler = client.create_sampling_client(model_path=sampler_path).result()
        got = []
        for s in SEQUENCES:
            lp = sampler.compute_logprobs(tinker.types.ModelInput.from_ints(s)).result()
            got.append(np.array(lp[1:]))
        _assert_close(got, want)

        trainer = client.create_training_client_from_state(train_path).result()
        data = [tinker.types.Datum(model_input=tinker.types.ModelInput.from_ints(s[:-1]),
                                   loss_fn_inputs={"target_tokens": s[1:], "weights": [1.0] * (len(s) - 1)})
                for s in SEQUENCES]
        out = trainer.forward(data, "cross_entropy").result()
        _assert_close([np.array(o["logprobs"].data) for o in out.loss_fn_outputs], want)

        # And back out again: export of the imported checkpoint equals the original PEFT folder's adapter.
        assert export_main([train_path, "--root", str(root), "--peft", str(tmp_path / "peft2")]) == 0
    _assert_close(_hf_logprobs(_peft_model(tmp_path / "peft2")), want)


def test_import_folds_peft_rank_alpha_patterns_and_rslora(tiny_engine, tmp_path):
    """An adapter PEFT itself made, on some modules only, with per-module ranks and alphas."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                     rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3}, init_lora_weights=False)
    model = get_peft_model(_base_model(), cfg)
    model.save_pretrained(tmp_path / "peft")
    want = _hf_logprobs(model.eval())
    assert max(np.abs(w - b).max() for w, b in zip(want, _hf_logprobs(_base_model()))) > 1e-2

    adapter = read_peft(tmp_path / "peft")
    assert adapter.base_model == TINY_MODEL_NAME  # PEFT wrote the tiny model's folder path
    adapter = fit_to_model(adapter, lora_modules_of(resolve_model(TINY_MODEL_NAME).path))
    assert adapter.spec.train_attn and adapter.spec.train_mlp and not adapter.spec.train_unembed
    write_checkpoint(adapter, tmp_path / "ckpt", "state")
    tiny_engine.load_state("imported-patterns", tmp_path / "ckpt", with_optimizer=False)
    try:
        _assert_close(_engine_logprobs(tiny_engine, "imported-patterns"), want)
    finally:
        tiny_engine.remove_adapter("imported-patterns")


def test_import_refuses_what_our_lora_cannot_express(tmp_path):
    from peft import LoraConfig, get_peft_model

    get_peft_model(_base_model(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)).save_pretrained(tmp_path / "dora")
    with pytest.raises(EngineError, match="use_dora"):
        read_peft(tmp_path / "dora")
    get_peft_model(_base_model(), LoraConfig(r=2, target_modules=["embed_tokens"])).save_pretrained(tmp_path / "emb")
    with pytest.raises(EngineError, match="embedding"):
        read_peft(tmp_path / "emb")
    with pytest.raises(EngineError, match="not a PEFT adapter folder"):
        read_peft(tmp_path)


def test_export_refuses_a_non_empty_folder_and_unknown_paths(tiny_engine, new_adapter, tmp_path, capsys):
    aid = new_adapter()
    tiny_engine.save_state(aid, tmp_path / "ckpt")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert export_main([str(tmp_path / "ckpt"), "--peft", str(tmp_path / "taken")]) == 1
    assert "not empty" in capsys.readouterr().err and (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    assert export_main(["tinker://nope/weights/x", "--root", str(tmp_path), "--peft", str(tmp_path / "p")]) == 1
    assert "no server state" in capsys.readouterr().err


@pytest.mark.slow
def test_export_of_the_bundled_model_matches_the_engine(tmp_path):
    from transformers import AutoModelForCausalLM

    from gemtinker import DEFAULT_MODEL
    from gemtinker.engine import Engine, LoraSpec

    engine = Engine(DEFAULT_MODEL, device="cpu", dtype="float32")
    try:
        engine.create_adapter("bundled", LoraSpec(rank=4, seed=0))
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _, b in engine._get("bundled").weights.tensors.values():
                b.copy_(torch.randn(b.shape, generator=gen) * 0.01)
        engine.save_sampler_weights("bundled", tmp_path / "ckpt")
        want = _engine_logprobs(engine, "bundled")
        _assert_close(_sampler_logprobs(engine, engine.load_sampler(tmp_path / "ckpt")), want)
    finally:
        engine.close()
    assert max(np.abs(w - b).max() for w, b in zip(want, _hf_logprobs(_base_model(DEFAULT_MODEL)))) > 1e-2
    assert export_main([str(tmp_path / "ckpt"), "--peft", str(tmp_path / "peft"), "--merged", str(tmp_path / "merged")]) == 0
    _assert_close(_hf_logprobs(_peft_model(tmp_path / "peft", DEFAULT_MODEL)), want)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    _assert_close(_hf_logprobs(merged), want)
