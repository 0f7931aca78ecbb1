"""Pieces shared by the benchmark scripts (run as `python bench/<name>.py`, so this imports as
`_common`): chat prompts, the plain `model.generate` baseline, concurrent engine sampling, and
the device/thread options."""

from __future__ import annotations

import argparse
import threading
import time

import torch

from gemtinker.engine import Engine, SamplingConfig


def chat_prompt(tok, text: str) -> list[int]:
    """Token ids of a one-message chat, generation prompt included."""
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def generate_batch(model, tok, ps: list[list[int]], new: int, eos: bool = False) -> tuple[float, int]:
    """Plain HF `generate` on one left-padded batch, sampling at temperature 1 (no top-k/top-p).

    eos=False: exactly `new` tokens per row; eos=True: rows stop at EOS, but generate keeps
    computing them until the longest is done. Returns (wall seconds, tokens generated, counting
    each row up to and including its first EOS)."""
    t_max = max(map(len, ps))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (t_max - len(p)) + p for p in ps], device=model.device)
    mask = torch.tensor([[0] * (t_max - len(p)) + [1] * len(p) for p in ps], device=model.device)
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                             top_p=1.0, max_new_tokens=new, min_new_tokens=None if eos else new, pad_token_id=pad)
    dt = time.perf_counter() - t
    n = 0
    for row in out[:, t_max:].tolist():
        n += row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
    return dt, n


def sample_concurrently(eng: Engine, sid: str, jobs: list[tuple[list[int], int, float]], eos: bool = False,
                        counted: list | None = None, seed: int | None = None) -> float:
    """jobs: (prompt, new tokens, arrival delay s). Returns wall seconds until the last finishes.
    eos: stop at EOS (else exactly `new tokens`); `counted` gets the number of tokens generated;
    seed: the same sampling seed for every request (None: each request draws its own)."""
    start = threading.Barrier(len(jobs) + 1)
    got: list[int] = []

    def one(p, n, delay):
        start.wait()
        time.sleep(delay)
        res = eng.sample(sid, p, 1, SamplingConfig(max_tokens=n, temperature=1.0, seed=seed, stop=None if eos else ()))
        got.append(len(res.sequences[0].tokens))

    threads = [threading.Thread(target=one, args=j) for j in jobs]
    for th in threads:
        th.start()
    start.wait()
    t = time.perf_counter()
    for th in threads:
        th.join()
    if counted is not None:
        counted.append(sum(got))
    return time.perf_counter() - t


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of one large square matmul in `dtype`: the ceiling achieved FLOP/s is compared to."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


def matmul_sizes(model) -> tuple[int, int]:
    """(decoder, unembedding) weights that take part in a matmul per token."""
    un = model.get_output_embeddings().weight.numel()
    total = sum(m.weight.numel() for name, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and "lora_" not in name)  # peft's factors are Linears too
    return total - un, un


def matmul_params(model) -> int:
    """Weights that take part in a matmul per token (all linears incl. the unembedding)."""
    return sum(matmul_sizes(model))


def add_device_args(ap: argparse.ArgumentParser, default_dtype: str | None = None) -> None:
    ap.add_argument("--dtype", default=default_dtype, help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads for everything in the run (on a CPU shared with other "
                         "busy processes, 1 can be much faster than 2)")


def apply_device_args(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
