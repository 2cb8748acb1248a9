"""From a user's model to the op graph the engine runs, without asking the user for anything.

1. **Trace the whole model** with ``torch.fx``, carrying the real values of one batch along
   (a *concrete* trace). Python control flow on shapes (``if x.dim() != 4``,
   ``range(x.size(0))``, ``len(x)``) is resolved from the batch's shapes, so it is traced;
   control flow on *values* (``if x.abs().max() > 1e3``) is not, because a perturbed query
   could take the other branch.
2. A **submodule that cannot be traced** becomes one opaque node (its parameters are
   reused at module granularity) instead of failing the whole trace.
3. **In-place ops** are rewritten so that every later reader of a mutated tensor reads the
   mutating node (``functionalize``); graphs whose mutations go through aliases the rewrite
   cannot follow are not used.
4. The trace is **verified**: the traced graph must reproduce the model's output on the batch.
5. If the model's own ``forward`` cannot be traced, its direct children are chained as the
   unperturbed forward calls them (recorded with forward hooks) and each child is traced on
   its own (``kind="chain"``). If that fails too, the model is one opaque node (``"opaque"``).

Graphs are specialized to the batch's shapes and the modules' train/eval modes; the engine
keeps one per (modes, input shape).
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from ..params import preserved_buffers
from .ops import is_inplace, is_random, is_shape_only, may_alias, out_of_place


class Untraceable(Exception):
    """The model (or a part of it) cannot be turned into a graph the engine can run."""


@contextlib.contextmanager
def same_randomness(seed: int, device: torch.device) -> Iterator[None]:
    """Run the body with torch's generators seeded to ``seed``; restore them afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        # the generators this device's ops draw from, not torch.manual_seed: that one also
        # visits every lazily-initialized backend, milliseconds per query
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


# ----------------------------------------------------------------------------------------
# Concrete tracing
class _ConcreteProxy(fx.Proxy):
    """A proxy that may be turned into a Python value when that value is static (shapes)."""

    def __len__(self) -> int:
        return len(self.tracer.static_value(self, "len()"))  # type: ignore[attr-defined]

    def __index__(self) -> int:
        return operator.index(self.tracer.static_value(self, "an integer"))  # type: ignore[attr-defined]

    def __int__(self) -> int:
        return int(self.tracer.static_value(self, "int()"))  # type: ignore[attr-defined]

    def __float__(self) -> float:
        return float(self.tracer.static_value(self, "float()"))  # type: ignore[attr-defined]


class _Rollback(Exception):
    """Internal: abort the root trace (never caught by the submodule fallback)."""


