"""The sparse-CGE engine and ModuleOracle against the naive per-coordinate loop.

Exactness is checked in float64 (where the engine must match the naive loop to ~1e-9 of
the gradient scale) and, for float32, against a float64 truth: the engine must be as close
to it as the float32 naive loop is.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from zoopt import CGE, BudgetExceeded, OracleError  # noqa: E402
from zoopt.torch import (  # noqa: E402
    CNN8,
    ModuleOracle,
    ResNet20,
    SmallCNN,
    SparseCGEEngine,
    block_reuse_coordinate_values,
    naive_coordinate_values,
)
from zoopt.torch.models import StagedModel  # noqa: E402

MU = 5e-3


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: a second OpenMP thread only adds barrier waits, which cost
    10x on a shared, oversubscribed CPU. Restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batch(shape, n_classes=10, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(*shape, generator=g, dtype=dtype)
    targets = torch.randint(0, n_classes, (shape[0],), generator=g)
    return inputs, targets


def _coords_everywhere(view, n_random, seed=0):
    """One coordinate of every parameter tensor plus ``n_random`` random ones, shuffled."""
    rng = np.random.default_rng(seed)
    per_tensor = [rng.integers(g.start, g.stop) for g in view.groups]
    extra = rng.choice(view.dim, size=min(n_random, view.dim), replace=False)
    return rng.permutation(np.unique(np.concatenate([per_tensor, extra])))


def _grad(values, base, step):
    return (values.double() - base) / step


def _assert_matches_naive(model, inputs, targets, coords, rel_tol, steps=(MU, -MU), **options):
    """Engine vs naive loop on forward-difference gradients for each step; returns engine."""
    engine = SparseCGEEngine(model, F.cross_entropy, **options)
    x = engine.view.flatten()
    buffers = [b.clone() for b in model.buffers()]
    base_engine = engine.base_forward(x, inputs, targets)
    base_naive = float(
        naive_coordinate_values(model, F.cross_entropy, x, [0], 0.0, inputs, targets)[0]
    )
    assert abs(base_engine - base_naive) <= 1e-9 * abs(base_naive)
    for step in steps:
        got = engine.coordinate_values(x, coords, step, inputs, targets)
        want = naive_coordinate_values(model, F.cross_entropy, x, coords, step, inputs, targets)
        g_got, g_want = _grad(got, base_engine, step), _grad(want, base_naive, step)
        scale = float(g_want.abs().max())
        assert scale > 0
        err = float((g_got - g_want).abs().max())
        assert err <= rel_tol * scale, f"step {step}: max diff {err:.3g} vs scale {scale:.3g}"
    # queries changed neither the parameters nor the running statistics
    assert torch.equal(engine.view.flatten(), x)
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))
    return engine


@pytest.mark.parametrize(
    ("shortcut", "memory_format"),
    [("A", "channels_last"), ("B", "channels_last"), ("A", "contiguous")],
)
def test_resnet20_train_mode_matches_naive_loop(shortcut, memory_format):
    torch.manual_seed(1)
    model = ResNet20(shortcut=shortcut).double().train()
    inputs, targets = _batch((3, 3, 8, 8))
    coords = _coords_everywhere(SparseCGEEngine(model, F.cross_entropy).view, 100)
    engine = _assert_matches_naive(
        model, inputs, targets, coords, rel_tol=1e-8, memory_format=memory_format
    )
    assert engine.stats["slow_path_queries"] == 0  # every op of ResNet-20 has a fast rule
    assert engine.stats["cache_builds"] == 1  # one unperturbed forward for all queries


def test_resnet20_eval_mode_uses_running_stats():
    torch.manual_seed(2)
    model = ResNet20().double()
    with torch.no_grad():  # make running statistics non-trivial
        model.train()(torch.randn(16, 3, 8, 8, dtype=torch.float64))
    model.eval()
    inputs, targets = _batch((2, 3, 8, 8), seed=3)
    coords = _coords_everywhere(SparseCGEEngine(model, F.cross_entropy).view, 40, seed=3)
    _assert_matches_naive(model, inputs, targets, coords, rel_tol=1e-8, steps=(MU,))


@pytest.mark.parametrize(
    ("model", "shape"),
    [
        (SmallCNN(), (8, 1, 8, 8)),
        (CNN8(3, image_size=16), (4, 3, 16, 16)),
        (CNN8(3, batch_norm=False, image_size=16), (4, 3, 16, 16)),
    ],
    ids=["smallcnn", "cnn8", "cnn8-no-bn"],
)
def test_small_models_match_naive_loop(model, shape):
    torch.manual_seed(4)
    model = model.double().train()
    inputs, targets = _batch(shape, seed=5)
    coords = _coords_everywhere(SparseCGEEngine(model, F.cross_entropy).view, 120, seed=5)
    engine = _assert_matches_naive(model, inputs, targets, coords, rel_tol=1e-8)
    assert engine.stats["slow_path_queries"] == 0


def test_block_reuse_reference_matches_naive_loop():
    torch.manual_seed(6)
    model = ResNet20().double().train()
    inputs, targets = _batch((2, 3, 8, 8), seed=6)
    x = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    coords = _coords_everywhere(SparseCGEEngine(model, F.cross_entropy).view, 30, seed=6)
    a = naive_coordinate_values(model, F.cross_entropy, x, coords, MU, inputs, targets)
    b = block_reuse_coordinate_values(model, F.cross_entropy, x, coords, MU, inputs, targets)
    assert torch.equal(a, b)  # same ops on the same tensors


def test_float32_engine_is_as_exact_as_the_float32_naive_loop():
    """In float32 neither method is exact; the engine must be no worse than naive."""
    torch.manual_seed(7)
    model = ResNet20().train()
    inputs, targets = _batch((8, 3, 16, 16), seed=7, dtype=torch.float32)
    engine = SparseCGEEngine(model, F.cross_entropy)
    x = engine.view.flatten()
    coords = _coords_everywhere(engine.view, 25, seed=7)
    base_e = engine.base_forward(x, inputs, targets)
    g_engine = _grad(engine.coordinate_values(x, coords, MU, inputs, targets), base_e, MU)
    base_n = float(naive_coordinate_values(model, F.cross_entropy, x, [0], 0.0, inputs, targets)[0])
    g_naive = _grad(
        naive_coordinate_values(model, F.cross_entropy, x, coords, MU, inputs, targets), base_n, MU
    )
    m64 = ResNet20().double().train()
    m64.load_state_dict(model.state_dict())
    x64, in64 = x.double(), inputs.double()
    base64 = float(naive_coordinate_values(m64, F.cross_entropy, x64, [0], 0.0, in64, targets)[0])
    # the float32 perturbed parameter, as the float32 loop sets it, in float64
    step32 = ((x[coords] + MU) - x[coords]).double()
    vals64 = torch.stack(
        [
            naive_coordinate_values(m64, F.cross_entropy, x64, [c], float(s), in64, targets)[0]
            for c, s in zip(coords.tolist(), step32.tolist(), strict=True)
        ]
    )
    g_true = (vals64 - base64) / MU
    scale = float(g_true.abs().max())
    err_engine = float((g_engine - g_true).abs().max())
    err_naive = float((g_naive - g_true).abs().max())
    assert err_engine <= 2 * err_naive + 1e-4 * scale, (err_engine, err_naive, scale)
    assert err_engine <= 2e-3 * scale  # float32 resolution of loss differences at this mu


# -- fallbacks: ops without a fast rule, shared weights, untraceable stages --------------
class GatedStage(nn.Module):
    """Ops the engine has no rule for: sigmoid gating (a product), a scalar multiply."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, groups=c)  # depthwise: no fast rule
        self.gate = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return self.conv(x) * torch.sigmoid(self.gate(x)) * 0.5 + x


