"""Learner benchmark: trained-token throughput of forward_backward + optim_step, side by side.

Throughput = (sum of datum lengths) / (seconds of forward_backward + optim_step), on the real
default model, for four batches:

  a  one recorded `make run` step (bench/data/make_run_step.json, importance_sampling)
  b  multi-turn: 16 episodes x 10 turns, the whole conversation re-sent each turn (~320 tokens
     at the last turn), 100 instruction tokens shared by all episodes (importance_sampling)
  c  RL groups: 8 prompts x 8 samples, 150-token prompts, 256-token replies (importance_sampling)
  d  SFT: 16 sequences of 128-384 tokens that share no prefix, loss weight 0 on the first 40%
     (the prompt), cross_entropy

"old" is the learner before prefix sharing (Engine(learner="unpacked"), fp32); "new" is the
packed learner (chunked log-probs) in `--train-dtype` (auto = the engine's default: bf16 on CUDA
and on CPUs with native bf16, else fp32; bfloat16 = the decoder's matmuls in bf16 with fp32
outputs, attention and the unembedding's forward in fp32, the unembedding's backward in bf16).
Row e runs batch d through a hand-written transformers + peft step (LoRA r16 on all linears,
fp32 weights, under bf16 autocast when the new learner is bf16, length-sorted micro-batches of
<= 2048 padded tokens, AdamW) against gemtinker with the same LoRA targets (no unembedding
LoRA) and the same dtype policy.

Each rep measures every configuration once, in turn, so the ratios compare neighbours in time
(this machine's speed drifts); odd reps run the old learner (and the peer) first, even reps the
new one, so neither always runs right after the other's memory was freed. Reported per batch: seconds, tokens/s, the tokens actually
computed (packed nodes and padded slots), the peak heap memory the call added (glibc mallinfo2;
RSS would keep earlier calls' freed memory), the matmul FLOPs the call did and the achieved
GFLOP/s against a matmul peak measured in the same run. FLOPs: 4 x decoder params per padded
token (forward, and the backward's input gradient: the frozen base needs no weight gradient),
plus 2 x unembedding params per position scored and again per position whose gradient runs
through it (the old learner and the peer: every real position, twice); LoRA factors are left out
(about 1% at rank 16). "bound" is old FLOPs / new FLOPs: the ratio the new learner reaches at the
old one's GFLOP/s, i.e. what sharing and skipped work alone buy. The last lines read
`train-bench bounds: a=<x> ...` and `train-bench ratios: a=<x> b=<x> c=<x> d=<x> e=<x>`
(medians over reps; e is gemtinker over the peer).

    python bench/train.py [--reps 2] [--batches a,b,c,d,e]
    python bench/train.py --record     # re-record batch a from one make-run step (base model)
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import torch

from _common import matmul_peak, matmul_sizes
from gemtinker.engine import AdamConfig, Engine, LoraSpec, TrainDatum
from gemtinker.engine.devices import cpu_has_fast_bf16
from gemtinker.engine.unpacked import micro_batches
from gemtinker.engine.validation import CheckedDatum

MAKE_RUN_STEP = Path(__file__).parent / "data" / "make_run_step.json"
ADAM = AdamConfig(learning_rate=1e-5)


# ----------------------------------------------------------------------------------- batches
def _rl_datum(tokens: np.ndarray, n_prompt: int, rng) -> TrainDatum:
    """An importance_sampling datum as the trainers send it: advantage 0 on prompt positions."""
    n = len(tokens) - 1
    adv = np.zeros(n, np.float32)
    adv[n_prompt - 1:] = rng.normal()
    lps = np.zeros(n, np.float32)
    lps[n_prompt - 1:] = rng.normal(-2.0, 0.5, n - n_prompt + 1)
    return TrainDatum(tokens[:-1], {"target_tokens": tokens[1:], "logprobs": lps, "advantages": adv})


def batch_a() -> list[TrainDatum]:
    rows = json.loads(MAKE_RUN_STEP.read_text())["datums"]
    return [TrainDatum(np.array(r["input_tokens"]), {
        "target_tokens": np.array(r["target_tokens"]), "logprobs": np.array(r["logprobs"], np.float32),
        "advantages": np.array(r["advantages"], np.float32)}) for r in rows]


def batch_b(vocab: int, rng) -> list[TrainDatum]:
    instructions = rng.integers(0, vocab, 100)
    out = []
    for _ in range(16):
        convo = np.concatenate([instructions, rng.integers(0, vocab, 20)])
        for _ in range(10):
            full = np.concatenate([convo, rng.integers(0, vocab, 12)])  # the reply
            out.append(_rl_datum(full, len(convo), rng))
            convo = np.concatenate([full, rng.integers(0, vocab, 8)])  # the env's feedback
    return out


def batch_c(vocab: int, rng) -> list[TrainDatum]:
    out = []
    for _ in range(8):
        prompt = rng.integers(0, vocab, 150)
        for _ in range(8):
            out.append(_rl_datum(np.concatenate([prompt, rng.integers(0, vocab, 256)]), len(prompt), rng))
    return out


def batch_d(vocab: int, rng) -> list[TrainDatum]:
    out = []
    for i in range(16):
        n = int(rng.integers(128, 385))
        toks = rng.integers(0, vocab, n + 1)
        toks[0] = i  # distinct first tokens: nothing is shared
        w = np.ones(n, np.float32)
        w[: int(0.4 * n)] = 0.0
        out.append(TrainDatum(toks[:-1], {"target_tokens": toks[1:], "weights": w}))
    return out


# ----------------------------------------------------------------------------------- measuring
class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


class PeakHeap:
    """Highest heap memory in use while the block runs, above what was in use at its start
    (glibc mallinfo2, polled every INTERVAL_S). Unlike RSS it does not stay high after an earlier
    call freed memory, so each configuration's own transient memory shows."""

    # mallinfo2 walks every heap under its lock, stalling the measured call's allocations: polled
    # every 5 ms it made batch a's step 35% slower (new learner) and 25% (old); every 100 ms the
    # times match unpolled ones within 5% (docs/learner-2026-12-03.md).
    INTERVAL_S = 0.1
    _libc = ctypes.CDLL(ctypes.util.find_library("c"))
    _libc.mallinfo2.restype = _MallInfo2

    def __enter__(self):
        self.base = self.peak = self._in_use()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._in_use())

    def _poll(self):
        while not self._stop.wait(self.INTERVAL_S):
            self.peak = max(self.peak, self._in_use())

    @classmethod
    def _in_use(cls) -> int:
        info = cls._libc.mallinfo2()
        return int(info.uordblks + info.hblkhd)


