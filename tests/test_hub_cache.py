"""Cache hygiene: the bundled model lives under its own hub-cache id, a real
`HuggingFaceTB/SmolLM2-135M-Instruct` snapshot is never touched, and what versions up to 0.1.0
wrote over that repo's cache entry is repaired."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gemtinker import DEFAULT_MODEL
from gemtinker.engine import models

REAL_ID = models.UPSTREAM_REPO_ID
REAL_REVISION = "12fd25f77366fa6b3b4b768ec3050bf629380bac"  # any 40-hex commit id
REAL_FILES = {"config.json": b'{"model_type": "llama", "real": true}\n', "tokenizer.json": b'{"fake": 1}\n'}


def _make_real_snapshot(hub: Path) -> Path:
    """A hub download's layout: blobs named by hash, relative links from the snapshot, refs/main."""
    repo = hub / ("models--" + REAL_ID.replace("/", "--"))
    snap = repo / "snapshots" / REAL_REVISION
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for name, data in REAL_FILES.items():
        digest = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / digest).write_bytes(data)
        os.symlink(f"../../blobs/{digest}", snap / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REAL_REVISION)
    return repo


def _make_old_version_copy(hub: Path, folder: Path) -> str:
    """What `ensure_hf_cache` of versions up to 0.1.0 wrote for the bundled model."""
    folder.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes(b"ours " + name.encode())
    revision = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()
    repo = hub / ("models--" + REAL_ID.replace("/", "--"))
    snap = repo / "snapshots" / revision
    snap.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        os.symlink((folder / name).resolve(), snap / name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return revision


def _tree_digest(root: Path) -> dict[str, str]:
    """Every entry under `root`: symlink targets as written, file bytes as sha256."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_file():
                out[rel] = "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = "dir"
    return out


def test_default_model_has_an_id_of_its_own():
    assert DEFAULT_MODEL.startswith(models.OWN_HUB_NAMESPACE) and DEFAULT_MODEL != REAL_ID
    with pytest.raises(ValueError, match="refusing"):
        models.ensure_hf_cache(REAL_ID, Path("/nonexistent"))


def test_poisoned_cache_is_repaired_and_the_genuine_snapshot_restored(tmp_path):
    hub = tmp_path / "hub"
    repo = _make_real_snapshot(hub)
    genuine = _tree_digest(repo)
    ours = _make_old_version_copy(hub, tmp_path / "gemtinker-cache" / "SmolLM2-135M-Instruct-v1")
    assert (repo / "refs" / "main").read_text() == ours  # poisoned: main names our copy

    done = models.repair_hub_cache(hub)

    assert any(ours in d for d in done)
    assert _tree_digest(repo) == genuine  # our snapshot gone, refs/main names the real one again
    assert models.repair_hub_cache(hub) == []  # once per process and cache


def test_poisoned_cache_without_a_genuine_snapshot_is_removed(tmp_path):
    hub = tmp_path / "hub"
    folder = tmp_path / "gemtinker-cache" / "SmolLM2-135M-Instruct-v1"
    _make_old_version_copy(hub, folder)
    models.repair_hub_cache(hub)
    assert not (hub / ("models--" + REAL_ID.replace("/", "--"))).exists()
    assert (folder / "model.safetensors").is_file()  # the converted model itself is kept


def test_clean_cache_is_left_alone(tmp_path):
    hub = tmp_path / "hub"
    repo = _make_real_snapshot(hub)
    # A snapshot of absolute links whose name is not the hash of their folder is someone else's.
    foreign = repo / "snapshots" / ("0" * 40)
    foreign.mkdir()
    os.symlink(tmp_path / "elsewhere" / "config.json", foreign / "config.json")
    before = _tree_digest(hub)
    assert models.repair_hub_cache(hub) == []
    assert _tree_digest(hub) == before


# ------------------------------------------------------------------ real processes, real model

def _env(hf_home: Path) -> dict[str, str]:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TINKER_TELEMETRY": "0"}
    env.pop("HF_HUB_CACHE", None)
    return env


_ENGINE_SCRIPT = """
import sys
from transformers import AutoTokenizer
from gemtinker import DEFAULT_MODEL
from gemtinker.engine import Engine
from gemtinker.engine.models import resolve_model
eng = Engine(device="cpu", dtype="float32")
assert eng.base_model == DEFAULT_MODEL, eng.base_model
assert AutoTokenizer.from_pretrained(DEFAULT_MODEL).eos_token == "<|im_end|>"
eng.close()
print("REAL", resolve_model(sys.argv[1]).path)
"""


def _serve_and_sample(env: dict[str, str], root: Path) -> None:
    import tinker

    from support.server import serve_process

    with serve_process(["--root", str(root)], env, ready_s=120) as (url, _):
        client = tinker.ServiceClient(base_url=url, api_key="tml-local")
        sampler = client.create_sampling_client(base_model=DEFAULT_MODEL).result()  # loads the engine
        res = sampler.sample(tinker.types.ModelInput.from_ints([1, 2, 3]), 1,
                             tinker.types.SamplingParams(max_tokens=2, temperature=0.0)).result()
        assert len(res.sequences[0].tokens) == 2


@pytest.mark.slow
def test_real_snapshot_is_untouched_by_engine_and_server(tmp_path):
    hf_home = tmp_path / "hf"
    repo = _make_real_snapshot(hf_home / "hub")
    before = _tree_digest(repo)
    env = _env(hf_home)

    out = subprocess.run([sys.executable, "-c", _ENGINE_SCRIPT, REAL_ID], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # The real id still loads the genuine snapshot, as it is.
    assert f"REAL {repo / 'snapshots' / REAL_REVISION}" in out.stdout
    assert _tree_digest(repo) == before

    _serve_and_sample(env, tmp_path / "server")
    assert _tree_digest(repo) == before
    assert (hf_home / "hub" / ("models--" + DEFAULT_MODEL.replace("/", "--")) / "refs" / "main").is_file()