class SharedStage(nn.Module):
    """One linear layer applied twice (a parameter with two uses)."""

    def __init__(self, f):
        super().__init__()
        self.lin = nn.Linear(f, f)

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


class DataDependentStage(nn.Module):
    """Python control flow on values: torch.fx cannot trace it (opaque stage)."""

    def __init__(self, f):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(f))

    def forward(self, x):
        if float(x.sum()) > 1e6:  # never true here; just untraceable
            return x
        return x * self.scale


class OddModel(StagedModel):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
            GatedStage(4),
            nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten()),
            SharedStage(16),
            DataDependentStage(16),
            nn.Linear(16, 5),
        )


def test_fallback_paths_are_exact():
    torch.manual_seed(8)
    model = OddModel().double().train()
    inputs, targets = _batch((4, 2, 6, 6), n_classes=5, seed=8)
    coords = _coords_everywhere(SparseCGEEngine(model, F.cross_entropy).view, 60, seed=8)
    engine = _assert_matches_naive(model, inputs, targets, coords, rel_tol=1e-8)
    assert engine.stats["slow_path_queries"] == 0  # the untraceable stage is one opaque node
    assert engine.stats["module_rerun_queries"] > 0 and engine.stats["looped_ops"] > 0
    # declaring the opaque stage per-sample batches it over queries: same values, fewer loops
    batched = _assert_matches_naive(
        model, inputs, targets, coords, rel_tol=1e-8, per_sample_modules=(DataDependentStage,)
    )
    assert batched.stats["looped_ops"] < engine.stats["looped_ops"]
    # the same option through ModuleOracle (and a distributed replica's recipe keeps it)
    oracle = ModuleOracle(model, F.cross_entropy, per_sample_modules=(DataDependentStage,))
    assert oracle.engine.per_sample_modules == (DataDependentStage,)
    oracle.set_batch(inputs, targets)
    x = oracle.view.flatten()
    want = batched.coordinate_values(x, coords, MU, inputs, targets)
    torch.testing.assert_close(oracle.eval_coordinate_steps(x, coords, MU), want)
    plain = ModuleOracle(model, F.cross_entropy, inputs, targets)
    torch.testing.assert_close(plain.eval_coordinate_steps(x, coords, MU), want)
    assert oracle.engine.stats["looped_ops"] < plain.engine.stats["looped_ops"]


