"""Which rule computes each graph node: a registry from ops to rules, open to users.

A rule is ``rule(chunk, node) -> Value`` (see :mod:`.rules` and :mod:`.values`). For each
node of a graph the planner asks :func:`rule_for`; it decides in this order:

1. ops that only read shapes (``x.size(0)``, ``torch.zeros_like``), dropout, and random
   ops (their draws must repeat the unperturbed forward's) -- fixed, never overridden;
2. ``per_sample_modules`` given to the engine (modules mapping each sample on its own);
3. the registry: rules added with :func:`register_rule` (the latest first), then the
   built-in ones, in the order they are listed below;
4. :func:`~.rules.rule_generic`: any op, under ``torch.func.vmap`` over the queries or once
   per query -- exact, only slower. An op without a rule is never an error.

An op is looked up by what its node calls: a ``call_module`` node by the module's type
(``isinstance``, so a rule for a class covers its subclasses), a ``call_function`` node by
the function (``node.target``), a ``call_method`` node by the method's name. Registering an
``nn.Module`` type also makes the tracer keep its instances whole (one ``call_module`` node,
never traced into), so the rule sees the module's call. How to write a rule: docs/engine.md.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .kernels import standard
from .ops import dropout_spec, is_random, is_shape_only
from .rules import (
    Rule,
    binary,
    elementwise,
    rule_batchnorm,
    rule_cat,
    rule_conv,
    rule_dropout,
    rule_elementwise_module,
    rule_generic,
    rule_getitem,
    rule_identity,
    rule_layer_norm,
    rule_linear,
    rule_multihead_attention,
    rule_pad,
    rule_per_sample,
    rule_permute,
    rule_pool,
    rule_reduce,
    rule_reshape,
    rule_sdpa,
    rule_split,
    rule_unchanged,
)

#: ``when(node, module) -> bool``: does an entry apply to this node? (``module``: the
#: called submodule of a ``call_module`` node, else None)
Predicate = Callable[[fx.Node, nn.Module | None], bool]


@dataclass(frozen=True)
class RuleEntry:
    """A rule, its kind and the condition under which it applies.

    ``kind`` names the rule (in each plan's ``rules``) and tells the planner what it reads: the
    built-in kinds are listed in :data:`BUILTIN_KINDS`; a rule of any other kind (user rules:
    ``"custom"`` by default) gets its inputs' unperturbed values cached for it.
    """

    rule: Rule
    kind: str
    when: Predicate | None = None

    def applies(self, node: fx.Node, module: nn.Module | None) -> bool:
        return self.when is None or bool(self.when(node, module))


class RuleHandle:
    """What :func:`register_rule` returns: ``handle.remove()`` takes the rule out again
    (graphs the engine already planned keep the rules they were planned with)."""

    def __init__(self, remove: Callable[[], None]):
        self._remove = remove

    def remove(self) -> None:
        """Unregister the rule (a second call does nothing)."""
        self._remove()
        self._remove = lambda: None


class RuleRegistry:
    """Rules by op: module types (checked in order with ``isinstance``), functions, method
    names. Rules registered by users come before the built-in ones, the latest first."""

    def __init__(self) -> None:
        self._modules: list[tuple[tuple[type[nn.Module], ...], RuleEntry]] = []
        self._functions: dict[Any, list[RuleEntry]] = {}
        self._methods: dict[str, list[RuleEntry]] = {}
        self._user_module_types: list[type[nn.Module]] = []

    def register(
        self, op: Any, rule: Rule, *, kind: str = "custom", when: Predicate | None = None
    ) -> RuleHandle:
        """Use ``rule`` for ``op`` (see :func:`register_rule`), before every rule so far."""
        entry = _entry(op, rule, kind, when)
        if isinstance(op, type):
            item = ((op,), entry)
            self._modules.insert(0, item)
            self._user_module_types.append(op)

            def remove() -> None:
                self._modules.remove(item)
                self._user_module_types.remove(op)

        else:
            table: dict[Any, list[RuleEntry]] = (
                self._methods if isinstance(op, str) else self._functions  # type: ignore[assignment]
            )
            table.setdefault(op, []).insert(0, entry)

            def remove() -> None:
                table[op].remove(entry)

        return RuleHandle(remove)

    def add_builtin(
        self,
        ops: Any,
        rule: Rule,
        kind: str,
        when: Predicate | None = None,
    ) -> None:
        """Add a built-in rule for each of ``ops`` after every rule so far (so built-ins are
        tried in the order they are added, and after every user rule)."""
        entry = _entry(ops, rule, kind, when, builtin=True)
        if isinstance(ops, type) or (
            isinstance(ops, tuple) and ops and all(isinstance(t, type) for t in ops)
        ):
            self._modules.append((ops if isinstance(ops, tuple) else (ops,), entry))
            return
        for op in ops if isinstance(ops, tuple | list | frozenset | set) else (ops,):
            table: dict[Any, list[RuleEntry]] = (
                self._methods if isinstance(op, str) else self._functions  # type: ignore[assignment]
            )
            table.setdefault(op, []).append(entry)

    def lookup(self, node: fx.Node, module: nn.Module | None) -> RuleEntry | None:
        """The first entry that applies to ``node`` (None: no rule; the generic one runs)."""
        if node.op == "call_module":
            for types, entry in self._modules:
                if isinstance(module, types) and entry.applies(node, module):
                    return entry
            return None
        if node.op == "call_function":
            try:
                entries = self._functions.get(node.target, ())
            except TypeError:  # an unhashable callable: no rule can name it
                return None
        elif node.op == "call_method":
            entries = self._methods.get(str(node.target), ())
        else:
            return None
        return next((e for e in entries if e.applies(node, module)), None)

    def leaf_types(self) -> tuple[type[nn.Module], ...]:
        """The module types users registered rules for: the tracer keeps them whole."""
        return tuple(dict.fromkeys(self._user_module_types))


def _entry(op: Any, rule: Any, kind: Any, when: Any, builtin: bool = False) -> RuleEntry:
    if not builtin and (
        isinstance(op, nn.Module)
        or not (
            (isinstance(op, type) and issubclass(op, nn.Module))
            or (isinstance(op, str) and op)
            or (callable(op) and not isinstance(op, type))
        )
    ):
        raise TypeError(
            "op must be an nn.Module subclass, a function (what a call_function node calls) "
            f"or a method name, got {op!r}"
        )
    try:
        hash(op)
    except TypeError:
        raise TypeError(f"op must be hashable to be looked up by, got {op!r}") from None
    if not callable(rule):
        raise TypeError(f"rule must be callable as rule(chunk, node), got {rule!r}")
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"kind must be a non-empty string, got {kind!r}")
    if when is not None and not callable(when):
        raise TypeError(f"when must be callable as when(node, module) or None, got {when!r}")
    return RuleEntry(rule, kind, when)


#: The registry the engine uses; :func:`register_rule` adds to it.
RULES = RuleRegistry()


def register_rule(
    op: Any, rule: Rule, *, kind: str = "custom", when: Predicate | None = None
) -> RuleHandle:
    """Compute the queries' values of ``op``'s nodes with ``rule(chunk, node) -> Value``.

    ``op``: an ``nn.Module`` subclass (its instances and subclasses' instances; the tracer
    then keeps them whole), a function as the graph calls it (``node.target`` of a
    ``call_function`` node, e.g. one wrapped with ``torch.fx.wrap``) or a method name
    (``"my_method"`` for ``x.my_method(...)``). ``when(node, module)``: apply only where it
    returns True. ``kind``: a label for ``explain``; a rule of a built-in kind must read
    only what that kind's rules read (:data:`BUILTIN_KINDS`). The rule overrides earlier and
    built-in rules for ``op`` in graphs planned from now on; ``handle.remove()`` undoes it.

    A rule must be exact: for each query its value equals what ``op`` computes on that
    query's inputs. It may return :func:`~.rules.rule_generic` ``(chunk, node)`` for inputs
    it does not handle. Raises ``TypeError``/``ValueError`` naming a bad argument.
    """
    return RULES.register(op, rule, kind=kind, when=when)


def rule_for(
    node: fx.Node,
    module: nn.Module | None,
    per_sample: tuple[type, ...] = (),
    registry: RuleRegistry = RULES,
) -> tuple[Rule, str]:
    """The rule for ``node`` and its kind (see the module docstring for the order)."""
    if is_shape_only(node):
        return rule_unchanged, "shape"
    if dropout_spec(node, module) is not None:
        return rule_dropout, "dropout"
    if is_random(node, module):
        return rule_generic, "random"
    if node.op == "call_module" and per_sample and isinstance(module, per_sample):
        return rule_per_sample, "per-sample"
    entry = registry.lookup(node, module)
    if entry is None:
        return rule_generic, "generic"
    return entry.rule, entry.kind


# ----------------------------------------------------------------------------------------
# the built-in rules
_BINARY_FUNCTIONS: dict[Any, tuple[Callable[..., torch.Tensor], bool]] = {
    operator.add: (torch.add, False),
    operator.sub: (torch.sub, False),
    operator.mul: (torch.mul, False),
    operator.truediv: (torch.div, False),
    operator.iadd: (torch.add, False),
    operator.isub: (torch.sub, False),
    operator.imul: (torch.mul, False),
    operator.itruediv: (torch.div, False),
    torch.add: (torch.add, False),
    torch.sub: (torch.sub, False),
    torch.mul: (torch.mul, False),
    torch.div: (torch.div, False),
    torch.maximum: (torch.maximum, False),
    torch.minimum: (torch.minimum, False),
}
_BINARY_METHODS: dict[str, tuple[Callable[..., torch.Tensor], bool]] = {
    "add": (torch.add, False), "add_": (torch.add, False), "__add__": (torch.add, False),
    "__iadd__": (torch.add, False), "__radd__": (torch.add, True),
    "sub": (torch.sub, False), "sub_": (torch.sub, False), "__sub__": (torch.sub, False),
    "__isub__": (torch.sub, False), "__rsub__": (torch.sub, True),
    "mul": (torch.mul, False), "mul_": (torch.mul, False), "__mul__": (torch.mul, False),
    "__imul__": (torch.mul, False), "__rmul__": (torch.mul, True),
    "div": (torch.div, False), "div_": (torch.div, False), "__truediv__": (torch.div, False),
    "__itruediv__": (torch.div, False), "__rtruediv__": (torch.div, True),
    "maximum": (torch.maximum, False), "minimum": (torch.minimum, False),
}  # fmt: skip
_REDUCTIONS = {"mean", "sum", "amax", "amin"}
_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid, nn.Threshold, nn.Hardshrink, nn.Softshrink,
)  # fmt: skip
_POOL_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d,
)  # fmt: skip
_PER_SAMPLE_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm, nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle, nn.Embedding,
)  # fmt: skip
_ELEMENTWISE_FUNCTIONS: dict[Any, tuple[Callable[..., Any], Callable[..., Any] | None]] = {
    F.relu: (torch.relu, torch.relu_),
    torch.relu: (torch.relu, torch.relu_),
    torch.relu_: (torch.relu, torch.relu_),
    F.relu6: (F.relu6, None),
    F.gelu: (F.gelu, None),
    F.silu: (F.silu, None),
    F.mish: (F.mish, None),
    F.hardswish: (F.hardswish, None),
    F.hardsigmoid: (F.hardsigmoid, None),
    F.leaky_relu: (F.leaky_relu, None),
    F.leaky_relu_: (F.leaky_relu, None),
    F.elu: (F.elu, None),
    F.elu_: (F.elu, None),
    F.selu: (F.selu, None),
    F.celu: (F.celu, None),
    F.softplus: (F.softplus, None),
    F.hardtanh: (F.hardtanh, None),
    F.hardtanh_: (F.hardtanh, None),
    F.logsigmoid: (F.logsigmoid, None),
    torch.sigmoid: (torch.sigmoid, None),
    F.sigmoid: (torch.sigmoid, None),
    torch.tanh: (torch.tanh, None),
    F.tanh: (torch.tanh, None),
    torch.exp: (torch.exp, None),
    torch.log: (torch.log, None),
    torch.sqrt: (torch.sqrt, None),
    torch.rsqrt: (torch.rsqrt, None),
    torch.abs: (torch.abs, None),
    torch.neg: (torch.neg, None),
    torch.square: (torch.square, None),
    torch.erf: (torch.erf, None),
    torch.clamp: (torch.clamp, None),
    torch.clip: (torch.clamp, None),
    operator.neg: (torch.neg, None),
}
_ELEMENTWISE_METHODS = frozenset(
    {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "exp_", "abs", "abs_",
     "neg", "neg_", "clamp", "clamp_", "clip", "clip_", "sqrt", "sqrt_", "rsqrt", "square",
     "erf", "log", "float", "double", "half", "bfloat16", "to", "type_as", "clamp_min",
     "clamp_min_", "clamp_max", "clamp_max_"}
)  # fmt: skip
_IDENTITY_METHODS = frozenset({"contiguous", "clone", "detach", "requires_grad_"})
_RESHAPE_METHODS = frozenset(
    {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
)
_RESHAPE_FUNCTIONS = (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze)
_PERMUTE_METHODS = frozenset({"permute", "transpose", "swapaxes", "swapdims", "t"})
_PERMUTE_FUNCTIONS = (torch.permute, torch.transpose, torch.swapaxes, torch.t)
_POOL_FUNCTIONS = (
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d, F.lp_pool1d, F.lp_pool2d,
)  # fmt: skip
_MAX_POOL_FUNCTIONS = (
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
)  # fmt: skip


def _method_elementwise(name: str) -> Rule:
    plain = name[:-1] if name.endswith("_") else name
    inplace = (plain + "_") if plain in ("relu", "sigmoid", "tanh", "exp", "abs", "neg") else None

    def fn(t: torch.Tensor, *a: Any, **k: Any) -> torch.Tensor:
        return getattr(t, plain)(*a, **k)

    def fn_(t: torch.Tensor, *a: Any, **k: Any) -> torch.Tensor:
        return getattr(t, inplace)(*a, **k)  # type: ignore[arg-type]

    return elementwise(fn, fn_ if inplace else None)


#: Kinds of the built-in rules (``shape``, ``dropout``, ``random``, ``per-sample`` and
#: ``generic`` come from :func:`rule_for` itself).
BUILTIN_KINDS = frozenset(
    {"shape", "dropout", "random", "per-sample", "generic", "conv", "linear", "batchnorm",
     "layernorm", "elementwise", "pool", "attention", "identity", "reshape", "arithmetic",
     "reduce", "permute", "index", "pad", "cat", "split"}
)  # fmt: skip


def _standard(cls: type[nn.Module]) -> Predicate:
    """Applies to modules whose forward is ``cls``'s own (not a subclass's override)."""
    return lambda node, m: standard(m, cls)  # type: ignore[arg-type]


def _no_indices(node: fx.Node, m: nn.Module | None) -> bool:
    """Pooling that returns values only (``return_indices=True`` returns a pair)."""
    if m is not None:
        return not getattr(m, "return_indices", False)
    return not node.kwargs.get("return_indices", False)


def _one_argument(node: fx.Node, m: nn.Module | None) -> bool:
    return len(node.args) == 1 and not node.kwargs


def _add_builtins(r: RuleRegistry) -> None:
    """The built-in rules, in the order they are tried."""
    # modules
    r.add_builtin(nn.Conv2d, rule_conv, "conv", _standard(nn.Conv2d))
    r.add_builtin(nn.Linear, rule_linear, "linear", _standard(nn.Linear))
    bn = nn.modules.batchnorm._BatchNorm
    r.add_builtin(bn, rule_batchnorm, "batchnorm", _standard(bn))
    r.add_builtin(nn.LayerNorm, rule_layer_norm, "layernorm", _standard(nn.LayerNorm))
    r.add_builtin(nn.ReLU, elementwise(torch.relu, torch.relu_), "elementwise")
    r.add_builtin(_ELEMENTWISE_MODULES, rule_elementwise_module, "elementwise")
    r.add_builtin(_POOL_MODULES, rule_pool, "pool", _no_indices)
    mha = nn.MultiheadAttention
    r.add_builtin(mha, rule_multihead_attention, "attention", _standard(mha))
    r.add_builtin((nn.Identity, nn.modules.dropout._DropoutNd), rule_identity, "identity")
    r.add_builtin((nn.Flatten, nn.Unflatten), rule_reshape, "reshape")
    r.add_builtin(_PER_SAMPLE_MODULES, rule_per_sample, "per-sample")
    # functions
    for fn, (op, reverse) in _BINARY_FUNCTIONS.items():
        r.add_builtin(fn, binary(op, reverse), "arithmetic")
    for fn, (out, inplace) in _ELEMENTWISE_FUNCTIONS.items():
        r.add_builtin(fn, elementwise(out, inplace), "elementwise")
    r.add_builtin(F.conv2d, rule_conv, "conv")
    r.add_builtin(F.linear, rule_linear, "linear")
    r.add_builtin(F.layer_norm, rule_layer_norm, "layernorm")
    r.add_builtin(_POOL_FUNCTIONS, rule_pool, "pool")
    r.add_builtin(_MAX_POOL_FUNCTIONS, rule_pool, "pool", _no_indices)
    r.add_builtin((torch.mean, torch.sum, torch.amax, torch.amin), rule_reduce, "reduce")
    r.add_builtin(_RESHAPE_FUNCTIONS, rule_reshape, "reshape")
    r.add_builtin(_PERMUTE_FUNCTIONS, rule_permute, "permute")
    r.add_builtin(operator.getitem, rule_getitem, "index")
    r.add_builtin(F.pad, rule_pad, "pad")
    r.add_builtin((torch.cat, torch.concat, torch.concatenate), rule_cat, "cat")
    r.add_builtin(F.scaled_dot_product_attention, rule_sdpa, "attention")
    r.add_builtin((torch.unbind, torch.chunk, torch.split), rule_split, "split")
    r.add_builtin(torch.detach, rule_identity, "identity")
    # methods
    for name, (op, reverse) in _BINARY_METHODS.items():
        r.add_builtin(name, binary(op, reverse), "arithmetic")
    for name in sorted(_ELEMENTWISE_METHODS):
        r.add_builtin(name, _method_elementwise(name), "elementwise")
    r.add_builtin(tuple(sorted(_IDENTITY_METHODS)), rule_identity, "identity", _one_argument)
    r.add_builtin(tuple(sorted(_RESHAPE_METHODS)), rule_reshape, "reshape")
    r.add_builtin(tuple(sorted(_PERMUTE_METHODS)), rule_permute, "permute")
    r.add_builtin(tuple(sorted(_REDUCTIONS)), rule_reduce, "reduce")
    r.add_builtin("__getitem__", rule_getitem, "index")
    r.add_builtin(("unbind", "chunk", "split"), rule_split, "split")


_add_builtins(RULES)

__all__ = [
    "BUILTIN_KINDS",
    "RULES",
    "Predicate",
    "RuleEntry",
    "RuleHandle",
    "RuleRegistry",
    "register_rule",
    "rule_for",
]
