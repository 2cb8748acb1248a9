"""The engine on models it was not written for: other people's styles, dropout, in-place
habits, untraceable code, random architectures.

Every check compares the engine with the naive loop (perturb in place, full forward) in
float64, where both must agree to ~1e-9 of the gradient scale.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402

from zoopt import CGE  # noqa: E402
from zoopt.torch import ModuleOracle, SparseCGEEngine, naive_coordinate_values  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from zoo_models import ZOO  # noqa: E402

MU = 5e-3
SEED = 7  # torch seed of the unperturbed forward and of every naive forward (dropout masks)


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _batch(shape, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(*shape, generator=g, dtype=torch.float64)
    return inputs, torch.randint(0, classes, (shape[0],), generator=g)


def _coords(dim, groups, n, seed=0):
    """One coordinate of every parameter tensor plus ``n`` random ones."""
    rng = np.random.default_rng(seed)
    first = [rng.integers(g.start, g.stop) for g in groups]
    extra = rng.choice(dim, size=min(n, dim), replace=False)
    return np.unique(np.concatenate([first, extra]))


def assert_engine_exact(model, inputs, targets, coords=None, rel_tol=1e-8, **options):
    """Engine == float64 naive loop on forward differences; returns the engine."""
    engine = SparseCGEEngine(model, F.cross_entropy, **options)
    x = engine.view.flatten()
    if coords is None:
        coords = _coords(engine.view.dim, engine.view.groups, 40)
    buffers = [b.clone() for b in model.buffers()]
    torch.manual_seed(SEED)
    base = engine.base_forward(x, inputs, targets)
    want_base = float(
        naive_coordinate_values(model, F.cross_entropy, x, [0], 0.0, inputs, targets, seed=SEED)[0]
    )
    assert base == pytest.approx(want_base, rel=1e-10, abs=1e-12)
    got = engine.coordinate_values(x, coords, MU, inputs, targets)
    want = naive_coordinate_values(
        model, F.cross_entropy, x, coords, MU, inputs, targets, seed=SEED
    )
    g_got, g_want = (got - base) / MU, (want - want_base) / MU
    scale = float(g_want.abs().max())
    assert scale > 0
    err = float((g_got - g_want).abs().max())
    assert err <= rel_tol * scale, f"max gradient difference {err:.3g} vs scale {scale:.3g}"
    assert torch.equal(engine.view.flatten(), x)  # parameters untouched
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers(), strict=True))
    return engine


# -- other people's styles -------------------------------------------------------------
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_in_training_mode_matches_the_naive_loop(name):
    entry = ZOO[name]
    torch.manual_seed(0)
    model = entry.small().double().train()
    inputs, targets = _batch((3, *entry.small_input_shape), entry.num_classes)
    engine = assert_engine_exact(model, inputs, targets)
    stats = engine.stats
    assert stats["slow_path_queries"] == 0 and stats["fallback_groups"] == 0
    assert stats["looped_ops"] == 0  # every op of these styles is batched
    assert engine.graph_kind == ("chain" if entry.kind == "untraceable" else "traced")


@pytest.mark.parametrize("name", ["kuangliu_resnet18", "mobilenet_v2", "vit_tiny_mha"])
def test_zoo_model_in_eval_mode_matches_the_naive_loop(name):
    entry = ZOO[name]
    torch.manual_seed(1)
    model = entry.small().double()
    with torch.no_grad():  # non-trivial running statistics
        model.train()(torch.randn(8, *entry.small_input_shape, dtype=torch.float64))
    model.eval()
    inputs, targets = _batch((2, *entry.small_input_shape), seed=2)
    assert_engine_exact(model, inputs, targets)


def test_channels_last_and_contiguous_layouts_agree_on_a_user_model():
    torch.manual_seed(3)
    model = ZOO["akamaster_resnet20"].small().double().train()
    inputs, targets = _batch((2, 3, 16, 16))
    for fmt in ("channels_last", "contiguous"):
        assert_engine_exact(model, inputs, targets, memory_format=fmt)


# -- dropout ---------------------------------------------------------------------------
class DropPath(nn.Module):
    """Stochastic depth as timm writes it: a per-sample Bernoulli mask from ``new_empty``."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class NoisyOpaque(nn.Module):
    """Untraceable (value-dependent branch) and random inside: reused as one opaque node."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x):
        if float(x.detach().abs().max()) > 1e9:
            return x
        return F.dropout(self.conv(x), 0.3, self.training)


class Stochastic(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.drop2d = nn.Dropout2d(0.25)
        self.path = DropPath(0.3)
        self.noisy = NoisyOpaque(6)
        self.fc1 = nn.Linear(6 * 4 * 4, 12)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(12, 5)

    def forward(self, x):
        x = F.relu(self.drop2d(self.conv(x)))
        x = x + self.path(x)
        x = self.noisy(x)
        x = F.dropout(torch.flatten(x, 1), 0.2, self.training)
        return self.fc2(self.drop(F.relu(self.fc1(x))))


def test_dropout_uses_one_mask_for_the_base_forward_and_every_query():
    torch.manual_seed(4)
    model = Stochastic().double().train()
    inputs, targets = _batch((6, 3, 4, 4), 5, seed=4)
    engine = assert_engine_exact(
        model, inputs, targets, coords=np.arange(model.conv.weight.numel() + 200)
    )
    assert engine.stats["slow_path_queries"] == 0
    # other masks give another function: a forward with a fresh draw is far from the base
    x = engine.view.flatten()
    base = engine.base_forward(x, inputs, targets)
    torch.manual_seed(SEED + 1)
    fresh = naive_coordinate_values(model, F.cross_entropy, x, [0], 0.0, inputs, targets)[0]
    assert abs(float(fresh) - base) > 1e-6


def test_module_oracle_seeds_every_forward_of_a_batch_alike():
    """The oracle's f is deterministic per batch, so CGE differences are not dropout noise;
    with or without the engine, and its autograd gradient sees the same masks."""
    torch.manual_seed(5)
    model = Stochastic().double().train()
    inputs, targets = _batch((6, 3, 4, 4), 5, seed=5)
    fast = ModuleOracle(model, F.cross_entropy, inputs, targets)
    slow = ModuleOracle(model, F.cross_entropy, inputs, targets, engine=False)
    x = fast.view.flatten()
    coords = np.arange(0, fast.dim, 7)
    a = fast.eval_coordinate_steps(x, coords, MU)
    b = slow.eval_coordinate_steps(x, coords, MU)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert float(fast(x)) == float(fast(x)) == pytest.approx(float(slow(x)), abs=1e-12)
    _, grad = fast.loss_and_grad(x, update_stats=False)
    est = CGE(mu=1e-6, scheme="central").estimate(fast, x, coords=coords)
    torch.testing.assert_close(est.grad[coords], grad[coords], rtol=1e-5, atol=1e-7)
    # another batch draws other masks
    fast.set_batch(inputs + 0.0, targets)
    assert float(fast(x)) == pytest.approx(float(slow(x)), abs=1e-12)
    fast.set_batch(inputs[:5], targets[:5])
    slow.set_batch(inputs[:5], targets[:5])
    assert float(fast(x)) == pytest.approx(float(slow(x)), abs=1e-12)


# -- in-place ops and aliases -------------------------------------------------------------
class InPlaceReaders(nn.Module):
    """In-place ops whose mutated tensors are read afterwards through their old names."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        out = self.bn(self.conv1(x))
        keep = out  # same tensor: sees every mutation below
        F.relu_(out)  # result unused; ``out`` and ``keep`` are mutated
        out.mul_(0.5)
        y = self.conv2(out)
        y += keep  # mutates y
        y = self.relu(y)
        y.add_(keep.mean())
        return self.fc(y.mean((2, 3)))


