"""The planner: once per (train/eval modes, input shape, dtype), a model's op graph and
everything derived from it -- each node's rule, each parameter's uses and path, what the
per-step cache must keep.

:class:`Planner` builds and remembers the :class:`Plan` of each input signature; the core
asks it for the plan of a batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from ..params import ParamView
from . import origins as org
from .graph import EngineGraph, build_graph
from .ops import dropout_spec, is_random, out_of_place
from .registry import BUILTIN_KINDS, RULES, RuleRegistry, rule_for
from .rules import Rule

#: Seed of the forwards that check a traced graph (they never touch the global generators).
CHECK_SEED = 20240229

#: Rule kinds that read the unperturbed value of their first input (not only its shape).
#: Rules of kinds outside :data:`~.registry.BUILTIN_KINDS` (user rules) are assumed to.
READS_INPUT = frozenset(
    {"conv", "linear", "layernorm", "per-sample", "generic", "random", "attention"}
)
#: Modules whose origin rule reads their unperturbed output.
READS_OUTPUT = frozenset({"conv", "linear"})

_RANDOM_LIKE = (torch.rand_like, torch.randn_like, torch.randint_like)


@dataclass
class Plan:
    """Everything derived once per graph: rules, parameter uses and paths."""

    graph: EngineGraph
    #: per parameter tensor of the view: the nodes using it
    uses: list[list[org.Use]]
    #: per parameter tensor: ``fast``, ``batched``, ``module rerun``, ``slow`` or ``unused``
    paths: list[str]
    #: per op node: its rule and the rule's kind
    rules: dict[fx.Node, tuple[Rule, str]]
    #: per op node: the function computing it out of place
    callables: dict[fx.Node, Callable[..., Any]]
    #: dropout nodes: ``(draw a mask like this tensor, p)``
    dropouts: dict[fx.Node, tuple[Callable[..., torch.Tensor], float]]
    #: nodes that draw random numbers: their generator state is recorded each step
    rng_nodes: set[fx.Node]
    live_last_use: dict[fx.Node, int]  # last position a node with readers reads it
    last_read: dict[fx.Node, int]  # last position any node reads it (the base forward)
    keep: set[fx.Node]  # nodes whose unperturbed values rules read: cached every step
    #: nodes found not to run under ``torch.func.vmap`` (filled while queries run)
    no_vmap: set[fx.Node] = field(default_factory=set)


def make_plan(
    eg: EngineGraph,
    view: ParamView,
    module: nn.Module,
    per_sample_modules: tuple[type[nn.Module], ...] = (),
    registry: RuleRegistry = RULES,
) -> Plan:
    """The plan of graph ``eg`` of ``module`` for the parameters of ``view``."""
    uses = org.locate(eg, view, module)
    paths = [org.path_of(eg, u, p, module) for u, p in zip(uses, view.params, strict=True)]
    rules, callables, dropouts, rng_nodes = {}, {}, {}, set()
    for node in eg.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        m = eg.modules.get(node)
        rules[node] = rule_for(node, m, per_sample_modules, registry)
        fn = out_of_place(node, m)
        if node in eg.opaque or is_random(node, m) or node.target in _RANDOM_LIKE:
            # opaque code may write into its inputs; and random draws fill tensors in
            # memory order, so a channels-last input would get other masks than eager
            fn = cloning(fn)
        callables[node] = fn
        spec = dropout_spec(node, m)
        if spec is not None:
            dropouts[node] = spec
        elif (
            node in eg.opaque
            or is_random(node, m)
            or rules[node][1] == "generic"
            and (node.op == "call_module")
        ):
            rng_nodes.add(node)
    live = {n for n in eg.nodes if n.users or n.op == "output"}
    last_use = {
        n: max((eg.position[u] for u in n.users if u in live), default=-1) for n in eg.nodes
    }
    last_read = {n: max((eg.position[u] for u in n.users), default=-1) for n in eg.nodes}
    keep = values_read(eg, rules, uses)
    return Plan(eg, uses, paths, rules, callables, dropouts, rng_nodes, last_use, last_read, keep)


def values_read(
    eg: EngineGraph, rules: dict[fx.Node, tuple[Rule, str]], uses: list[list[org.Use]]
) -> set[fx.Node]:
    """Nodes whose unperturbed values the queries read; the others are recomputed on the
    rare occasions they are needed (e.g. the BatchNorm output an in-place ReLU overwrites)."""
    keep = {eg.input}
    out_arg = eg.output.args[0]
    fx.node.map_arg(out_arg, keep.add)
    for node, (_, kind) in rules.items():
        tensors = node.all_input_nodes
        if kind in READS_INPUT or kind not in BUILTIN_KINDS or len(tensors) > 1:
            keep.update(tensors)
        if kind in READS_OUTPUT:
            keep.add(node)
    for group in uses:
        for u in group:
            if u.node.op == "call_module":
                keep.update(u.node.all_input_nodes)  # origins read their module's input
                if rules[u.node][1] in READS_OUTPUT or isinstance(
                    eg.modules[u.node], nn.GroupNorm | nn.LayerNorm
                ):
                    keep.add(u.node)
    return keep


def cloning(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` on contiguous copies of its tensor arguments."""

    def call(*args: Any, **kwargs: Any) -> Any:
        args = tuple(
            a.clone(memory_format=torch.contiguous_format) if isinstance(a, torch.Tensor) else a
            for a in args
        )
        return fn(*args, **kwargs)

    return call