def engine_step(eng: Engine, aid: str, datums: list[TrainDatum], loss: str) -> dict:
    with PeakHeap() as mem:
        t = time.perf_counter()
        eng.forward_backward(aid, datums, loss)
        eng.optim_step(aid, ADAM)
        dt = time.perf_counter() - t
    n = sum(len(d.tokens) for d in datums)
    decoder, unembed = matmul_sizes(eng.model)
    if eng.learner is not None:
        st = eng.learner.last_stats
        computed, padded = st["packed_tokens"], st["padded_tokens"]
        flops = 4 * decoder * padded + 2 * unembed * (st["scored_nodes"] + st["gradient_nodes"])
    else:
        checked = [CheckedDatum(torch.as_tensor(d.tokens), {}) for d in datums]
        computed = n
        padded = sum(len(g) * max(len(datums[i].tokens) for i in g) for g in micro_batches(checked, eng.max_tokens_per_batch))
        flops = 4 * decoder * padded + 4 * unembed * n
    return {"s": dt, "tokens": n, "computed": computed, "padded": padded, "flops": flops, "rss": mem.peak - mem.base}


class PeftPeer:
    """What a user writes by hand: transformers + peft LoRA on all linears, fp32 weights, under
    bf16 autocast when `dtype` is bf16 (gemtinker's bf16 policy: bf16 matmuls, fp32 masters)."""

    def __init__(self, dtype: torch.dtype, rank: int = 16):
        self.autocast = dtype == torch.bfloat16
        from peft import LoraConfig, get_peft_model

        from gemtinker.engine.models import load_causal_lm

        model, _, _ = load_causal_lm(None, dtype=torch.float32)
        self.model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=ADAM.learning_rate, betas=(0.9, 0.95), eps=1e-12)

    def step(self, datums: list[TrainDatum], max_tokens: int = 2048) -> dict:
        order = sorted(range(len(datums)), key=lambda i: len(datums[i].tokens))
        groups, cur = [], []
        for i in order:
            if cur and (len(cur) + 1) * len(datums[i].tokens) > max_tokens:
                groups.append(cur)
                cur = []
            cur.append(i)
        groups.append(cur)
        with PeakHeap() as mem:
            t = time.perf_counter()
            padded = 0
            for g in groups:
                length = max(len(datums[i].tokens) for i in g)
                padded += len(g) * length
                ids = torch.zeros(len(g), length, dtype=torch.long)
                tgt = torch.zeros(len(g), length, dtype=torch.long)
                w = torch.zeros(len(g), length)
                att = torch.zeros(len(g), length, dtype=torch.long)
                for r, i in enumerate(g):
                    n = len(datums[i].tokens)
                    ids[r, :n] = torch.as_tensor(datums[i].tokens)
                    tgt[r, :n] = torch.as_tensor(datums[i].inputs["target_tokens"])
                    w[r, :n] = torch.as_tensor(datums[i].inputs["weights"])
                    att[r, :n] = 1
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
                    logits = self.model(input_ids=ids, attention_mask=att).logits
                lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
                (-(lp * w).sum()).backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t
        n = sum(len(d.tokens) for d in datums)
        decoder, unembed = matmul_sizes(self.model.get_base_model())
        flops = 4 * (decoder + unembed) * padded  # logits and their backward on every padded slot
        return {"s": dt, "tokens": n, "computed": n, "padded": padded, "flops": flops, "rss": mem.peak - mem.base}


