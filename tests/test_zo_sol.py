"""Solver-in-the-loop: oracles, tasks, Trainer runs and the Fig. 6 application (real PhiFlow).

Tiny grids (coarse 8x16, reference 16x32 after 20 warm-up steps) keep every solver call to a
few milliseconds; each new batch size costs one jit trace (~1 s).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

pytest.importorskip("phi", reason="needs phiflow (pip install deepzero[phiflow])")
torch = pytest.importorskip("torch")

from applications.sol.config import RunOptions, SolSettings  # noqa: E402
from applications.sol.data import Trajectories, one_step_pairs  # noqa: E402
from applications.sol.model import CorrectionCNN, Normalization  # noqa: E402
from applications.sol.oracle import (  # noqa: E402
    SolverInTheLoopOracle,
    SupervisedCorrectionOracle,
)
from applications.sol.rollout import corrected_rollout, rollout_mae  # noqa: E402
from applications.sol.tasks import SolverInTheLoopTask, SupervisedCorrectionTask  # noqa: E402
from oracles.wake_flow import WakeFlowSimulator, reference_trajectories  # noqa: E402
from zoopt import CGE, OracleError  # noqa: E402
from zoopt import sparsity as sp  # noqa: E402
from zoopt.oracle import DifferentiableOracle, TrainableOracle  # noqa: E402
from zoopt.torch.train import TrainConfig, Trainer  # noqa: E402

COARSE, FINE = (8, 16), (16, 32)
TRAIN_RE, TEST_RE = (100.0, 400.0), (200.0,)
FRAMES, WARMUP = 8, 20
pytestmark = [
    pytest.mark.filterwarnings("ignore:Sparse:UserWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*should not be instantiated:DeprecationWarning"),
]


class RecordingSimulator(WakeFlowSimulator):
    """The real simulator, recording how it is called (which path, input types, autograd)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_calls: list[dict] = []
        self.step_torch_calls = 0

    def step(self, states, corrections=None, *, reynolds=None):
        self.step_calls.append(
            {
                "batch": len(states),
                "numpy": isinstance(states, np.ndarray)
                and (corrections is None or isinstance(corrections, np.ndarray)),
                "grad_enabled": torch.is_grad_enabled(),
            }
        )
        return super().step(states, corrections, reynolds=reynolds)

    def step_torch(self, states, corrections=None, *, reynolds=None):
        self.step_torch_calls += 1
        return super().step_torch(states, corrections, reynolds=reynolds)


class FailingSimulator(WakeFlowSimulator):
    """The real simulator whose black-box step fails, as a diverged pressure solve would."""

    def step(self, states, corrections=None, *, reynolds=None):
        raise FloatingPointError("pressure solve diverged")


class NumpyOnlySolver:
    """Only the black box: the real simulator's numpy ``step``, no ``step_torch``."""

    def __init__(self, sim: WakeFlowSimulator):
        self._sim = sim

    def step(self, states, corrections=None, *, reynolds=None):
        return self._sim.step(states, corrections, reynolds=reynolds)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("wake_cache")


@pytest.fixture(scope="module")
def data(cache_dir) -> tuple[Trajectories, Trajectories]:
    frames = reference_trajectories(
        COARSE, TRAIN_RE + TEST_RE, FRAMES, fine_res=FINE, warmup_steps=WARMUP, cache_dir=cache_dir
    )
    n = len(TRAIN_RE)
    return Trajectories(frames[:n], np.array(TRAIN_RE)), Trajectories(frames[n:], np.array(TEST_RE))


@pytest.fixture(scope="module")
def sim() -> RecordingSimulator:
    return RecordingSimulator(COARSE)


@pytest.fixture(scope="module")
def pairs(sim, data):
    return one_step_pairs(sim, data[0])


@pytest.fixture(scope="module")
def normalization(data, pairs) -> Normalization:
    return Normalization.fit(data[0].frames, data[0].reynolds, pairs[2] - pairs[0])


def make_model(normalization: Normalization, seed: int = 0) -> CorrectionCNN:
    torch.manual_seed(seed)
    return CorrectionCNN(normalization, width=4, depth=2, kernel_size=3, final_gain=1.0)


def sol_task(sim, data, normalization, **kw) -> SolverInTheLoopTask:
    train, test = data
    return SolverInTheLoopTask(
        make_model(normalization), sim, train, test, n_steps=3, batch_size=2, **kw
    )


