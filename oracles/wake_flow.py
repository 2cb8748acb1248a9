"""PhiFlow wake flow behind a cylinder as a black box (DeepZero Fig. 6, after Um et al. 2020).

Incompressible Navier-Stokes in a 2-D channel with a cylinder: uniform inflow from the left,
zero-gradient outflow on the right, no-slip walls at the bottom and top. Each step does
semi-Lagrangian advection, explicit diffusion and a pressure projection (CG) with the cylinder
as an obstacle, on a staggered grid, with PhiFlow's torch backend and ``math.jit_compile``.

Units: lengths in cylinder diameters, speeds in inflow speeds; ``Re = U * D / nu`` sets the
kinematic viscosity ``nu``.

Array layout (all public arrays): a state is ``(batch, 2, H, W)`` float32, ``H``/``W`` the
cells along y/x. Each cell ``(i, j)`` stores the velocity on its *upper* faces:

* ``[:, 0, i, j]`` = u_x on the face at ``x = (j + 1) dx``, ``y = (i + 0.5) dy``;
* ``[:, 1, i, j]`` = u_y on the face at ``y = (i + 1) dy``, ``x = (j + 0.5) dx``.

The lower faces of row/column 0 are boundaries (inflow u_x = U, wall u_y = 0) and are not
stored. The top row of channel 1 is the top wall: it is always 0 on output and corrections to
it are ignored. Faces inside the cylinder are zeroed by the projection.

PhiFlow, torch and phiml are imported on first use, so importing this module is light.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "DEFAULT_COARSE_RESOLUTION",
    "DEFAULT_FINE_RESOLUTION",
    "DEFAULT_REYNOLDS",
    "DEFAULT_WARMUP_STEPS",
    "WakeFlowSetup",
    "WakeFlowSimulator",
    "benchmark_step",
    "default_cache_dir",
    "downsample",
    "main",
    "reference_cache_path",
    "reference_trajectories",
    "reynolds_channel",
    "trajectory_mae",
    "vorticity",
]

log = logging.getLogger(__name__)

DEFAULT_COARSE_RESOLUTION = (32, 64)
DEFAULT_FINE_RESOLUTION = (64, 128)
DEFAULT_REYNOLDS = (100.0, 200.0, 400.0, 800.0)
#: Steps simulated before recording; the street is developed by then (see docs/wake_flow.md).
DEFAULT_WARMUP_STEPS = 400
#: Bump when the simulator changes in a way that changes results: old caches become stale.
CACHE_FORMAT_VERSION = 1
#: Explicit diffusion is stable for nu * dt / dx^2 <= 1/4 in 2-D; keep a margin.
_DIFFUSION_STABILITY = 0.2


# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WakeFlowSetup:
    """Physical and numerical settings shared by every resolution (lengths in diameters).

    Attributes:
        domain_size: (height, width) of the channel (y, x).
        cylinder_center: (y, x) of the cylinder centre.
        cylinder_diameter: D; the length unit of ``Re``.
        inflow_speed: U, the uniform inflow speed (x direction).
        dt: time step (time unit D / U).
        min_reynolds: smallest Re the simulator accepts; sets the explicit diffusion substeps.
        cg_rel_tol, cg_abs_tol: pressure CG tolerances (float32 CG stalls below ~1e-3).
        cg_max_iterations: CG iteration cap.
        perturbation: amplitude (in U) of the transverse velocity bump in the initial state
            that breaks the symmetry so the vortex street starts early.
    """

    domain_size: tuple[float, float] = (5.0, 10.0)
    cylinder_center: tuple[float, float] = (2.5, 2.0)
    cylinder_diameter: float = 1.0
    inflow_speed: float = 1.0
    dt: float = 0.1
    min_reynolds: float = 50.0
    cg_rel_tol: float = 1e-3
    cg_abs_tol: float = 1e-3
    cg_max_iterations: int = 1000
    perturbation: float = 0.3

    def __post_init__(self) -> None:
        for name in ("domain_size", "cylinder_center"):
            value = getattr(self, name)
            if (
                not isinstance(value, tuple | list)
                or len(value) != 2
                or not all(_is_finite_number(v) for v in value)
            ):
                raise ValueError(f"{name} must be two finite numbers (y, x), got {value!r}")
            object.__setattr__(self, name, (float(value[0]), float(value[1])))
        height, width = self.domain_size
        if height <= 0 or width <= 0:
            raise ValueError(f"domain_size must be positive, got {self.domain_size!r}")
        for name in ("cylinder_diameter", "inflow_speed", "dt", "min_reynolds"):
            value = getattr(self, name)
            if not _is_finite_number(value) or value <= 0:
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        cy, cx = self.cylinder_center
        r = self.cylinder_diameter / 2
        if not (r < cy < height - r and r < cx < width - r):
            raise ValueError(
                f"cylinder_center={self.cylinder_center} with cylinder_diameter="
                f"{self.cylinder_diameter} puts the cylinder outside the domain {self.domain_size}"
            )
        for name in ("cg_rel_tol", "cg_abs_tol"):
            value = getattr(self, name)
            if not _is_finite_number(value) or value < 0:
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        if not isinstance(self.cg_max_iterations, int) or self.cg_max_iterations < 1:
            raise ValueError(
                f"cg_max_iterations must be a positive int, got {self.cg_max_iterations!r}"
            )
        if not _is_finite_number(self.perturbation):
            raise ValueError(f"perturbation must be a finite number, got {self.perturbation!r}")

    def as_dict(self) -> dict[str, Any]:
        """JSON-able settings (stored in reference caches)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def viscosity(self, reynolds: float | np.ndarray) -> np.ndarray:
        """Kinematic viscosity nu = U * D / Re (float64 array of Re's shape)."""
        return self.inflow_speed * self.cylinder_diameter / np.asarray(reynolds, dtype=np.float64)


