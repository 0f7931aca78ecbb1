"""Sampler throughput: 32 concurrent sample requests on the bundled model, side by side in one run.

Compares, on the same 32 chat prompts and the same number of new tokens per request:
  * engine, continuous batching: 32 threads call `engine.sample` at once (LoRA r32 sampler);
  * engine, one request at a time: the same calls made one after another (first 8, for time);
  * plain `model.generate` on one left-padded batch of the 32 prompts (no LoRA);
  * RL-like: half short questions, every request stopping at EOS (generated tokens / wall time):
    generate keeps computing finished rows, the engine drops them;
  * optionally (--staggered) requests arriving over time with mixed lengths: continuous batching
    vs the previous whole-batch sampler (HF decoder, DynamicCache), which makes late arrivals
    wait for the running batch.

Each round uses a fresh sampler (nothing cached from earlier rounds), and engine/generate rounds
alternate so load changes on a shared machine hit both; the ratio reported is the median over
rounds. Also printed: tensor ops per batch-32 decode step (engine vs HF forward), a load-free
measure of per-step overhead.

    python bench/sampler.py [--quick] [--rounds 3] [--new-tokens 64] [--dtype float32] [--staggered]

Measured 2026-11-26 on the 2-core CPU (load avg ~1.5, nothing else running), fp32, --rounds 3
--staggered: generate 119 tok/s, engine 283 tok/s concurrent (2.54x, rounds 2.69/2.54/2.08x),
19 tok/s one at a time (14.8x); stop at EOS 2.50x; staggered arrivals 3.64x over the whole-batch
sampler. Before the pre-packed linears and the shared-start prefill the same run gave 1.37x.
The 32 prompts share the chat template's system prompt (~25 tokens), which the engine
prefills once and `generate` 32 times.
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import add_device_args, apply_device_args, chat_prompt, generate_batch, sample_concurrently
from gemtinker.engine import Engine, LoraSpec, SamplingConfig
from gemtinker.engine.models import load_causal_lm

TOPICS = [
    "rain", "the sea", "a cat", "winter", "bread", "a train", "the moon", "coffee", "a river", "autumn",
    "a library", "mountains", "a garden", "the city", "a violin", "snow", "a lighthouse", "bees", "the desert",
    "a clock", "fireflies", "a bridge", "the wind", "a kite", "an old map", "tea", "a forest", "the stars",
    "a market", "a storm", "a boat", "spring",
]


QUESTIONS = [
    "What is 2+3?", "Name a primary colour.", "What is the capital of France?", "What do bees make?",
    "What is 7 times 8?", "Who wrote Hamlet?", "What is H2O?", "How many legs does a spider have?",
]


def prompts(tok, n: int, mixed: bool = False) -> list[list[int]]:
    """Chat prompts; `mixed`: every other one a short question (answers end early at EOS)."""
    out = []
    for i, t in enumerate((TOPICS * (n // len(TOPICS) + 1))[:n]):
        text = QUESTIONS[i // 2 % len(QUESTIONS)] if mixed and i % 2 else f"Write a short story about {t}."
        out.append(chat_prompt(tok, text))
    return out


def run_sequential(eng: Engine, sid: str, ps: list[list[int]], new: int) -> float:
    t = time.perf_counter()
    for p in ps:
        eng.sample(sid, p, 1, SamplingConfig(max_tokens=new, temperature=1.0, seed=0, stop=()))
    return time.perf_counter() - t


def run_generate(model, tok, ps: list[list[int]], new: int, eos: bool = False, counted: list | None = None) -> float:
    dt, n = generate_batch(model, tok, ps, new, eos=eos)
    if counted is not None:
        counted.append(n)
    return dt


def count_ops(eng: Engine, plain, batch: int = 32, ctx: int = 100) -> tuple[int, int]:
    """aten ops in one decode step (forward + logits + sampling): engine fast path vs HF forward."""
    from transformers import DynamicCache

    from gemtinker.engine.sampling.fast_decoder import FastDecoder

    fd = FastDecoder(eng.model, eng.device, eng.dtype)
    buf = fd.new_buffer(batch, ctx + 8)
    plan = fd.plan(["base"] * batch, [None] * batch)
    ids = torch.zeros(batch, 1, dtype=torch.long, device=eng.device)
    pos = torch.full((batch, 1), ctx, device=eng.device)
    cache = DynamicCache()
    with torch.inference_mode():
        plain(input_ids=torch.zeros(batch, ctx, dtype=torch.long, device=eng.device), cache=cache, use_cache=True)

    def engine_step():
        lp = torch.log_softmax(fd.logits(plan, fd.forward(plan, buf, 0, ids, pos, ctx + 1)[:, 0]), -1)
        torch.searchsorted(lp.exp().cumsum(-1), torch.rand(batch, 1, device=eng.device), right=True)

    def hf_step():
        out = plain(input_ids=ids, cache=cache, use_cache=True)
        torch.multinomial(torch.softmax(out.logits[:, -1].float(), -1), 1)

    counts = []
    for f in (engine_step, hf_step):
        with torch.inference_mode(), torch.profiler.profile() as prof:
            f()
        counts.append(sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")))
    return counts[0], counts[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer tokens: about a minute")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=None, help="alternating engine/generate rounds (median)")
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--staggered", action="store_true", help="also: arrivals over time vs the whole-batch sampler")
    add_device_args(ap)
    args = ap.parse_args()
    apply_device_args(args)
    new = args.new_tokens or (24 if args.quick else 64)
    torch.manual_seed(0)

    eng = Engine(dtype=args.dtype)
    print(f"torch {torch.__version__}, device {eng.device}, dtype {eng.dtype}, {torch.get_num_threads()} threads; "
          f"{args.requests} requests x {new} new tokens")
    plain, tok, _ = load_causal_lm(None, dtype=eng.dtype, device=eng.device)
    ps = prompts(tok, args.requests)
    eng.create_adapter("bench", LoraSpec(rank=32, seed=0))
    sid = eng.snapshot_sampler("bench")
    sample_concurrently(eng, sid, [(p, 4, 0.0) for p in ps[:4]])  # warm-up
    run_generate(plain, tok, ps[:4], 4)
    ops_engine, ops_hf = count_ops(eng, plain)
    print(f"aten ops per batch-32 decode step incl. sampling: engine {ops_engine}, HF forward {ops_hf} "
          f"({ops_hf / ops_engine:.2f}x fewer)")

    total = len(ps) * new
    rounds = args.rounds or (1 if args.quick else 3)
    t_gen, t_cb = [], []
    for r in range(rounds):
        fresh = eng.snapshot_sampler("bench")  # new sampler: no K/V cached from earlier rounds
        order = ("gen", "cb") if r % 2 == 0 else ("cb", "gen")
        for what in order:
            if what == "gen":
                t_gen.append(run_generate(plain, tok, ps, new))
            else:
                t_cb.append(sample_concurrently(eng, fresh, [(p, new, 0.0) for p in ps]))
        eng.release_sampler(fresh)
        print(f"  round {r}: generate {t_gen[-1]:.1f} s, engine {t_cb[-1]:.1f} s, ratio {t_gen[-1] / t_cb[-1]:.2f}x")
    # One at a time is slow: time the first `n_seq` requests and compare throughputs.
    n_seq = min(len(ps), 8)
    t_seq = run_sequential(eng, eng.snapshot_sampler("bench"), ps[:n_seq], new) * len(ps) / n_seq
    ratio = sorted(g / c for g, c in zip(t_gen, t_cb))[len(t_gen) // 2]
    g_med, c_med = sorted(t_gen)[len(t_gen) // 2], sorted(t_cb)[len(t_cb) // 2]
    print(f"HF generate, one batch of {len(ps)} (no LoRA): {total / g_med:7.1f} tok/s  (median {g_med:.1f} s)")
    print(f"engine, one request at a time (LoRA r32):  {total / t_seq:7.1f} tok/s  (first {n_seq} requests)")
    print(f"engine, {len(ps)} concurrent requests (LoRA r32): {total / c_med:7.1f} tok/s  (median {c_med:.1f} s)")
    print(f"ratio continuous batching / generate (median of rounds): {ratio:.2f}x")
    print(f"ratio continuous batching / one at a time:               {t_seq / c_med:.2f}x")

    # RL-like: half the prompts are short questions and every request stops at EOS. generate keeps
    # computing finished rows until the longest is done; the engine drops them.
    mixed = prompts(tok, args.requests, mixed=True)
    n_gen, n_cb, t_gen2, t_cb2 = [], [], [], []
    for r in range(rounds):
        fresh = eng.snapshot_sampler("bench")
        t_gen2.append(run_generate(plain, tok, mixed, new * 2, eos=True, counted=n_gen))
        t_cb2.append(sample_concurrently(eng, fresh, [(p, new * 2, 0.0) for p in mixed], eos=True, counted=n_cb))
        eng.release_sampler(fresh)
    tp_gen = sorted(n / t for n, t in zip(n_gen, t_gen2))[rounds // 2]
    tp_cb = sorted(n / t for n, t in zip(n_cb, t_cb2))[rounds // 2]
    print(f"stop at EOS, mixed questions/stories, <= {new * 2} tokens: generate {tp_gen:.1f} tok/s, "
          f"engine {tp_cb:.1f} tok/s (generated tokens / wall), ratio {tp_cb / tp_gen:.2f}x")

    if args.staggered:
        # Arrivals spread over the first seconds, lengths varied: late requests should not wait.
        gen = torch.Generator().manual_seed(1)
        jobs = [(p, int(torch.randint(new // 2, new * 2, (1,), generator=gen)), float(i) * 0.05)
                for i, p in enumerate(ps)]
        old = Engine(dtype=args.dtype, prefix_cache=False)
        old._scheduler.use_fast = False  # the previous sampler: HF decoder, whole batches
        old.create_adapter("bench", LoraSpec(rank=32, seed=0))
        osid = old.snapshot_sampler("bench")
        sample_concurrently(old, osid, [(p, 4, 0.0) for p in ps[:4]])
        t_old = sample_concurrently(old, osid, jobs)
        t_new = sample_concurrently(eng, eng.snapshot_sampler("bench"), jobs)
        tot = sum(j[1] for j in jobs)
        print(f"staggered arrivals: whole-batch sampler {tot / t_old:.1f} tok/s, continuous batching "
              f"{tot / t_new:.1f} tok/s, ratio {t_old / t_new:.2f}x")
        old.close()
    eng.close()


if __name__ == "__main__":
    main()