def random_points(x: torch.Tensor, n: int, scale: float = 0.05, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return x[None] + scale * torch.randn(n, x.numel(), generator=g)


# -- data and the network -----------------------------------------------------------------
def test_one_step_pairs_are_plain_coarse_steps_from_the_reference(sim, data, pairs):
    train = data[0]
    inputs, reynolds, targets = pairs
    t = train.n_steps
    assert inputs.shape == targets.shape == (train.n_sims * t, 2, *COARSE)
    np.testing.assert_array_equal(reynolds, np.repeat(train.reynolds, t))
    np.testing.assert_array_equal(targets[:t], train.frames[0, 1:])
    k = 3
    expected = sim.step(train.frames[1, k - 1 : k], reynolds=train.reynolds[1])
    np.testing.assert_allclose(inputs[t + k - 1], expected[0], atol=1e-4)


def test_rollout_without_network_is_the_plain_solver(sim, data):
    test = data[1]
    ours = corrected_rollout(None, sim, test.frames[:, 0], test.reynolds, 4)
    plain = sim.rollout(test.frames[:, 0], 4, reynolds=test.reynolds)
    np.testing.assert_array_equal(ours, plain)
    mae = rollout_mae(None, sim, test, 4)
    expected = np.abs(plain[:, 1:].astype(np.float64) - test.frames[:, 1:5]).mean()
    assert mae.shape == (1,) and mae[0] == pytest.approx(expected, rel=1e-12)


def test_network_shapes_wall_row_and_parameter_count(normalization):
    model = CorrectionCNN(normalization)  # the documented default: 2,618 parameters
    assert sum(p.numel() for p in model.parameters()) == 2618
    states = torch.randn(3, 2, *COARSE)
    out = model(states, torch.tensor([100.0, 200.0, 400.0]))
    assert out.shape == (3, 2, *COARSE)
    assert torch.all(out[:, 1, -1, :] == 0)  # the top wall row of u_y
    assert torch.any(out[:, 1, :-1, :] != 0)


@settings(max_examples=25, deadline=None)
@given(
    states=arrays(np.float64, (3, 2, 4, 5), elements=st.floats(-3, 3)),
    corrections=arrays(np.float64, (3, 2, 4, 5), elements=st.floats(-1, 1)),
    scale=st.floats(0.1, 10),
)
def test_normalization_standardizes_and_scales(states, corrections, scale):
    corrections[0, :, 0, 0] = 0.5  # every channel has a non-zero correction
    states[0, :, 0, 0] += 7.0  # and a non-constant state
    n = Normalization.fit(states, [100.0, 400.0], corrections)
    flat = np.moveaxis(states, 1, 0).reshape(2, -1)
    standardized = (flat - np.array(n.velocity_mean)[:, None]) / np.array(n.velocity_std)[:, None]
    np.testing.assert_allclose(standardized.mean(axis=1), 0.0, atol=1e-9)
    np.testing.assert_allclose(standardized.std(axis=1), 1.0, rtol=1e-6)
    rms = np.sqrt((np.moveaxis(corrections, 1, 0).reshape(2, -1) ** 2).mean(axis=1))
    np.testing.assert_allclose(n.correction_std, rms, rtol=1e-12)
    scaled = Normalization.fit(states, [100.0, 400.0], scale * corrections)
    np.testing.assert_allclose(scaled.correction_std, scale * rms, rtol=1e-9)
    assert n.log_re_mean == pytest.approx(np.log([100.0, 400.0]).mean())


# -- the oracles ----------------------------------------------------------------------------
@pytest.mark.parametrize("vectorize", [False, True])
def test_batched_queries_equal_queries_one_by_one(sim, data, normalization, vectorize):
    task = sol_task(sim, data, normalization, vectorize=vectorize)
    oracle = task.oracle
    oracle.set_batch(*task.window_batch(np.array([0, 4])))
    X = random_points(task.parameters_vector(), 5)
    batched = oracle.batch(X).numpy()
    single = np.array([oracle.batch(X[i : i + 1]).numpy()[0] for i in range(5)])
    assert oracle.queries == 10
    assert len(np.unique(batched)) == 5  # the queries really differ
    if not vectorize:
        # each network runs exactly as alone, and the solver batch equals its members alone
        np.testing.assert_array_equal(batched, single)
    else:
        # vmap's grouped convolutions round differently (~1e-9); where that moves a pressure
        # solve across a CG stopping iteration the loss moves by up to ~1e-5 (relative)
        np.testing.assert_allclose(batched, single, rtol=1e-4)


def test_supervised_batched_queries_equal_one_by_one(normalization, pairs):
    model = make_model(normalization)
    oracle = SupervisedCorrectionOracle(model)
    oracle.set_batch(pairs[0][:6], pairs[1][:6], pairs[2][:6])
    X = random_points(oracle.view.flatten(), 4)
    batched = oracle.batch(X).numpy()
    single = np.array([oracle.batch(X[i : i + 1]).numpy()[0] for i in range(4)])
    np.testing.assert_allclose(batched, single, rtol=1e-5)
    with oracle.view.loaded(X[2]):
        f = torch.from_numpy(pairs[0][:6])
        pred = f + model(f, torch.from_numpy(pairs[1][:6]).float())
    err = (pred.double() - torch.from_numpy(pairs[2][:6]).double()) / model.correction_std.double()
    assert batched[2] == pytest.approx(float((err**2).mean()), rel=1e-5)


def test_coordinate_queries_are_one_solver_batch_per_unrolled_step(sim, data, normalization):
    task = sol_task(sim, data, normalization)
    oracle = task.oracle
    oracle.set_batch(*task.window_batch(np.array([1, 2])))
    x = task.parameters_vector()
    coords = np.array([0, 3, 17, 40, x.numel() - 1])
    sim.step_calls.clear()
    values = oracle.eval_coordinate_steps(x, coords, 0.01).numpy()
    assert [c["batch"] for c in sim.step_calls] == [len(coords) * 2] * 3  # k queries x B windows
    points = x[None].repeat(len(coords), 1)
    points[np.arange(len(coords)), coords] += 0.01
    np.testing.assert_array_equal(values, oracle.batch(points).numpy())
    assert oracle.queries == 2 * len(coords)


def test_black_box_is_queried_without_autograd(sim, data, normalization, tmp_path):
    task = sol_task(sim, data, normalization)
    sim.step_calls.clear()
    sim.step_torch_calls = 0
    cfg = TrainConfig(
        method="deepzero", epochs=1, max_steps_per_epoch=1, sparsity=0.9, grasp_q=3,
        progress=False, plots=False, lr=0.01,
    )  # fmt: skip
    Trainer(task, cfg, tmp_path).fit()
    assert sim.step_torch_calls == 0
    assert sim.step_calls and all(c["numpy"] for c in sim.step_calls)
    assert not any(c["grad_enabled"] for c in sim.step_calls)
    # and the first-order path does go through the differentiable solver
    task.oracle.set_batch(*task.window_batch(np.array([0])))
    task.oracle.loss_and_grad(task.parameters_vector())
    assert sim.step_torch_calls == 3


def test_zo_gradient_matches_autograd_through_the_solver(sim, data, normalization):
    task = sol_task(sim, data, normalization)
    oracle = task.oracle
    oracle.set_batch(*task.window_batch(np.array([0, 3])))
    x = task.parameters_vector()
    loss, grad = oracle.loss_and_grad(x)
    assert loss == pytest.approx(oracle.base_value(x), rel=1e-5)
    coords = np.arange(0, x.numel(), 5)
    zo = CGE(mu=1e-2, scheme="central").estimate(oracle, x, coords=coords).grad
    a, b = zo[coords].numpy(), grad[coords].numpy()
    cosine = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    assert cosine > 0.999
    assert np.linalg.norm(a) == pytest.approx(np.linalg.norm(b), rel=0.02)
    # a small step against the estimate lowers the loss on this batch
    step = 0.02 / np.linalg.norm(a)
    assert oracle.base_value(x - step * zo) < oracle.base_value(x)


def test_training_loss_is_the_mean_loss_over_the_whole_training_set(
    sim, data, normalization, pairs
):
    sol = sol_task(sim, data, normalization)
    full = sol.training_loss()
    assert sol.oracle.queries == 0  # a diagnostic, not a query
    x = sol.parameters_vector()
    per_window = []
    for i in range(len(sol.windows)):
        sol.oracle.set_batch(*sol.window_batch(np.array([i])))
        per_window.append(sol.oracle.base_value(x))
    assert len(per_window) == 2 * (FRAMES - 3 + 1)
    assert full == pytest.approx(np.mean(per_window), rel=1e-4)  # batched CG: see above

    non = SupervisedCorrectionTask(make_model(normalization), pairs, sim, data[1])
    inputs, reynolds, targets = (torch.from_numpy(a) for a in pairs)
    with torch.no_grad():
        pred = inputs + non.model(inputs, reynolds.float())
    err = (pred.double() - targets.double()) / non.model.correction_std.double()
    assert non.training_loss() == pytest.approx(float((err**2).mean()), rel=1e-6)


def test_oracles_reject_bad_input(sim, data, normalization):
    model = make_model(normalization)
    oracle = SolverInTheLoopOracle(model, sim)
    x = oracle.view.flatten()
    with pytest.raises(ValueError, match="no batch"):
        oracle.base_value(x)
    train = data[0]
    start, targets = train.frames[:, 0], train.frames[:, 1:4]
    with pytest.raises(ValueError, match="reynolds has 1 values"):
        oracle.set_batch(start, [100.0], targets)
    with pytest.raises(ValueError, match="do not match"):
        oracle.set_batch(start, train.reynolds, targets[:1])
    bad = start.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        oracle.set_batch(bad, train.reynolds, targets)
    with pytest.raises(TypeError, match="step"):
        SolverInTheLoopOracle(model, object())
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        CorrectionCNN(normalization, kernel_size=4)
    with pytest.raises(ValueError, match="frames must have shape"):
        Trajectories(np.zeros((2, 5, 3, 4, 4)), [100.0, 200.0])
    with pytest.raises(ValueError, match="n_steps=9 exceeds"):
        SolverInTheLoopTask(model, sim, train, data[1], n_steps=9)
    with pytest.raises(TypeError, match="correction_std"):
        SolverInTheLoopOracle(torch.nn.Conv2d(2, 2, 3), sim)
    oracle.set_batch(start, train.reynolds, targets)
    with pytest.raises(ValueError, match=f"coords index {x.numel()} out of range for dim="):
        oracle.eval_coordinate_steps(x, np.array([0, x.numel()]), 0.01)
    assert oracle.queries == 0  # refused before anything was charged


def test_oracles_are_trainable_oracles_fed_by_their_tasks_batches(sim, data, normalization, pairs):
    rng = np.random.default_rng(0)
    sol = sol_task(sim, data, normalization)
    non = SupervisedCorrectionTask(make_model(normalization), pairs, sim, data[1], batch_size=3)
    for task in (sol, non):
        oracle = task.oracle
        assert isinstance(oracle, TrainableOracle)
        assert isinstance(oracle, DifferentiableOracle)
        batch = next(task.train_batches(0, rng))
        oracle.set_batch(*batch)
        x = task.parameters_vector()
        value = oracle.base_value(x)
        assert np.isfinite(value) and oracle.queries == 1
        assert oracle.batch(x[None]).numpy()[0] == value  # base_value is one ordinary query
        loss, grad = oracle.loss_and_grad(x, update_stats=False)
        assert loss == pytest.approx(value, rel=1e-5) and grad.shape == x.shape
        assert oracle.queries == 2  # the gradient costs no query


def test_failing_solver_raises_oracle_error_naming_the_queries(sim, data, normalization):
    train = data[0]
    batch = (train.frames[:, 0], train.reynolds, train.frames[:, 1:3])
    failing = FailingSimulator(COARSE)
    oracle = SolverInTheLoopOracle(make_model(normalization), failing, on_error="raise")
    oracle.set_batch(*batch)
    x = oracle.view.flatten()
    with pytest.raises(OracleError, match=r"queries 0\.\.0 \(FloatingPointError: pressure"):
        oracle.base_value(x)
    with pytest.raises(OracleError, match=r"queries 1\.\.3 \(FloatingPointError"):
        oracle.eval_coordinate_steps(x, np.array([0, 5, 9]), 0.01)
    assert oracle.queries == 4  # the failed queries were spent
    # the whole-training-set diagnostic is evaluated under the same policy
    task = SolverInTheLoopTask(make_model(normalization), failing, train, data[1], n_steps=2)
    with pytest.raises(OracleError, match="FloatingPointError"):
        task.training_loss()
    # on_error="inf": the failed queries are +inf, training can go on
    tolerant = SolverInTheLoopOracle(make_model(normalization), failing, on_error="inf")
    tolerant.set_batch(*batch)
    assert tolerant.base_value(x) == np.inf
    assert np.all(np.isinf(tolerant.eval_coordinate_steps(x, np.array([0, 5]), 0.01).numpy()))
    # and the working solver gives a finite value on the same batch
    working = SolverInTheLoopOracle(make_model(normalization), sim, on_error="raise")
    working.set_batch(*batch)
    assert np.isfinite(working.base_value(x))


def test_zo_needs_only_the_black_box_step(sim, data, normalization):
    train = data[0]
    batch = (train.frames[:, 0], train.reynolds, train.frames[:, 1:3])
    black_box = SolverInTheLoopOracle(make_model(normalization), NumpyOnlySolver(sim))
    full = SolverInTheLoopOracle(make_model(normalization), sim)
    for oracle in (black_box, full):
        oracle.set_batch(*batch)
    x = full.view.flatten()
    assert black_box.base_value(x) == full.base_value(x)
    with pytest.raises(TypeError, match="step_torch"):
        black_box.loss_and_grad(x)


# -- through the Trainer --------------------------------------------------------------------
@pytest.mark.parametrize("method", ["NON", "FO-SOL", "ZO-SOL"])
def test_each_method_trains_through_the_trainer(sim, data, normalization, pairs, tmp_path, method):
    train, test = data
    model = make_model(normalization)
    if method == "NON":
        task = SupervisedCorrectionTask(model, pairs, sim, test, batch_size=4)
    else:
        task = SolverInTheLoopTask(model, sim, train, test, n_steps=3, batch_size=1)
    x0 = task.parameters_vector()
    cfg = TrainConfig(
        method="deepzero" if method == "ZO-SOL" else "fo", epochs=2, max_steps_per_epoch=2,
        lr=0.01, sparsity=0.95, grasp_q=3, reshuffle_every=1, progress=False, plots=False,
    )  # fmt: skip
    summary = Trainer(task, cfg, tmp_path).fit()
    assert summary["steps"] == 4 and summary["finished"]
    assert np.isfinite(summary["test_mae"]) and summary["test_mae"] > 0
    assert not torch.equal(task.parameters_vector(), x0)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and all("test_mae" in r for r in rows)
    if method == "ZO-SOL":
        per_step = 1 + sum(
            sp.kept_count(summary["keep_ratios"][g.name], g.size) for g in task.groups
        )
        assert per_step < 0.15 * task.oracle.dim  # 95% of the weights are not estimated
        assert summary["queries"] == 4 * per_step + 2 * (3 + 1)  # + the ZO-GraSP scoring
        assert len(task.oracle.seconds["coordinate_steps"]) == 4
    else:
        assert summary["queries"] == 0 and task.oracle.grad_evaluations == 4


def test_resume_restores_parameters_and_normalization(sim, data, normalization, pairs, tmp_path):
    test = data[1]
    cfg = TrainConfig(
        method="fo", epochs=1, max_steps_per_epoch=2, lr=0.01, progress=False, plots=False
    )
    first = SupervisedCorrectionTask(make_model(normalization), pairs, sim, test, batch_size=4)
    Trainer(first, cfg, tmp_path).fit()
    # a different network: other initial weights and another correction scale
    other = Normalization(**{**normalization.as_dict(), "correction_std": (1.0, 1.0)})
    second = SupervisedCorrectionTask(make_model(other, seed=1), pairs, sim, test, batch_size=4)
    Trainer(second, cfg, tmp_path, resume=True)
    assert torch.equal(second.parameters_vector(), first.parameters_vector())
    for name, value in first.model.named_buffers():
        assert torch.equal(dict(second.model.named_buffers())[name], value)
    # the loss is scaled by the restored buffer, not by the one the oracle was built with
    first.oracle.set_batch(*pairs)
    second.oracle.set_batch(*pairs)
    x = first.parameters_vector()
    assert second.oracle.base_value(x) == pytest.approx(first.oracle.base_value(x), rel=1e-12)
    with pytest.raises(KeyError, match="not in the model"):
        second.load_buffers_state({"no_such_buffer": torch.zeros(1)})


# -- the application ------------------------------------------------------------------------
def test_application_writes_mae_json_and_figures(cache_dir, tmp_path):
    from applications import zo_sol

    out = tmp_path / "run"
    argv = [
        "--out", str(out), "--res", "8x16", "--fine-res", "16x32", "--warmup", str(WARMUP),
        "--frames", "6", "--n-steps", "2", "--train-re", *map(str, TRAIN_RE),
        "--test-re", "200", "300", "--steps", "2", "--steps-per-epoch", "1",
        "--width", "4", "--depth", "2", "--grasp-q", "3", "--cache-dir", str(cache_dir),
        "--no-progress",
    ]  # fmt: skip
    assert zo_sol.main(argv) == 0
    result = json.loads((out / "mae.json").read_text())
    assert list(result["mae"]) == ["SRC", "NON", "FO-SOL", "ZO-SOL"]
    for method, values in result["per_simulation"].items():
        assert len(values) == 2 and all(v > 0 for v in values)
        assert result["mae"][method] == pytest.approx(np.mean(values))
    assert result["test_reynolds"] == [200.0, 300.0]
    assert result["zo_seconds_per_step"]["mean"] > 0
    assert result["zo_queries"] == 2 * result["zo_queries_per_step"] + 2 * (3 + 1)
    assert result["settings"]["sparsity"] == 0.95
    for method in ("NON", "FO-SOL", "ZO-SOL"):
        assert result["methods"][method]["steps"] == 2
        assert np.isfinite(result["methods"][method]["train_loss"])
    for name in ("mae.png", "vorticity.png", "zo-sol/summary.json", "fo-sol/checkpoint.pt"):
        assert (out / name).stat().st_size > 0


def test_application_rejects_test_re_in_training_set():
    with pytest.raises(ValueError, match=r"test Reynolds numbers \[100.0\]"):
        SolSettings(test_reynolds=(100.0, 150.0))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"frames": 0}, "frames must be a positive int, got 0"),
        ({"n_steps": 101}, "n_steps=101 exceeds frames=100"),
        ({"eval_steps": 101}, r"eval_steps must be in \[1, frames=100\], got 101"),
        ({"kernel_size": 4}, "kernel_size must be odd"),
        ({"depth": 1}, "depth must be >= 2, got 1"),
        ({"res": (16, 0)}, r"res must be a pair \(H, W\) of positive ints, got \(16, 0\)"),
        ({"train_reynolds": (100.0, -1.0)}, r"train_reynolds must be .*got \(100.0, -1.0\)"),
        ({"methods": ("SRC", "XYZ")}, "methods must be a non-empty subset"),
        ({"lr": {"NON": 0.1, "FO-SOL": 0.003}}, r"lr has no learning rate for \['ZO-SOL'\]"),
        ({"lr": {"NON": 0.1, "FO-SOL": -1.0, "ZO-SOL": 0.01}}, "lr must be a finite number"),
        ({"sparsity": 1.0}, r"sparsity must be in \[0, 1\), got 1.0"),
        ({"ratios": "best"}, "ratios must be one of"),
    ],
)
def test_settings_name_the_bad_value(change, message):
    with pytest.raises(ValueError, match=message):
        SolSettings(**change)