class ConcreteTracer(fx.Tracer):
    """``torch.fx`` tracer that evaluates every node on a real batch while tracing.

    ``static_value`` answers Python's questions about a proxy (``bool``, ``len``, ``int``,
    iteration) when the value depends only on shapes and constants; otherwise it raises
    :class:`Untraceable`. A submodule whose forward fails to trace is rolled back and kept as
    one opaque ``call_module`` node (``self.opaque`` maps its name to the reason).
    """

    def __init__(self, example: torch.Tensor, leaf_types: tuple[type[nn.Module], ...] = ()):
        super().__init__()
        self.record_stack_traces = False  # costly, and the engine reports nodes by name
        self.example = example
        self.leaf_types = tuple(leaf_types)
        self.forced_leaves: set[int] = set()
        self.opaque: dict[str, str] = {}
        self.values: dict[fx.Node, Any] = {}
        self.static: dict[fx.Node, bool] = {}
        self._placeholders = 0

    # -- proxies that know their values ----------------------------------------------------
    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ConcreteProxy(node, self)

    def static_value(self, proxy: fx.Proxy, what: str) -> Any:
        node = proxy.node
        if not self.static.get(node, False):
            raise Untraceable(
                f"{what} of {node.format_node()} depends on tensor values (value-dependent "
                "control flow)"
            )
        return self.values[node]

    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(self.static_value(obj, "a condition"))

    def iter(self, obj: fx.Proxy) -> Iterator:
        return iter(self.static_value(obj, "iteration"))

    def keys(self, obj: fx.Proxy) -> Any:
        return self.static_value(obj, "keys()").keys()

    def create_node(
        self,
        kind: str,
        target: Any,
        args: tuple,
        kwargs: dict,
        name: str | None = None,
        type_expr: Any | None = None,
    ) -> fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind != "output":
            with _unpatched():  # fx reroutes module calls and attributes while tracing
                self._evaluate(node)
        return node

    def _evaluate(self, node: fx.Node) -> None:
        static = False
        if node.op == "placeholder":
            self._placeholders += 1
            if self._placeholders == 1:
                value = self.example
            elif node.args or str(node.target).startswith("*"):  # a default, *args, **kwargs
                value, static = placeholder_default(node), True
            else:
                raise _Rollback(f"forward takes more than one required input ({node.target})")
        elif node.op == "get_attr":
            value = _resolve(self.root, str(node.target))
            static = not isinstance(value, torch.Tensor)
        else:
            module = self.root.get_submodule(str(node.target)) if node.op == "call_module" else None
            args = fx.node.map_arg(node.args, self.values.__getitem__)
            kwargs = fx.node.map_arg(node.kwargs, self.values.__getitem__)
            value = out_of_place(node, module)(*args, **kwargs)
            inputs = node.all_input_nodes
            static = is_shape_only(node) or all(self.static[n] for n in inputs)
            static = static and not is_random(node, module)
        self.values[node] = value
        self.static[node] = static

    # -- leaves and the fallback for untraceable submodules --------------------------------
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if id(m) in self.forced_leaves or isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        if self.is_leaf_module(m, self.path_of_module(m)):
            return super().call_module(m, forward, args, kwargs)
        last = self.graph._root.prev  # the last node so far
        stack = list(self.module_stack.items())
        calls = dict(self.num_calls)
        try:
            return super().call_module(m, forward, args, kwargs)
        except _Rollback:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure: keep the module opaque
            self._erase_after(last)
            self.module_stack.clear()
            self.module_stack.update(stack)
            self.num_calls.clear()
            self.num_calls.update(calls)
            name = self.path_of_module(m)
            self.forced_leaves.add(id(m))
            self.opaque[name] = (
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            )
            return super().call_module(m, forward, args, kwargs)

    def _erase_after(self, last: fx.Node) -> None:
        doomed = []
        node = last.next
        while node is not self.graph._root:
            doomed.append(node)
            node = node.next
        for node in reversed(doomed):
            for user in list(node.users):  # only other doomed nodes can use it
                if user not in doomed:
                    raise _Rollback(f"cannot roll back {node.format_node()}")
            self.graph.erase_node(node)
            self.values.pop(node, None)
            self.static.pop(node, None)


def placeholder_default(node: fx.Node) -> Any:
    """The value an extra ``forward`` argument takes: its default; ``()`` for ``*args`` and
    ``{}`` for ``**kwargs`` (the engine passes the model one input)."""
    target = str(node.target)
    if target.startswith("**"):
        return {}
    if target.startswith("*"):
        return ()
    return node.args[0] if node.args else None


def _unpatched() -> contextlib.AbstractContextManager:
    """Undo fx's tracing patches (``nn.Module.__call__``...) while evaluating real values.

    A private torch helper (present in the torch versions we support); without it, a
    module's concrete evaluation would be traced again.
    """
    revert = getattr(fx._symbolic_trace, "_maybe_revert_all_patches", None)
    return revert() if revert is not None else contextlib.nullcontext()


