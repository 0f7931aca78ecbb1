"""`save_weights_external` and `get_external_weights_urls`: an adapter exported in hosted Tinker's
layout, as a checkpoint of its own (`tinker://<run>/external_weights/<name>`), and downloaded from
this server through short-lived URLs.

Layout (what tinker-cookbook 0.6.1's `weights.download`, `build_lora_adapter` and `build_hf_model`
read): `adapter_model.safetensors` with `base_model.model.<module>.lora_A.weight` (r x in) and
`.lora_B.weight` (out x r, unscaled), and `adapter_config.json` with `r` and `lora_alpha` (the
delta is `lora_alpha / r * B A`). The unembedding is Tinker's `model.unembed_tokens`, which the
cookbook maps to the base model's `lm_head.weight`.

Tied embeddings (SmolLM2, the tiny Llama): our adapter's unembedding delta applies to the output
side only, but where the base files hold no `lm_head.weight` the cookbook maps
`model.unembed_tokens` onto `model.embed_tokens`, which would change the input embedding too. For
such models the unembedding is written as `lm_head`: `build_lora_adapter` turns it into a PEFT
`lm_head` LoRA (exact), and `build_hf_model`'s default (shard) merge refuses it ("does not exist in
the model state dict") instead of merging it wrongly. Its `merge_strategy="full"` would merge it
into the shared weight: wrong; `gemtinker export --merged` writes untied embeddings instead.

Encryption: with `age_encryption_recipients`, every file is age-encrypted to all of them and
stored as `<file>.age` (pyrage); the plaintext never reaches the checkpoint directory.

Download URLs: one random token per file and signing, of which only a SHA-256 is stored (a copy
of the database gives no URLs). A URL names one file of one checkpoint as it was when signed; it
lasts URL_TTL_S (never past the checkpoint's own expiry), and stops working when the checkpoint
is deleted, expires or is saved again under the same name. Like a signed URL, it needs no API key:
whoever holds it may fetch that file until then.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from .checkpoints import Checkpoints, is_expired
from .errors import Gone, NotFoundError, UserError
from .limits import check_ttl, iso
from .paths import TinkerPath, check_component, checkpoint_dir, parse_tinker_path
from .store import Store

log = logging.getLogger("gemtinker.server")

# Hosted Tinker's signed URLs last an hour; the cookbook signs again 5 minutes before they expire.
URL_TTL_S = 3600.0
# Rows of expired URLs are kept this long, so an expired URL is answered "expired" (410) rather
# than "unknown" (404), then purged.
URL_KEEP_S = 86400.0
# The SDK documents at most 10 recipients.
MAX_RECIPIENTS = 10
AGE_SUFFIX = ".age"
# Not under the API key check (app.py): the token in the URL is the credential, as in a signed URL.
DOWNLOAD_ROUTE = "/api/v1/external_weights_download"
UNEMBED_NAME = "model.unembed_tokens"  # hosted Tinker's name for the unembedding


@dataclass(frozen=True)
class ExportRequest:
    name: str
    ttl_s: float | None
    recipients: tuple[Any, ...]  # pyrage recipients; empty: files stored in the clear


def parse_request(body: dict) -> ExportRequest:
    """A `SaveWeightsExternalRequest` body, checked before the op is queued (UserError)."""
    from tinker import types

    try:
        req = types.SaveWeightsExternalRequest.model_validate(body)
    except ValueError as e:
        raise UserError(f"save_weights_external: invalid request: {str(e)[:300]}") from None
    name = check_component(req.path, "save_weights_external name")
    ttl = check_ttl(req.ttl_seconds)
    raw = req.age_encryption_recipients
    if raw is not None and not 1 <= len(raw) <= MAX_RECIPIENTS:
        raise UserError(f"save_weights_external: age_encryption_recipients must list 1..{MAX_RECIPIENTS} recipients "
                        f"(or be None for unencrypted files), got {len(raw)}")
    return ExportRequest(name, ttl, tuple(_recipient(r, i) for i, r in enumerate(raw or [])))


def _recipient(text: str, index: int) -> Any:
    import pyrage

    where = f"save_weights_external: age_encryption_recipients[{index}]"
    kind = pyrage.x25519 if text.startswith("age1") else pyrage.ssh if text.startswith(("ssh-", "ecdsa-")) else None
    if kind is None:
        raise UserError(f"{where} = {text[:80]!r} is neither an age public key (age1...) nor an SSH public key "
                        "(ssh-ed25519 ... / ssh-rsa ...)")
    try:
        return kind.Recipient.from_str(text.strip())
    except pyrage.RecipientError as e:
        raise UserError(f"{where} = {text[:80]!r} is not a valid recipient: {e}") from None


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def base_has_lm_head(model_dir: Path) -> bool:
    """Whether the base model's files hold an `lm_head.weight` (the cookbook's own test for where
    `model.unembed_tokens` goes); without safetensors files, its config's tie_word_embeddings."""
    import json

    from safetensors import safe_open

    shards = sorted(model_dir.glob("*.safetensors"))
    if not shards:
        config = json.loads((model_dir / "config.json").read_text())
        return not config.get("tie_word_embeddings", True)
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            if any(k == "lm_head.weight" or k.endswith(".lm_head.weight") for k in f.keys()):
                return True
    return False


