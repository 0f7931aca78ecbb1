"""A lean decoder for Llama-family models (and Qwen3's q/k norms) over a preallocated KV buffer
(sampler fast path).

Decoding a small model is bound by per-op overhead and by re-reading the weights, not by FLOPs,
so this runs the model's own weights with as few tensor ops per layer as possible, each linear
pre-packed for the CPU's GEMM once (see `packed_linear`): q/k/v and gate/up fused into one matmul
each, rotary embedding applied to q, k (and, as identity, v) in three ops, one `index_put_`
writing k and v into the KV buffer, one SDPA call. Qwen3 normalises each q and k head (RMSNorm over
head_dim) between the projection and the rotary embedding: that is a nonlinearity, so its weight
cannot be folded into q_proj; it runs as three ops over all heads at once, v heads passing
through with scale 1. With a single sampler in fp32 the LoRA delta is
merged into the weights once per sampler (W + scale * B @ A), which removes the LoRA cost; mixed
batches and low-precision bases apply the LoRA delta in fp32 beside the base weights, as the
trainer does. Everything is plain torch on `device`, so it runs on CUDA unchanged.

KV buffer layout: (layers, 2, rows, kv_heads, T, head_dim). Row r holds its sequence from
position 0 (no left padding); the attention mask hides positions >= the row's length.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..lora import LoraLinear, LoraWeights
from ..packed_linear import PackedLinear

_SUPPORTED = {"llama", "mistral", "qwen2", "qwen3"}


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the fast path cannot run this model (None: it can)."""
    cfg = model.config
    if getattr(cfg, "model_type", None) not in _SUPPORTED:
        return f"model_type {getattr(cfg, 'model_type', None)!r}"
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "mlp_bias", False):
        return "activation/MLP bias"
    if getattr(cfg, "pretraining_tp", 1) != 1:
        return "pretraining_tp"
    if getattr(cfg, "sliding_window", None) and (cfg.model_type == "mistral" or getattr(cfg, "use_sliding_window", False)):
        return "sliding-window attention"
    dec = model.get_decoder()
    if not all(hasattr(dec, a) for a in ("layers", "embed_tokens", "norm", "rotary_emb")):
        return "decoder layout"
    if cfg.model_type == "qwen3" and not all(hasattr(layer.self_attn, n) for layer in dec.layers for n in ("q_norm", "k_norm")):
        return "qwen3 without q/k norms"
    return None


@dataclass
class _LayerW:
    # RMSNorm weights are folded into the linears that follow them (W * w[None, :]), so a norm
    # is just x / rms(x); the residual adds after o and down are fused into their matmuls.
    qkv: PackedLinear
    o: PackedLinear
    gu: PackedLinear
    down: PackedLinear


@dataclass
class WeightSet:
    layers: list[_LayerW]
    unembed: PackedLinear  # final norm weight folded in


# A LoRA delta on one fused linear: (A (R, in), B (out, R)) with the scale folded into B, or
# per row (A (b, in, R), B (b, R, out)) already transposed for bmm. A preceding norm's weight is
# folded into A, as into the base weight.
Delta = tuple[torch.Tensor, torch.Tensor] | None


@dataclass(frozen=True)
class Plan:
    """What a forward over a batch runs: packed weights, and the LoRA deltas applied beside them
    (None when there are none, or when they are merged into `weights`)."""

    weights: WeightSet
    layer_deltas: list[list[Delta]] | None = None  # per layer: qkv, o, gate|up, down
    unembed_delta: Delta = None