def _resolve(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# ----------------------------------------------------------------------------------------
# The engine's graph
@dataclass
class EngineGraph:
    """An op graph of a model, ready for the engine.

    Attributes:
        root: the module the graph's ``call_module``/``get_attr`` targets resolve against
            (the model itself, or a chain of its children).
        graph: the functionalized ``torch.fx`` graph (in-place nodes read as out-of-place).
        kind: ``"traced"`` (the whole forward), ``"chain"`` (its children, chained as the
            forward called them) or ``"opaque"`` (one node: the model).
        modules: each ``call_module`` node's module.
        opaque: ``call_module`` nodes the tracer could not trace into.
        notes: what was made opaque and why (for ``explain``).
        defaults: values of extra ``forward`` arguments (their defaults).
    """

    root: nn.Module
    graph: fx.Graph
    kind: str
    modules: dict[fx.Node, nn.Module]
    opaque: set[fx.Node]
    notes: list[str] = field(default_factory=list)
    defaults: dict[fx.Node, Any] = field(default_factory=dict)
    #: prefix of the model's own module names in ``graph`` (``explain`` strips it)
    prefix: str = ""
    #: the ``torch.utils._pytree`` structure of the model's output (None: a tensor)
    out_spec: Any = None

    def __post_init__(self) -> None:
        self.nodes = list(self.graph.nodes)
        self.position = {n: i for i, n in enumerate(self.nodes)}
        self.input = next(n for n in self.nodes if n.op == "placeholder")
        self.output = self.nodes[-1]
        # after this position no node reads the value of a node: free it then
        self.last_use = {
            n: max((self.position[u] for u in n.users), default=-1) for n in self.nodes
        }

    def resolve(self, target: str) -> Any:
        return _resolve(self.root, target)

    def restore_output(self, out: Any) -> Any:
        """The graph's output in the structure the model returns (fx turns a dict or a
        ``ModelOutput`` into an ``immutable_dict``; the loss gets the model's own type)."""
        spec = self.out_spec
        if spec is None or isinstance(out, torch.Tensor):
            return out
        leaves, got = pytree.tree_flatten(out)
        if got == spec or len(leaves) != spec.num_leaves:
            return out
        return pytree.tree_unflatten(leaves, spec)


def _opaque_graph(module: nn.Module, notes: list[str]) -> EngineGraph:
    graph = fx.Graph()
    x = graph.placeholder("x")
    call = graph.call_module("", (x,))
    graph.output(call)
    return EngineGraph(module, graph, "opaque", {call: module}, {call}, notes)


def _modules_of(root: nn.Module, graph: fx.Graph) -> dict[fx.Node, nn.Module]:
    return {n: root.get_submodule(str(n.target)) for n in graph.nodes if n.op == "call_module"}


# ----------------------------------------------------------------------------------------
# In-place ops
def functionalize(graph: fx.Graph, modules: dict[fx.Node, nn.Module], opaque: set[fx.Node]) -> None:
    """Make every reader of a tensor after an in-place op on it read that op's node.

    The engine then runs each in-place node out of place (clone, then the op), which computes
    what the eager program computes as long as no *other* tensor sharing storage with the
    mutated one is read afterwards, and no parameter or buffer is mutated.

    Raises:
        Untraceable: a mutation the rewrite cannot follow (names the node).
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    latest: dict[fx.Node, fx.Node] = {}  # a tensor -> the node holding its newest version
    parent: dict[fx.Node, fx.Node] = {}  # union-find over nodes that may share storage
    version_of: dict[fx.Node, fx.Node] = {}  # a version -> the first version of its tensor

    def find(n: fx.Node) -> fx.Node:
        while parent.get(n, n) is not n:
            n = parent[n]
        return n

    def union(a: fx.Node, b: fx.Node) -> None:
        ra, rb = find(a), find(b)
        if ra is not rb:
            parent[ra] = rb

    def newest(n: fx.Node) -> fx.Node:
        while n in latest:
            n = latest[n]
        return n

    last_read: dict[fx.Node, int] = {}
    for n in graph.nodes:
        for u in n.users:
            last_read[n] = max(last_read.get(n, -1), order[u])

    for node in list(graph.nodes):
        node.args = fx.node.map_arg(node.args, newest)
        node.kwargs = fx.node.map_arg(node.kwargs, newest)
        module = modules.get(node)
        tensor_inputs = [a for a in node.all_input_nodes]
        if is_inplace(node, module):
            target = node.args[0]
            if not isinstance(target, fx.Node):
                continue
            first = version_of.get(target, target)
            versions = {n for n, v in version_of.items() if v is first} | {first}
            group = find(target)
            for other in [n for n in order if find(n) is group]:
                if other in versions:
                    continue
                if other.op == "get_attr" or last_read.get(other, -1) > order[node]:
                    raise Untraceable(
                        f"{node.format_node()} mutates a tensor that is also read through "
                        f"{other.name} (an alias or a parameter/buffer)"
                    )
            if target.op == "get_attr":
                raise Untraceable(f"{node.format_node()} mutates a parameter or buffer")
            latest[target] = node
            version_of[node] = first
            union(node, target)
        elif may_alias(node, module, node in opaque):
            for a in tensor_inputs:
                union(node, a)


# ----------------------------------------------------------------------------------------
# Verification
def _max_error(a: Any, b: Any) -> float | None:
    """Largest relative difference between two (nested) outputs; ``None``: different kinds."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return None
        if not a.is_floating_point():
            return 0.0 if torch.equal(a, b) else float("inf")
        scale = float(b.abs().max()) if b.numel() else 0.0
        diff = float((a - b).abs().max()) if b.numel() else 0.0
        if diff != diff:  # NaN somewhere
            return 0.0 if torch.equal(a.isnan(), b.isnan()) else float("inf")
        return diff / max(scale, torch.finfo(b.dtype).tiny)
    if isinstance(a, tuple | list) and isinstance(b, tuple | list) and len(a) == len(b):
        errs = [_max_error(x, y) for x, y in zip(a, b, strict=True)]
        return None if any(e is None for e in errs) else max(errs, default=0.0)  # type: ignore[type-var]
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return _max_error(list(a.values()), list(b.values()))
    return 0.0 if type(a) is type(b) and a == b else None


def _tolerance(example: torch.Tensor) -> float:
    return 1e-9 if example.dtype == torch.float64 else 1e-4


def verify(model_out: Any, graph_out: Any, example: torch.Tensor, what: str) -> None:
    err = _max_error(graph_out, model_out)
    if err is None or err > _tolerance(example):
        detail = "a different structure" if err is None else f"relative difference {err:.3g}"
        raise Untraceable(f"{what} does not reproduce the model's output ({detail})")


def run_functional(eg: EngineGraph, x: torch.Tensor) -> Any:
    """Run a functionalized graph out of place (no mutation anywhere)."""
    env: dict[fx.Node, Any] = {}
    for node in eg.nodes:
        if node.op == "placeholder":
            env[node] = x if node is eg.input else placeholder_default(node)
        elif node.op == "get_attr":
            env[node] = eg.resolve(str(node.target))
        elif node.op == "output":
            return fx.node.map_arg(node.args[0], env.__getitem__)
        else:
            fn = out_of_place(node, eg.modules.get(node))
            args = fx.node.map_arg(node.args, env.__getitem__)
            kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
            env[node] = fn(*args, **kwargs)
    raise Untraceable("graph without output")  # pragma: no cover


# ----------------------------------------------------------------------------------------
# Building
def _trace(
    root: nn.Module, example: torch.Tensor, leaf_types: tuple[type[nn.Module], ...], kind: str
) -> EngineGraph:
    """Concrete-trace ``root``, functionalize; retrace with more opaque modules as needed."""
    forced: set[int] = set()
    notes: list[str] = []
    for _ in range(64):
        tracer = ConcreteTracer(example, leaf_types)
        tracer.forced_leaves |= forced
        try:
            graph = tracer.trace(root)
        except (_Rollback, Untraceable) as exc:
            raise Untraceable(str(exc)) from exc
        except Exception as exc:  # noqa: BLE001 - fx raises many kinds of errors
            raise Untraceable(f"{type(exc).__name__}: {exc}") from exc
        finally:
            tracer.values.clear()
        modules = _modules_of(root, graph)
        opaque = {n for n, m in modules.items() if id(m) in tracer.forced_leaves}
        model_graph = fx.GraphModule(root, graph)  # before the rewrite: fx's own semantics
        try:
            functionalize(graph, modules, opaque)
        except Untraceable as exc:
            culprit = _innermost_module(exc, graph, root)
            if culprit is None or id(culprit) in forced:
                raise
            forced.add(id(culprit))
            notes.append(f"{type(culprit).__name__} kept opaque: {exc}")
            continue
        notes.extend(
            f"{name or type(root).__name__} kept opaque (not traceable: {why})"
            for name, why in tracer.opaque.items()
        )
        eg = EngineGraph(root, graph, kind, modules, opaque, notes)
        eg.traced_module = model_graph  # type: ignore[attr-defined]
        return eg
    raise Untraceable("too many in-place rewrites")  # pragma: no cover


def _innermost_module(exc: Untraceable, graph: fx.Graph, root: nn.Module) -> nn.Module | None:
    """The innermost module whose forward created the node an error message names."""
    message = str(exc)
    for node in graph.nodes:
        if node.format_node() in message:
            stack = node.meta.get("nn_module_stack") or {}
            if node.op == "call_module":
                return root.get_submodule(str(node.target))
            if stack:
                qualname = list(stack.values())[-1][0]
                return root.get_submodule(qualname)
            return None
    return None


class _Called(nn.Module):
    """``model(x)``: the model as the one submodule of a root fx can always trace."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Any:
        return self.model(x)


class _Chain(nn.Module):
    """The model's direct children, called one after the other (with reshapes in between)."""

    def __init__(self, model: nn.Module, steps: list[tuple[str, tuple[int, ...] | None]], out):
        super().__init__()
        self.steps = []
        for name, shape in steps:
            attr = name.replace(".", "_")
            while attr in self._modules:
                attr += "_"
            self.add_module(attr, model.get_submodule(name))
            self.steps.append((attr, shape))
        self.out_shape = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attr, shape in self.steps:
            if shape is not None:
                x = x.reshape(shape)
            x = getattr(self, attr)(x)
        if self.out_shape is not None:
            x = x.reshape(self.out_shape)
        return x


def _callable_children(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The model's children, with module containers (never called themselves) expanded."""
    out = []
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleList | nn.ModuleDict):
            out += _callable_children(child, f"{prefix}{name}.")
        else:
            out.append((prefix + name, child))
    return out


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.numel() == b.numel()
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and a.storage_offset() == b.storage_offset()
    )