# -- ModuleOracle ------------------------------------------------------------------------
def _oracle(**kwargs):
    torch.manual_seed(9)
    model = SmallCNN().double().train()
    inputs, targets = _batch((16, 1, 8, 8), seed=9)
    return ModuleOracle(model, F.cross_entropy, inputs, targets, **kwargs)


def test_oracle_counts_queries_and_enforces_budget():
    oracle = _oracle(max_queries=10)
    x = oracle.view.flatten()
    values = oracle.eval_coordinate_steps(x, np.array([0, 5, 100, 3000]), MU)
    assert values.shape == (4,) and oracle.queries == 4
    with pytest.raises(BudgetExceeded) as info:
        oracle.eval_coordinate_steps(x, np.arange(7), MU)
    assert oracle.queries == 4  # refused before evaluating anything
    assert info.value.best_f == pytest.approx(float(values.min()))
    oracle.eval_coordinate_steps(x, np.arange(6), MU)
    assert oracle.remaining == 0


def test_oracle_values_match_base_class_path():
    fast, slow = _oracle(), _oracle(engine=False)
    x = fast.view.flatten()
    coords = np.array([0, 17, 72, 1000, 3841])
    a = fast.eval_coordinate_steps(x, coords, -MU)
    b = slow.eval_coordinate_steps(x, coords, -MU)
    assert torch.allclose(a, b, rtol=0, atol=1e-12)
    assert fast.queries == slow.queries == 5
    # best point tracking sees the perturbed point of the smallest value
    i = int(torch.argmin(a))
    expect = x.clone()
    expect[coords[i]] += -MU
    assert torch.equal(fast.best_x, expect)


def test_trainer_flow_base_value_then_sparse_cge():
    """``base_value`` updates running stats once; CGE queries reuse its cache, touch nothing."""
    fast, slow = _oracle(), _oracle(engine=False)
    x = fast.view.flatten()
    coords = np.random.default_rng(0).choice(fast.dim, size=200, replace=False)
    bn = fast.module.body[0][1]
    tracked = int(bn.num_batches_tracked)
    fx = fast.base_value(x)
    assert int(bn.num_batches_tracked) == tracked + 1  # the one stat-updating forward
    stats_after_base = [b.clone() for b in fast.module.buffers()]
    est = CGE(mu=MU).estimate(fast, x, fx=fx, coords=coords)
    assert all(
        torch.equal(a, b) for a, b in zip(stats_after_base, fast.module.buffers(), strict=True)
    )
    assert fast.engine.stats["cache_builds"] == 1  # base_value's forward served the queries
    ref = CGE(mu=MU).estimate(slow, x, fx=slow.base_value(x), coords=coords)
    assert torch.allclose(est.grad, ref.grad, rtol=0, atol=1e-8)
    assert fast.queries == slow.queries == 201
    central = CGE(mu=MU, scheme="central").estimate(fast, x, coords=coords)
    assert torch.allclose(central.grad[coords], ref.grad[coords], atol=1e-2)