class Planner:
    """The plans of one model, one per (train/eval modes, input shape, input dtype).

    Args:
        module: the model; ``view``: its flat parameter view.
        format_input: puts a batch in the engine's memory format (graphs are traced on the
            batch as the base forward will see it).
        per_sample_modules: module types the tracer keeps whole and runs on all ``Q * B``
            samples at once (see :class:`~.core.SparseCGEEngine`).
        registry: where the rules come from (module types users registered rules for are
            kept whole by the tracer, too).
    """

    def __init__(
        self,
        module: nn.Module,
        view: ParamView,
        format_input: Callable[[torch.Tensor], torch.Tensor],
        per_sample_modules: tuple[type[nn.Module], ...] = (),
        registry: RuleRegistry = RULES,
    ):
        self.module = module
        self.view = view
        self.format_input = format_input
        self.per_sample_modules = per_sample_modules
        self.registry = registry
        self.plans: dict[tuple, Plan] = {}

    def modes(self) -> tuple[bool, ...]:
        """The train/eval flag of every submodule (part of every plan's and cache's key)."""
        return tuple(m.training for m in self.module.modules())

    def key(self, inputs: torch.Tensor) -> tuple:
        """What a plan depends on besides the model: modes, input shape and dtype."""
        return (self.modes(), tuple(inputs.shape), inputs.dtype)

    def has_plan(self, inputs: torch.Tensor) -> bool:
        """Is the plan for this batch's signature built already?"""
        return self.key(inputs) in self.plans

    def plan_for(self, inputs: torch.Tensor) -> tuple[Plan, bool]:
        """The plan for a batch like ``inputs``, and whether it was built just now (a graph
        traced and checked: a few forwards of the model)."""
        if not isinstance(inputs, torch.Tensor):
            raise TypeError(f"inputs must be a torch tensor, got {type(inputs).__name__}")
        key = self.key(inputs)
        plan = self.plans.get(key)
        if plan is not None:
            return plan, False
        # in the layout of the base forward: a black box then sees the same inputs
        example = self.format_input(inputs.to(self.view.device))
        leaves = tuple(dict.fromkeys(self.per_sample_modules + self.registry.leaf_types()))
        with torch.no_grad():
            eg = build_graph(self.module, example, leaf_types=leaves, seed=CHECK_SEED)
        plan = make_plan(eg, self.view, self.module, self.per_sample_modules, self.registry)
        self.plans[key] = plan
        return plan, True

    @contextlib.contextmanager
    def memoized_black_boxes(self, inputs: torch.Tensor) -> Iterator[None]:
        """While a new graph is built and first run: each ``per_sample_modules`` instance
        answers a repeated input from memory. Building a graph runs the model a few times on
        the same batch; a black box (e.g. a paid API) is then asked once, not four times."""
        if not self.per_sample_modules or self.has_plan(inputs):
            yield
            return
        patched = []
        for m in self.module.modules():
            if isinstance(m, self.per_sample_modules) and "forward" not in m.__dict__:
                m.forward = memoize(m.forward)  # type: ignore[method-assign]
                patched.append(m)
        try:
            yield
        finally:
            for m in patched:
                del m.forward


def memoize(forward: Callable[..., Any]) -> Callable[..., Any]:
    """``forward`` answering a call from memory when its tensor arguments equal an earlier
    call's up to floating-point rounding (the graph checks run the model eagerly; the
    engine's own forward rounds its BatchNorm slightly differently)."""
    memory: list[tuple[tuple, Any]] = []

    def close(x: Any, y: Any) -> bool:
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype or x.device != y.device:
                return False
            if not x.is_floating_point():
                return torch.equal(x, y)
            tol = (
                64 * torch.finfo(x.dtype).eps * max(1.0, float(y.abs().max()) if y.numel() else 0.0)
            )
            return bool((x - y).abs().max() <= tol) if x.numel() else True
        return not isinstance(x, torch.Tensor) and not isinstance(y, torch.Tensor) and x == y

    def call(*args: Any) -> Any:
        for old, out in memory:
            if len(old) == len(args) and all(close(a, b) for a, b in zip(args, old, strict=True)):
                return out.clone() if isinstance(out, torch.Tensor) else out
        out = forward(*args)
        memory.append((tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args), out))
        return out

    return call


__all__ = [
    "CHECK_SEED",
    "READS_INPUT",
    "READS_OUTPUT",
    "Plan",
    "Planner",
    "cloning",
    "make_plan",
    "memoize",
    "values_read",
]
