"""What the engine knows about individual torch ops, independent of how values are stored.

* Out-of-place callables: the engine never mutates a cached activation. An in-place op
  (``x.add_(y)``, ``F.relu_(x)``, ``nn.ReLU(inplace=True)``, ``x[:, 0] = y``) is run as
  "clone, then the in-place op", which gives the value the eager program computes; the graph
  is rewritten (see ``graph.functionalize``) so that later readers of ``x`` read this node.
* Shape-only ops (``x.size(0)``, ``x.shape``, ``zeros_like(x)``, ...): their result does not
  depend on the values of their input, so perturbing a parameter never changes it.
* Random ops: their draws must be the same for the base forward and every query.
* View ops: may return a tensor sharing storage with their input (aliasing analysis).
"""

from __future__ import annotations

import builtins
import inspect
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

# -- in-place ops ---------------------------------------------------------------------------
_INPLACE_OPERATORS = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
    operator.ifloordiv: operator.floordiv,
    operator.imod: operator.mod,
    operator.ipow: operator.pow,
    operator.iand: operator.and_,
    operator.ior: operator.or_,
    operator.ixor: operator.xor,
}


def _name_of(target: Any) -> str:
    return getattr(target, "__name__", "") or ""


def _has_inplace_flag(fn: Any, args: tuple, kwargs: dict) -> bool:
    """``F.relu(x, inplace=True)`` / ``F.relu(x, True)``: a functional with an inplace flag."""
    if "inplace" in kwargs:
        return bool(kwargs["inplace"])
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return False
    if "inplace" not in params:
        return False
    pos = params.index("inplace")
    return len(args) > pos and bool(args[pos])


def is_inplace(node: fx.Node, module: nn.Module | None) -> bool:
    """Does ``node`` mutate its first argument (and return it)?"""
    if node.op == "call_module":
        return bool(getattr(module, "inplace", False)) and bool(node.args)
    if node.op == "call_function":
        t = node.target
        if t in _INPLACE_OPERATORS or t is operator.setitem:
            return True
        name = _name_of(t)
        if name.endswith("_") and not name.endswith("__"):
            return True
        return _has_inplace_flag(t, node.args, node.kwargs)
    if node.op == "call_method":
        name = str(node.target)
        if name.startswith("__i") and name.endswith("__") and name != "__index__":
            return True
        return name.endswith("_") and not name.endswith("__")
    return False


def _clone_first(fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        if args and isinstance(args[0], torch.Tensor):
            args = (args[0].clone(), *args[1:])
        return fn(*args, **kwargs)

    return call


def _setitem(x: torch.Tensor, index: Any, value: Any) -> torch.Tensor:
    out = x.clone()
    out[index] = value
    return out


def out_of_place(node: fx.Node, module: nn.Module | None) -> Callable[..., Any]:
    """A callable computing ``node``'s value without mutating any argument.

    In-place ops become "clone the mutated argument, then the in-place op": the result is the
    value the eager program computes. Other ops are returned as they are.
    """
    if node.op == "call_module":
        assert module is not None
        return _clone_first(module) if is_inplace(node, module) else module
    if node.op == "call_function":
        t = node.target
        if t in _INPLACE_OPERATORS:
            return _INPLACE_OPERATORS[t]
        if t is operator.setitem:
            return _setitem
        if is_inplace(node, None):
            return _clone_first(t)  # type: ignore[arg-type]
        return t  # type: ignore[return-value]
    if node.op == "call_method":
        name = str(node.target)
        if name.startswith("__i") and name.endswith("__"):
            plain = "__" + name[3:]
            return lambda self, *a, **k: getattr(self, plain)(*a, **k)
        if name == "view":  # a view of a channels-last tensor may fail: same values
            return _view_or_reshape
        call = _method(name)
        return _clone_first(call) if is_inplace(node, None) else call
    raise TypeError(f"no callable for node {node.format_node()}")


def _view_or_reshape(self: torch.Tensor, *shape: Any, **kwargs: Any) -> torch.Tensor:
    """``x.view(shape)`` as ``reshape`` (same values; the engine never writes through views);
    ``x.view(dtype)`` as it is."""
    if (shape and isinstance(shape[0], torch.dtype)) or "dtype" in kwargs:
        return self.view(*shape, **kwargs)
    return self.reshape(*shape, **kwargs)


def _method(name: str) -> Callable[..., Any]:
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, name)(*args, **kwargs)

    call.__name__ = name
    return call


