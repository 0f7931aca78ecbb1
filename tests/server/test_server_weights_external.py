"""`save_weights_external` and `get_external_weights_urls` through the real `tinker` SDK, and the
cookbook's weights round trip on top of them: `weights.download` -> `build_lora_adapter` (loaded
with PEFT) and `build_hf_model` (loaded with plain transformers) give the logprobs of the engine's
own sampler on the same weights (fp32, within 1e-4).

Clients with another API key stand for another user (the test server enforces no key).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import tinker
import torch
from tinker import types

from support.clock import server_clock  # noqa: F401  (fixture)
from support.old_store import ADDED, CKPT, write_old_db
from support.server import API_KEY, SEQ_A, SEQ_B, datum_ce

from gemtinker.engine.models import TINY_MODEL_NAME, TINY_QWEN3_NAME, resolve_model
from gemtinker.server import start_local

pytestmark = pytest.mark.integration  # a real (tiny) torch engine behind HTTP, or a server subprocess: `make test` only

OTHER_KEY = "tml-someone-else"
TOL = 1e-4
SEQUENCES = [SEQ_A, SEQ_B]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with start_local(models=[TINY_QWEN3_NAME, TINY_MODEL_NAME], root=tmp_path_factory.mktemp("server")) as srv:
        yield srv


@pytest.fixture(scope="module")
def sc(server):
    c = tinker.ServiceClient(base_url=server.base_url, api_key=API_KEY)
    yield c
    c.close("success")


@pytest.fixture(scope="module")
def rc(server):
    return tinker.RestClient(base_url=server.base_url, api_key=API_KEY)


@pytest.fixture(autouse=True)
def _cookbook_key(monkeypatch):
    monkeypatch.setenv("TINKER_API_KEY", API_KEY)  # weights.download makes its own clients


def _trained(sc, base_model: str) -> tinker.TrainingClient:
    """A training client after three Adam steps (A and B both moved off their init)."""
    tc = sc.create_lora_training_client(base_model=base_model, rank=4, seed=3).result()
    for _ in range(3):
        tc.forward_backward([datum_ce(s) for s in SEQUENCES], "cross_entropy")
        tc.optim_step(types.AdamParams(learning_rate=2e-2)).result()
    return tc


def _engine_logprobs(sc, sampler_path: str) -> list[np.ndarray]:
    sampler = sc.create_sampling_client(model_path=sampler_path).result()
    return [np.array(sampler.compute_logprobs(types.ModelInput.from_ints(s)).result()[1:], dtype=np.float64)
            for s in SEQUENCES]


@torch.no_grad()
def _hf_logprobs(model) -> list[np.ndarray]:
    out = []
    for s in SEQUENCES:
        ids = torch.tensor([s])
        logits = model(input_ids=ids).logits.float()
        out.append(torch.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0].double().numpy())
    return out


def _assert_close(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=TOL, rtol=0)


def _base(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _peft(model_dir: Path, folder: Path):
    from peft import PeftModel

    with warnings.catch_warnings():  # tied lm_head: PEFT warns, expected (see engine/weights_io.py)
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(_base(model_dir), str(folder)).eval()


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:  # no API key: the URL is the credential
        return r.read()


def _fetch_error(url: str) -> tuple[int, str]:
    with pytest.raises(urllib.error.HTTPError) as e:
        _fetch(url)
    return e.value.code, json.loads(e.value.read())["detail"]


# ------------------------------------------------------------------ the cookbook round trip
def test_cookbook_round_trip_untied_qwen3(server, sc, rc, tmp_path):
    from tinker_cookbook import weights
    from transformers import AutoModelForCausalLM

    model_dir = resolve_model(TINY_QWEN3_NAME).path
    tc = _trained(sc, TINY_QWEN3_NAME)
    want = _engine_logprobs(sc, tc.save_weights_for_sampler("s").result().path)
    assert max(np.abs(w - b).max() for w, b in zip(want, _hf_logprobs(_base(model_dir)))) > 1e-2  # it matters

    path = tc.save_weights_external("final").result().path
    assert path == f"tinker://{tc.model_id}/external_weights/final"
    urls = rc.get_external_weights_urls(path).result()
    assert set(urls.urls) == {"adapter_config.json", "adapter_model.safetensors"}
    assert 3500 < (urls.expires.timestamp() - time.time()) <= 3600
    listed = {c.tinker_path: c for c in rc.list_checkpoints(tc.model_id).result().checkpoints}
    assert listed[path].checkpoint_type == "external" and listed[path].size_bytes > 0

    adapter = weights.download(tinker_path=path, output_dir=str(tmp_path / "dl"), base_url=server.base_url)
    from safetensors import safe_open

    with safe_open(str(Path(adapter) / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.unembed_tokens.lora_A.weight" in keys  # hosted Tinker's name
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight" in keys

    weights.build_lora_adapter(base_model=str(model_dir), adapter_path=adapter, output_path=str(tmp_path / "peft"))
    _assert_close(_hf_logprobs(_peft(model_dir, tmp_path / "peft")), want)
    weights.build_hf_model(base_model=str(model_dir), adapter_path=adapter, output_path=str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    _assert_close(_hf_logprobs(merged), want)


def test_tied_embeddings_peft_is_exact_and_the_cookbook_merge_refuses(server, sc, tmp_path):
    """The tiny Llama ties its embeddings, as SmolLM2 does; our adapter trains lm_head."""
    from tinker_cookbook import weights
    from tinker_cookbook.exceptions import WeightsMergeError

    model_dir = resolve_model(TINY_MODEL_NAME).path
    tc = _trained(sc, TINY_MODEL_NAME)
    want = _engine_logprobs(sc, tc.save_weights_for_sampler("s").result().path)
    path = tc.save_weights_external("final").result().path
    adapter = weights.download(tinker_path=path, output_dir=str(tmp_path / "dl"), base_url=server.base_url)

    weights.build_lora_adapter(base_model=str(model_dir), adapter_path=adapter, output_path=str(tmp_path / "peft"))
    assert "lm_head" in json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["target_modules"]
    _assert_close(_hf_logprobs(_peft(model_dir, tmp_path / "peft")), want)
    # Merging the output-side delta into the shared embedding would be wrong: refused by name.
    with pytest.raises(WeightsMergeError, match="lm_head.weight"):
        weights.build_hf_model(base_model=str(model_dir), adapter_path=adapter, output_path=str(tmp_path / "merged"))


def test_cookbook_downloads_a_training_checkpoint_through_an_encrypted_export(server, sc, rc, tmp_path):
    """weights.download of tinker://.../weights/NAME: a new training client from the state, an
    export age-encrypted to a key it generates, download + decrypt, then the export is deleted."""
    from tinker_cookbook import weights

    tc = _trained(sc, TINY_QWEN3_NAME)
    state = tc.save_state("st").result().path
    direct = tc.save_weights_external("plain").result().path
    out = weights.download(tinker_path=state, output_dir=str(tmp_path / "dl"), base_url=server.base_url)
    assert sorted(p.name for p in Path(out).iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    ref = weights.download(tinker_path=direct, output_dir=str(tmp_path / "ref"), base_url=server.base_url)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (Path(out) / name).read_bytes() == (Path(ref) / name).read_bytes()
    leftovers = [c.tinker_path for c in rc.list_user_checkpoints(limit=1000).result().checkpoints
                 if c.tinker_path.endswith("/external_weights/download")]
    assert leftovers == []  # the temporary export was deleted


def test_encrypted_files_decrypt_with_the_matching_identity_only(sc, rc):
    import pyrage

    tc = _trained(sc, TINY_QWEN3_NAME)
    ident, other = pyrage.x25519.Identity.generate(), pyrage.x25519.Identity.generate()
    plain = rc.get_external_weights_urls(tc.save_weights_external("p").result().path).result().urls
    enc_path = tc.save_weights_external("e", age_encryption_recipients=[str(ident.to_public())]).result().path
    enc = rc.get_external_weights_urls(enc_path).result().urls
    assert set(enc) == {f"{name}.age" for name in plain}
    for name, url in plain.items():
        blob = _fetch(enc[f"{name}.age"])
        assert pyrage.decrypt(blob, [ident]) == _fetch(url)
        with pytest.raises(pyrage.DecryptError):
            pyrage.decrypt(blob, [other])


# ------------------------------------------------------------------ bad input, lifetime, ownership
@pytest.mark.parametrize("recipients, needle", [
    (["age1bogus"], r"age_encryption_recipients\[0\] = 'age1bogus' is not a valid recipient"),
    (["not a key"], r"age_encryption_recipients\[0\] = 'not a key' is neither an age public key"),
    ([], r"age_encryption_recipients must list 1\.\.10 recipients"),
])
def test_bad_recipients_fail_clearly_and_the_client_keeps_working(sc, recipients, needle):
    tc = sc.create_lora_training_client(base_model=TINY_QWEN3_NAME, rank=4).result()
    with pytest.raises(tinker.RequestFailedError, match=needle):
        tc.save_weights_external("bad", age_encryption_recipients=recipients).result()
    assert tc.forward_backward([datum_ce(SEQ_A)], "cross_entropy").result().metrics  # seq_id slot kept


def test_an_existing_name_and_a_bad_ttl_are_refused(sc):
    tc = sc.create_lora_training_client(base_model=TINY_QWEN3_NAME, rank=4).result()
    tc.save_weights_external("x").result()
    with pytest.raises(tinker.RequestFailedError, match="already exists"):
        tc.save_weights_external("x").result()
    with pytest.raises(tinker.RequestFailedError, match="ttl_seconds must be"):
        tc.save_weights_external("y", ttl_seconds=0).result()


def test_unknown_and_wrong_kind_paths(server, sc, rc):
    with pytest.raises(tinker.NotFoundError, match="not found"):
        rc.get_external_weights_urls("tinker://nope:train:0/external_weights/x").result()
    tc = sc.create_lora_training_client(base_model=TINY_QWEN3_NAME, rank=4).result()
    tc.save_state("st").result()
    # The SDK itself refuses a non-external path, so ask over plain HTTP.
    req = urllib.request.Request(f"{server.base_url}/api/v1/training_runs/{tc.model_id}/checkpoints/weights/st/"
                                 "external_weights_urls", headers={"X-API-Key": API_KEY})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 400 and "URLs are made for external weights only" in json.loads(e.value.read())["detail"]
    ext = tc.save_weights_external("x").result().path
    with pytest.raises(tinker.BadRequestError, match="holds exported files"):  # not weights to sample from
        sc.create_sampling_client(model_path=ext).result()
    with pytest.raises(tinker.RequestFailedError, match="is an external weights export; load_state needs"):
        sc.create_training_client_from_state(ext).result()


def test_another_keys_export_is_forbidden_until_published(server, sc, rc):
    tc = sc.create_lora_training_client(base_model=TINY_QWEN3_NAME, rank=4).result()
    path = tc.save_weights_external("mine").result().path
    other = tinker.RestClient(base_url=server.base_url, api_key=OTHER_KEY)
    with pytest.raises(tinker.PermissionDeniedError, match="not published"):
        other.get_external_weights_urls(path).result()
    rc.publish_checkpoint_from_tinker_path(path).result()
    assert set(other.get_external_weights_urls(path).result().urls) == {"adapter_config.json",
                                                                         "adapter_model.safetensors"}
    with pytest.raises(tinker.PermissionDeniedError, match="only the key that made it"):
        other.delete_checkpoint_from_tinker_path(path).result()


def test_urls_expire_and_follow_the_checkpoint_lifetime(server, sc, rc, server_clock):
    tc = sc.create_lora_training_client(base_model=TINY_QWEN3_NAME, rank=4).result()
    ext = server.service.external
    path = tc.save_weights_external("life").result().path
    ext.url_ttl_s = 1.0
    try:
        short = rc.get_external_weights_urls(path).result().urls
    finally:
        ext.url_ttl_s = 3600.0
    server_clock.advance(1.2)
    code, detail = _fetch_error(short["adapter_config.json"])
    assert code == 410 and "expired" in detail and "get_external_weights_urls" in detail
    code, _ = _fetch_error(short["adapter_config.json"].rsplit("/", 2)[0] + "/bogus-token/adapter_config.json")
    assert code == 404

    fresh = rc.get_external_weights_urls(path).result().urls
    assert json.loads(_fetch(fresh["adapter_config.json"]))["r"] == 4
    rc.delete_checkpoint_from_tinker_path(path).result()
    code, detail = _fetch_error(fresh["adapter_config.json"])
    assert code == 404 and "deleted" in detail
    tc.save_weights_external("life").result()  # the same name again: old URLs stay dead
    assert _fetch_error(fresh["adapter_config.json"])[0] == 404

    brief = tc.save_weights_external("brief", ttl_seconds=1).result().path
    urls = rc.get_external_weights_urls(brief).result()
    assert urls.expires.timestamp() <= server_clock.time() + 1  # never past the checkpoint's own expiry
    server_clock.advance(1.2)
    assert _fetch_error(urls.urls["adapter_config.json"])[0] == 410
    with pytest.raises(tinker.NotFoundError, match="expired"):
        rc.get_external_weights_urls(brief).result()


def test_download_urls_need_no_api_key_where_the_server_requires_one(tmp_path):
    with start_local(models=[TINY_QWEN3_NAME], root=tmp_path / "srv", api_key=API_KEY) as srv:
        c = tinker.ServiceClient(base_url=srv.base_url, api_key=API_KEY)
        try:
            tc = c.create_lora_training_client(base_model=TINY_QWEN3_NAME, rank=4).result()
            path = tc.save_weights_external("k").result().path
            urls = tinker.RestClient(base_url=srv.base_url, api_key=API_KEY).get_external_weights_urls(path).result()
            assert json.loads(_fetch(urls.urls["adapter_config.json"]))["r"] == 4
            with pytest.raises(urllib.error.HTTPError) as e:  # every other route still needs the key
                _fetch(f"{srv.base_url}/api/v1/training_runs")
            assert e.value.code == 401
        finally:
            c.close("success")


def test_export_record_and_urls_survive_a_restart(tmp_path):
    root = tmp_path / "srv"
    with start_local(models=[TINY_QWEN3_NAME], root=root) as srv:
        c = tinker.ServiceClient(base_url=srv.base_url, api_key=API_KEY)
        try:
            tc = c.create_lora_training_client(base_model=TINY_QWEN3_NAME, rank=4).result()
            path = tc.save_weights_external("r").result().path
            url = tinker.RestClient(base_url=srv.base_url, api_key=API_KEY).get_external_weights_urls(
                path).result().urls["adapter_model.safetensors"]
            before = _fetch(url)
        finally:
            c.close("success")
        old_base = srv.base_url
    with start_local(models=[TINY_QWEN3_NAME], root=root) as srv:  # another port: the token is what counts
        assert _fetch(url.replace(old_base, srv.base_url)) == before
        rc = tinker.RestClient(base_url=srv.base_url, api_key=API_KEY)
        assert rc.get_external_weights_urls(path).result().urls.keys() == {"adapter_config.json",
                                                                          "adapter_model.safetensors"}


def test_a_database_from_before_external_weights_opens_and_gains_the_column_and_table(tmp_path):
    from gemtinker.server.store import Store

    write_old_db(tmp_path / "old.sqlite", added=len(ADDED))
    store = Store(tmp_path / "old.sqlite")
    try:
        assert store.get_checkpoint(CKPT)["files"] is None
        store.add_checkpoint("tinker://s:train:0/external_weights/e", "s:train:0", "external", "e", "/y", 3, None,
                             None, {"adapter_config.json": 3})
        assert store.get_checkpoint("tinker://s:train:0/external_weights/e")["files"] == {"adapter_config.json": 3}
        store.add_download_urls([("h", "tinker://s:train:0/external_weights/e", "adapter_config.json", 1.0, 5.0)])
        assert store.get_download_url("h")["file"] == "adapter_config.json"
        store.purge_download_urls(6.0)
        assert store.get_download_url("h") is None
    finally:
        store.close()


def test_the_tinker_cli_downloads_an_export(server, sc, tmp_path):
    import os
    import subprocess
    import sys

    tc = sc.create_lora_training_client(base_model=TINY_QWEN3_NAME, rank=4).result()
    path = tc.save_weights_external("cli").result().path
    env = {**os.environ, "TINKER_BASE_URL": server.base_url, "TINKER_API_KEY": API_KEY}
    out = subprocess.run([sys.executable, "-m", "tinker.cli", "checkpoint", "download", path, "--output", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    folder = tmp_path / path.replace("tinker://", "").replace("/", "_")
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4