class AliasedWrite(nn.Module):
    """An in-place write through a view that is read afterwards: kept opaque, still exact."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.inner = Aliasing()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.inner(self.conv(x)).mean((2, 3)))


class Aliasing(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.full((4,), 2.0))

    def forward(self, x):
        y = x * 1.0
        first = y[:, :2]  # a view of y
        first.mul_(self.scale[:2, None, None])  # writes into y
        return y + first.sum(1, keepdim=True)


def test_in_place_ops_are_exact():
    torch.manual_seed(6)
    inputs, targets = _batch((4, 2, 5, 5), 3, seed=6)
    engine = assert_engine_exact(InPlaceReaders().double().train(), inputs, targets)
    assert engine.graph_kind == "traced" and engine.stats["looped_ops"] == 0
    model = AliasedWrite().double().train()
    engine = assert_engine_exact(model, inputs, targets)
    notes = " ".join(engine._plan.graph.notes)
    assert "Aliasing kept opaque" in notes


# -- code fx cannot trace -----------------------------------------------------------------
class RootWithGlue(nn.Module):
    """Untraceable forward (value-dependent branch) with its own parameter between children."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.gain = nn.Parameter(torch.ones(4, 1, 1))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x):
        x = self.stem(x)
        if float(x.detach().mean()) > 1e6:
            x = x * 0
        return self.head(x * self.gain)


