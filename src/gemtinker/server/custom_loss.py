"""Server-side custom losses: a traced torch.fx graph, sent as plain data, rebuilt and run here.

`ServiceClient.create_custom_loss` uploads a `CustomLossGraph` (JSON nodes, never pickle; the
format is the SDK's `custom_loss.encode_graph`). Nothing in it is executable: every
call_function target must be a name in FUNCTIONS (torch and operator callables chosen in
custom_loss_ops.py), every call_method a name in METHODS, and getattr may only read a few
tensor attributes. Imports, modules, captured tensors, dunder attributes and every other
callable are refused with a user error naming the node. At run time each call is checked before
it runs: tensors may not grow past MAX_ELEMENTS, one request may not spend more than MAX_WORK
element operations, and Python ints may not grow past int64, so a graph cannot exhaust memory
or hold the training thread for long.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .custom_loss_ops import (ATTRIBUTES, DTYPES, FACTORIES, FUNCTIONS, METHODS, NUMERIC_ONLY, PAIR_ATTRIBUTES,
                              SCALAR_CONSTANTS)
from .errors import UserError

MAX_NODES = 1000
MAX_ARG_ITEMS = 10_000  # scalars and containers over all of a graph's arguments
MAX_ARG_DEPTH = 8
# Largest tensor (elements) a graph may create or read: 4M float32 is 16 MB.
MAX_ELEMENTS = 1 << 22
# Element operations one forward_backward's loss may spend over all its datums (matmul counts
# n*k*m): a few seconds of CPU, far more than any loss over logprobs needs.
MAX_WORK = 1 << 32
INT_LIMIT = 1 << 63
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}")
_METRIC_KEY = re.compile(r"custom/[a-z0-9_./-]{1,64}:(sum|mean)")
_INPUT_NAME = re.compile(r"[a-z_][a-z0-9_]{0,63}")

@dataclass(frozen=True)
class _Ref:
    name: str


@dataclass(frozen=True)
class _Node:
    op: str
    name: str
    target: Any  # the callable (call_function), method name, attribute name or input name
    args: tuple
    kwargs: dict[str, Any]


class _Decoder:
    """Encoded arguments -> Python values; refs must name earlier nodes."""

    def __init__(self, loss: str) -> None:
        self.loss, self.defined, self.items = loss, set[str](), 0

    def fail(self, node: str, why: str) -> UserError:
        return UserError(f"create_custom_loss: loss {self.loss!r} node {node!r}: {why}")

    def arg(self, node: str, v: Any, depth: int = 0) -> Any:
        self.items += 1
        if self.items > MAX_ARG_ITEMS or depth > MAX_ARG_DEPTH:
            raise self.fail(node, f"arguments are too large (at most {MAX_ARG_ITEMS} items, nested "
                                  f"{MAX_ARG_DEPTH} deep)")
        if v is None or isinstance(v, (bool, int, float, str)):
            if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= INT_LIMIT:
                raise self.fail(node, f"integer {v} does not fit in int64")
            return v
        if isinstance(v, list):
            return [self.arg(node, a, depth + 1) for a in v]
        if not (isinstance(v, dict) and len(v) == 1):
            raise self.fail(node, f"argument {str(v)[:80]!r} is not an encoded value")
        (kind, val), = v.items()
        if kind in ("ref", "float", "dtype", "device", *SCALAR_CONSTANTS) and not isinstance(val, str):
            raise self.fail(node, f"argument {str(v)[:80]!r}: {kind} must name a string")
        if kind == "ref":
            if val not in self.defined:
                raise self.fail(node, f"refers to {val!r}, which is not an earlier node")
            return _Ref(val)
        if kind == "tuple" and isinstance(val, list):
            return tuple(self.arg(node, a, depth + 1) for a in val)
        if kind == "dict" and isinstance(val, dict):
            return {str(k): self.arg(node, a, depth + 1) for k, a in val.items()}
        if kind == "slice" and isinstance(val, list) and len(val) == 3:
            return slice(*(self.arg(node, a, depth + 1) for a in val))
        if kind == "ellipsis" and val is True:
            return Ellipsis
        if kind == "float" and val in ("inf", "-inf", "nan"):
            return float(val)
        if kind == "dtype" and val in DTYPES:
            return DTYPES[val]
        if kind == "device":
            if val != "cpu":
                raise self.fail(node, f"device {val!r}: a custom loss runs on the server's CPU; pass no device")
            return torch.device("cpu")
        if kind in SCALAR_CONSTANTS and val in SCALAR_CONSTANTS[kind]:
            return SCALAR_CONSTANTS[kind][val]
        raise self.fail(node, f"argument {str(v)[:80]!r} is not an allowed constant")


def compile_graph(loss_name: str, inputs: list[tuple[str, int]], nodes: Any) -> list[_Node]:
    """Check an encoded graph against the allowlists and rebuild it; UserError names the node."""
    dec = _Decoder(loss_name)
    if not isinstance(nodes, list) or not nodes:
        raise UserError(f"create_custom_loss: loss {loss_name!r} has no graph nodes")
    if len(nodes) > MAX_NODES:
        raise UserError(f"create_custom_loss: loss {loss_name!r} has {len(nodes)} nodes; at most {MAX_NODES}")
    out: list[_Node] = []
    placeholders: list[str] = []
    for raw in nodes:
        if not isinstance(raw, dict):
            raise UserError(f"create_custom_loss: loss {loss_name!r}: every graph node must be an object")
        op, name, target = raw.get("op"), raw.get("name"), raw.get("target")
        if not (isinstance(name, str) and _NAME.fullmatch(name)) or name in dec.defined:
            raise UserError(f"create_custom_loss: loss {loss_name!r}: node name {str(name)[:80]!r} is not a "
                            "unique identifier")
        if not isinstance(target, str):
            raise dec.fail(name, "target must be a string")
        args, kwargs = raw.get("args", []), raw.get("kwargs", {})
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise dec.fail(name, "args must be a list and kwargs an object")
        if out and out[-1].op == "output":
            raise dec.fail(name, "follows the output node")
        dec_args = tuple(dec.arg(name, a) for a in args)
        dec_kwargs = {str(k): dec.arg(name, a) for k, a in kwargs.items()}
        if op == "placeholder":
            placeholders.append(target)
            fn: Any = target
        elif op == "call_function":
            fn = _function(dec, name, target, dec_args)
        elif op == "call_method":
            if target not in METHODS:
                raise dec.fail(name, f"calls method {target!r}, which is not an allowed tensor method "
                                     f"(allowed: {', '.join(sorted(METHODS))})")
            fn = target
        elif op == "output":
            _check_output(dec, name, dec_args)
            fn = target
        elif op in ("call_module", "get_attr"):
            raise dec.fail(name, f"{op} {target!r} is refused: a custom loss may not use modules or captured "
                                 "tensors, only torch functions of its inputs")
        else:
            raise dec.fail(name, f"unknown node op {str(op)[:40]!r}")
        out.append(_Node(op, name, fn, dec_args, dec_kwargs))
        dec.defined.add(name)
    if out[-1].op != "output":
        raise UserError(f"create_custom_loss: loss {loss_name!r} graph has no output node")
    expected = [n for n, _ in inputs]
    if placeholders != expected:
        raise UserError(f"create_custom_loss: loss {loss_name!r} graph inputs {placeholders} do not match the "
                        f"declared inputs {expected}")
    return out


def _function(dec: _Decoder, node: str, target: str, args: tuple) -> Any:
    if target in ("getattr", "builtins.getattr"):
        if len(args) != 2 or not isinstance(args[0], _Ref) or args[1] not in ATTRIBUTES | PAIR_ATTRIBUTES:
            attr = args[1] if len(args) > 1 else None
            raise dec.fail(node, f"getattr of {str(attr)[:60]!r} is refused: a custom loss may only read "
                                 f"{', '.join(sorted(ATTRIBUTES))} of a tensor and values, indices of a "
                                 "max/min result")
        return getattr
    fn = FUNCTIONS.get(target)
    if fn is None:
        raise dec.fail(node, f"calls {target[:100]!r}, which is not an allowed operation; a custom loss may "
                             "call torch tensor math (arithmetic, exp/log, sigmoid, reductions, where, clamp, "
                             "gather, indexing, matmul, comparisons) and nothing else")
    return fn


def _check_output(dec: _Decoder, node: str, args: tuple) -> None:
    result = args[0] if len(args) == 1 else None
    if not (isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[0], _Ref)
            and isinstance(result[1], dict)):
        raise dec.fail(node, "a custom loss must return (loss, metrics): a tensor and a dict of tensors")
    for key, value in result[1].items():
        if not _METRIC_KEY.fullmatch(key) or not isinstance(value, _Ref):
            raise dec.fail(node, f"metric {key[:80]!r} must be a tensor named custom/<name>:sum or "
                                 "custom/<name>:mean in lowercase")


def check_inputs(loss_name: str, inputs: Any) -> list[tuple[str, int]]:
    if not isinstance(inputs, list) or not 1 <= len(inputs) <= 16:
        raise UserError(f"create_custom_loss: loss {loss_name!r} needs 1 to 16 inputs, logprobs first")
    out = []
    for item in inputs:
        name = item.get("name") if isinstance(item, dict) else None
        rank = item.get("rank") if isinstance(item, dict) else None
        if not (isinstance(name, str) and _INPUT_NAME.fullmatch(name)) or rank not in (0, 1, 2):
            raise UserError(f"create_custom_loss: loss {loss_name!r} input {str(item)[:80]} needs a lowercase "
                            "name and a rank of 0, 1 or 2")
        out.append((name, int(rank)))
    if out[0][0] != "logprobs" or out[0][1] == 0 or len({n for n, _ in out}) != len(out):
        raise UserError(f"create_custom_loss: loss {loss_name!r} inputs must start with logprobs (rank 1 or 2) "
                        "and have distinct names")
    return out


# ------------------------------------------------------------------ running
class _Stop(Exception):
    pass


def _leaves(v: Any) -> list[Any]:
    if isinstance(v, (list, tuple)):
        return [x for a in v for x in _leaves(a)]
    if isinstance(v, dict):
        return [x for a in v.values() for x in _leaves(a)]
    if isinstance(v, slice):
        return [v.start, v.stop, v.step]
    return [v]


def _numel(shape: Any) -> int:
    return math.prod(int(s) for s in shape)


def _shape_arg(args: tuple, kwargs: Mapping[str, Any]) -> list[Any]:
    size = kwargs.get("size", args[0] if args else ())
    if isinstance(size, (list, tuple)):
        return list(size)
    return [a for a in args if isinstance(a, int)] if isinstance(size, int) else []


def _number(v: Any) -> Any:
    return v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v


def _estimate(fn: Any, args: tuple, kwargs: Mapping[str, Any]) -> tuple[int, int]:
    """(elements the call will allocate, element operations it will spend), judged before it runs."""
    tensors = [a for a in _leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
    size = _allocation(fn, tensors, tuple(_number(a) for a in args), kwargs)
    work = max(size, sum(t.numel() for t in tensors))
    if fn in (torch.matmul, operator.matmul, torch.mm, torch.bmm, "matmul", "mm") and len(tensors) == 2:
        work = max(work, size * tensors[0].shape[-1])  # each output element is a k-long dot product
    return size, work


def _allocation(fn: Any, tensors: list[torch.Tensor], args: tuple, kwargs: Mapping[str, Any]) -> int:
    if fn in (torch.cat, torch.stack):
        return sum(t.numel() for t in tensors)
    if fn in FACTORIES:
        dims = _shape_arg(args if fn is not torch.full else args[:1], kwargs)
        if not all(isinstance(d, int) for d in dims):
            raise _Stop(f"{fn.__name__} needs integer sizes")
        return _numel(dims)
    if fn is torch.arange:
        pos = [a for a in args if isinstance(a, (int, float)) and not isinstance(a, bool)]
        start, end, step = (0, pos[0], 1) if len(pos) == 1 else (pos + [1])[:3] if pos else (0, None, 1)
        start, end, step = (_number(kwargs.get(k, v)) for k, v in (("start", start), ("end", end), ("step", step)))
        if not all(isinstance(v, (int, float)) for v in (start, end, step)) or not step:
            return 0  # torch refuses these itself
        return int(abs((end - start) / step)) + 1
    if fn == "repeat" and tensors:
        reps = [_number(a) for a in _leaves(args[1:]) if not isinstance(a, torch.Tensor) or a.numel() == 1]
        return tensors[0].numel() * _numel(reps)
    if fn in (torch.outer, "outer"):
        return math.prod(t.numel() for t in tensors)
    if fn in (torch.matmul, operator.matmul, torch.mm, torch.bmm, "matmul", "mm") and len(tensors) == 2:
        a, b = tensors
        if a.ndim >= 2 and b.ndim >= 2:
            batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
            return _numel(batch) * a.shape[-2] * b.shape[-1]
    if len(tensors) > 1:
        try:
            return _numel(torch.broadcast_shapes(*(t.shape for t in tensors)))
        except RuntimeError:
            return 0  # the op itself will refuse the shapes
    return 0


def _pre_check(fn: Any, args: tuple, kwargs: Mapping[str, Any], budget: list[int]) -> None:
    """Refuse a call that would allocate too much, spend too much (from `budget[0]`, which it
    lowers) or reach anything but numbers and tensors."""
    if "out" in kwargs:
        raise _Stop("out= is not allowed: a custom loss may not write into existing tensors")
    leaves = _leaves((args, kwargs))
    for v in leaves:
        if isinstance(v, torch.Tensor) and v.numel() > MAX_ELEMENTS:
            raise _Stop(f"an argument has {v.numel()} elements, more than the limit of {MAX_ELEMENTS}")
        if isinstance(v, str) and fn is not getattr:
            raise _Stop("string arguments are not allowed")
    if fn in NUMERIC_ONLY:
        for v in args:
            if not isinstance(v, (torch.Tensor, int, float, bool)):
                raise _Stop(f"operator arguments must be tensors or numbers, got {type(v).__name__}")
        if fn is operator.pow and len(args) == 2 and not any(isinstance(a, torch.Tensor) for a in args):
            if abs(args[1]) > 64:
                raise _Stop(f"number ** {args[1]} is out of range (exponents of plain numbers are at most 64)")
    if fn is operator.getitem and not isinstance(args[0], (torch.Tensor, tuple, list, torch.Size)):
        raise _Stop(f"indexing a {type(args[0]).__name__} is not allowed")
    if fn is getattr:
        pair = type(args[0]).__module__ == "torch.return_types"
        if not (isinstance(args[0], torch.Tensor) and args[1] in ATTRIBUTES or pair and args[1] in PAIR_ATTRIBUTES):
            raise _Stop(f"getattr {args[1]!r} on a {type(args[0]).__name__} is refused: only tensor attributes "
                        "and the values/indices of a max/min result may be read")
    est, work = _estimate(fn, args, kwargs)
    if est > MAX_ELEMENTS:
        raise _Stop(f"it would create a tensor of {est} elements, more than the limit of {MAX_ELEMENTS}")
    budget[0] -= work
    if budget[0] < 0:
        raise _Stop(f"the loss needs more than {MAX_WORK} element operations in one forward_backward, "
                    "this server's limit")


_RESULT_TYPES = (torch.Tensor, bool, int, float, torch.Size, torch.dtype, type(None))


def _post_check(value: Any) -> None:
    for v in _leaves(value):
        if not isinstance(v, _RESULT_TYPES):
            raise _Stop(f"it produced a {type(v).__name__}, which a custom loss may not hold")
        if isinstance(v, torch.Tensor) and v.numel() > MAX_ELEMENTS:
            raise _Stop(f"it produced {v.numel()} elements, more than the limit of {MAX_ELEMENTS}")
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= INT_LIMIT:
            raise _Stop("it produced an integer that does not fit in int64")


def run_graph(loss_name: str, nodes: list[_Node], values: list[torch.Tensor],
              budget: list[int] | None = None) -> tuple[Any, dict[str, Any]]:
    """Evaluate the graph on one datum's inputs (logprobs first): (loss, metrics). `budget`:
    [element operations left], shared by the datums of one request."""
    budget = [MAX_WORK] if budget is None else budget
    env: dict[str, Any] = {}
    it = iter(values)

    def load(v: Any) -> Any:
        if isinstance(v, _Ref):
            return env[v.name]
        if isinstance(v, list):
            return [load(a) for a in v]
        if isinstance(v, tuple):
            return tuple(load(a) for a in v)
        if isinstance(v, dict):
            return {k: load(a) for k, a in v.items()}
        if isinstance(v, slice):
            return slice(load(v.start), load(v.stop), load(v.step))
        return v

    for node in nodes:
        if node.op == "placeholder":
            env[node.name] = next(it)
            continue
        args, kwargs = load(node.args), load(node.kwargs)
        if node.op == "output":
            return args[0][0], args[0][1]
        try:
            _pre_check(node.target, args, kwargs, budget)
            if node.op == "call_method":
                if not isinstance(args[0], torch.Tensor):
                    raise _Stop(f"method {node.target!r} called on a {type(args[0]).__name__}, not a tensor")
                result = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                result = node.target(*args, **kwargs)
            _post_check(result)
        except _Stop as e:
            raise UserError(f"custom loss {loss_name!r} node {node.name!r} is refused: {e}") from None
        except (RuntimeError, TypeError, ValueError, IndexError, ArithmeticError) as e:
            raise UserError(f"custom loss {loss_name!r} node {node.name!r} failed: {type(e).__name__}: "
                            f"{str(e)[:300]}") from None
        env[node.name] = result
    raise UserError(f"custom loss {loss_name!r} has no output")  # compile_graph guarantees one