def test_settings_are_frozen_and_a_method_not_run_needs_no_lr():
    s = SolSettings()
    with pytest.raises(AttributeError):
        s.steps = 10
    with pytest.raises(TypeError):
        s.lr["ZO-SOL"] = 1.0
    assert s.lr["ZO-SOL"] == 0.01
    only_non = SolSettings(methods=("SRC", "NON"), lr={"NON": 0.05})
    assert only_non.trained_methods == ("NON",)
    assert only_non.train_config("NON", progress=False).lr == 0.05
    as_json = json.loads(json.dumps(s.as_dict()))
    assert as_json["lr"] == {"NON": 0.1, "FO-SOL": 0.003, "ZO-SOL": 0.01}
    assert list(as_json) == [f.name for f in dataclasses.fields(SolSettings)]


def test_cli_maps_flags_onto_settings_and_options():
    from applications.sol.cli import parse_args

    assert parse_args([]) == (SolSettings(), RunOptions())
    settings, options = parse_args(
        ["--res", "8x16", "--lr-zo-sol", "0.02", "--methods", "SRC", "ZO-SOL", "--threads", "2",
         "--no-progress", "--out", "somewhere"]
    )  # fmt: skip
    assert settings == SolSettings(
        res=(8, 16), lr={"NON": 0.1, "FO-SOL": 0.003, "ZO-SOL": 0.02}, methods=("SRC", "ZO-SOL")
    )
    assert options == RunOptions(out=Path("somewhere"), threads=2, progress=False)
    with pytest.raises(ValueError, match="threads must be a positive int, got 0"):
        parse_args(["--threads", "0"])
    with pytest.raises(SystemExit):
        parse_args(["--res", "8by16"])
