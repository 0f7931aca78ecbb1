"""LoraLinear: the frozen base linear plus the active adapter's delta, and what its backward does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gemtinker.engine.lora import ActiveLora, LoraLinear, use_lora


def _graph(t: torch.Tensor) -> set[str]:
    """Names of every autograd node behind t."""
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(fn.name())
        todo.extend(nxt for nxt, _ in fn.next_functions)
    return names


@pytest.mark.parametrize("shape", [(5, 8), (2, 5, 8)])
def test_the_delta_goes_into_the_output_in_place_without_copying_its_gradient(shape):
    """The delta is added into the base output itself, never into a view of it: autograd's
    backward of an in-place op on a view (CopySlices) copies the whole output gradient three
    times, at the unembedding three (nodes x vocabulary) copies per chunk."""
    gen = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(8, 12)
    base.requires_grad_(False)
    mod = LoraLinear(base, "q")
    a = torch.randn(4, 8, generator=gen, requires_grad=True)
    b = torch.randn(12, 4, generator=gen, requires_grad=True)
    x = torch.randn(*shape, generator=gen, requires_grad=True)
    with use_lora(ActiveLora(shared={"q": (a, b, 0.5)})):
        y = mod(x)
    assert y.shape == (*shape[:-1], 12)
    assert not any("CopySlices" in name for name in _graph(y)), _graph(y)

    g = torch.randn(y.shape, generator=gen)
    grads = torch.autograd.grad(y, (x, a, b), g)
    ref = F.linear(x, base.weight, base.bias) + 0.5 * F.linear(F.linear(x, a), b)
    ref_grads = torch.autograd.grad(ref, (x, a, b), g)
    torch.testing.assert_close(y, ref)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)