class ShapeChecks(nn.Module):
    """Python control flow on shapes alone (asserts, len, range): traced."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError("want images")
        assert x.shape[1] == 3
        parts = [x[:, :, i : i + 1] for i in range(x.size(2))]
        x = torch.cat(parts, dim=2) * (1.0 / len(parts))
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


def test_value_dependent_root_is_not_traced_but_still_exact():
    torch.manual_seed(8)
    inputs, targets = _batch((3, 2, 4, 4), 3, seed=8)
    engine = assert_engine_exact(RootWithGlue().double().train(), inputs, targets)
    # glue between children (x * gain) breaks the chain: every query reruns the model
    assert engine.graph_kind == "opaque"
    assert engine.stats["slow_path_queries"] == engine.stats["queries"]
    assert "value-dependent" in engine.explain()


def test_shape_dependent_control_flow_is_traced():
    torch.manual_seed(9)
    inputs, targets = _batch((3, 3, 4, 4), 3, seed=9)
    engine = assert_engine_exact(ShapeChecks().double().train(), inputs, targets)
    assert engine.graph_kind == "traced" and engine.stats["slow_path_queries"] == 0


def test_chained_children_reuse_features_and_report_it():
    torch.manual_seed(10)
    entry = ZOO["early_exit_net"]
    model = entry.small().double().train()
    inputs, targets = _batch((3, *entry.small_input_shape), seed=10)
    engine = assert_engine_exact(model, inputs, targets)
    assert engine.graph_kind == "chain"
    text = engine.explain()
    assert "children chained" in text and "control flow" in text


# -- random architectures ------------------------------------------------------------------
ACTIVATIONS = [
    lambda: nn.ReLU(inplace=True), nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish,
    lambda: nn.LeakyReLU(0.1), nn.Tanh,
]  # fmt: skip


class RandomCNN(nn.Module):
    def __init__(self, spec, channels, size=8):
        super().__init__()
        layers, c = [], channels
        for i, (
            kind,
            width,
            kernel,
            stride,
            padding,
            groups,
            norm,
            act,
            pool,
            residual,
        ) in enumerate(spec):
            kind = kind if i == 0 else "zeros"  # reflect padding needs inputs wider than it
            if size < 4:  # keep the maps at least 2 wide
                stride, pool, padding = 1, 0, "same"
            before = size
            if padding != "same":
                size = (size + 2 * padding - kernel) // stride + 1
            conv_keeps_size = size == before
            out = width if groups == 1 else c * (2 if groups == "x2" else 1)
            g = 1 if groups == 1 else c
            if out % g:
                out = c
            conv = nn.Conv2d(c, out, kernel, stride if padding != "same" else 1,
                             padding, groups=g, padding_mode=kind, bias=norm == "none")  # fmt: skip
            block = [conv]
            if norm == "bn":
                block.append(nn.BatchNorm2d(out))
            elif norm == "gn":
                block.append(nn.GroupNorm(1, out))
            block.append(ACTIVATIONS[act]())
            if pool:
                block.append(
                    nn.MaxPool2d(2, ceil_mode=True)
                    if pool == 1
                    else nn.AvgPool2d(2, ceil_mode=True)
                )
            layers.append(
                (nn.Sequential(*block), residual and out == c and conv_keeps_size and not pool)
            )
            size = -(-size // 2) if pool else size
            c = out
        self.blocks = nn.ModuleList([b for b, _ in layers])
        self.residual = [r for _, r in layers]
        self.fc = nn.Linear(c, 4)

    def forward(self, x):
        for block, residual in zip(self.blocks, self.residual, strict=True):
            x = x + block(x) if residual else block(x)
        return self.fc(x.mean((2, 3)))


layer = st.tuples(
    st.sampled_from(["zeros", "zeros", "reflect"]),
    st.integers(2, 5),
    st.sampled_from([1, 3]),
    st.integers(1, 2),
    st.sampled_from([0, 1, "same"]),
    st.sampled_from([1, 1, "depthwise", "x2"]),
    st.sampled_from(["bn", "gn", "none"]),
    st.integers(0, len(ACTIVATIONS) - 1),
    st.integers(0, 2),
    st.booleans(),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    spec=st.lists(layer, min_size=1, max_size=4), seed=st.integers(0, 2**16), train=st.booleans()
)
def test_random_cnns_match_the_naive_loop(spec, seed, train):
    torch.manual_seed(seed)
    model = RandomCNN(spec, 3).double().train(train)
    inputs, targets = _batch((3, 3, 6, 6), 4, seed=seed)
    with torch.no_grad():
        model(inputs)  # running statistics for eval mode
    engine = assert_engine_exact(model, inputs, targets)
    assert engine.graph_kind == "traced"
    assert engine.stats["slow_path_queries"] == 0 and engine.stats["looped_ops"] == 0


# -- what the engine says, frozen parameters, memory ---------------------------------------
def test_explain_names_every_tensor_path_and_cost():
    torch.manual_seed(11)
    model = ZOO["vit_tiny"].small().double().train()
    model.head.weight.requires_grad_(False)
    inputs, targets = _batch((2, 3, 16, 16))
    engine = SparseCGEEngine(model, F.cross_entropy)
    text = engine.explain(inputs)
    rows = engine.plan_rows(inputs)
    assert [r["name"] for r in rows] == [g.name for g in engine.view.groups]
    assert "head.weight" not in [r["name"] for r in rows]
    assert "frozen (requires_grad=False" in text and "head.weight" in text
    assert {r["path"] for r in rows} <= {"fast", "batched"}
    costs = {r["name"]: r["cost_per_query"] for r in rows}
    assert 0 <= costs["head.bias"] < costs["blocks.0.attn.qkv.weight"] <= 1
    assert "cls_token" in text and "batched" in text
    oracle = ModuleOracle(model, F.cross_entropy, inputs, targets)
    assert "the whole forward traced" in oracle.explain()
    with pytest.raises(ValueError, match="needs a batch"):
        SparseCGEEngine(model, F.cross_entropy).explain()


def test_cache_cap_recomputes_instead_of_caching():
    torch.manual_seed(12)
    model = ZOO["kuangliu_resnet18"].small().double().train()
    inputs, targets = _batch((2, 3, 32, 32), seed=12)
    full = assert_engine_exact(model, inputs, targets)
    cap = full.cache_bytes // 4
    capped = assert_engine_exact(model, inputs, targets, max_cache_bytes=cap)
    assert capped.cache_bytes <= cap
    assert capped.stats["recomputed_nodes"] > 0
    with pytest.raises(ValueError, match="max_cache_bytes"):
        SparseCGEEngine(model, F.cross_entropy, max_cache_bytes=-1)