def _record_chain(model: nn.Module, example: torch.Tensor, seed: int) -> tuple[_Chain, Any]:
    """The chain of direct children the unperturbed forward calls, and the model's output."""
    calls: list[tuple[str, tuple, dict, Any]] = []
    names = {id(c): n for n, c in _callable_children(model)}
    hooks = [
        child.register_forward_hook(
            lambda m, args, kwargs, out: calls.append((names[id(m)], args, kwargs, out)),
            with_kwargs=True,
        )
        for _, child in _callable_children(model)
    ]
    try:
        with torch.no_grad(), preserved_buffers(model), same_randomness(seed, example.device):
            out = model(example)
    finally:
        for h in hooks:
            h.remove()
    if not calls:
        raise Untraceable("the forward calls none of the model's children")
    steps: list[tuple[str, tuple[int, ...] | None]] = []
    prev: Any = example
    seen = set()
    for name, args, kwargs, result in calls:
        if name in seen:
            raise Untraceable(f"child {name!r} is called more than once")
        seen.add(name)
        if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
            raise Untraceable(f"child {name!r} is not called with one tensor")
        if not isinstance(result, torch.Tensor):
            raise Untraceable(f"child {name!r} does not return one tensor")
        inp = args[0]
        if inp is prev:
            steps.append((name, None))
        elif isinstance(prev, torch.Tensor) and _shares_storage(inp, prev):
            steps.append((name, tuple(inp.shape)))
        else:
            raise Untraceable(
                f"the input of child {name!r} is computed from the previous child's output by "
                "code in the model's forward"
            )
        prev = result
    if out is prev:
        final = None
    elif isinstance(out, torch.Tensor) and _shares_storage(out, prev):
        final = tuple(out.shape)
    else:
        raise Untraceable("the model's output is computed from its last child's output")
    return _Chain(model, steps, final), out


