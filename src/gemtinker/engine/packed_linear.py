"""Frozen linear layers with the weight pre-packed for the CPU's GEMM.

An unpacked GEMM re-packs (re-blocks) the whole weight matrix on every call. For a frozen weight
that work can be done once: on the CPU the weight is kept in oneDNN's blocked layout (the same
ops torch's inductor uses for frozen CPU linears). Measured on a 2-core AVX-512 CPU, fp32 with
fp32 accumulation: 1.5-3.5x faster at the 4-32 rows of a decode step, about 1.2-1.5x at the
200-1000 rows of a prefill. The results differ from MKL's by float rounding only (max about
5e-6 on unit-scale outputs). Elsewhere (CUDA, no oneDNN, other dtypes) it is a plain
`F.linear` / `addmm`.

Only the sampler packs weights. Tried for the trainer's frozen base linears (forward with W, input
gradient with a second packing of W^T): a forward_backward of 1k tokens went from 5.3 to 5.0 s,
not worth a second packed copy of every weight.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def _onednn_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    except (AttributeError, RuntimeError):
        return False


def linear_fp32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, for fp32 CPU tensors through oneDNN's GEMM (the weight re-blocked per call, not
    packed): on an AMD Zen 4 torch's default fp32 GEMM (MKL) ran the learner's unembedding,
    (255 x 576) @ (576 x 49152), in 111-121 ms, oneDNN in 80-83 ms, with results equal to float
    rounding (max 1.3e-4 against float64 on outputs of magnitude 24, MKL's 5.5e-5). No autograd:
    callers inside an autograd.Function only."""
    if (x.device.type == "cpu" and x.dim() == 2 and x.dtype == weight.dtype == torch.float32
            and (bias is None or bias.dtype == torch.float32) and _onednn_available()):
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight.contiguous(), bias, "none", [], "")
    return F.linear(x, weight, bias)


class PackedLinear:
    """y = x @ W^T (+ bias) (+ a residual added in the same call), for 2-D x, W frozen."""

    pack_rows_hint = 256  # oneDNN picks the blocking for this many rows; fine from 1 to 1k rows

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, keep_plain: bool = True):
        self.bias = bias
        self.packed = None
        if weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16) and _onednn_available():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), self.pack_rows_hint)
        # The plain weight is kept for LoRA merges (the decoder's base set) and when nothing is packed.
        self.weight = weight if keep_plain or self.packed is None else None

    def __call__(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        if self.packed is not None:
            if add is not None and self.bias is None:
                return torch.ops.mkldnn._linear_pointwise.binary(x, add, self.packed, None, "add")
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
            return y if add is None else add + y
        if add is not None and self.bias is None:
            return torch.addmm(add, x, self.weight.t())
        y = F.linear(x, self.weight, self.bias)
        return y if add is None else add + y
