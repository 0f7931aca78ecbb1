"""Pre-packed frozen linears (engine/packed_linear.py) give the plain linear's numbers.

The sampler's decoder runs every linear through them on the CPU; this compares them with
`F.linear` directly (outputs and the fused residual add) at decode and prefill sizes.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from gemtinker.engine.packed_linear import PackedLinear, _onednn_available

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
