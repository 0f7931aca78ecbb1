"""`gemtinker export` and `gemtinker import-peft`: trained adapters out of and into gemtinker.

    gemtinker export tinker://RUN/weights/NAME --peft DIR      # PEFT adapter folder
    gemtinker export tinker://RUN/sampler_weights/NAME --merged DIR   # base + adapter, plain HF
    gemtinker import-peft DIR [--base-model NAME] [--name NAME]

`tinker://` paths are looked up in a server state directory (`--root`, default the one
`gemtinker serve` uses); a checkpoint directory can be given instead. These commands work while
the server runs: they read its checkpoints, and an import only adds rows and directories.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _default_root() -> Path:
    from gemtinker.server.local import default_root

    return default_root()


def _checkpoint_dir(source: str, root: Path) -> Path:
    """A checkpoint directory from a tinker:// path (via the server's store) or a folder."""
    from gemtinker.server.checkpoints import CHECKPOINTS_DIR, STORE_FILE, resolve_checkpoint
    from gemtinker.server.errors import UserError
    from gemtinker.server.store import Store

    if not source.startswith("tinker://"):
        return Path(source)
    if not (root / STORE_FILE).is_file():
        raise UserError(f"no server state at {root} (pass --root, the folder `gemtinker serve --root` used)")
    store = Store(root / STORE_FILE)
    try:
        _, directory, _ = resolve_checkpoint(store, (root / CHECKPOINTS_DIR).resolve(), source)
    finally:
        store.close()
    return directory


def export_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gemtinker export", description="Write a trained adapter as a PEFT folder "
                                "and/or a merged Hugging Face model folder.")
    p.add_argument("source", help="tinker://RUN/weights/NAME, tinker://RUN/sampler_weights/NAME, or a checkpoint directory")
    p.add_argument("--peft", type=Path, metavar="DIR", help="write a PEFT adapter folder (peft.PeftModel.from_pretrained)")
    p.add_argument("--merged", type=Path, metavar="DIR", help="write the base model with the adapter merged in "
                   "(transformers.AutoModelForCausalLM.from_pretrained)")
    p.add_argument("--dtype", default="auto", choices=_DTYPES, help="dtype of the merged weights (default: the base model's)")
    p.add_argument("--root", type=Path, default=_default_root(), help="server state dir for tinker:// paths (default %(default)s)")
    args = p.parse_args(argv)
    if args.peft is None and args.merged is None:
        p.error("give --peft DIR and/or --merged DIR")

    import torch

    from gemtinker.engine.models import resolve_model
    from gemtinker.engine.types import EngineError
    from gemtinker.engine.weights_io import read_checkpoint, write_merged, write_peft
    from gemtinker.server.errors import UserError

    try:
        adapter = read_checkpoint(_checkpoint_dir(args.source, args.root.expanduser()))
        if args.peft is not None:
            print(f"PEFT adapter: {write_peft(adapter, args.peft)}")
        if args.merged is not None:
            dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
            model_dir = resolve_model(adapter.base_model).path
            print(f"merged model: {write_merged(adapter, model_dir, args.merged, dtype)}")
    except (EngineError, UserError) as e:
        print(f"gemtinker export: {e}", file=sys.stderr)
        return 1
    return 0


def import_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gemtinker import-peft", description="Turn a PEFT LoRA adapter folder into "
                                "gemtinker checkpoints that the tinker SDK loads by their tinker:// paths.")
    p.add_argument("folder", type=Path, help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--base-model", help="the served base model it applies to (default: the adapter's "
                   "base_model_name_or_path); must be a model the server is started with")
    p.add_argument("--name", default="imported", help="checkpoint name in the tinker:// paths (default %(default)s)")
    p.add_argument("--root", type=Path, default=_default_root(), help="server state dir (default %(default)s)")
    args = p.parse_args(argv)

    from gemtinker.engine.types import EngineError
    from gemtinker.server.errors import UserError

    try:
        paths = import_peft(args.folder, args.root.expanduser(), args.base_model, args.name)
    except (EngineError, UserError) as e:
        print(f"gemtinker import-peft: {e}", file=sys.stderr)
        return 1
    print(f"training checkpoint (create_training_client_from_state): {paths[0]}")
    print(f"sampler checkpoint (create_sampling_client(model_path=...)): {paths[1]}")
    return 0


def import_peft(folder: Path, root: Path, base_model: str | None, name: str) -> list[str]:
    """Register a PEFT folder as a training and a sampler checkpoint of a new run; returns
    their tinker:// paths."""
    from gemtinker.engine.models import resolve_model
    from gemtinker.engine.weights_io import fit_to_model, lora_modules_of, read_peft, write_checkpoint
    from gemtinker.server.checkpoints import CHECKPOINTS_DIR, STORE_FILE, new_import_run, record_checkpoint
    from gemtinker.server.paths import TinkerPath, check_component, checkpoint_dir
    from gemtinker.server.store import Store

    check_component(name, "checkpoint name")
    adapter = read_peft(folder, base_model)
    adapter = fit_to_model(adapter, lora_modules_of(resolve_model(adapter.base_model).path))
    store = Store(root / STORE_FILE)
    try:
        meta = {"imported_from": str(folder.resolve())}
        run_id = new_import_run(store, adapter.base_model, adapter.spec, meta)
        out = []
        for kind in ("training", "sampler"):
            tp = TinkerPath(run_id, kind, name)  # type: ignore[arg-type]
            directory = checkpoint_dir((root / CHECKPOINTS_DIR).resolve(), tp)
            write_checkpoint(adapter, directory, "state" if kind == "training" else "sampler", meta)
            record_checkpoint(store, tp, directory, meta)
            out.append(str(tp))
        return out
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(export_main())
