"""Device paths: the same code on a GPU gives the CPU result and keeps its arrays on the device.

Each test runs twice: on the CPU (numpy / torch-CPU, always) and on the GPU (torch CUDA /
CuPy), the latter marked ``gpu`` and skipped without CUDA (tests/conftest.py). CuPy cases are
also skipped when CuPy is not installed or cannot reach a GPU (``cupy-cuda12x`` installs on
machines without one and raises at first use).
"""

from __future__ import annotations

import numpy as np
import pytest

import zoopt

torch = pytest.importorskip("torch")
F = pytest.importorskip("torch.nn.functional")

ON_CPU_AND_CUDA = pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
)


def _cupy():
    cupy = pytest.importorskip("cupy")
    try:
        available = bool(cupy.is_available())
    except Exception:  # a CUDA runtime that cannot start: same as no GPU
        available = False
    if not available:
        pytest.skip("CuPy cannot reach a GPU")
    return cupy


def _array_module(name: str):
    return np if name == "numpy" else _cupy()


ON_NUMPY_AND_CUPY = pytest.mark.parametrize(
    "xp_name", ["numpy", pytest.param("cupy", marks=pytest.mark.gpu)]
)


def _quadratic_problem(d: int = 50):
    rng = np.random.default_rng(0)
    A = rng.standard_normal((d, d))
    H = A @ A.T / d + np.eye(d)
    return H, rng.standard_normal(d)


def _numpy_quadratic(H):
    return lambda X: 0.5 * np.einsum("ni,ij,nj->n", X, H, X)


ESTIMATORS = pytest.mark.parametrize(
    "estimator",
    [
        zoopt.RGE(q=8, mu=1e-4, scheme="central"),
        zoopt.RGE(q=8, mu=1e-4, dist="rademacher"),
        zoopt.CGE(mu=1e-4, scheme="central"),
    ],
    ids=["rge-central", "rge-rademacher", "cge-central"],
)


@ON_CPU_AND_CUDA
@ESTIMATORS
def test_torch_estimates_stay_on_device_and_match_numpy(device, estimator):
    H, x = _quadratic_problem()
    Ht = torch.as_tensor(H, device=device)
    seen_devices = set()

    def f_torch(X):
        seen_devices.add(X.device.type)
        return 0.5 * torch.einsum("ni,ij,nj->n", X, Ht, X)

    oracle = zoopt.as_oracle(f_torch, dim=x.size, batched=True)
    got = estimator.estimate(oracle, torch.as_tensor(x, device=device), rng=3)
    want = estimator.estimate(zoopt.as_oracle(_numpy_quadratic(H), x.size, batched=True), x, rng=3)
    assert isinstance(got.grad, torch.Tensor) and got.grad.device.type == device
    assert seen_devices == {device}  # every perturbation batch was built on the device
    np.testing.assert_allclose(got.grad.cpu().numpy(), want.grad, rtol=1e-6, atol=1e-8)


@ON_NUMPY_AND_CUPY
@ESTIMATORS
def test_array_module_oracle_gets_its_own_arrays(xp_name, estimator):
    xp = _array_module(xp_name)
    H, x = _quadratic_problem()
    Hx = xp.asarray(H)
    seen_types = set()

    def f(X):
        seen_types.add(type(X).__module__.split(".")[0])
        return 0.5 * xp.einsum("ni,ij,nj->n", X, Hx, X)

    got = estimator.estimate(zoopt.as_oracle(f, dim=x.size, batched=True), xp.asarray(x), rng=5)
    want = estimator.estimate(zoopt.as_oracle(_numpy_quadratic(H), x.size, batched=True), x, rng=5)
    assert type(got.grad).__module__.split(".")[0] == xp_name
    assert seen_types == {xp_name}
    grad = got.grad if xp is np else xp.asnumpy(got.grad)
    np.testing.assert_allclose(grad, want.grad, rtol=1e-6, atol=1e-8)


@ON_NUMPY_AND_CUPY
def test_minimize_keeps_the_array_module(xp_name):
    xp = _array_module(xp_name)
    H, x = _quadratic_problem(20)
    Hx = xp.asarray(H)
    result = zoopt.minimize(
        lambda X: 0.5 * xp.einsum("ni,ij,nj->n", X, Hx, X),
        xp.asarray(x),
        estimator=zoopt.CGE(mu=1e-5, scheme="central"),
        optimizer=zoopt.SGD(lr=0.2),
        maxiter=100,
        batched=True,
    )
    assert type(result.x).__module__.split(".")[0] == xp_name
    assert result.fun < 1e-3 * 0.5 * float(x @ H @ x)


@ON_CPU_AND_CUDA
def test_engine_on_device_matches_the_float64_cpu_naive_loop(device):
    from zoopt.torch.models import ResNet20
    from zoopt.torch.oracle import ModuleOracle

    torch.manual_seed(0)
    reference = ResNet20().double().train()
    model = ResNet20().double().train()
    model.load_state_dict(reference.state_dict())
    model.to(device)
    g = torch.Generator().manual_seed(0)
    inputs, targets = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,))
    naive = ModuleOracle(reference, F.cross_entropy, engine=False)
    fast = ModuleOracle(model, F.cross_entropy)
    naive.set_batch(inputs, targets)
    fast.set_batch(inputs, targets)
    x = naive.view.flatten()
    coords = np.random.default_rng(1).choice(naive.dim, size=120, replace=False)
    est = zoopt.CGE(mu=5e-3)
    want = est.estimate(naive, x, fx=naive.base_value(x), coords=coords).grad
    xd = x.to(device)
    got = est.estimate(fast, xd, fx=fast.base_value(xd), coords=coords).grad
    assert got.device.type == device
    assert fast.engine.stats["slow_path_queries"] == 0
    scale = float(want.abs().max())
    assert scale > 0
    assert float((got.cpu() - want).abs().max()) <= 1e-8 * scale


@ON_CPU_AND_CUDA
def test_trainer_runs_deepzero_on_device(device, tmp_path):
    from zoopt.data import load_digits_split
    from zoopt.torch.models import build_model
    from zoopt.torch.tasks import ClassificationTask
    from zoopt.torch.train import TrainConfig, Trainer

    Xtr, ytr, Xte, yte = load_digits_split()
    torch.manual_seed(0)
    model = build_model("smallcnn", num_classes=10, in_channels=1, image_size=8)
    task = ClassificationTask(model, (Xtr, ytr), (Xte, yte), batch_size=64, device=device)
    config = TrainConfig(method="deepzero", epochs=1, lr=0.05, sparsity=0.9, max_steps_per_epoch=3)
    summary = Trainer(task, config, tmp_path).fit()
    assert next(model.parameters()).device.type == device
    assert summary["steps"] == 3 and summary["queries"] > 0
    assert np.isfinite(summary["test_loss"])
