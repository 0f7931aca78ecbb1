"""Engine benchmark on the real default model, everything measured side by side in one run.

Prints: sampling tokens/s at batch 1 and 16 (engine sampler vs plain `model.generate` on the
same prompts), forward_backward seconds per 1k tokens, and achieved FLOP/s as a fraction of a
measured matmul peak of the same dtype.

    python bench/engine.py [--model NAME] [--dtype float32|bfloat16] [--new-tokens 64] [--fb-dtypes float32,bfloat16]

`--model` takes any model name the engine resolves (default: the bundled model), e.g.
`gemtinker/tiny-qwen3` to see the fast sampler's ratio on the Qwen3 code path.

Measured 2026-11-26, quiet 2-core AVX-512 CPU (about 70 s): sampling batch 1 generate 14.5 tok/s,
engine 18.6 (1.29x; LoRA r32 18.7); batch 16 generate 95.2, engine 228.1 (2.40x; LoRA 223.4).
forward_backward 16x164 tokens: fp32 5.59 s per 1k tokens, 96 GFLOP/s = 54% of the measured fp32
matmul peak (179); bf16 4.01 s per 1k tokens, 134 GFLOP/s = 33% of the bf16 peak (403). bf16
trained only 1.4x faster here with the learner of then (the packed learner: bench/train.py).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from _common import chat_prompt, generate_batch, matmul_params, matmul_peak, sample_concurrently
from gemtinker.engine import Engine, LoraSpec, TrainDatum
from gemtinker.engine.models import load_causal_lm

QUESTIONS = [
    "What is 2+3?", "Name a primary colour.", "Write a haiku about rain.", "What is the capital of France?",
    "Explain gravity in one sentence.", "Count from one to five.", "What do bees make?", "Give me a synonym for happy.",
    "Why is the sky blue?", "What is 7 times 8?", "Translate 'hello' to Spanish.", "Who wrote Hamlet?",
    "What is H2O?", "Suggest a name for a cat.", "How many legs does a spider have?", "What is the opposite of cold?",
]


def prompts(tok) -> list[list[int]]:
    return [chat_prompt(tok, q) for q in QUESTIONS]


def bench_generate(model, tok, ps: list[list[int]], new: int) -> float:
    """Plain HF generate (left-padded batch, exactly `new` tokens per row): tokens/s."""
    dt, _ = generate_batch(model, tok, ps, new)
    return len(ps) * new / dt


def bench_engine_sample(eng: Engine, sid: str, ps: list[list[int]], new: int) -> float:
    """All prompts sampled concurrently (exactly `new` tokens each): tokens/s."""
    return len(ps) * new / sample_concurrently(eng, sid, [(p, new, 0.0) for p in ps], seed=0)


def bench_fb(model: str | None, dtype: str, batch: int = 16, seq: int = 164) -> None:
    eng = Engine(model, dtype=dtype)
    try:
        eng.create_adapter("bench", LoraSpec(rank=32, seed=0))
        rng = np.random.default_rng(0)
        data = []
        for _ in range(batch):
            toks = rng.integers(0, eng.vocab_size, seq + 1)
            data.append(TrainDatum(toks[:-1], {"target_tokens": toks[1:], "logprobs": np.full(seq, -5.0, np.float32),
                                               "advantages": rng.normal(size=seq).astype(np.float32)}))
        eng.forward_backward("bench", data[:2], "importance_sampling")  # warm-up
        t = time.perf_counter()
        eng.forward_backward("bench", data, "importance_sampling")
        dt = time.perf_counter() - t
        tokens = batch * seq
        # Forward 2*P*T, backward 2*P*T (activation grads only: base weights are frozen); LoRA is ~1%.
        flops = 4 * matmul_params(eng.model) * tokens
        peak = matmul_peak(eng.dtype)
        print(f"forward_backward [{dtype}] {batch}x{seq} tokens: {dt:.2f} s = {dt / tokens * 1000:.2f} s per 1k tokens; "
              f"{flops / dt / 1e9:.0f} GFLOP/s = {flops / dt / peak:.0%} of measured {dtype} matmul peak "
              f"({peak / 1e9:.0f} GFLOP/s)")
    finally:
        eng.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model name or folder (default: the bundled model)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--fb-dtypes", default="float32,bfloat16")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, sampling dtype {args.dtype}")

    eng = Engine(args.model, dtype=args.dtype)
    sched = eng._scheduler
    print(f"model {eng.base_model}: sampler {'fast path' if sched.use_fast else 'generic path (' + str(sched.fast_reason) + ')'}")
    plain, tok, _ = load_causal_lm(args.model, dtype=eng.dtype, device=eng.device)
    plain.eval()
    ps = prompts(tok)
    eng.create_adapter("s", LoraSpec(rank=32, seed=0))
    sid, base = eng.snapshot_sampler("s"), eng.base_sampler()
    bench_engine_sample(eng, sid, ps[:1], 8)  # warm-up
    bench_generate(plain, tok, ps[:1], 8)
    for bs in (1, 16):
        g = bench_generate(plain, tok, ps[:bs], args.new_tokens)
        e = bench_engine_sample(eng, sid, ps[:bs], args.new_tokens)
        b = bench_engine_sample(eng, base, ps[:bs], args.new_tokens)
        print(f"sampling batch {bs:2d}: HF generate {g:7.1f} tok/s (no LoRA) | engine base {b:7.1f} tok/s "
              f"(ratio {b / g:.2f}x) | engine LoRA r32 {e:7.1f} tok/s (ratio {e / g:.2f}x)")
    eng.close()
    del eng, plain
    for dt in filter(None, args.fb_dtypes.split(",")):
        bench_fb(args.model, dt)


if __name__ == "__main__":
    main()