class FastDecoder:
    # Packed weight sets kept, base included (each a copy of every linear, 0.5 GB for SmolLM2-135M
    # in fp32). One serves the synchronous loop (each step samples from one new sampler); a
    # client alternating between samplers, or mixed batches after a merged one, pay a rebuild
    # (one pass over the weights, about 0.3 s) on each switch.
    merged_cache_size = 1

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype, merge_lora: bool | None = None,
                 on_build: Callable[[], None] | None = None, after_build: Callable[[], None] | None = None):
        cfg = model.config
        # Called before a packed weight set is built (the engine frees what training holds) and
        # after (the model's own linears are not read again until the next training call).
        self.on_build, self.after_build = on_build, after_build
        dec = model.get_decoder()
        self.device, self.dtype = device, dtype
        self.n_layers = len(dec.layers)
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = float(cfg.rms_norm_eps)
        self.embed = dec.embed_tokens.weight
        self.norm_w = dec.norm.weight
        self.rotary = dec.rotary_emb
        self.layers = list(dec.layers)
        # Qwen3: per layer, the q/k norm weights laid out over all q, k and v heads (ones for v).
        self._qk_norm = [self._qk_norm_weight(layer) for layer in self.layers] if cfg.model_type == "qwen3" else None
        self.unembed_mod: LoraLinear | nn.Linear = model.get_output_embeddings()
        # Merging rounds W + delta to the base dtype: exact enough in fp32, not in bf16/fp16.
        self.merge_lora = (dtype == torch.float32) if merge_lora is None else merge_lora
        half = self.head_dim // 2
        self._sign = torch.cat([-torch.ones(half), torch.ones(half)]).to(device=device, dtype=torch.float32)
        self._sqrt_eps = torch.tensor(self.eps ** 0.5, device=device, dtype=torch.float32)
        # Packed weight sets: the base model's (key None) and merged ones (key = sampler), in one
        # LRU bounded by `merged_cache_size`, so a loop that samples one policy at a time keeps
        # one copy of the linears besides the model's own.
        self._merged: OrderedDict[str | None, WeightSet] = OrderedDict()
        self._shared: OrderedDict[str, tuple[list[list[Delta]], Delta]] = OrderedDict()

    # ------------------------------------------------------------------ weights
    def _qk_norm_weight(self, layer) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight (heads, hd) in the model dtype, (heads, 1) mask of the v heads, which are not normed)."""
        at = layer.self_attn
        w = torch.cat([at.q_norm.weight.expand(self.n_heads, -1), at.k_norm.weight.expand(self.n_kv, -1),
                       at.q_norm.weight.new_ones(self.n_kv, self.head_dim)]).to(self.device)
        v_heads = torch.zeros(self.n_heads + 2 * self.n_kv, 1, dtype=torch.bool, device=self.device)
        v_heads[self.n_heads + self.n_kv:] = True
        return w.contiguous(), v_heads

    def _lin(self, mod) -> tuple[torch.Tensor, torch.Tensor | None, str | None]:
        if isinstance(mod, LoraLinear):
            return mod.base.weight, mod.base.bias, mod.key
        return mod.weight, mod.bias, None

    def _fused(self, layer) -> list[tuple[list, torch.Tensor | None]]:
        """The four fused linears of a layer: (parts, weight of the norm in front of it)."""
        at, mlp = layer.self_attn, layer.mlp
        return [
            ([self._lin(at.q_proj), self._lin(at.k_proj), self._lin(at.v_proj)], layer.input_layernorm.weight),
            ([self._lin(at.o_proj)], None),
            ([self._lin(mlp.gate_proj), self._lin(mlp.up_proj)], layer.post_attention_layernorm.weight),
            ([self._lin(mlp.down_proj)], None),
        ]

    def _folded(self, parts, norm_w, dtype: torch.dtype) -> torch.Tensor:
        """A fused linear's weight (parts stacked) with the norm weight in front of it folded in."""
        out = torch.cat([weight.float() for weight, _, _ in parts], 0)
        if norm_w is not None:
            out = out * norm_w.float()[None, :]
        return out.to(dtype).contiguous()

    def _fused_weights(self) -> list[list[tuple[list, torch.Tensor | None]]]:
        return [self._fused(layer) for layer in self.layers] + [[([self._lin(self.unembed_mod)], self.norm_w)]]

    def _build(self) -> WeightSet:
        """Base weights fused (q|k|v, gate|up), norm weights folded in."""
        return self._pack(None)

    def _merge(self, lora: LoraWeights) -> WeightSet:
        """Base weights + LoRA delta, one addmm per fused linear: W' = W_folded + B_blk @ A_cat.

        The deltas already carry the scale (in B) and the norm weight (in A), so this is a single
        pass over the weights (merging runs once per new sampler)."""
        return self._pack(self._shared_deltas(lora))

    @torch.no_grad()
    def _pack(self, deltas: tuple[list[list[Delta]], Delta] | None) -> WeightSet:
        """Packed linears folded from the model's weights (plus merged deltas). Only the packed
        form is kept, not the plain folded weights: a merge re-folds them from the model, which
        saves a copy of every linear (about 0.5 GB for SmolLM2-135M in fp32)."""
        if self.on_build is not None:
            self.on_build()
        fused = self._fused_weights()
        layers_d, un_d = deltas if deltas is not None else ([[None] * 4 for _ in self.layers], None)

        def m(parts_norm, d: Delta) -> PackedLinear:
            biases = [b for _, b, _ in parts_norm[0]]
            bias = torch.cat(biases) if all(b is not None for b in biases) else None
            w = self._folded(*parts_norm, torch.float32)
            if d is not None:
                w = torch.addmm(w, d[1], d[0])
            return PackedLinear(w.to(self.dtype), bias, keep_plain=False)

        layers = [_LayerW(*(m(f[j], d[j]) for j in range(4))) for f, d in zip(fused, layers_d)]
        packed = WeightSet(layers, m(fused[-1][0], un_d))
        if self.after_build is not None:
            self.after_build()
        return packed

    def _shared_deltas(self, lora: LoraWeights) -> tuple[list[list[Delta]], Delta]:
        """Per fused linear: A = concat of the parts' A, B = block-diagonal of scale * B."""

        def d(parts, norm_w=None) -> Delta:
            present = [(i, lora.tensors[k]) for i, (_, _, k) in enumerate(parts) if k in lora.tensors]
            if not present:
                return None
            outs = [p[0].shape[0] for p in parts]
            r_tot = sum(a.shape[0] for _, (a, _) in present)
            a_cat = torch.cat([a.float() for _, (a, _) in present], 0)
            if norm_w is not None:
                a_cat = a_cat * norm_w.float()[None, :]
            b_blk = torch.zeros(sum(outs), r_tot, dtype=torch.float32, device=a_cat.device)
            r0 = 0
            for i, (a, b) in present:
                o0 = sum(outs[:i])
                b_blk[o0:o0 + b.shape[0], r0:r0 + a.shape[0]] = b.float() * lora.scale
                r0 += a.shape[0]
            return a_cat, b_blk

        with torch.no_grad():
            layers = [[d(parts, nw) for parts, nw in self._fused(layer)] for layer in self.layers]
            return layers, d([self._lin(self.unembed_mod)], self.norm_w)

    def _lru_get(self, cache: OrderedDict, key: str, make, size: int):
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        # Make room before building: a packed set is a full copy of the linears (0.5 GB for
        # SmolLM2-135M in fp32), and building first held two of them at once (a batch still
        # running on an evicted set keeps it alive through its plan).
        while cache and len(cache) >= size:
            cache.popitem(last=False)
        val = make()
        cache[key] = val
        return val

    @property
    def base(self) -> WeightSet:
        return self._lru_get(self._merged, None, self._build, self.merged_cache_size)

    def drop(self, key: str) -> None:
        self._merged.pop(key, None)
        self._shared.pop(key, None)

    def drop_all(self) -> None:
        """Forget every packed weight set and delta (the next plan rebuilds what it needs)."""
        self._merged.clear()
        self._shared.clear()

    def plan(self, keys: list[str], weights: list[LoraWeights | None]) -> Plan:
        """Weights and LoRA deltas for a batch whose row i uses sampler keys[i] / weights[i]."""
        first = keys[0]
        if all(k == first for k in keys):
            w = weights[0]
            if w is None:
                return Plan(self.base)
            if self.merge_lora:
                return Plan(self._lru_get(self._merged, first, lambda: self._merge(w), self.merged_cache_size))
            layers, un = self._lru_get(self._shared, first, lambda: self._shared_deltas(w), 8)
            return Plan(self.base, layers, un)
        # Mixed batch: base weights plus each row's own delta (zeros for base-model rows).
        per_key = {}
        for k, w in zip(keys, weights):
            if k not in per_key:
                per_key[k] = None if w is None else self._lru_get(self._shared, k, lambda w=w: self._shared_deltas(w), 8)
        layers = [[self._stack([None if per_key[k] is None else per_key[k][0][li][j] for k in keys])
                   for j in range(4)] for li in range(self.n_layers)]
        un = self._stack([None if per_key[k] is None else per_key[k][1] for k in keys])
        return Plan(self.base, layers, un)

    @staticmethod
    def _stack(ds: list[Delta]) -> Delta:
        present = [d for d in ds if d is not None]
        if not present:
            return None
        r = max(d[0].shape[0] for d in present)
        a0, b0 = present[0]
        a_rows = a0.new_zeros(len(ds), a0.shape[1], r)
        b_rows = b0.new_zeros(len(ds), r, b0.shape[0])
        for i, d in enumerate(ds):
            if d is not None:
                a_rows[i, :, : d[0].shape[0]] = d[0].t()
                b_rows[i, : d[1].shape[1]] = d[1].t()
        return a_rows, b_rows

    # ------------------------------------------------------------------ forward
    def new_buffer(self, rows: int, t: int) -> torch.Tensor:
        # Zeros, not empty: masked positions are multiplied by 0 attention weight, NaN would leak.
        return torch.zeros(self.n_layers, 2, rows, self.n_kv, t, self.head_dim, dtype=self.dtype, device=self.device)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        """x / rms(x), statistics in fp32 as HF's RMSNorm; the weight is folded into the next linear."""
        xf = x if x.dtype == torch.float32 else x.float()
        # sqrt(mean(x^2) + eps) as hypot(||x|| / sqrt(d), sqrt(eps)): 4 ops instead of 6.
        rms = torch.hypot(torch.linalg.vector_norm(xf, dim=-1, keepdim=True) * x.shape[-1] ** -0.5, self._sqrt_eps)
        return xf / rms if x.dtype == torch.float32 else (xf / rms).to(x.dtype)

    def _qk_norm_heads(self, qkv: torch.Tensor, li: int) -> torch.Tensor:
        """Qwen3's RMSNorm over each q and k head of (B, S, heads, hd), as HF computes it
        (statistics in fp32, the weight applied in the model dtype); v heads unchanged."""
        w, v_heads = self._qk_norm[li]
        xf = qkv.float()
        inv = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps).masked_fill_(v_heads, 1.0)
        return w * (xf * inv).to(qkv.dtype)

    @staticmethod
    def _delta(x: torch.Tensor, y: torch.Tensor, d: Delta, b: int) -> torch.Tensor:
        """y + LoRA delta of x (x: (N, in) with N = b * s rows)."""
        a, bm = d
        xf = x.to(a.dtype)
        if a.dim() == 2:
            delta = F.linear(F.linear(xf, a), bm)
        else:
            delta = torch.bmm(torch.bmm(xf.view(b, -1, x.shape[-1]), a), bm).view(y.shape)
        return y + delta.to(y.dtype)

    def forward(
        self,
        plan: Plan,
        buf: torch.Tensor,
        row0: int,
        ids: torch.Tensor,  # (B, S) tokens of rows row0..row0+B-1
        pos: torch.Tensor,  # (B, S) their positions (= KV buffer index)
        t_used: int,  # attend over buffer positions [0, t_used)
    ) -> torch.Tensor:
        """Run the decoder, writing K/V into `buf`; returns final-normed hidden states (B, S, D)
        (without the final norm's weight, which lives in the unembedding)."""
        ws, deltas = plan.weights, plan.layer_deltas
        b, s = ids.shape
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        x = F.embedding(ids.reshape(-1), self.embed)  # (N, D): 2-D keeps F.linear a single mm
        cos, sin = self.rotary(x, pos)  # (B, S, hd), attention scaling included
        # One cos/sin for all q, k and v heads; v heads get the identity (cos 1, sin 0).
        n_rot = nh + nkv
        cos = torch.cat([cos.unsqueeze(2).expand(b, s, n_rot, hd), cos.new_ones(b, s, nkv, hd)], 2).to(x.dtype)
        sin = (sin * self._sign.to(sin.dtype)).unsqueeze(2)
        sin = torch.cat([sin.expand(b, s, n_rot, hd), sin.new_zeros(b, s, nkv, hd)], 2).to(x.dtype)
        keys = torch.arange(t_used, device=ids.device)
        allowed = keys.view(1, 1, t_used) <= pos.unsqueeze(-1)  # causal, per row (B, S, T)
        mask = torch.zeros(b, 1, s, t_used, dtype=x.dtype, device=ids.device)
        mask.masked_fill_(~allowed.unsqueeze(1), float("-inf"))
        rows = torch.arange(row0, row0 + b, device=ids.device).unsqueeze(1).expand(b, s)
        writers = buf.permute(0, 2, 4, 1, 3, 5).unbind(0)  # per layer (rows, T, 2, kv_heads, hd)
        readers = buf[:, :, row0:row0 + b, :, :t_used].unbind(0)  # per layer (2, B, kv_heads, T, hd)
        half = hd // 2
        gqa = nkv != nh
        for li, lw in enumerate(ws.layers):
            d = deltas[li] if deltas is not None else None
            h = self._norm(x)
            qkv = lw.qkv(h)
            if d is not None and d[0] is not None:
                qkv = self._delta(h, qkv, d[0], b)
            qkv = qkv.view(b, s, nh + 2 * nkv, hd)
            if self._qk_norm is not None:
                qkv = self._qk_norm_heads(qkv, li)
            qkv = torch.addcmul(qkv * cos, torch.roll(qkv, half, -1), sin)  # rotate_half via roll
            writers[li].index_put_((rows, pos), qkv[:, :, nh:].view(b, s, 2, nkv, hd))
            k, v = readers[li]
            att = F.scaled_dot_product_attention(qkv[:, :, :nh].transpose(1, 2), k, v, attn_mask=mask, enable_gqa=gqa)
            att = att.transpose(1, 2).reshape(b * s, nh * hd)
            if d is None or d[1] is None:
                x = lw.o(att, add=x)
            else:
                x = x + self._delta(att, lw.o(att), d[1], b)
            h = self._norm(x)
            gu = lw.gu(h)
            if d is not None and d[2] is not None:
                gu = self._delta(h, gu, d[2], b)
            g, u = gu.chunk(2, -1)
            act = F.silu(g) * u
            if d is None or d[3] is None:
                x = lw.down(act, add=x)
            else:
                x = x + self._delta(act, lw.down(act), d[3], b)
        return self._norm(x).view(b, s, -1)

    def logits(self, plan: Plan, h: torch.Tensor) -> torch.Tensor:
        """fp32 logits of `forward`'s hidden states (the trainer's unembedding numerics)."""
        d = plan.unembed_delta
        y = plan.weights.unembed(h.reshape(-1, h.shape[-1])).view(*h.shape[:-1], -1).float()
        if d is None:
            return y
        a, bm = d
        if a.dim() == 2:
            return y + F.linear(F.linear(h.float(), a), bm)
        return y + torch.bmm(torch.bmm(h.float().reshape(h.shape[0], -1, h.shape[-1]), a), bm).view(*y.shape)
