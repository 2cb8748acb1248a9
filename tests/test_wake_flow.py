"""Tests of the PhiFlow wake-flow black box (real PhiFlow, small grids)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

pytest.importorskip("phi", reason="needs phiflow (pip install deepzero[phiflow])")
torch = pytest.importorskip("torch")

from oracles.wake_flow import (  # noqa: E402
    WakeFlowSetup,
    WakeFlowSimulator,
    default_cache_dir,
    downsample,
    reference_cache_path,
    reference_trajectories,
    reynolds_channel,
    trajectory_mae,
    vorticity,
)

COARSE = (16, 32)
RE = 200.0
# PhiFlow's pressure matrix triggers torch's sparse-CSR beta warnings, and phiml's jit uses
# torch.jit.trace (deprecated in torch 2.13); neither is ours to fix.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Sparse:UserWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*should not be instantiated:DeprecationWarning"),
]


@pytest.fixture(scope="module")
def sim() -> WakeFlowSimulator:
    return WakeFlowSimulator(COARSE, reynolds=RE)


@pytest.fixture(scope="module")
def state(sim: WakeFlowSimulator) -> np.ndarray:
    """A (1, 2, H, W) state a few steps after the impulsive start."""
    return sim.rollout(sim.initial_state(1), 5)[:, -1]


def random_corrections(batch: int, seed: int, scale: float = 0.1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (scale * rng.standard_normal((batch, 2, *COARSE))).astype(np.float32)


def divergence(states: np.ndarray, sim: WakeFlowSimulator) -> np.ndarray:
    """Discrete divergence per cell (B, H, W), with the inflow face u_x = U and wall u_y = 0."""
    dy, dx = sim.spacing
    u_x, u_y = states[:, 0], states[:, 1]
    left = np.concatenate([np.full_like(u_x[:, :, :1], sim.setup.inflow_speed), u_x[:, :, :-1]], 2)
    below = np.concatenate([np.zeros_like(u_y[:, :1]), u_y[:, :-1]], 1)
    return (u_x - left) / dx + (u_y - below) / dy


def fluid_far_from_cylinder(sim: WakeFlowSimulator) -> np.ndarray:
    """(H, W) mask of cells whose centre is 2 cells or more outside the cylinder."""
    (h, w), (dy, dx) = sim.resolution, sim.spacing
    cy, cx = sim.setup.cylinder_center
    y = (np.arange(h) + 0.5)[:, None] * dy
    x = (np.arange(w) + 0.5)[None, :] * dx
    return np.hypot(y - cy, x - cx) > sim.setup.cylinder_diameter / 2 + 2 * max(dx, dy)


# ------------------------------------------------------------------------------------------
# the simulator
# ------------------------------------------------------------------------------------------
def test_import_is_light():
    code = (
        "import sys, oracles.wake_flow; print(sorted({'phi','torch','phiml'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_step_runs_and_projects(sim, state):
    corrections = random_corrections(1, seed=1)
    far = fluid_far_from_cylinder(sim)
    assert np.abs(divergence(state + corrections, sim)[:, far]).max() > 0.5
    out = sim.step(state, corrections)
    assert out.shape == (1, 2, *COARSE) and out.dtype == np.float32
    assert np.all(np.isfinite(out))
    # The pressure projection makes the fluid divergence-free up to the CG tolerance.
    assert np.abs(divergence(out, sim)[:, far]).max() < 1e-2
    assert np.all(out[:, 1, -1] == 0)  # top wall
    assert not np.allclose(out, state, atol=1e-3)


def test_zero_correction_equals_no_correction(sim, state):
    zero = sim.step(state, np.zeros_like(state))
    none = sim.step(state)
    np.testing.assert_array_equal(zero, none)
    corrected = sim.step(state, random_corrections(1, seed=2))
    assert np.abs(corrected - none).max() > 1e-2


def test_identical_inputs_give_identical_outputs(sim, state):
    corrections = random_corrections(3, seed=3)
    states = np.repeat(state, 3, axis=0)
    inputs = (states.copy(), corrections.copy())
    first = sim.step(states, corrections)
    np.testing.assert_array_equal(states, inputs[0])  # inputs are not modified
    np.testing.assert_array_equal(corrections, inputs[1])
    np.testing.assert_array_equal(first, sim.step(states.copy(), corrections.copy()))
    # A second simulator (its own trace) agrees too.
    np.testing.assert_array_equal(
        first, WakeFlowSimulator(COARSE, reynolds=RE).step(states, corrections)
    )


def test_batch_members_match_single_runs(sim, state):
    corrections = random_corrections(3, seed=4)
    reynolds = np.array([100.0, 300.0, 1000.0])
    batched = sim.step(np.repeat(state, 3, axis=0), corrections, reynolds=reynolds)
    # Members are far apart, so a mix-up could not hide below the tolerance.
    assert np.abs(batched[0] - batched[1]).max() > 0.05
    for i in range(3):
        alone = sim.step(state, corrections[i : i + 1], reynolds=reynolds[i])
        # Bit-identical in most cases; float32 CG may stop one iteration apart (tol 1e-3).
        np.testing.assert_allclose(batched[i : i + 1], alone, atol=1e-3, rtol=0)


def test_states_batch_of_one_broadcasts(sim, state):
    corrections = random_corrections(3, seed=5)
    np.testing.assert_array_equal(
        sim.step(state, corrections), sim.step(np.repeat(state, 3, axis=0), corrections)
    )


def test_reynolds_changes_the_flow(sim, state):
    low, high = sim.step(state, reynolds=60.0), sim.step(state, reynolds=2000.0)
    assert np.abs(low - high).max() > 1e-3
    np.testing.assert_array_equal(sim.step(state), sim.step(state, reynolds=RE))


def test_jit_and_eager_agree(sim, state):
    eager = WakeFlowSimulator(COARSE, reynolds=RE, jit=False)
    corrections = random_corrections(1, seed=6)
    np.testing.assert_allclose(
        eager.step(state, corrections), sim.step(state, corrections), atol=1e-5
    )


def test_capped_pressure_solve_returns_last_iterate_in_both_modes(state):
    capped = WakeFlowSetup(cg_max_iterations=3)
    corrections = random_corrections(1, seed=10, scale=5.0)
    jitted = WakeFlowSimulator(COARSE, capped, reynolds=RE).step(state, corrections)
    eager = WakeFlowSimulator(COARSE, capped, reynolds=RE, jit=False).step(state, corrections)
    np.testing.assert_allclose(jitted, eager, atol=1e-5)
    converged = WakeFlowSimulator(COARSE, reynolds=RE).step(state, corrections)
    assert np.abs(jitted - converged).max() > 1e-2  # three iterations are not enough


def test_rollout_applies_correction_fn_each_step(sim, state):
    seen = []

    def correction_fn(current: np.ndarray) -> np.ndarray:
        seen.append(current.copy())
        return 0.05 * current

    trajectory = sim.rollout(state, 3, correction_fn)
    assert trajectory.shape == (1, 4, 2, *COARSE)
    np.testing.assert_array_equal(trajectory[:, 0], state)
    manual = state
    for k in range(3):
        np.testing.assert_array_equal(seen[k], manual)
        manual = sim.step(manual, 0.05 * manual)
        np.testing.assert_array_equal(trajectory[:, k + 1], manual)
    plain = sim.rollout(state, 2)
    np.testing.assert_array_equal(plain[:, 2], sim.step(sim.step(state)))


# ------------------------------------------------------------------------------------------
# the differentiable variant
# ------------------------------------------------------------------------------------------
def test_torch_step_matches_numpy_step(sim, state):
    corrections = random_corrections(2, seed=7)
    out = sim.step_torch(torch.from_numpy(state), torch.from_numpy(corrections))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 2, *COARSE)
    np.testing.assert_allclose(out.numpy(), sim.step(state, corrections), atol=1e-6, rtol=0)


def test_torch_gradient_is_finite_and_matches_finite_differences(sim, state):
    rng = np.random.default_rng(8)
    weights = rng.standard_normal((1, 2, *COARSE)).astype(np.float32)
    direction = rng.standard_normal((1, 2, *COARSE)).astype(np.float32)
    base = random_corrections(1, seed=9, scale=0.02)
    corrections = torch.tensor(base, requires_grad=True)
    loss = (sim.step_torch(torch.from_numpy(state), corrections) * torch.from_numpy(weights)).sum()
    loss.backward()
    grad = corrections.grad.numpy()
    assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0
    eps = 0.03
    plus = (sim.step(state, base + eps * direction) * weights).sum()
    minus = (sim.step(state, base - eps * direction) * weights).sum()
    finite_difference = (plus - minus) / (2 * eps)
    analytic = float((grad * direction).sum())
    assert abs(analytic - finite_difference) < 0.05 * abs(finite_difference)


def test_rollout_torch_backpropagates_through_steps(sim, state):
    correction = torch.zeros((1, 2, *COARSE), requires_grad=True)
    trajectory = sim.rollout_torch(torch.from_numpy(state), 2, lambda s: correction)
    assert trajectory.shape == (1, 3, 2, *COARSE)
    np.testing.assert_allclose(
        trajectory.detach().numpy(), sim.rollout(state, 2, lambda s: np.zeros_like(s)), atol=1e-6
    )
    trajectory[:, -1, 0].sum().backward()
    assert np.all(np.isfinite(correction.grad.numpy())) and correction.grad.abs().max() > 0


# ------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("states_shape", "match"),
    [
        ((2, 16, 32), "shape"),
        ((1, 3, 16, 32), "shape"),
        ((1, 2, 32, 16), "shape"),
        ((0, 2, 16, 32), "shape"),
    ],
)
def test_wrong_state_shapes_raise(sim, states_shape, match):
    with pytest.raises(ValueError, match=match):
        sim.step(np.zeros(states_shape, np.float32))


def test_bad_inputs_raise_clear_errors(sim, state):
    with pytest.raises(ValueError, match=r"batch 2 and corrections batch 3"):
        sim.step(np.repeat(state, 2, 0), random_corrections(3, seed=0))
    with pytest.raises(ValueError, match="corrections must have shape"):
        sim.step(state, np.zeros((1, 2, 8, 8), np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        sim.step(np.full_like(state, np.nan))
    with pytest.raises(TypeError, match="real numeric"):
        sim.step(state.astype(np.complex64))
    with pytest.raises(TypeError, match="step_torch"):
        sim.step(torch.from_numpy(state))
    with pytest.raises(TypeError, match="torch.Tensor"):
        sim.step_torch(state)
    with pytest.raises(TypeError, match="float32"):
        sim.step_torch(torch.from_numpy(state).double())
    with pytest.raises(ValueError, match="3 values for a batch of 2"):
        sim.step(np.repeat(state, 2, 0), reynolds=[100.0, 200.0, 300.0])
    with pytest.raises(ValueError, match="n_steps"):
        sim.rollout(state, -1)


@pytest.mark.parametrize("reynolds", [0.0, -5.0, float("nan"), float("inf")])
def test_non_positive_or_non_finite_reynolds_raise(sim, state, reynolds):
    with pytest.raises(ValueError, match="finite and > 0"):
        sim.step(state, reynolds=reynolds)
    with pytest.raises(ValueError, match="finite and > 0"):
        WakeFlowSimulator(COARSE, reynolds=reynolds)


def test_reynolds_below_diffusion_limit_raises(sim, state):
    with pytest.raises(ValueError, match="min_reynolds"):
        sim.step(state, reynolds=10.0)
    with pytest.raises(TypeError, match="reynolds"):
        sim.step(state, reynolds="high")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dt": 0.0},
        {"inflow_speed": -1.0},
        {"cylinder_center": (0.1, 2.0)},
        {"domain_size": (5.0,)},
        {"domain_size": 5.0},
        {"cg_max_iterations": 0},
        {"min_reynolds": float("nan")},
    ],
)
def test_bad_setup_raises(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        WakeFlowSetup(**kwargs)


@pytest.mark.parametrize("resolution", [(16,), (2, 32), (16.0, 32), "16x32"])
def test_bad_resolution_raises(resolution):
    with pytest.raises(ValueError, match="resolution"):
        WakeFlowSimulator(resolution)


# ------------------------------------------------------------------------------------------
# reference data and its cache
# ------------------------------------------------------------------------------------------
REF = {"res": (8, 16), "fine_res": (16, 32), "warmup_steps": 4}
RE_LIST = [100.0, 250.0]


def cached_files(directory) -> list:
    return sorted(directory.glob("*.npz"))


def test_reference_is_the_downsampled_fine_simulation(tmp_path):
    ref = reference_trajectories(re_list=RE_LIST, n_steps=3, cache_dir=tmp_path, **REF)
    assert ref.shape == (2, 4, 2, 8, 16) and ref.dtype == np.float32
    fine = WakeFlowSimulator(REF["fine_res"], reynolds=RE_LIST[0])
    state = fine.initial_state(2)
    frames = []
    for k in range(REF["warmup_steps"] + 3):
        if k >= REF["warmup_steps"]:
            frames.append(downsample(state, 2))
        state = fine.step(state, reynolds=np.array(RE_LIST))
    frames.append(downsample(state, 2))
    np.testing.assert_allclose(ref, np.stack(frames, axis=1), atol=1e-5, rtol=0)
    assert np.abs(ref[:, -1] - ref[:, 0]).max() > 1e-3  # the flow moves


def test_cache_is_written_reused_and_stale_caches_regenerated(tmp_path, caplog):
    ref = reference_trajectories(re_list=RE_LIST, n_steps=3, cache_dir=tmp_path, **REF)
    files = cached_files(tmp_path)
    assert files == sorted(
        reference_cache_path(
            re,
            cache_dir=tmp_path,
            res=REF["res"],
            fine_res=REF["fine_res"],
            warmup_steps=REF["warmup_steps"],
        )
        for re in RE_LIST
    )
    with np.load(files[0]) as data:
        stored = json.loads(str(data["settings"]))
    assert stored["fine_resolution"] == [16, 32] and stored["warmup_steps"] == 4
    assert stored["setup"]["dt"] == WakeFlowSetup().dt and stored["reynolds"] in RE_LIST

    past = 1_000_000_000 * 10**9
    for path in files:
        os.utime(path, ns=(past, past))
    # Reused: same data, files untouched, also for a shorter horizon.
    np.testing.assert_array_equal(
        reference_trajectories(re_list=RE_LIST, n_steps=3, cache_dir=tmp_path, **REF), ref
    )
    np.testing.assert_array_equal(
        reference_trajectories(re_list=RE_LIST[::-1], n_steps=1, cache_dir=tmp_path, **REF),
        ref[::-1, :2],
    )
    assert [p.stat().st_mtime_ns for p in files] == [past, past]

    # Stale: the settings stored in a file no longer match the requested ones.
    with np.load(files[0]) as data:
        trajectory = data["trajectory"]
    tampered = dict(stored, warmup_steps=999)
    np.savez(files[0], settings=json.dumps(tampered, sort_keys=True), trajectory=trajectory + 1)
    os.utime(files[0], ns=(past, past))
    with caplog.at_level(logging.WARNING, logger="oracles.wake_flow"):
        again = reference_trajectories(re_list=RE_LIST, n_steps=3, cache_dir=tmp_path, **REF)
    assert "stale" in caplog.text and files[0].name in caplog.text
    np.testing.assert_allclose(again, ref, atol=1e-5, rtol=0)
    assert files[0].stat().st_mtime_ns != past and files[1].stat().st_mtime_ns == past
    with np.load(files[0]) as data:
        assert json.loads(str(data["settings"])) == stored

    # Too short for the request: regenerated longer, the old frames reproduced.
    longer = reference_trajectories(re_list=RE_LIST, n_steps=5, cache_dir=tmp_path, **REF)
    assert longer.shape[1] == 6
    np.testing.assert_allclose(longer[:, :4], ref, atol=1e-5, rtol=0)

    # Changed settings: their own files; the old ones stay.
    other = reference_trajectories(
        re_list=RE_LIST, n_steps=3, cache_dir=tmp_path, **dict(REF, warmup_steps=6)
    )
    assert len(cached_files(tmp_path)) == 4
    assert np.abs(other - ref).max() > 1e-4


def test_unreadable_cache_is_regenerated(tmp_path, caplog):
    path = reference_cache_path(
        150.0, cache_dir=tmp_path, res=REF["res"], fine_res=REF["fine_res"], warmup_steps=4
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not an npz file")
    with caplog.at_level(logging.WARNING, logger="oracles.wake_flow"):
        ref = reference_trajectories(re_list=[150.0], n_steps=1, cache_dir=tmp_path, **REF)
    assert "unreadable" in caplog.text
    assert ref.shape == (1, 2, 2, 8, 16)
    with np.load(path) as data:
        np.testing.assert_array_equal(data["trajectory"], ref[0])


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ZOOPT_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path / "wake_flow"
    monkeypatch.delenv("ZOOPT_CACHE_DIR")
    assert default_cache_dir().parts[-3:] == (".cache", "zoopt", "wake_flow")


def test_reference_bad_arguments_raise(tmp_path):
    with pytest.raises(ValueError, match="multiple"):
        reference_trajectories((8, 16), [100.0], 1, fine_res=(16, 24), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="re_list"):
        reference_trajectories((8, 16), [], 1, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="finite and > 0"):
        reference_trajectories((8, 16), [100.0, -1.0], 1, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="warmup_steps"):
        reference_trajectories((8, 16), [100.0], 1, warmup_steps=-1, cache_dir=tmp_path)
    assert cached_files(tmp_path) == []


# ------------------------------------------------------------------------------------------
# array helpers (properties)
# ------------------------------------------------------------------------------------------
finite = st.floats(-10, 10, allow_nan=False, width=32)


@settings(max_examples=40, deadline=None)
@given(
    fine=st.integers(1, 3).flatmap(
        lambda k: st.tuples(st.just(k), arrays(np.float64, (2, 2, 3 * k, 4 * k), elements=finite))
    )
)
def test_downsample_averages_divergence(fine):
    factor, states = fine
    coarse = downsample(states, factor)
    assert coarse.shape == (2, 2, 3, 4)

    def div(s, dy, dx):  # inflow face 0 and bottom wall 0: plain differences
        left = np.concatenate([np.zeros_like(s[:, 0, :, :1]), s[:, 0, :, :-1]], 2)
        below = np.concatenate([np.zeros_like(s[:, 1, :1]), s[:, 1, :-1]], 1)
        return (s[:, 0] - left) / dx + (s[:, 1] - below) / dy

    fine_div = div(states, 1.0, 1.0).reshape(2, 3, factor, 4, factor).mean(axis=(2, 4))
    np.testing.assert_allclose(div(coarse, factor, factor), fine_div, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(u=finite, v=finite, factor=st.integers(1, 4))
def test_downsample_keeps_uniform_flow(u, v, factor):
    states = np.empty((1, 2, 2 * factor, 3 * factor))
    states[:, 0], states[:, 1] = u, v
    coarse = downsample(states, factor)
    np.testing.assert_allclose(coarse[:, 0], u, atol=1e-6)
    np.testing.assert_allclose(coarse[:, 1], v, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(a=finite, b=finite, c=finite, dy=st.floats(0.1, 2), dx=st.floats(0.1, 2))
def test_vorticity_of_linear_shear_is_exact(a, b, c, dy, dx):
    h, w = 5, 7
    y = (np.arange(h) + 0.5)[:, None] * dy  # u_x sits at cell-centre height
    x = (np.arange(w) + 0.5)[None, :] * dx  # u_y sits at cell-centre x
    states = np.empty((1, 2, h, w))
    states[:, 0] = a * y + c
    states[:, 1] = b * x - c
    omega = vorticity(states, (dy, dx))
    assert omega.shape == (1, h - 1, w - 1)
    np.testing.assert_allclose(omega, b - a, atol=1e-3 * (1 + abs(a) + abs(b)))


@settings(max_examples=40, deadline=None)
@given(ref=arrays(np.float32, (2, 3, 2, 2, 3), elements=finite), shift=finite)
def test_trajectory_mae_properties(ref, shift):
    assert trajectory_mae(ref, ref) == 0.0
    shifted = ref + np.float32(shift)
    expected = float(np.abs(shifted.astype(np.float64) - ref.astype(np.float64)).mean())
    assert trajectory_mae(shifted, ref) == pytest.approx(expected, abs=1e-9)
    assert trajectory_mae(shifted, ref) == trajectory_mae(ref, shifted)
    per_step = trajectory_mae(shifted, ref, per_step=True)
    assert per_step.shape == (3,)
    assert float(per_step.mean()) == pytest.approx(expected, abs=1e-6)


def test_trajectory_mae_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differ"):
        trajectory_mae(np.zeros((3, 2, 4, 4)), np.zeros((2, 2, 4, 4)))


def test_reynolds_channel():
    channel = reynolds_channel([100.0, 400.0], (4, 6), scale=200.0)
    assert channel.shape == (2, 1, 4, 6) and channel.dtype == np.float32
    np.testing.assert_array_equal(channel[:, 0, 0, 0], [0.5, 2.0])
    assert np.ptp(channel[1]) == 0
    with pytest.raises(ValueError, match="finite and > 0"):
        reynolds_channel(-3.0, (4, 6))


# ------------------------------------------------------------------------------------------
# physics (slow)
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_vortex_street_sheds_at_a_plausible_strouhal_number():
    coarse = WakeFlowSimulator((32, 64), reynolds=200.0)
    trajectory = coarse.rollout(coarse.initial_state(1), 700)[0, 300:]
    probe = trajectory[:, 1, 16, 32]  # u_y 3 diameters behind the cylinder, on its axis
    assert probe.std() > 0.1  # the wake oscillates
    spectrum = np.abs(np.fft.rfft(probe - probe.mean()))
    frequency = np.fft.rfftfreq(probe.size, coarse.setup.dt)[spectrum.argmax()]
    strouhal = frequency * coarse.setup.cylinder_diameter / coarse.setup.inflow_speed
    assert 0.12 < strouhal < 0.3
