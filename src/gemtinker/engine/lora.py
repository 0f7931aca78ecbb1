"""LoRA over one shared frozen base model.

Target `nn.Linear` modules are wrapped once by `LoraLinear`. A wrapper holds no adapter weights
itself: it reads the weights to apply from a context variable (`use_lora`), which the engine sets
per call. So many adapters (and frozen sampler snapshots) share one base model, and threads
(trainer workers, the sampling thread) never see each other's selection.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .packed_linear import linear_fp32
from .types import LoraSpec

DEFAULT_ALPHA = 32.0

_ATTN_HINTS = ("attn", "attention")
_MLP_HINTS = ("mlp", "feed_forward", "ffn")


@dataclass
class LoraWeights:
    """One adapter's (or snapshot's) weights: module name -> (A (r, in), B (out, r))."""

    spec: LoraSpec
    seed: int
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def scale(self) -> float:
        alpha = self.spec.alpha if self.spec.alpha is not None else DEFAULT_ALPHA
        return alpha / self.spec.rank

    def parameters(self) -> list[torch.Tensor]:
        return [t for name in sorted(self.tensors) for t in self.tensors[name]]

    def named_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, (a, b) in self.tensors.items():
            out[f"{name}.lora_A"] = a
            out[f"{name}.lora_B"] = b
        return out

    def frozen_copy(self) -> LoraWeights:
        """Detached clones: a sampler snapshot that later optimizer steps cannot touch."""
        return LoraWeights(
            self.spec,
            self.seed,
            {n: (a.detach().clone(), b.detach().clone()) for n, (a, b) in self.tensors.items()},
        )

    def num_params(self) -> int:
        return sum(t.numel() for t in self.parameters())


@dataclass
class ActiveLora:
    """What the wrappers apply during one forward.

    shared: same weights for every row: name -> (A, B, scale).
    per_row: batched weights for mixed batches: name -> (A (b, r, in), B (b, out, r)) with the
    scale folded into B; rows without an adapter have zeros.
    """

    shared: dict[str, tuple[torch.Tensor, torch.Tensor, float]] | None = None
    per_row: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None


_ACTIVE: contextvars.ContextVar[ActiveLora | None] = contextvars.ContextVar(
    "gemtinker_active_lora", default=None
)
_LOW_PRECISION: contextvars.ContextVar[torch.dtype | None] = contextvars.ContextVar(
    "gemtinker_low_precision", default=None
)
# The last input cast to low precision and its cast, so q/k/v (and gate/up), which read the same
# input, share one cast and one cast backward.
_LAST_CAST: contextvars.ContextVar[tuple[torch.Tensor, int, torch.Tensor] | None] = contextvars.ContextVar(
    "gemtinker_last_cast", default=None
)


# The outputs a sibling group computed for its other members (`SiblingGroup.output_for`):
# (group, input, input version, member index -> output).
_PENDING: contextvars.ContextVar[tuple[SiblingGroup, torch.Tensor, int, dict[int, torch.Tensor]] | None] = \
    contextvars.ContextVar("gemtinker_pending_sibling_outputs", default=None)


def _cast_once(x: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    last = _LAST_CAST.get()
    if last is not None and last[0] is x and last[1] == x._version and last[2].dtype == dt:
        return last[2]
    xl = x.to(dt)
    _LAST_CAST.set((x, x._version, xl))
    return xl


def prepare_low_precision(modules: dict[str, tuple[LoraLinear, str]], dtype: torch.dtype) -> None:
    """Give every decoder wrapper a `dtype` copy of its frozen base weight, and the unembedding
    one for its backward only: its forward stays in the model's dtype (its rounding shows directly
    in logprobs), while the hidden-state gradient it sends back is rounded to bf16 by the next
    decoder linear's backward anyway.

    The copies are views into one buffer: one allocation, which the C library maps and unmaps
    whole, so dropping them (`LowPrecisionCopies.release`) returns the memory at once; separate
    copies (a few hundred kB to 2 MB each) would sit inside the heap between activations."""
    weights: dict[int, torch.Tensor] = {}
    for mod, _ in modules.values():
        for member in (mod,) if mod.siblings is None else mod.siblings.members:  # siblings side by side
            weights.setdefault(id(member.base.weight), member.base.weight)
    if not weights:
        return
    first = next(iter(weights.values()))
    flat = torch.empty(sum(w.numel() for w in weights.values()), dtype=dtype, device=first.device)
    copies: dict[int, torch.Tensor] = {}
    start = 0
    for key, w in weights.items():
        view = flat[start:start + w.numel()].view(w.shape)
        view.copy_(w.detach())
        copies[key] = view
        start += w.numel()
    for mod, category in modules.values():
        if category == "unembed":
            mod.low_precision_grad_weight = copies[id(mod.base.weight)]
        else:
            mod.low_precision_weight = copies[id(mod.base.weight)]
    for group in {id(m.siblings): m.siblings for m, _ in modules.values() if m.siblings is not None}.values():
        group.prepare(copies, dtype)


class LowPrecisionCopies:
    """The learner's low-precision copies of the frozen decoder weights, present only while
    training needs them: `ensure` (before a training call) makes them, `release` (when the
    sampler builds its packed weights) drops them. In a synchronous RL loop the two phases
    alternate, so each holds its own copy of the linears only while it runs: on `make run` with
    a bf16 learner the copies (0.21 GB for SmolLM2-135M) otherwise stayed resident through every
    evaluation, where the process peaks. Making them is one cast of the weights (measured in
    docs/learner-2026-12-03.md)."""

    def __init__(self, modules: dict[str, tuple[LoraLinear, str]], dtype: torch.dtype):
        self.modules, self.dtype = modules, dtype
        self.present = False

    def ensure(self) -> bool:
        """Make the copies unless present; True if they were made."""
        if self.present:
            return False
        prepare_low_precision(self.modules, self.dtype)
        self.present = True
        return True

    def release(self) -> None:
        if self.present:
            for mod, _ in self.modules.values():
                mod.low_precision_weight = mod.low_precision_grad_weight = None
                if mod.siblings is not None:
                    mod.siblings.release()
            self.present = False


@contextlib.contextmanager
def low_precision_compute(dtype: torch.dtype | None) -> Iterator[None]:
    """Within this block (this thread only), wrappers with a low-precision copy run their
    matmuls in `dtype` and return fp32; None leaves everything as it is."""
    token = _LOW_PRECISION.set(dtype)
    cast_token = _LAST_CAST.set(None)
    pending_token = _PENDING.set(None)
    try:
        yield
    finally:
        _PENDING.reset(pending_token)  # drops outputs no sibling asked for
        _LAST_CAST.reset(cast_token)  # drops the reference to the last input
        _LOW_PRECISION.reset(token)


@contextlib.contextmanager
def use_lora(active: ActiveLora | None) -> Iterator[None]:
    token = _ACTIVE.set(active)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def shared_active(weights: LoraWeights | None) -> ActiveLora | None:
    if weights is None:
        return None
    s = weights.scale
    return ActiveLora(shared={n: (a, b, s) for n, (a, b) in weights.tensors.items()})


def per_row_active(rows: list[LoraWeights | None], device: torch.device) -> ActiveLora | None:
    """Stack per-row weights (ranks padded with zeros, which add nothing) for a mixed batch."""
    present = [w for w in rows if w is not None]
    if not present:
        return None
    names = sorted({n for w in present for n in w.tensors})
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in names:
        ref = next(w.tensors[name] for w in present if name in w.tensors)
        r = max(w.tensors[name][0].shape[0] for w in present if name in w.tensors)
        d_in, d_out = ref[0].shape[1], ref[1].shape[0]
        a_rows = torch.zeros(len(rows), r, d_in, dtype=ref[0].dtype, device=device)
        b_rows = torch.zeros(len(rows), d_out, r, dtype=ref[1].dtype, device=device)
        for i, w in enumerate(rows):
            if w is None or name not in w.tensors:
                continue
            a, b = w.tensors[name]
            a_rows[i, : a.shape[0]] = a
            b_rows[i, :, : b.shape[1]] = b * w.scale
        out[name] = (a_rows, b_rows)
    return ActiveLora(per_row=out)


class _LowPrecisionInputGrad(torch.autograd.Function):
    """F.linear(x, weight, bias) in x's dtype (fp32 through oneDNN: `linear_fp32`), whose
    backward computes the input gradient `grad @ weight` against `low_weight`, a low-precision
    copy (the base weight and bias are frozen: no gradient of their own). For the unembedding of
    a bf16 learner: with 49k outputs its input gradient is as large a matmul as its forward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                low_weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(low_weight)
        ctx.x_dtype = x.dtype
        return linear_fp32(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (low_weight,) = ctx.saved_tensors
        grad_x = (grad.to(low_weight.dtype) @ low_weight).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


def _plus_delta_fp32(y: torch.Tensor, xa: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """y (2-D, low precision) + scale * xa @ B^T in fp32, against the fp32 master B (autocast
    would make it bf16), in place on y's fp32 copy: a (tokens x out) fp32 pass less than
    torch.addmm, which copies its input; 2.3 against 3.0 ms forward and backward at
    (510 x 1536), 30 alternations."""
    with torch.autocast(y.device.type, enabled=False):
        return y.float().addmm_(xa, b.t(), alpha=scale)


class SiblingGroup:
    """Linears of one block that read the same input: q/k/v, gate/up.

    In the learner's low-precision path the first member called computes every member's output
    at once: one bf16 matmul against the members' weights side by side (views into one buffer,
    no copy), one for their LoRA A factors; each member's fp32 sum is its own addmm, so each
    output is its own tensor, kept for the backward only as far as its own uses need. The later
    members take their output from `_PENDING`, if called with the same input (unchanged). The
    backward then runs one matmul for the input gradient of the group, not one a member, and
    sums nothing. Same numbers as member by member (to rounding); six decoder layers at 510
    tokens ran 2% faster, forward and backward (docs/learner-2026-12-06.md)."""

    def __init__(self, members: list[LoraLinear]):
        self.members = members
        self.sizes = [m.out_features for m in members]
        self.low_precision_weight: torch.Tensor | None = None
        self.low_precision_bias: torch.Tensor | None = None
        for index, member in enumerate(members):
            member.siblings, member.sibling_index = self, index

    def prepare(self, copies: dict[int, torch.Tensor], dtype: torch.dtype) -> None:
        """Take the members' low-precision weights as one (sum of outputs x inputs) view, where
        `prepare_low_precision` laid them out side by side; else the group stays unfused."""
        views = [copies[id(m.base.weight)] for m in self.members]
        first = views[0]
        stride = first.shape[1]
        if any(v.shape[1] != stride for v in views) or any(
                v.data_ptr() != first.data_ptr() + off * stride * first.element_size()
                for v, off in zip(views, [sum(self.sizes[:i]) for i in range(len(views))])):
            return
        flat = first.as_strided((sum(self.sizes), stride), (stride, 1))
        biases = [m.base.bias for m in self.members]
        self.low_precision_bias = None if all(b is None for b in biases) else torch.cat([
            b.detach() if b is not None else torch.zeros(n, device=first.device)
            for b, n in zip(biases, self.sizes)]).to(dtype)
        self.low_precision_weight = flat

    def release(self) -> None:
        self.low_precision_weight = self.low_precision_bias = None

    def _factors(self, active: ActiveLora | None):
        """The active adapter's factors of every member as (As, Bs, scale); () where no member
        has any; None where only some have them, or with different scales (then unfused)."""
        if active is None or active.shared is None:
            return () if active is None else None
        found = [active.shared.get(m.key) for m in self.members]
        if all(f is None for f in found):
            return ()
        if any(f is None for f in found) or len({f[2] for f in found}) != 1:
            return None
        return [f[0] for f in found], [f[1] for f in found], found[0][2]

    def output_for(self, member: LoraLinear, x: torch.Tensor, active: ActiveLora | None,
                   dt: torch.dtype) -> torch.Tensor | None:
        """`member`'s output for x, computed with its siblings'; None: compute it alone."""
        pending = _PENDING.get()
        if pending is not None and pending[0] is self and pending[1] is x and pending[2] == x._version:
            out = pending[3].pop(member.sibling_index, None)
            if not pending[3]:
                _PENDING.set(None)
            if out is not None:
                return out
        if member.sibling_index != 0 or self.low_precision_weight is None:
            return None
        factors = self._factors(active)
        if factors is None:
            return None
        outs = self._forward_all(x, factors, dt)
        _PENDING.set((self, x, x._version, dict(enumerate(outs[1:], start=1))))
        return outs[0]

    def _forward_all(self, x: torch.Tensor, factors, dt: torch.dtype) -> list[torch.Tensor]:
        xl = _cast_once(x, dt)
        lead = x.shape[:-1]
        y = F.linear(xl, self.low_precision_weight, self.low_precision_bias).reshape(-1, sum(self.sizes))
        parts = y.split(self.sizes, dim=-1)
        if not factors:
            return [p.float().view(*lead, n) for p, n in zip(parts, self.sizes)]
        a_factors, b_factors, scale = factors
        a_all = torch.cat(a_factors).to(dt)
        xa = F.linear(xl, a_all).reshape(-1, a_all.shape[0]).float().split([a.shape[0] for a in a_factors], dim=-1)
        return [_plus_delta_fp32(p, xa_i, b, scale).view(*lead, n)
                for p, xa_i, b, n in zip(parts, xa, b_factors, self.sizes)]


class LoraLinear(nn.Module):
    """A frozen base linear plus the LoRA delta `scale * B(A(x))` of the active adapter."""

    def __init__(self, base: nn.Linear, key: str, upcast_output: bool = False):
        super().__init__()
        self.base = base
        self.key = key
        # The unembedding returns fp32 logits so logprobs stay accurate with a bf16 base.
        self.upcast_output = upcast_output
        # A low-precision copy of the base weight for the learner (`low_precision_compute`): for
        # both passes of a decoder linear, for the backward only of the unembedding.
        self.low_precision_weight: torch.Tensor | None = None
        self.low_precision_grad_weight: torch.Tensor | None = None
        # Linears that read the same input, computed together in the learner (`SiblingGroup`).
        self.siblings: SiblingGroup | None = None
        self.sibling_index = 0

    @property
    def weight(self) -> torch.Tensor:  # keeps tied-embedding lookups working
        return self.base.weight

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        active = _ACTIVE.get()
        low = _LOW_PRECISION.get()
        if low is not None and self.low_precision_weight is not None:
            return self._forward_low_precision(x, active, low)
        lead = x.shape[:-1]
        # 2-D from here on, so the LoRA delta goes into y in place and not into a view of it:
        # autograd's backward of an in-place op on a view (CopySlices) copies the output's
        # gradient three times, at the unembedding three (nodes x vocab) fp32 copies per chunk.
        x = x.reshape(-1, x.shape[-1])
        if low is not None and self.low_precision_grad_weight is not None:
            y = _LowPrecisionInputGrad.apply(x, self.base.weight, self.base.bias, self.low_precision_grad_weight)
        else:
            y = self.base(x)
        if self.upcast_output and y.dtype in (torch.bfloat16, torch.float16):
            y = y.float()
        out = self._add_lora(x, y, active, lead)
        # 2-D in, 2-D out, not a view: the learner overwrites the unembedding's logits in place
        return out if len(lead) == 1 else out.view(*lead, y.shape[-1])

    def _add_lora(self, x: torch.Tensor, y: torch.Tensor, active: ActiveLora | None, lead: torch.Size) -> torch.Tensor:
        """y (2-D) plus the active adapter's delta for x (2-D, `lead` its leading dimensions)."""
        if active is None:
            return y
        if active.shared is not None:
            w = active.shared.get(self.key)
            if w is None:
                return y
            a, b, scale = w
            dt = torch.promote_types(x.dtype, a.dtype)  # fp32 LoRA beside a bf16/fp32 base; f64 stays f64
            xa = F.linear(x.to(dt), a.to(dt))
            if y.dtype == dt:
                # y + scale * xa @ B^T in one op: no (tokens x out) delta, scaled copy or sum to
                # keep (these were a tenth of a learner step on SmolLM2, most of it the unembedding)
                # In place: no copy of y (F.linear does not keep its output for backward).
                return y.addmm_(xa, b.to(dt).t(), alpha=scale)
            delta = F.linear(xa, b.to(dt)) * scale
        else:
            assert active.per_row is not None
            wr = active.per_row.get(self.key)
            if wr is None:
                return y
            a_rows, b_rows = wr
            xs = x.to(a_rows.dtype).reshape(lead[0], -1, x.shape[-1])
            delta = torch.bmm(torch.bmm(xs, a_rows.transpose(1, 2)), b_rows.transpose(1, 2))
            delta = delta.reshape(*y.shape)
        return y + delta.to(y.dtype)

    def _forward_low_precision(self, x: torch.Tensor, active: ActiveLora | None, dt: torch.dtype) -> torch.Tensor:
        """The learner's bf16 path: both matmuls in `dt` (the LoRA factors cast from their fp32
        masters, so gradients reach the masters), the sum and the output in fp32.

        Rounding the sum to bf16 rounds away LoRA deltas smaller than half a bf16 ulp of the
        base output, so the learner would score a less trained policy than the fp32 sampler
        runs. Measured on SmolLM2 after one Adam step (lr 5e-4): mean logprob gap to the fp32
        learner 0.11 nats per action token with a bf16 residual stream, 0.08-0.12 with fp32
        residual writers but bf16 q/k/v/gate/up outputs (what bf16 autocast over peft does),
        and |v1| < 5e-3, v2 1-3e-3 (bf16 noise, no bias) with every output in fp32."""
        if self.siblings is not None:
            out = self.siblings.output_for(self, x, active, dt)
            if out is not None:
                return out
        xl = _cast_once(x, dt)
        bias = self.base.bias
        y = F.linear(xl, self.low_precision_weight, None if bias is None else bias.to(dt))
        w = None if active is None or active.shared is None else active.shared.get(self.key)
        if w is None:
            return y.float()
        a, b, scale = w
        xa = F.linear(xl, a.to(dt)).reshape(-1, a.shape[0]).float()
        out = _plus_delta_fp32(y.reshape(-1, y.shape[-1]), xa, b, scale)
        return out.view(*y.shape[:-1], out.shape[-1])


def _category(name: str) -> str | None:
    parts = name.lower().split(".")
    if any(h in p for p in parts for h in _ATTN_HINTS):
        return "attn"
    if any(h in p for p in parts for h in _MLP_HINTS):
        return "mlp"
    return None


def inject_lora(model: nn.Module) -> dict[str, tuple[LoraLinear, str]]:
    """Wrap every attention/MLP linear and the unembedding once; returns name -> (module, category).

    The base unembedding weight stays shared with the input embedding when the model ties them:
    the wrapper keeps the original nn.Linear, so only the LoRA delta is separate.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    found: dict[str, tuple[LoraLinear, str]] = {}
    targets: list[tuple[str, str]] = []
    out_emb = model.get_output_embeddings()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and mod is not out_emb:
            cat = _category(name)
            if cat is not None:
                targets.append((name, cat))
    for name, cat in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapper = LoraLinear(getattr(parent, child), name)
        setattr(parent, child, wrapper)
        found[name] = (wrapper, cat)
    _group_siblings(found)
    if isinstance(out_emb, nn.Linear):
        key = next(n for n, m in model.named_modules() if m is out_emb)
        wrapper = LoraLinear(out_emb, key, upcast_output=True)
        # Assign the attribute directly: set_output_embeddings may re-tie weights.
        parent_name, _, child = key.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, wrapper)
        found[key] = (wrapper, "unembed")
    return found


# Linears that the decoders of Llama-style models (Llama, Qwen, Mistral, SmolLM) call on one input.
_SIBLING_NAMES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _group_siblings(found: dict[str, tuple[LoraLinear, str]]) -> None:
    for name in found:
        parent, _, child = name.rpartition(".")
        for names in _SIBLING_NAMES:
            if child == names[0] and all(f"{parent}.{n}" in found for n in names):
                members = [found[f"{parent}.{n}"][0] for n in names]
                if len({m.in_features for m in members}) == 1:
                    SiblingGroup(members)


def select_targets(modules: dict[str, tuple[LoraLinear, str]], spec: LoraSpec) -> list[str]:
    wanted = set()
    if spec.train_attn:
        wanted.add("attn")
    if spec.train_mlp:
        wanted.add("mlp")
    if spec.train_unembed:
        wanted.add("unembed")
    return sorted(n for n, (_, cat) in modules.items() if cat in wanted)


def init_weights(
    modules: dict[str, tuple[LoraLinear, str]], spec: LoraSpec, seed: int, device: torch.device
) -> LoraWeights:
    """Deterministic init from `seed`: A ~ kaiming-uniform (as is usual for LoRA), B = 0."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in select_targets(modules, spec):
        mod = modules[name][0]
        a = torch.empty(spec.rank, mod.in_features, dtype=torch.float32)
        bound = 1.0 / math.sqrt(mod.in_features)  # kaiming_uniform with a=sqrt(5)
        a.uniform_(-bound, bound, generator=gen)
        b = torch.zeros(mod.out_features, spec.rank, dtype=torch.float32)
        tensors[name] = (
            nn.Parameter(a.to(device), requires_grad=True),
            nn.Parameter(b.to(device), requires_grad=True),
        )
    return LoraWeights(spec, seed, tensors)