class ExternalWeights:
    def __init__(self, store: Store, checkpoints: Checkpoints, url_ttl_s: float = URL_TTL_S):
        self.store = store
        self.checkpoints = checkpoints
        self.url_ttl_s = url_ttl_s
        self._lm_head: dict[str, bool] = {}  # base model -> base_has_lm_head

    # ------------------------------------------------------------ save_weights_external
    def export(self, engine: Any, model_id: str, base_model: str, req: ExportRequest) -> dict:
        """Write the model's current adapter as an external weights checkpoint; the response of
        `save_weights_external`. Blocking: runs as the model's ordered op."""
        from gemtinker.engine.weights_io import read_checkpoint, write_peft

        tp = TinkerPath(check_component(model_id, "model id"), "external", req.name)
        root = self.checkpoints.root
        # ".tmp-" in the name: the start-up recovery removes it if a crash leaves it behind.
        with tempfile.TemporaryDirectory(dir=root, prefix=".export.tmp-") as tmp:
            engine.save_sampler_weights(model_id, os.path.join(tmp, "adapter"))
            adapter = read_checkpoint(os.path.join(tmp, "adapter"))
            write_peft(adapter, Path(tmp) / "plain", self._rename(base_model, adapter.tensors))
            with self.checkpoints.writing(tp, overwrite=False) as path:
                stage = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"  # removed at start if a crash leaves it
                stage.mkdir()
                try:
                    files = self._stage_files(Path(tmp) / "plain", stage, req.recipients)
                    if path.exists():  # unrecorded: left by an export a crash interrupted
                        shutil.rmtree(path)
                    os.replace(stage, path)
                finally:
                    shutil.rmtree(stage, ignore_errors=True)
                expires = None if req.ttl_s is None else time.time() + req.ttl_s
                size = sum(files.values())
                self.store.add_checkpoint(str(tp), tp.run_id, tp.kind, tp.name, str(path), size, None, expires, files)
        log.info("%-26s %s files=%s encrypted=%s", "save_weights_external", tp, sorted(files), bool(req.recipients))
        return {"type": "save_weights_external", "path": str(tp), "size_bytes": size}

    def _rename(self, base_model: str, tensors: dict) -> dict[str, str]:
        """Our unembedding -> hosted Tinker's name, where the cookbook maps that name back onto a
        separate `lm_head` (see the module docstring for tied embeddings)."""
        if base_model not in self._lm_head:
            from gemtinker.engine.models import resolve_model

            self._lm_head[base_model] = base_has_lm_head(Path(resolve_model(base_model).path))
        if not self._lm_head[base_model]:
            return {}
        return {n: UNEMBED_NAME for n in tensors if n == "lm_head" or n.endswith(".lm_head")}

    @staticmethod
    def _stage_files(plain: Path, stage: Path, recipients: tuple[Any, ...]) -> dict[str, int]:
        import pyrage

        files: dict[str, int] = {}
        for src in sorted(plain.iterdir()):
            dst = stage / (src.name + AGE_SUFFIX if recipients else src.name)
            if recipients:
                pyrage.encrypt_file(str(src), str(dst), list(recipients))
            else:
                shutil.copyfile(src, dst)
            files[dst.name] = dst.stat().st_size
        return files

    # ------------------------------------------------------------ get_external_weights_urls
    def sign_urls(self, run_id: str, checkpoint_id: str, owner: str | None, base_url: str) -> dict:
        """`ExternalWeightsUrlsResponse`: a fresh URL per file of an external weights checkpoint
        that `owner` may read (its own, or published)."""
        tp, directory, _ = self.checkpoints.resolve(f"tinker://{run_id}/{checkpoint_id}", reader=owner)
        if tp.kind != "external":
            raise UserError(f"get_external_weights_urls: {tp} is a {tp.kind} checkpoint; URLs are made for external "
                            "weights only (tinker://<run>/external_weights/<name>, from save_weights_external)")
        row = self.store.get_checkpoint(str(tp))
        if row is None:  # deleted since resolve
            raise NotFoundError(f"checkpoint {tp} not found on this server")
        files = row["files"] or {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file()}
        now = time.time()
        expires = now + self.url_ttl_s
        if row["expires_at"] is not None:
            expires = min(expires, row["expires_at"])
        urls, rows = {}, []
        for name in files:
            token = secrets.token_urlsafe(32)
            rows.append((_token_hash(token), str(tp), name, row["created"], expires))
            urls[name] = f"{base_url.rstrip('/')}{DOWNLOAD_ROUTE}/{token}/{quote(name)}"
        self.store.purge_download_urls(now - URL_KEEP_S)
        self.store.add_download_urls(rows)
        log.info("%-26s %s %d files", "get_external_weights_urls", tp, len(urls))
        return {"urls": urls, "expires": iso(expires)}

    def open_download(self, token: str, file: str) -> tuple[Path, int]:
        """(path, size) of the file a download URL names, or NotFoundError / Gone."""
        row = self.store.get_download_url(_token_hash(token))
        if row is None or row["file"] != file:
            raise NotFoundError("unknown download URL: get new ones with RestClient.get_external_weights_urls")
        path = row["tinker_path"]
        if row["expires_at"] <= time.time():
            raise Gone(f"this download URL for {file!r} of {path} expired at {iso(row['expires_at'])}; get new ones "
                       "with RestClient.get_external_weights_urls")
        ckpt = self.store.get_checkpoint(path)
        if ckpt is None or ckpt["created"] != row["checkpoint_created"]:
            raise NotFoundError(f"checkpoint {path} was deleted (or saved again) since this URL was made")
        if is_expired(ckpt):
            raise Gone(f"checkpoint {path} expired at {iso(ckpt['expires_at'])} (its TTL ran out)")
        directory = checkpoint_dir(self.checkpoints.root, parse_tinker_path(path))
        target = directory / file
        if target.parent != directory or not target.is_file():
            raise NotFoundError(f"{file!r} is not a file of checkpoint {path}")
        return target, target.stat().st_size