# ----------------------------------------------------------------------------------- record
def record_make_run_step(path: Path) -> None:
    """Play one step of the default `make run` with the base policy and save its datums."""
    import asyncio
    import random

    import tinker

    from gemtinker.envs.factory import EnvFactory
    from gemtinker.recipes.rebn import Config, build_batch
    from gemtinker.recipes.rebn.credit import datum_arrays
    from gemtinker.recipes.rollouts import EpisodeRunner, RolloutSettings, collect_training_batch, make_executor
    from gemtinker.recipes.tokenizer import load_tokenizer
    from gemtinker.server import ensure_backend

    from gemtinker.hub import use_offline_hub_if_unreachable

    use_offline_hub_if_unreachable()
    cfg = Config()
    ensure_backend(models=[cfg.model_name])

    async def play():
        service = tinker.ServiceClient()
        tc = await service.create_lora_training_client_async(base_model=cfg.model_name, rank=cfg.lora_rank, seed=cfg.seed)
        sampler = await tc.save_weights_and_get_sampling_client_async()
        tok = load_tokenizer(cfg.model_name, tc)
        factory = EnvFactory(cfg.env_id, cfg.env_wrappers, tok)
        envs = [factory.make(cfg.seed * 100_003 + i) for i in range(cfg.num_env)]
        runner = EpisodeRunner(tok, RolloutSettings(cfg.template, cfg.max_tokens, cfg.temperature), make_executor(cfg.num_env))
        batch = await collect_training_batch(envs, runner, sampler, cfg.batch_size, cfg.seed, 0)
        turns, _ = build_batch(batch.episodes, cfg, random.Random(0))
        return turns

    turns = asyncio.run(play())
    rows = []
    for t in turns:
        a = datum_arrays(t)
        rows.append({"input_tokens": a.input_tokens, "target_tokens": a.target_tokens, "logprobs": a.logprobs,
                     "advantages": a.advantages})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"what": f"one step of make run ({cfg.env_id}, template {cfg.template}, "
                                        f"batch_size {cfg.batch_size}), base policy", "datums": rows}))
    print(f"recorded {len(rows)} datums, {sum(len(r['input_tokens']) for r in rows)} tokens -> {path}")


# ----------------------------------------------------------------------------------- main
def _fmt(name: str, r: dict, peak: float) -> str:
    gflops = r["flops"] / r["s"] / 1e9
    return (f"  {name:5s} {r['s']:7.2f} s  {r['tokens'] / r['s']:7.0f} tok/s  computed {r['computed']:6d} "
            f"(padded {r['padded']:6d}) of {r['tokens']:6d}  peak heap +{r['rss'] / 2**30:.2f} GiB  "
            f"{r['flops'] / 1e12:6.2f} TFLOP, {gflops:5.0f} GFLOP/s = {gflops * 1e9 / peak:4.0%} of peak")


