"""Rules for the user's own ops: ``register_rule`` for a function and for an ``nn.Module`` leaf.

Each check compares the engine with the naive loop (perturb in place, full forward) in
float64, to 1e-8 of the gradient scale (the engine's exactness criterion, as in
tests/test_engine_models.py), and shows which rule ran: without a rule the op takes the
generic path (``torch.func.vmap`` over the queries), with one the user's rule runs instead.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import fx, nn  # noqa: E402

from zoopt.torch import SparseCGEEngine, naive_coordinate_values  # noqa: E402
from zoopt.torch.engine import (  # noqa: E402
    Dense,
    SliceDelta,
    register_rule,
    rule_generic,
)

MU = 5e-3


def soft_clip(x: torch.Tensor) -> torch.Tensor:
    """An op the engine has no rule for: one graph node (``torch.fx.wrap``), elementwise."""
    return x / (1 + x.abs())


fx.wrap("soft_clip")


class LeakyGate(nn.Module):
    """A user's module with a parameter per channel; fx would trace into it, a registered
    rule makes it one leaf node."""

    def __init__(self, channels: int):
        super().__init__()
        self.slope = nn.Parameter(torch.linspace(0.05, 0.3, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 0, x, self.slope.view(1, -1, 1, 1) * x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.gate = LeakyGate(4)
        self.conv2 = nn.Conv2d(4, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 5 * 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate(self.bn(self.conv1(x)))
        h = soft_clip(self.conv2(h))
        return self.fc(h.flatten(1))


def _setup(seed=0):
    torch.manual_seed(seed)
    model = Net().double().train()
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(4, 2, 5, 5, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 3, (4,), generator=g)
    return model, inputs, targets


def _engine_gradient(model, inputs, targets, coords):
    """Engine and naive forward-difference gradients at the model's parameters."""
    engine = SparseCGEEngine(model, F.cross_entropy)
    x = engine.view.flatten()
    base = engine.base_forward(x, inputs, targets)
    got = (engine.coordinate_values(x, coords, MU, inputs, targets) - base) / MU
    want_base = naive_coordinate_values(model, F.cross_entropy, x, [0], 0.0, inputs, targets)[0]
    want = naive_coordinate_values(model, F.cross_entropy, x, coords, MU, inputs, targets)
    return engine, got, (want - want_base) / MU


def _assert_exact(got, want):
    scale = float(want.abs().max())
    assert scale > 0
    err = float((got - want).abs().max())
    assert err <= 1e-8 * scale, f"max gradient difference {err:.3g} vs scale {scale:.3g}"


def _coords(model, n=48, seed=0):
    """Every coordinate of the gate, one of every other tensor, ``n`` random ones."""
    sizes = [p.numel() for p in model.parameters()]
    starts = np.cumsum([0, *sizes[:-1]])
    names = [name for name, _ in model.named_parameters()]
    gate = names.index("gate.slope")
    rng = np.random.default_rng(seed)
    picked = [np.arange(starts[gate], starts[gate] + sizes[gate]), starts]
    picked.append(rng.choice(sum(sizes), size=n, replace=False))
    return np.unique(np.concatenate(picked))


def soft_clip_rule(calls):
    def rule(ch, node):
        calls.append(node.name)
        v = ch.env.get(node.args[0])
        if isinstance(v, SliceDelta):  # each query changed one slice: clip that slice
            return SliceDelta(v.index, soft_clip(v.values), v.axis)
        if isinstance(v, Dense):  # (Q, *shape): every query's full activation
            return Dense(soft_clip(v.values))
        return rule_generic(ch, node)

    return rule