def _is_finite_number(value: Any) -> bool:
    return (
        isinstance(value, int | float | np.integer | np.floating)
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def _check_resolution(resolution: Any, name: str = "resolution") -> tuple[int, int]:
    """(H, W) as ints >= 4 (smaller grids cannot hold a cylinder and a wake)."""
    try:
        h, w = resolution
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (H, W), got {resolution!r}") from None
    for v in (h, w):
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 4:
            raise ValueError(f"{name} must be two ints >= 4 (H, W), got {resolution!r}")
    return int(h), int(w)


def _check_reynolds_values(reynolds: Any, min_reynolds: float) -> np.ndarray:
    """Re as a float64 array (scalar -> shape ()); each finite, > 0 and >= min_reynolds."""
    if isinstance(reynolds, bool) or isinstance(reynolds, str):
        raise TypeError(f"reynolds must be a number or an array of numbers, got {reynolds!r}")
    try:
        values = np.asarray(reynolds, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(
            f"reynolds must be a number or an array of numbers, got {reynolds!r}"
        ) from None
    if values.ndim > 1:
        raise ValueError(f"reynolds must be a scalar or a 1-D array, got shape {values.shape}")
    bad = ~np.isfinite(values) | (values <= 0)
    if np.any(bad):
        raise ValueError(f"Reynolds numbers must be finite and > 0, got {values[bad].tolist()}")
    low = values < min_reynolds
    if np.any(low):
        raise ValueError(
            f"Reynolds numbers {values[low].tolist()} are below min_reynolds={min_reynolds} "
            "(explicit diffusion is only stable down to it; lower WakeFlowSetup.min_reynolds)"
        )
    return values


# --------------------------------------------------------------------------------------
# Simulator
# --------------------------------------------------------------------------------------
class WakeFlowSimulator:
    """The wake flow at one resolution; a batch of independent simulations per call.

    Args:
        resolution: (H, W) cells along (y, x).
        setup: physics and solver settings (default :class:`WakeFlowSetup`).
        reynolds: default Re used when a call passes none.
        jit: compile the step with ``phi.math.jit_compile`` (one trace per batch size; the
            first call of each costs ~1-3 s).
        num_threads: torch intra-op threads while a step runs (restored afterwards); ``None``
            keeps torch's setting. One thread is the default because these grids are small and
            on a busy machine multi-threaded torch slows the step down tens of times.

    Calls: :meth:`step` / :meth:`rollout` take and return numpy float32 arrays and never build
    an autograd graph (the ZO path); :meth:`step_torch` / :meth:`rollout_torch` take torch
    tensors and let autograd flow through the solver (the first-order baseline). Both run the
    same compiled physics, so identical inputs give identical outputs.
    """

    def __init__(
        self,
        resolution: tuple[int, int] = DEFAULT_COARSE_RESOLUTION,
        setup: WakeFlowSetup | None = None,
        *,
        reynolds: float = DEFAULT_REYNOLDS[0],
        jit: bool = True,
        num_threads: int | None = 1,
    ):
        self.resolution = _check_resolution(resolution)
        self.setup = WakeFlowSetup() if setup is None else setup
        if not isinstance(self.setup, WakeFlowSetup):
            raise TypeError(f"setup must be a WakeFlowSetup, got {type(self.setup).__name__}")
        if np.ndim(reynolds) != 0:
            raise ValueError(f"the default reynolds must be a scalar, got {reynolds!r}")
        self.reynolds = float(_check_reynolds_values(reynolds, self.setup.min_reynolds))
        self.jit = bool(jit)
        if num_threads is not None and (
            isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1
        ):
            raise ValueError(f"num_threads must be a positive int or None, got {num_threads!r}")
        self.num_threads = num_threads
        h, w = self.resolution
        height, width = self.setup.domain_size
        #: (dy, dx) cell size in diameters.
        self.spacing = (height / h, width / w)
        nu_max = self.setup.inflow_speed * self.setup.cylinder_diameter / self.setup.min_reynolds
        #: explicit diffusion substeps per step, enough for Re >= setup.min_reynolds.
        self.diffusion_substeps = max(
            1, math.ceil(nu_max * self.setup.dt / (_DIFFUSION_STABILITY * min(self.spacing) ** 2))
        )
        self._physics = None  # built on first use (imports PhiFlow)

    def __repr__(self) -> str:
        return (
            f"WakeFlowSimulator(resolution={self.resolution}, reynolds={self.reynolds:g}, "
            f"dt={self.setup.dt:g}, jit={self.jit})"
        )

    # -- states -------------------------------------------------------------------------
    def state_shape(self, batch: int = 1) -> tuple[int, int, int, int]:
        """(batch, 2, H, W)."""
        return (batch, 2, *self.resolution)

    def initial_state(self, batch: int = 1) -> np.ndarray:
        """Uniform inflow plus a transverse bump behind the cylinder; (batch, 2, H, W) float32.

        The bump (a Gaussian of u_y, amplitude ``setup.perturbation`` * U, one diameter wide,
        centred 1.5 D downstream) breaks the up-down symmetry so the street starts early.
        """
        if isinstance(batch, bool) or not isinstance(batch, int | np.integer) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        s = self.setup
        h, w = self.resolution
        dy, dx = self.spacing
        state = np.zeros((batch, 2, h, w), dtype=np.float32)
        state[:, 0] = s.inflow_speed
        # u_y sits at y = (i + 1) dy, x = (j + 0.5) dx (upper faces).
        y = (np.arange(h) + 1.0)[:, None] * dy
        x = (np.arange(w) + 0.5)[None, :] * dx
        cy, cx = s.cylinder_center
        d = s.cylinder_diameter
        bump = np.exp(-(((x - cx - 1.5 * d) / d) ** 2 + ((y - cy) / d) ** 2))
        state[:, 1] = (s.perturbation * s.inflow_speed * bump).astype(np.float32)
        state[:, 1, -1, :] = 0.0  # top wall
        return state

    def viscosity(self, reynolds: float | np.ndarray | None = None) -> np.ndarray:
        """nu for ``reynolds`` (default: the simulator's Re); validated like in :meth:`step`."""
        re = self.reynolds if reynolds is None else reynolds
        return self.setup.viscosity(_check_reynolds_values(re, self.setup.min_reynolds))

    def vorticity(self, states: np.ndarray) -> np.ndarray:
        """Vorticity at interior cell corners, (batch, H-1, W-1); see :func:`vorticity`."""
        return vorticity(self._check_numpy(states, "states"), self.spacing)

    # -- black-box (numpy, no autograd) -------------------------------------------------
    def step(
        self,
        states: np.ndarray,
        corrections: np.ndarray | None = None,
        *,
        reynolds: float | np.ndarray | None = None,
    ) -> np.ndarray:
        """One solver step of ``states + corrections``.

        Args:
            states: (B, 2, H, W) velocities in the module's layout.
            corrections: None (no correction) or an array of the same layout, added to the
                velocity values before the step. A batch of 1 on either side broadcasts.
            reynolds: scalar or (B,) Re per simulation (default: the simulator's Re).

        Returns:
            (B, 2, H, W) float32 numpy array of the next states.
        """
        import torch

        velocity = self._check_numpy(states, "states")
        correction = None if corrections is None else self._check_numpy(corrections, "corrections")
        with torch.no_grad():
            out = self._advance(
                torch.from_numpy(velocity),
                None if correction is None else torch.from_numpy(correction),
                reynolds,
            )
        return np.ascontiguousarray(out.numpy())

    def rollout(
        self,
        states: np.ndarray,
        n_steps: int,
        correction_fn: Callable[[np.ndarray], np.ndarray] | None = None,
        *,
        reynolds: float | np.ndarray | None = None,
    ) -> np.ndarray:
        """``n_steps`` steps; before each, ``correction_fn(states)`` gives the corrections.

        Returns the trajectory including the initial states: (B, n_steps + 1, 2, H, W) float32.
        ``correction_fn`` gets and returns numpy arrays of the step layout; ``None`` runs the
        plain solver.
        """
        n_steps = _check_n_steps(n_steps)
        current = self._check_numpy(states, "states")
        frames = [current]
        for _ in range(n_steps):
            corrections = None if correction_fn is None else correction_fn(current)
            current = self.step(current, corrections, reynolds=reynolds)
            frames.append(current)
        return np.stack(frames, axis=1)

    # -- differentiable (torch autograd through the solver) -----------------------------
    def step_torch(
        self,
        states: torch.Tensor,
        corrections: torch.Tensor | None = None,
        *,
        reynolds: float | np.ndarray | None = None,
    ) -> torch.Tensor:
        """Like :meth:`step` on float32 CPU torch tensors; gradients flow to both inputs."""
        velocity = self._check_torch(states, "states")
        correction = None if corrections is None else self._check_torch(corrections, "corrections")
        return self._advance(velocity, correction, reynolds)

    def rollout_torch(
        self,
        states: torch.Tensor,
        n_steps: int,
        correction_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        *,
        reynolds: float | np.ndarray | None = None,
    ) -> torch.Tensor:
        """Differentiable :meth:`rollout`: (B, n_steps + 1, 2, H, W) torch tensor."""
        import torch

        n_steps = _check_n_steps(n_steps)
        current = self._check_torch(states, "states")
        frames = [current]
        for _ in range(n_steps):
            corrections = None if correction_fn is None else correction_fn(current)
            current = self.step_torch(current, corrections, reynolds=reynolds)
            frames.append(current)
        return torch.stack(frames, dim=1)

    # -- internals ----------------------------------------------------------------------
    def _advance(
        self,
        velocity: torch.Tensor,
        correction: torch.Tensor | None,
        reynolds: float | np.ndarray | None,
    ) -> torch.Tensor:
        """The shared step on validated (B|1, 2, H, W) float32 tensors -> (B, 2, H, W)."""
        import torch

        if correction is None:
            correction = torch.zeros_like(velocity)  # x + 0 == x exactly: same trace, same result
        batch = _broadcast_batch(velocity.shape[0], correction.shape[0])
        nu = self.viscosity(reynolds)
        if nu.ndim == 1 and nu.shape[0] not in (1, batch):
            if batch == 1:
                batch = nu.shape[0]
            else:
                raise ValueError(
                    f"reynolds has {nu.shape[0]} values for a batch of {batch} simulations"
                )
        velocity = velocity.expand(batch, -1, -1, -1)
        correction = correction.expand(batch, -1, -1, -1)
        viscosity = torch.from_numpy(np.broadcast_to(nu, (batch,)).astype(np.float32))
        physics = self._physics_fn()
        previous_threads = torch.get_num_threads()
        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        try:
            return physics(velocity, correction, viscosity)
        finally:
            torch.set_num_threads(previous_threads)

    def _physics_fn(self) -> Callable[..., torch.Tensor]:
        if self._physics is None:
            self._physics = _build_physics(self)
        return self._physics

    def _check_numpy(self, array: Any, name: str) -> np.ndarray:
        if type(array).__module__.startswith("torch"):
            raise TypeError(f"{name} must be a numpy array here (use step_torch for tensors)")
        try:
            values = np.asarray(array)
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a numeric array, got {type(array).__name__}") from None
        if values.dtype.kind not in "fiu":
            raise TypeError(f"{name} must be a real numeric array, got dtype {values.dtype}")
        self._check_shape(values.shape, name)
        values = np.ascontiguousarray(values, dtype=np.float32)
        if not np.all(np.isfinite(values)):
            raise ValueError(f"{name} contains non-finite values")
        return values

    def _check_torch(self, tensor: Any, name: str) -> torch.Tensor:
        import torch

        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {tensor.dtype}")
        if tensor.device.type != "cpu":
            raise ValueError(f"{name} must be on the CPU, got device {tensor.device}")
        self._check_shape(tuple(tensor.shape), name)
        if not bool(torch.isfinite(tensor.detach()).all()):
            raise ValueError(f"{name} contains non-finite values")
        return tensor

    def _check_shape(self, shape: tuple[int, ...], name: str) -> None:
        h, w = self.resolution
        if len(shape) != 4 or shape[1:] != (2, h, w) or shape[0] < 1:
            raise ValueError(f"{name} must have shape (batch, 2, {h}, {w}), got {tuple(shape)}")


def _check_n_steps(n_steps: Any) -> int:
    if isinstance(n_steps, bool) or not isinstance(n_steps, int | np.integer) or n_steps < 0:
        raise ValueError(f"n_steps must be a non-negative int, got {n_steps!r}")
    return int(n_steps)


def _broadcast_batch(a: int, b: int) -> int:
    if a != b and 1 not in (a, b):
        raise ValueError(f"states batch {a} and corrections batch {b} do not broadcast")
    return max(a, b)


def _build_physics(sim: WakeFlowSimulator) -> Callable[..., torch.Tensor]:
    """The (optionally jit-compiled) step on torch (B, 2, H, W) tensors.

    The obstacle, boundary and grid live in the closure: they are constants of the trace
    (passing an ``Obstacle`` as a jit argument would retrace / fail).
    """
    from phi.torch import flow

    phimath = flow.math
    s = sim.setup
    h, w = sim.resolution
    height, width = s.domain_size
    inflow = flow.vec(x=float(s.inflow_speed), y=0.0)
    boundary = phimath.extrapolation.combine_sides(
        x=(phimath.extrapolation.ConstantExtrapolation(inflow), flow.ZERO_GRADIENT),
        y=0.0,  # no-slip walls
    )
    bounds = flow.Box(x=width, y=height)
    grid_resolution = flow.spatial(x=w, y=h)
    cy, cx = s.cylinder_center
    cylinder = flow.Obstacle(flow.Sphere(x=cx, y=cy, radius=s.cylinder_diameter / 2))
    # The jit path cannot raise on a non-converged / diverged CG (phiml returns the last
    # iterate there), so eager mode is told to do the same: both modes behave alike, and a
    # diverged solve shows up as non-finite states.
    solve = flow.Solve(
        "CG",
        s.cg_rel_tol,
        s.cg_abs_tol,
        max_iterations=s.cg_max_iterations,
        suppress=(phimath.NotConverged, phimath.Diverged),
    )
    dt, substeps = s.dt, sim.diffusion_substeps

    def to_grid(values: Any) -> Any:
        # values: (sim, vector=x,y, x, y); u_y's top row is the wall face, not a grid value.
        faces = phimath.stack(
            [values.vector["x"], values.vector["y"].y[:-1]], flow.dual(vector="x,y")
        )
        return flow.StaggeredGrid(faces, boundary, bounds=bounds, resolution=grid_resolution)

    def from_grid(velocity: Any) -> Any:
        u_y = phimath.pad(velocity.vector["y"].values, {"y": (0, 1)}, 0)
        return phimath.stack([velocity.vector["x"].values, u_y], flow.channel(vector="x,y"))

    def physics_step(values: Any, correction: Any, viscosity: Any) -> Any:
        velocity = to_grid(values + correction)  # corrections are values, not Fields (no BCs)
        velocity = flow.advect.semi_lagrangian(velocity, velocity, dt)
        velocity = flow.diffuse.explicit(velocity, viscosity, dt, substeps=substeps)
        velocity, _ = flow.fluid.make_incompressible(velocity, (cylinder,), solve)
        return from_grid(velocity)

    step_fn = phimath.jit_compile(physics_step) if sim.jit else physics_step
    layout = (flow.batch("sim"), flow.channel(vector="x,y"), flow.spatial("x,y"))

    def run(velocity: torch.Tensor, correction: torch.Tensor, viscosity: torch.Tensor):
        # (B, 2, H, W) -> phiml (sim, vector, x, y): spatial order must match the vector order.
        wrap = [phimath.tensor(t.permute(0, 1, 3, 2), *layout) for t in (velocity, correction)]
        nu = phimath.tensor(viscosity, flow.batch("sim"))
        out = step_fn(wrap[0], wrap[1], nu)
        return out.native(["sim", "vector", "y", "x"]).contiguous()

    return run


# --------------------------------------------------------------------------------------
# Array helpers (numpy; no PhiFlow needed)
# --------------------------------------------------------------------------------------
def _as_states(states: Any, name: str = "states") -> np.ndarray:
    values = np.asarray(states)
    if values.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real numeric array, got dtype {values.dtype}")
    if values.ndim != 4 or values.shape[1] != 2:
        raise ValueError(f"{name} must have shape (batch, 2, H, W), got {values.shape}")
    return values


def downsample(states: np.ndarray, factor: int) -> np.ndarray:
    """Restrict fine staggered states to a grid ``factor`` times coarser (flux-conserving).

    Each coarse face is the mean of the ``factor`` fine faces it covers, so the coarse
    divergence of a cell is the mean of the fine divergences inside it.

    Args:
        states: (B, 2, H*factor, W*factor) in the module's layout.
        factor: positive int.

    Returns:
        (B, 2, H, W), dtype of ``states``.
    """
    if isinstance(factor, bool) or not isinstance(factor, int | np.integer) or factor < 1:
        raise ValueError(f"factor must be a positive int, got {factor!r}")
    fine = _as_states(states)
    b, _, hf, wf = fine.shape
    if hf % factor or wf % factor:
        raise ValueError(f"fine resolution {(hf, wf)} is not divisible by factor {factor}")
    h, w = hf // factor, wf // factor
    k = factor
    # u_x at coarse x-face (j+1) = fine x-face k(j+1): column k-1 of each block; mean over rows.
    u_x = fine[:, 0, :, k - 1 :: k].reshape(b, h, k, w).mean(axis=2)
    # u_y at coarse y-face (i+1) = fine row k(i+1)-1; mean over the k columns of the block.
    u_y = fine[:, 1, k - 1 :: k, :].reshape(b, h, w, k).mean(axis=3)
    return np.stack([u_x, u_y], axis=1).astype(fine.dtype, copy=False)


def vorticity(states: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
    """Vorticity dv_y/dx - dv_x/dy at the interior cell corners.

    Args:
        states: (B, 2, H, W) in the module's layout.
        spacing: (dy, dx) cell size.

    Returns:
        (B, H-1, W-1); entry (i, j) is the corner at y = (i + 1) dy, x = (j + 1) dx (the
        circulation around the dual cell divided by its area; exact for linear fields).
    """
    values = _as_states(states).astype(np.float64, copy=False)
    dy, dx = (float(v) for v in spacing)
    if not (dy > 0 and dx > 0):
        raise ValueError(f"spacing must be two positive numbers (dy, dx), got {spacing!r}")
    u_x, u_y = values[:, 0], values[:, 1]
    dvy_dx = (u_y[:, :-1, 1:] - u_y[:, :-1, :-1]) / dx
    dvx_dy = (u_x[:, 1:, :-1] - u_x[:, :-1, :-1]) / dy
    return (dvy_dx - dvx_dy).astype(np.float32)


def reynolds_channel(
    reynolds: float | Sequence[float] | np.ndarray,
    resolution: tuple[int, int],
    *,
    scale: float = 1000.0,
) -> np.ndarray:
    """A constant input channel ``Re / scale`` per simulation, (B, 1, H, W) float32.

    Concatenate it to the states (axis 1) as the network's Re input; a scalar gives B = 1.
    """
    h, w = _check_resolution(resolution)
    if not _is_finite_number(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    re = np.atleast_1d(_check_reynolds_values(reynolds, min_reynolds=0.0))
    channel = np.broadcast_to(
        (re / scale).astype(np.float32)[:, None, None, None], (re.size, 1, h, w)
    )
    return np.ascontiguousarray(channel)


def trajectory_mae(pred: np.ndarray, ref: np.ndarray, *, per_step: bool = False) -> Any:
    """Mean absolute error between trajectories (..., T, 2, H, W) of equal shape.

    Returns a float (mean over everything), or with ``per_step=True`` the (T,) means over
    all but the time axis (axis -4).
    """
    a, b = np.asarray(pred), np.asarray(ref)
    if a.shape != b.shape:
        raise ValueError(f"trajectory shapes differ: {a.shape} vs {b.shape}")
    if a.ndim < 4 or a.shape[-3] != 2:
        raise ValueError(f"trajectories must have shape (..., T, 2, H, W), got {a.shape}")
    err = np.abs(a.astype(np.float64) - b.astype(np.float64))
    if not per_step:
        return float(err.mean())
    return np.moveaxis(err, -4, 0).reshape(a.shape[-4], -1).mean(axis=1)


# --------------------------------------------------------------------------------------
# Reference data (fine simulation downsampled onto the coarse grid), cached on disk
# --------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$ZOOPT_CACHE_DIR/wake_flow`` if set, else ``~/.cache/zoopt/wake_flow``."""
    root = os.environ.get("ZOOPT_CACHE_DIR")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "zoopt"
    return base / "wake_flow"


def _reference_settings(
    res: tuple[int, int],
    fine_res: tuple[int, int],
    reynolds: float,
    warmup_steps: int,
    setup: WakeFlowSetup,
) -> dict[str, Any]:
    """Everything a cached reference trajectory depends on (except its length)."""
    return {
        "format": CACHE_FORMAT_VERSION,
        "coarse_resolution": list(res),
        "fine_resolution": list(fine_res),
        "reynolds": float(reynolds),
        "warmup_steps": int(warmup_steps),
        "setup": setup.as_dict(),
    }


def reference_cache_path(
    reynolds: float,
    *,
    res: tuple[int, int] = DEFAULT_COARSE_RESOLUTION,
    fine_res: tuple[int, int] = DEFAULT_FINE_RESOLUTION,
    warmup_steps: int = DEFAULT_WARMUP_STEPS,
    setup: WakeFlowSetup | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """The npz file holding the reference for one Re (named by a digest of its settings)."""
    setup = WakeFlowSetup() if setup is None else setup
    re = float(_check_reynolds_values(reynolds, setup.min_reynolds))
    res, fine_res = _check_resolution(res, "res"), _check_resolution(fine_res, "fine_res")
    settings = _reference_settings(res, fine_res, re, warmup_steps, setup)
    return _cache_file(Path(cache_dir) if cache_dir is not None else default_cache_dir(), settings)


def _cache_file(cache_dir: Path, settings: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    h, w = settings["coarse_resolution"]
    return cache_dir / f"wake_re{settings['reynolds']:g}_{h}x{w}_{digest}.npz"


def _load_cached(path: Path, settings: dict[str, Any], n_frames: int) -> np.ndarray | None:
    """The first ``n_frames`` cached frames, or None if missing, stale, short or unreadable."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            stored = json.loads(str(data["settings"]))
            trajectory = data["trajectory"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        log.warning("unreadable wake-flow cache %s (%s); regenerating", path, exc)
        return None
    if stored != settings:
        log.warning("stale wake-flow cache %s (settings changed); regenerating", path)
        return None
    if trajectory.shape[0] < n_frames:
        log.info(
            "wake-flow cache %s holds %d frames < %d; regenerating",
            path,
            trajectory.shape[0],
            n_frames,
        )
        return None
    return trajectory[:n_frames]


def _save_cached(path: Path, settings: dict[str, Any], trajectory: np.ndarray) -> None:
    """Write atomically (temp file + rename) so concurrent readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp.npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, settings=json.dumps(settings, sort_keys=True), trajectory=trajectory)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _simulate_reference(
    fine: WakeFlowSimulator,
    reynolds: np.ndarray,
    n_steps: int,
    warmup_steps: int,
    factor: int,
    progress: bool = False,
) -> np.ndarray:
    """Fine batch (one simulation per Re) -> (n_re, n_steps + 1, 2, H, W) coarse frames."""
    import torch
    from tqdm.auto import tqdm

    frames = []
    with (
        torch.no_grad(),
        tqdm(total=warmup_steps + n_steps, disable=not progress, desc="wake-flow reference") as bar,
    ):
        state = torch.from_numpy(fine.initial_state(len(reynolds)))
        for k in range(warmup_steps + n_steps + 1):
            if k >= warmup_steps:
                frames.append(downsample(state.numpy(), factor))
            if k < warmup_steps + n_steps:
                state = fine._advance(state, None, reynolds)
                bar.update()
    trajectory = np.stack(frames, axis=1)
    if not np.all(np.isfinite(trajectory)):
        raise FloatingPointError(
            f"the fine reference simulation diverged for Re={reynolds.tolist()}"
        )
    return trajectory


def reference_trajectories(
    res: tuple[int, int] = DEFAULT_COARSE_RESOLUTION,
    re_list: Sequence[float] = DEFAULT_REYNOLDS,
    n_steps: int = 100,
    *,
    fine_res: tuple[int, int] = DEFAULT_FINE_RESOLUTION,
    warmup_steps: int = DEFAULT_WARMUP_STEPS,
    setup: WakeFlowSetup | None = None,
    cache_dir: str | os.PathLike | None = None,
    jit: bool = True,
    progress: bool = False,
) -> np.ndarray:
    """Fine-grid trajectories downsampled onto the coarse grid, one per Re.

    Each Re is cached in its own npz (see :func:`reference_cache_path`) holding the settings
    it was made with; a file whose stored settings differ, or that is too short, is
    regenerated. All missing Re are simulated together as one fine batch.

    Args:
        res: coarse (H, W).
        re_list: Reynolds numbers (each >= ``setup.min_reynolds``).
        n_steps: recorded steps after the warm-up (frame 0 is the state after warm-up).
        fine_res: fine (H, W), an integer multiple (same factor on both axes) of ``res``.
        warmup_steps: fine steps simulated before frame 0, to let the street develop.
        setup: physics settings (default :class:`WakeFlowSetup`).
        cache_dir: directory of the npz files (default :func:`default_cache_dir`).
        jit: jit-compile the fine simulator.
        progress: show a tqdm progress bar while simulating.

    Returns:
        (len(re_list), n_steps + 1, 2, H, W) float32, coarse layout, one time step = setup.dt.
    """
    res = _check_resolution(res, "res")
    fine_res = _check_resolution(fine_res, "fine_res")
    factor = fine_res[0] // res[0]
    if fine_res != (factor * res[0], factor * res[1]):
        raise ValueError(f"fine_res {fine_res} must be the same integer multiple of res {res}")
    n_steps = _check_n_steps(n_steps)
    if (
        isinstance(warmup_steps, bool)
        or not isinstance(warmup_steps, int | np.integer)
        or warmup_steps < 0
    ):
        raise ValueError(f"warmup_steps must be a non-negative int, got {warmup_steps!r}")
    setup = WakeFlowSetup() if setup is None else setup
    if (
        isinstance(re_list, str)
        or not isinstance(re_list, Sequence | np.ndarray)
        or len(re_list) == 0
    ):
        raise ValueError(
            f"re_list must be a non-empty sequence of Reynolds numbers, got {re_list!r}"
        )
    reynolds = _check_reynolds_values(list(re_list), setup.min_reynolds)
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()

    unique = sorted({float(re) for re in reynolds})
    settings = {re: _reference_settings(res, fine_res, re, warmup_steps, setup) for re in unique}
    paths = {re: _cache_file(directory, settings[re]) for re in unique}
    trajectories = {re: _load_cached(paths[re], settings[re], n_steps + 1) for re in unique}
    missing = [re for re in unique if trajectories[re] is None]
    if missing:
        log.info("simulating fine wake-flow references at %s for Re=%s", fine_res, missing)
        fine = WakeFlowSimulator(fine_res, setup, reynolds=missing[0], jit=jit)
        generated = _simulate_reference(
            fine, np.asarray(missing), n_steps, int(warmup_steps), factor, progress
        )
        for re, trajectory in zip(missing, generated, strict=True):
            _save_cached(paths[re], settings[re], trajectory)
            trajectories[re] = trajectory
    return np.stack([trajectories[float(re)] for re in reynolds]).astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------
# Command line: timings and cache warm-up (python -m oracles.wake_flow {bench,reference})
# --------------------------------------------------------------------------------------
def benchmark_step(
    resolution: tuple[int, int],
    batch: int,
    *,
    n_steps: int = 20,
    settle_steps: int = 30,
    num_threads: int | None = 1,
    jit: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Time :meth:`WakeFlowSimulator.step` on a batch with distinct small corrections.

    The flow first runs ``settle_steps`` past the impulsive start (whose first pressure
    solves are the most expensive); the first call (jit trace) is timed separately.

    Returns:
        JSON-able dict: resolution, batch, ms_per_step, ms_per_simulation_step, compile_s,
        threads, load average before/after.
    """
    import time

    import torch

    sim = WakeFlowSimulator(resolution, jit=jit, num_threads=num_threads)
    rng = np.random.default_rng(seed)
    state = sim.initial_state(batch)

    def corrections() -> np.ndarray:
        return (0.01 * rng.standard_normal(state.shape)).astype(np.float32)

    load_before = os.getloadavg()
    start = time.perf_counter()
    state = sim.step(state, corrections())
    compile_s = time.perf_counter() - start
    for _ in range(settle_steps):
        state = sim.step(state, corrections())
    pending = [corrections() for _ in range(n_steps)]
    start = time.perf_counter()
    for c in pending:
        state = sim.step(state, c)
    elapsed = time.perf_counter() - start
    return {
        "resolution": list(sim.resolution),
        "batch": batch,
        "steps": n_steps,
        "ms_per_step": round(1e3 * elapsed / max(n_steps, 1), 2),
        "ms_per_simulation_step": round(1e3 * elapsed / max(n_steps, 1) / batch, 3),
        "first_call_s": round(compile_s, 2),
        "jit": jit,
        "threads": num_threads if num_threads is not None else torch.get_num_threads(),
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
    }


def _parse_resolution(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"resolution must look like 32x64 (HxW), got {text!r}") from None
    return _check_resolution((h, w))


def main(argv: Sequence[str] | None = None) -> int:
    """``bench``: print step timings as JSON; ``reference``: fill the reference cache."""
    import argparse
    import time

    parser = argparse.ArgumentParser(prog="python -m oracles.wake_flow", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="time the step (JSON on stdout)")
    bench.add_argument("--resolutions", nargs="+", default=["32x64", "64x128"])
    bench.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    bench.add_argument("--steps", type=int, default=20)
    bench.add_argument("--settle", type=int, default=30)
    bench.add_argument("--threads", type=int, default=1)
    bench.add_argument("--no-jit", action="store_true")
    ref = commands.add_parser("reference", help="generate / load the cached references")
    ref.add_argument("--res", default="32x64")
    ref.add_argument("--fine-res", default="64x128")
    ref.add_argument("--re", nargs="+", type=float, default=list(DEFAULT_REYNOLDS))
    ref.add_argument("--n-steps", type=int, default=100)
    ref.add_argument("--warmup", type=int, default=DEFAULT_WARMUP_STEPS)
    ref.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)

    if args.command == "bench":
        results = [
            benchmark_step(
                _parse_resolution(r),
                b,
                n_steps=args.steps,
                settle_steps=args.settle,
                num_threads=args.threads,
                jit=not args.no_jit,
            )
            for r in args.resolutions
            for b in args.batches
        ]
        for result in results:
            print(json.dumps(result))
        return 0
    start = time.perf_counter()
    trajectories = reference_trajectories(
        _parse_resolution(args.res),
        args.re,
        args.n_steps,
        fine_res=_parse_resolution(args.fine_res),
        warmup_steps=args.warmup,
        cache_dir=args.cache_dir,
        progress=True,
    )
    summary = {
        "shape": list(trajectories.shape),
        "seconds": round(time.perf_counter() - start, 2),
        "files": [
            str(
                reference_cache_path(
                    re,
                    res=_parse_resolution(args.res),
                    fine_res=_parse_resolution(args.fine_res),
                    warmup_steps=args.warmup,
                    cache_dir=args.cache_dir,
                )
            )
            for re in args.re
        ],
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