def _in_turn(rep: int, baseline, candidate) -> tuple[dict, dict]:
    """(baseline(), candidate()), measured baseline first in odd reps (rep 0, 2, ...) and
    candidate first in even ones."""
    if rep % 2:
        r_candidate = candidate()
        return baseline(), r_candidate
    r_baseline = baseline()
    return r_baseline, candidate()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--batches", default="a,b,c,d,e")
    ap.add_argument("--record", action="store_true", help="re-record batch a, then exit")
    ap.add_argument("--train-dtype", default="auto", help="the new learner's dtype: auto (the default: bf16 on "
                    "CUDA and native-bf16 CPUs, else fp32), float32 or bfloat16")
    args = ap.parse_args()
    if args.record:
        record_make_run_step(MAKE_RUN_STEP)
        return
    wanted = args.batches.split(",")
    rng = np.random.default_rng(0)
    old = Engine(learner="unpacked", train_dtype="float32")
    new = Engine(train_dtype=args.train_dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16 CPU: {cpu_has_fast_bf16()}; "
          f"old learner: unpacked fp32; new learner: packed, train dtype {new.train_dtype}")
    vocab = new.vocab_size
    batches = {"a": ("importance_sampling", batch_a()), "b": ("importance_sampling", batch_b(vocab, rng)),
               "c": ("importance_sampling", batch_c(vocab, rng)), "d": ("cross_entropy", batch_d(vocab, rng))}
    spec = LoraSpec(rank=16, seed=0)
    for eng in (old, new):
        eng.create_adapter("bench", spec)
        eng.forward_backward("bench", batches["d"][1][:2], "cross_entropy")  # warm-up
    peer = None
    if "e" in wanted:
        peer = PeftPeer(new.train_dtype)
        peer.step(batches["d"][1][:2])
        new.create_adapter("bench-e", LoraSpec(rank=16, seed=0, train_unembed=False))
    peak_old, peak_new = matmul_peak(torch.float32), matmul_peak(new.train_dtype)
    print(f"matmul peak: fp32 {peak_old / 1e9:.0f} GFLOP/s, {new.train_dtype} {peak_new / 1e9:.0f} GFLOP/s")

    ratios: dict[str, list[float]] = {}
    bounds: dict[str, float] = {}
    for rep in range(args.reps):
        print(f"rep {rep + 1}/{args.reps}")
        for name in "abcd":
            if name not in wanted:
                continue
            loss, datums = batches[name]
            r_old, r_new = _in_turn(rep, lambda: engine_step(old, "bench", datums, loss),
                                    lambda: engine_step(new, "bench", datums, loss))
            ratios.setdefault(name, []).append(r_old["s"] / r_new["s"])
            bounds[name] = r_old["flops"] / r_new["flops"]
            print(f" {name}: {len(datums)} datums, new/old throughput {ratios[name][-1]:.2f}x "
                  f"(bound at equal GFLOP/s {bounds[name]:.2f}x)")
            print(_fmt("old", r_old, peak_old))
            print(_fmt("new", r_new, peak_new))
        if peer is not None:
            datums = batches["d"][1]
            r_peer, r_gem = _in_turn(rep, lambda: peer.step(datums),
                                     lambda: engine_step(new, "bench-e", datums, "cross_entropy"))
            ratios.setdefault("e", []).append(r_peer["s"] / r_gem["s"])
            print(f" e: batch d, gemtinker/peft-peer throughput {ratios['e'][-1]:.2f}x")
            bounds["e"] = r_peer["flops"] / r_gem["flops"]
            print(_fmt("peer", r_peer, peak_new))
            print(_fmt("gem", r_gem, peak_new))
    print("train-bench bounds: " + " ".join(f"{k}={v:.2f}" for k, v in bounds.items())
          + "  (old FLOPs / new FLOPs: the ratio at equal GFLOP/s)")
    summary = " ".join(f"{k}={statistics.median(v):.2f}" for k, v in ratios.items())
    print(f"train-bench ratios: {summary}  (median of {args.reps} reps)")
    old.close()
    new.close()


if __name__ == "__main__":
    main()