def test_cache_follows_x_batch_and_mode():
    oracle = _oracle()
    x = oracle.view.flatten()
    coords = np.array([1, 500, 3000])
    first = oracle.eval_coordinate_steps(x, coords, MU)
    oracle.eval_coordinate_steps(x, coords, -MU)  # same step: cached
    assert oracle.engine.stats["cache_builds"] == 1
    x2 = x.clone()
    x2[7] += 0.1
    oracle.eval_coordinate_steps(x2, coords, MU)
    inputs, targets = _batch((16, 1, 8, 8), seed=10)
    oracle.set_batch(inputs, targets)
    other_batch = oracle.eval_coordinate_steps(x, coords, MU)
    oracle.module.eval()
    oracle.eval_coordinate_steps(x, coords, MU)
    assert oracle.engine.stats["cache_builds"] == 4
    assert not torch.allclose(first, other_batch)


def test_oracle_loss_and_grad_matches_central_differences():
    oracle = _oracle()
    x = oracle.view.flatten()
    loss, grad = oracle.loss_and_grad(x, update_stats=False)
    assert grad.shape == (oracle.dim,) and loss == pytest.approx(float(oracle(x)))
    coords = np.array([3, 80, 1200, 3841])
    est = CGE(mu=1e-5, scheme="central").estimate(oracle, x, coords=coords)
    assert torch.allclose(est.grad[coords], grad[coords], atol=1e-6)


def test_oracle_error_policies():
    class Fragile(StagedModel):
        """Raises when its scale parameter is large: only some queries fail."""

        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), Guard())

    class Guard(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3, dtype=torch.float64))

        def forward(self, x):
            if float(self.scale.max()) > 5:
                raise RuntimeError("scale too large")
            return x * self.scale

    model = Fragile().double()
    inputs, targets = _batch((4, 1, 2, 2), n_classes=3)
    x = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    coords = np.array([0, 15, 16])  # 15, 16: Guard.scale entries
    raising = ModuleOracle(model, F.cross_entropy, inputs, targets)
    with pytest.raises(OracleError, match="scale too large"):
        raising.eval_coordinate_steps(x, coords, 10.0)
    lenient = ModuleOracle(
        model, F.cross_entropy, inputs, targets, on_error="inf", on_nonfinite="inf"
    )
    values = lenient.eval_coordinate_steps(x, coords, 10.0)
    assert np.isfinite(float(values[0])) and torch.isinf(values[1:]).all()
    assert lenient.queries == 3


def test_bad_input_errors():
    oracle = _oracle()
    x = oracle.view.flatten()
    with pytest.raises(ValueError, match="out of range"):
        oracle.eval_coordinate_steps(x, np.array([oracle.dim]), MU)
    with pytest.raises(TypeError, match="integers"):
        oracle.eval_coordinate_steps(x, np.array([0.5]), MU)
    with pytest.raises(ValueError, match="shape"):
        oracle.eval_coordinate_steps(x[:-1], np.array([0]), MU)
    assert oracle.queries == 0
    empty = ModuleOracle(SmallCNN(), F.cross_entropy)
    with pytest.raises(ValueError, match="set_batch"):
        empty.base_value(empty.view.flatten())
    with pytest.raises(ValueError, match="batch size"):
        empty.set_batch(torch.zeros(3, 1, 8, 8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="callable"):
        ModuleOracle(SmallCNN(), "cross_entropy")
    with pytest.raises(ValueError, match="memory_format"):
        SparseCGEEngine(SmallCNN(), F.cross_entropy, memory_format="nhwc")