# -- shape-only ops -------------------------------------------------------------------------
SHAPE_ATTRS = frozenset(
    {"shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad", "is_sparse"}
)
_SHAPE_METHODS = frozenset(
    {"size", "dim", "numel", "nelement", "ndimension", "get_device", "is_contiguous", "stride",
     "is_floating_point", "is_complex", "element_size", "new_zeros", "new_ones", "new_empty",
     "new_full", "new_tensor", "type"}
)  # fmt: skip
_SHAPE_FUNCTIONS = (
    torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like,
    torch.randn_like, torch.randint_like, torch.numel, torch.is_floating_point,
)  # fmt: skip
# In-place fills whose result does not depend on the values of the tensor they fill.
_FILL_METHODS = frozenset(
    {"zero_", "fill_", "uniform_", "normal_", "exponential_", "cauchy_", "log_normal_",
     "geometric_", "random_"}
)  # fmt: skip


def is_shape_only(node: fx.Node) -> bool:
    """Is ``node``'s value independent of the *values* of its first (tensor) argument?"""
    if node.op == "call_method":
        name = str(node.target)
        if name in _SHAPE_METHODS or name in _FILL_METHODS:
            return True
        return name == "bernoulli_" and not any(
            isinstance(a, fx.Node) for a in (*node.args[1:], *node.kwargs.values())
        )
    if node.op == "call_function":
        if node.target is builtins.getattr:
            return len(node.args) > 1 and node.args[1] in SHAPE_ATTRS
        return node.target in _SHAPE_FUNCTIONS
    return False


# -- random ops -----------------------------------------------------------------------------
DROPOUT_MODULES: tuple[type[nn.Module], ...] = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
)  # fmt: skip
ALPHA_DROPOUT_MODULES: tuple[type[nn.Module], ...] = (nn.AlphaDropout, nn.FeatureAlphaDropout)
_DROPOUT_MODULE_FUNCTIONS: tuple[tuple[type[nn.Module], Callable[..., Any]], ...] = (
    (nn.Dropout1d, F.dropout1d),
    (nn.Dropout2d, F.dropout2d),
    (nn.Dropout3d, F.dropout3d),
    (nn.Dropout, F.dropout),
)
_DROPOUT_FUNCTIONS: dict[Any, Callable[..., Any]] = {
    F.dropout: F.dropout,
    F.dropout1d: F.dropout1d,
    F.dropout2d: F.dropout2d,
    F.dropout3d: F.dropout3d,
}
#: ``torch.dropout(input, p, train)``: builtins without a signature to bind against.
_DROPOUT_BUILTINS = (torch.dropout, torch.feature_dropout)
_RANDOM_NAMES = frozenset(
    {"bernoulli", "bernoulli_", "rand", "randn", "randint", "randperm", "normal", "normal_",
     "uniform_", "multinomial", "poisson", "exponential_", "cauchy_", "log_normal_",
     "geometric_", "random_", "rrelu", "rrelu_", "alpha_dropout", "feature_alpha_dropout",
     "dropout", "dropout1d", "dropout2d", "dropout3d", "feature_dropout", "native_dropout"}
)  # fmt: skip


