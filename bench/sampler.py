"""Sampler throughput: 32 concurrent sample requests on the bundled model, side by side in one run.

Compares, on the same 32 chat prompts and the same number of new tokens per request:
  * engine, continuous batching: 32 threads call `engine.sample` at once (LoRA r32 sampler);
  * engine, one request at a time: the same calls made one after another;
  * plain `model.generate` on one left-padded batch of the 32 prompts (no LoRA);
  * optionally (--staggered) requests arriving over time with mixed lengths: continuous batching
    vs the previous whole-batch sampler (HF decoder, DynamicCache), which makes late arrivals
    wait for the running batch.

    python bench/sampler.py [--quick] [--new-tokens 64] [--dtype float32] [--staggered]
"""

from __future__ import annotations

import argparse
import threading
import time

import torch

from gemtinker.engine import Engine, LoraSpec, SamplingConfig
from gemtinker.engine.models import load_causal_lm

TOPICS = [
    "rain", "the sea", "a cat", "winter", "bread", "a train", "the moon", "coffee", "a river", "autumn",
    "a library", "mountains", "a garden", "the city", "a violin", "snow", "a lighthouse", "bees", "the desert",
    "a clock", "fireflies", "a bridge", "the wind", "a kite", "an old map", "tea", "a forest", "the stars",
    "a market", "a storm", "a boat", "spring",
]


def prompts(tok, n: int) -> list[list[int]]:
    out = []
    for t in (TOPICS * (n // len(TOPICS) + 1))[:n]:
        msgs = [{"role": "user", "content": f"Write a short story about {t}."}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def run_concurrent(eng: Engine, sid: str, jobs: list[tuple[list[int], int, float]]) -> float:
    """jobs: (prompt, new tokens, arrival delay s). Returns wall seconds until the last finishes."""
    start = threading.Barrier(len(jobs) + 1)

    def one(p, n, delay):
        start.wait()
        time.sleep(delay)
        eng.sample(sid, p, 1, SamplingConfig(max_tokens=n, temperature=1.0, seed=0, stop=()))

    threads = [threading.Thread(target=one, args=j) for j in jobs]
    for th in threads:
        th.start()
    start.wait()
    t = time.perf_counter()
    for th in threads:
        th.join()
    return time.perf_counter() - t


def run_sequential(eng: Engine, sid: str, ps: list[list[int]], new: int) -> float:
    t = time.perf_counter()
    for p in ps:
        eng.sample(sid, p, 1, SamplingConfig(max_tokens=new, temperature=1.0, seed=0, stop=()))
    return time.perf_counter() - t


def run_generate(model, tok, ps: list[list[int]], new: int) -> float:
    t_max = max(map(len, ps))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (t_max - len(p)) + p for p in ps])
    mask = torch.tensor([[0] * (t_max - len(p)) + [1] * len(p) for p in ps])
    t = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), do_sample=True,
                       temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=new, pad_token_id=pad)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer tokens: about a minute")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--staggered", action="store_true", help="also: arrivals over time vs the whole-batch sampler")
    args = ap.parse_args()
    new = args.new_tokens or (24 if args.quick else 64)
    torch.manual_seed(0)

    eng = Engine(dtype=args.dtype)
    print(f"torch {torch.__version__}, device {eng.device}, dtype {eng.dtype}, {torch.get_num_threads()} threads; "
          f"{args.requests} requests x {new} new tokens")
    plain, tok, _ = load_causal_lm(None, dtype=eng.dtype, device=eng.device)
    ps = prompts(tok, args.requests)
    eng.create_adapter("bench", LoraSpec(rank=32, seed=0))
    sid = eng.snapshot_sampler("bench")
    run_concurrent(eng, sid, [(p, 4, 0.0) for p in ps[:4]])  # warm-up (also merges the LoRA once)
    run_generate(plain, tok, ps[:4], 4)

    total = len(ps) * new
    t_gen = run_generate(plain, tok, ps, new)
    t_cb = run_concurrent(eng, sid, [(p, new, 0.0) for p in ps])
    t_seq = run_sequential(eng, sid, ps, new)
    print(f"HF generate, one batch of {len(ps)} (no LoRA): {total / t_gen:7.1f} tok/s  ({t_gen:.1f} s)")
    print(f"engine, one request at a time (LoRA r32):  {total / t_seq:7.1f} tok/s  ({t_seq:.1f} s)")
    print(f"engine, {len(ps)} concurrent requests (LoRA r32): {total / t_cb:7.1f} tok/s  ({t_cb:.1f} s)")
    print(f"ratio continuous batching / generate:        {t_gen / t_cb:.2f}x")
    print(f"ratio continuous batching / one at a time:   {t_seq / t_cb:.2f}x")
    print(f"(prefix cache over the run: {eng.sampler_stats()})")

    if args.staggered:
        # Arrivals spread over the first seconds, lengths varied: late requests should not wait.
        gen = torch.Generator().manual_seed(1)
        jobs = [(p, int(torch.randint(new // 2, new * 2, (1,), generator=gen)), float(i) * 0.05)
                for i, p in enumerate(ps)]
        old = Engine(dtype=args.dtype, prefix_cache=False)
        old._scheduler.use_fast = False  # the previous sampler: HF decoder, whole batches
        old.create_adapter("bench", LoraSpec(rank=32, seed=0))
        osid = old.snapshot_sampler("bench")
        run_concurrent(old, osid, [(p, 4, 0.0) for p in ps[:4]])
        t_old = run_concurrent(old, osid, jobs)
        t_new = run_concurrent(eng, sid, jobs)
        tot = sum(j[1] for j in jobs)
        print(f"staggered arrivals: whole-batch sampler {tot / t_old:.1f} tok/s, continuous batching "
              f"{tot / t_new:.1f} tok/s, ratio {t_old / t_new:.2f}x")
        old.close()
    eng.close()


if __name__ == "__main__":
    main()
