"""The allowlists of server-side custom losses (custom_loss.py): the only callables, tensor methods,
attributes and constants a loss graph's nodes may name. Everything not listed here is refused."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

# Python arithmetic and comparisons, as fx records them (the wire names `operator.<fn>`).
OPERATORS = ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "eq", "ne", "lt",
              "le", "gt", "ge", "and_", "or_", "xor", "invert", "matmul")
TORCH = ("exp", "log", "log1p", "expm1", "log2", "sqrt", "rsqrt", "square", "abs", "neg", "sign", "sigmoid",
          "tanh", "relu", "logsumexp", "sum", "mean", "prod", "max", "min", "amax", "amin", "maximum", "minimum",
          "clamp", "clip", "where", "gather", "index_select", "masked_fill", "matmul", "mm", "bmm", "outer", "dot",
          "stack", "cat", "pow", "add", "sub", "mul", "div", "true_divide", "lt", "le", "gt", "ge", "eq", "ne",
          "logical_and", "logical_or", "logical_not", "isfinite", "zeros_like", "ones_like", "full_like", "zeros",
          "ones", "full", "arange", "cumsum", "reshape", "flatten", "squeeze", "unsqueeze", "transpose", "t",
          "std", "var", "softmax", "log_softmax", "floor", "ceil", "round", "detach", "argmax", "argmin", "tensor",
          "any", "all", "numel")
FUNCTIONS: dict[str, Callable[..., Any]] = {
    **{f"operator.{n}": getattr(operator, n) for n in OPERATORS},
    "operator.getitem": operator.getitem,
    **{f"torch.{n}": getattr(torch, n) for n in TORCH},
    **{f"torch.nn.functional.{n}": getattr(F, n) for n in ("logsigmoid", "softplus", "log_softmax", "softmax",
                                                            "relu", "sigmoid")},
    # builtins fx records by their C names
    "torch._C._nn.log_sigmoid": torch._C._nn.log_sigmoid,
    "torch._C._nn.softplus": torch._C._nn.softplus,
    "torch._C._VariableFunctions.sigmoid": torch.sigmoid,
    **{f"math.{n}": getattr(math, n) for n in ("log", "exp", "sqrt", "log1p", "expm1")},
}
METHODS = frozenset((
    "sum", "mean", "prod", "exp", "log", "log1p", "expm1", "sigmoid", "tanh", "relu", "abs", "neg", "sign", "sqrt",
    "rsqrt", "square", "pow", "clamp", "clip", "clamp_min", "clamp_max", "max", "min", "amax", "amin", "logsumexp",
    "softmax", "log_softmax", "gather", "index_select", "masked_fill", "where", "matmul", "mm", "float", "double",
    "long", "int", "bool", "type_as", "reshape", "view", "flatten", "squeeze", "unsqueeze", "transpose", "t",
    "permute", "expand", "expand_as", "repeat", "detach", "size", "dim", "numel", "cumsum", "std", "var", "floor",
    "ceil", "round", "add", "sub", "mul", "div", "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or",
    "logical_not", "any", "all", "contiguous", "clone", "argmax", "argmin",
    "to",  # to a dtype: strings are refused and the only device is the CPU
))
# What `getattr(tensor, name)` may read (fx records `x.shape` as getattr), and what it may read
# of the (values, indices) pairs that max/min/topk-style reductions return.
ATTRIBUTES = frozenset(("shape", "ndim", "dtype", "T", "mT"))
PAIR_ATTRIBUTES = frozenset(("values", "indices"))
# Arithmetic whose arguments must be tensors or numbers (no strings or sequences: "a" * 10**9).
NUMERIC_ONLY = {FUNCTIONS[f"operator.{n}"] for n in OPERATORS}
FACTORIES = {torch.zeros, torch.ones, torch.full}
DTYPES = {name: getattr(torch, name) for name in ("float32", "float64", "float16", "bfloat16", "int64", "int32",
                                                    "int16", "int8", "uint8", "bool")}
SCALAR_CONSTANTS = {"layout": {"strided": torch.strided},
                     "memory_format": {"contiguous_format": torch.contiguous_format,
                                       "preserve_format": torch.preserve_format}}