def dropout_spec(node: fx.Node, module: nn.Module | None) -> tuple[Callable, float] | None:
    """``(mask_fn, p)`` if ``node`` is an active (training, p > 0) mask-multiplying dropout.

    ``mask_fn(ones)`` draws the mask exactly as the op draws it for an input of that shape.
    """
    if node.op == "call_module":
        if isinstance(module, DROPOUT_MODULES) and module.training and module.p > 0:
            fn = next(f for cls, f in _DROPOUT_MODULE_FUNCTIONS if isinstance(module, cls))
            p = float(module.p)
            return (lambda t, fn=fn, p=p: fn(t, p, True)), p
        return None
    if node.op == "call_function" and node.target in _DROPOUT_BUILTINS:
        if len(node.args) != 3 or node.kwargs:
            return None
        _, p, train = node.args
        if isinstance(p, fx.Node) or isinstance(train, fx.Node) or not train or p == 0:
            return None
        fn = node.target
        return (lambda t, fn=fn, p=p: fn(t, p, True)), float(p)
    if node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS:
        fn = _DROPOUT_FUNCTIONS[node.target]
        bound = _bind(fn, node.args, node.kwargs)
        if bound is None:
            return None
        p = bound.get("p", 0.5)
        training = bound.get("training", bound.get("train", True))
        if isinstance(p, fx.Node) or isinstance(training, fx.Node):
            return None
        if not training or p == 0:
            return None
        extra = set(bound) - {"input", "p", "training", "train", "inplace"}
        if extra:
            return None
        return (lambda t, fn=fn, p=p: fn(t, p, True)), float(p)
    return None


def _bind(fn: Callable[..., Any], args: tuple, kwargs: dict) -> dict[str, Any] | None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def is_random(node: fx.Node, module: nn.Module | None) -> bool:
    """Does ``node`` draw random numbers (in its current mode)?"""
    if node.op == "call_module":
        if isinstance(module, DROPOUT_MODULES + ALPHA_DROPOUT_MODULES):
            return bool(module.training) and module.p > 0
        return isinstance(module, nn.RReLU) and module.training
    if node.op in ("call_function", "call_method"):
        name = str(node.target) if node.op == "call_method" else _name_of(node.target)
        if name == "scaled_dot_product_attention":  # attention dropout (HF models in training)
            p = node.kwargs.get("dropout_p", node.args[4] if len(node.args) > 4 else 0.0)
            return isinstance(p, fx.Node) or bool(p)
        return name in _RANDOM_NAMES
    return False


# -- ops whose result may share storage with an argument -------------------------------------
_VIEW_METHODS = frozenset(
    {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze",
     "unsqueeze", "transpose", "permute", "t", "expand", "expand_as", "narrow", "select",
     "unbind", "split", "chunk", "movedim", "moveaxis", "swapaxes", "swapdims", "diagonal",
     "detach", "contiguous", "as_strided", "unfold", "to", "type", "type_as", "float",
     "double", "half", "bfloat16", "cpu", "cuda", "__getitem__", "real", "imag", "view_as_real",
     "tensor_split", "hsplit", "vsplit", "mT", "T", "H", "mH"}
)  # fmt: skip
_VIEW_FUNCTIONS = (
    torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.transpose,
    torch.permute, torch.narrow, torch.select, torch.split, torch.chunk, torch.unbind,
    torch.movedim, torch.t, torch.detach, operator.getitem, torch.swapaxes,
    torch.tensor_split, torch.diagonal, torch.as_strided, builtins.getattr,
)  # fmt: skip
_VIEW_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.Flatten, nn.Unflatten, *DROPOUT_MODULES, *ALPHA_DROPOUT_MODULES,
)  # fmt: skip


def may_alias(node: fx.Node, module: nn.Module | None, opaque: bool) -> bool:
    """May ``node``'s value share storage with one of its tensor arguments?"""
    if node.op == "call_module":
        return opaque or isinstance(module, _VIEW_MODULES) or is_inplace(node, module)
    if node.op == "call_method":
        return str(node.target) in _VIEW_METHODS
    if node.op == "call_function":
        return node.target in _VIEW_FUNCTIONS
    return False