def build_graph(
    model: nn.Module,
    example: torch.Tensor,
    *,
    leaf_types: tuple[type[nn.Module], ...] = (),
    seed: int = 0,
) -> EngineGraph:
    """The engine graph of ``model`` for batches shaped like ``example`` (see module doc).

    Runs the model a few times on ``example``; its buffers and torch's random generators are
    as before afterwards.
    """
    with preserved_buffers(model), same_randomness(seed, example.device):
        return _build_graph(model, example, leaf_types, seed)


def _build_graph(
    model: nn.Module, example: torch.Tensor, leaf_types: tuple[type[nn.Module], ...], seed: int
) -> EngineGraph:
    notes: list[str] = []
    with torch.no_grad(), preserved_buffers(model), same_randomness(seed, example.device):
        reference = model(example)
    try:
        eg = _trace(model, example, leaf_types, "traced")
        _verify_graph(eg, model, example, reference, seed)
        return eg
    except Untraceable as exc:
        notes.append(f"the model's forward is not traceable as a whole: {exc}")
        try:
            # fx cannot trace some forward signatures as the root (``**kwargs`` behind a
            # decorator, as in Hugging Face models); called as a submodule they trace
            eg = _trace(_Called(model), example, leaf_types, "traced")
            if eg.opaque and any(m is model for m in eg.modules.values()):
                raise Untraceable(eg.notes[-1] if eg.notes else "the model stays opaque")
            _verify_graph(eg, model, example, reference, seed)
            eg.notes[:0] = notes
            eg.notes.append("traced as model(x): forward's other arguments take their defaults")
            eg.prefix = "model."
            return eg
        except Untraceable as exc2:
            if str(exc2) != str(exc):
                notes.append(f"called as model(x), not traceable either: {exc2}")
    try:
        chain, out = _record_chain(model, example, seed)
        eg = _trace(chain, example, leaf_types, "chain")
        _verify_graph(eg, model, example, out, seed)
        eg.notes[:0] = notes
        eg.notes.append(
            "module-level reuse: the children are chained as the unperturbed forward called "
            "them (control flow in the model's own forward is assumed not to change)"
        )
        return eg
    except Untraceable as exc:
        notes.append(f"no chain of children: {exc}")
    notes.append("every query reruns the whole model")
    return _opaque_graph(model, notes)


def _verify_graph(
    eg: EngineGraph, model: nn.Module, example: torch.Tensor, reference: Any, seed: int
) -> None:
    traced = eg.traced_module  # type: ignore[attr-defined]
    if not isinstance(reference, torch.Tensor):
        eg.out_spec = pytree.tree_structure(reference)
    with torch.no_grad(), preserved_buffers(model):
        with same_randomness(seed, example.device):
            verify(reference, traced(example.clone()), example, "the traced graph")
        with same_randomness(seed, example.device):
            verify(reference, run_functional(eg, example), example, "the rewritten graph")
    del eg.traced_module  # type: ignore[attr-defined]