def leaky_gate_rule(calls):
    def rule(ch, node):
        calls.append(node.name)
        gate = ch.context.module_of(node)
        slope = gate.slope.detach()
        v = ch.env.get(node.args[0])
        if isinstance(v, SliceDelta) and v.axis == 1:
            # values (N, Q, H, W): slice q is channel index[q], with that channel's slope
            s = slope[v.index].view(1, -1, 1, 1)
            return SliceDelta(v.index, torch.where(v.values > 0, v.values, s * v.values), 1)
        if isinstance(v, Dense):  # (Q, N, C, H, W)
            s = slope.view(1, 1, -1, 1, 1)
            return Dense(torch.where(v.values > 0, v.values, s * v.values))
        return rule_generic(ch, node)

    return rule


def test_without_rules_the_users_ops_take_the_generic_path_exactly():
    model, inputs, targets = _setup()
    engine, got, want = _engine_gradient(model, inputs, targets, _coords(model))
    _assert_exact(got, want)
    assert engine.stats["vmapped_ops"] > 0  # soft_clip and the traced torch.where
    assert engine.stats["slow_path_queries"] == 0


def test_registered_rules_for_a_function_and_a_module_are_used_and_exact():
    model, inputs, targets = _setup()
    clip_calls, gate_calls = [], []
    handles = [
        register_rule(soft_clip, soft_clip_rule(clip_calls)),
        register_rule(LeakyGate, leaky_gate_rule(gate_calls), kind="leaky-gate"),
    ]
    try:
        engine, got, want = _engine_gradient(model, inputs, targets, _coords(model))
    finally:
        for h in handles:
            h.remove()
    _assert_exact(got, want)
    assert clip_calls and gate_calls  # both rules ran
    # nothing left for vmap: the gate is one leaf node and both ops have rules
    assert engine.stats["vmapped_ops"] == 0 and engine.stats["looped_ops"] == 0
    assert engine.stats["slow_path_queries"] == 0 and engine.stats["fallback_groups"] == 0
    assert "gate" in [r["where"] for r in engine.plan_rows() if r["name"] == "gate.slope"][0]


def test_a_removed_rule_is_not_used_by_graphs_planned_afterwards():
    model, inputs, targets = _setup(1)
    calls = []
    register_rule(soft_clip, soft_clip_rule(calls)).remove()
    engine, got, want = _engine_gradient(model, inputs, targets, _coords(model, 16))
    _assert_exact(got, want)
    assert calls == [] and engine.stats["vmapped_ops"] > 0


def test_when_restricts_a_rule_to_the_nodes_it_accepts():
    model, inputs, targets = _setup(2)
    calls = []
    handle = register_rule(
        soft_clip, soft_clip_rule(calls), when=lambda node, module: node.name == "no such node"
    )
    try:
        engine, got, want = _engine_gradient(model, inputs, targets, _coords(model, 16))
    finally:
        handle.remove()
    _assert_exact(got, want)
    assert calls == [] and engine.stats["vmapped_ops"] > 0


@pytest.mark.parametrize(
    ("op", "rule", "kwargs", "error", "names"),
    [
        (42, rule_generic, {}, TypeError, "42"),
        (nn.ReLU(), rule_generic, {}, TypeError, "ReLU()"),
        (int, rule_generic, {}, TypeError, "int"),
        (soft_clip, "not a rule", {}, TypeError, "not a rule"),
        (soft_clip, rule_generic, {"kind": ""}, ValueError, "kind"),
        (soft_clip, rule_generic, {"when": 3}, TypeError, "3"),
    ],
)
def test_register_rule_names_the_bad_argument(op, rule, kwargs, error, names):
    with pytest.raises(error, match=names.replace("(", r"\(").replace(")", r"\)")):
        register_rule(op, rule, **kwargs)


def test_the_context_exists_once_the_engine_has_a_plan():
    model, inputs, targets = _setup()
    engine = SparseCGEEngine(model, F.cross_entropy)
    with pytest.raises(ValueError, match="no plan"):
        engine.context  # noqa: B018
    engine.base_forward(engine.view.flatten(), inputs, targets)
    ctx = engine.context
    assert ctx.graph.kind == "traced" and ctx.stats is engine.stats
    assert ctx.unperturbed(ctx.graph.input).shape == inputs.shape
