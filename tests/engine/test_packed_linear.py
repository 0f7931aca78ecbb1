"""Pre-packed frozen linears (engine/packed_linear.py) give the plain linear's numbers.

The sampler's decoder runs every linear through them on the CPU; this compares them with
`F.linear` directly (outputs and the fused residual add) at decode and prefill sizes, and the
learner's unpacked oneDNN linear (`linear_fp32`) likewise.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from gemtinker.engine.packed_linear import PackedLinear, _onednn_available, linear_fp32

ONEDNN = _onednn_available()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_packed_linear_equals_plain(bias, rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 64, generator=g) / 8
    b = torch.randn(96, generator=g) if bias else None
    x = torch.randn(rows, 64, generator=g)
    res = torch.randn(rows, 96, generator=g)
    lin = PackedLinear(w, b)
    assert (lin.packed is not None) == ONEDNN
    torch.testing.assert_close(lin(x), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lin(x, add=res), res + F.linear(x, w, b), atol=1e-5, rtol=1e-5)


def test_without_onednn_it_is_the_plain_linear(monkeypatch):
    """The path CUDA and oneDNN-less builds take: nothing packed, same numbers."""
    import gemtinker.engine.packed_linear as packed_linear

    monkeypatch.setattr(packed_linear, "_onednn_available", lambda: False)
    g = torch.Generator().manual_seed(0)
    w, x, res = torch.randn(24, 16, generator=g), torch.randn(5, 16, generator=g), torch.randn(5, 24, generator=g)
    lin = PackedLinear(w)
    assert lin.packed is None and lin.weight is w
    torch.testing.assert_close(lin(x), F.linear(x, w))
    torch.testing.assert_close(lin(x, add=res), res + F.linear(x, w))
    assert PackedLinear(w, keep_plain=False).weight is w  # nothing packed: the plain weight stays


@pytest.mark.parametrize("bias", [False, True])
def test_linear_fp32_equals_plain(bias):
    """The learner's fp32 unembedding forward (oneDNN, weight not packed): F.linear's numbers to
    fp32 rounding, a transposed (non-contiguous) input included."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(1000, 64, generator=g) / 8
    b = torch.randn(1000, generator=g) if bias else None
    x = torch.randn(64, 37, generator=g).t()
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    got = linear_fp32(x, w, b)
    assert got.dtype == torch.float32 and got.shape == (37, 1000)
    torch.testing.assert_close(got.double(), exact, atol=1e-5, rtol=1e-5)


def test_linear_fp32_leaves_other_dtypes_to_f_linear():
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(24, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    assert torch.equal(linear_fp32(x, w), F.linear(x, w))  # not 2-D
    wb, xb = w.bfloat16(), x[0].bfloat16()
    assert torch.equal(linear_fp32(xb, wb), F.linear(xb, wb))
