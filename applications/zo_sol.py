"""DeepZero Fig. 6: a network corrects a coarse wake-flow simulation, trained with ZO.

The coarse PhiFlow solver (``oracles/wake_flow.py``) advances the unsteady wake behind a
cylinder; a small CNN adds a correction after every step so that the coarse trajectory tracks
a fine simulation downsampled onto the coarse grid (Um et al. 2020, "Solver-in-the-Loop";
DeepZero Sec. 6.3). Four methods, evaluated on test Reynolds numbers not seen in training:

* ``SRC``    — the coarse solver alone;
* ``NON``    — the network trained first-order on pre-computed one-step coarse/fine pairs,
  no solver in the loop;
* ``FO-SOL`` — trained through ``n`` unrolled solver steps by autograd (Trainer "fo");
* ``ZO-SOL`` — the same loss, the solver a black box queried through its numpy ``step``:
  DeepZero (ZO-GraSP keep ratios, 95% gradient sparsity, sparse CGE, SGD; Trainer
  "deepzero"), every query of a step simulated as one solver batch.

Embedded default (600 steps per method; measured ~11 min on one core of a 2-core machine
whose other core was busy, plus 1.5-3.5 min once to fill the reference cache)::

    python applications/zo_sol.py --out runs/zo_sol

writes ``runs/zo_sol/mae.json`` (test MAE per method and per simulation, seconds per ZO step,
queries), ``mae.png`` (bar chart), ``vorticity.png`` (snapshot of every method) and one
Trainer folder per trained method. Paper scale (Um et al.: coarse 32x64, 4x finer
reference, 6 training / 5 test Re, 500 frames; see docs/zo_sol.md for what is not checked)::

    python applications/zo_sol.py --res 32x64 --fine-res 128x256 --frames 500 \\
        --kernel-size 5 --width 32 --windows-per-step 3 --steps 97000 --out runs/zo_sol_paper
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

METHODS = ("SRC", "NON", "FO-SOL", "ZO-SOL")
#: Um et al.'s Re layout: training Re spaced by factors of 2, test Re halfway (x1.5) between.
TRAIN_REYNOLDS = (100.0, 200.0, 400.0, 800.0, 1600.0, 3200.0)
TEST_REYNOLDS = (150.0, 300.0, 600.0, 1200.0, 2400.0)


@dataclass
class SolSettings:
    """Everything one run depends on (stored in ``mae.json``).

    Grids are ``(H, W)``; ``frames`` recorded reference steps per simulation (after
    ``warmup`` fine steps); ``n_steps`` unrolled solver steps per training window;
    ``eval_steps`` steps of each test rollout (default all ``frames``). ``steps`` optimizer
    steps per method, the same for every trained method, and by default every step sees 16
    reference frames (NON: ``non_batch_size`` one-step pairs; SOL: ``windows_per_step`` windows of
    ``n_steps``); ``steps_per_epoch`` (the ZO mask is redrawn, the test MAE logged and a
    checkpoint written every epoch). Learning rates are per method, each picked by one rule
    on this default without looking at the test set: the value of the grid 0.001, 0.003,
    0.01, 0.02, 0.05, 0.1, 0.2 with the lowest final loss of the method's own objective on
    its whole training set (seed 0, 600 steps; see docs/zo_sol.md). The rest of the recipe
    is shared.
    """

    res: tuple[int, int] = (16, 32)
    fine_res: tuple[int, int] = (64, 128)
    train_reynolds: tuple[float, ...] = TRAIN_REYNOLDS
    test_reynolds: tuple[float, ...] = TEST_REYNOLDS
    frames: int = 100
    warmup: int = 400
    n_steps: int = 16
    eval_steps: int | None = None
    width: int = 8
    depth: int = 3
    kernel_size: int = 3
    steps: int = 600
    steps_per_epoch: int = 20
    windows_per_step: int = 1
    non_batch_size: int = 16
    lr: dict[str, float] = field(
        default_factory=lambda: {"NON": 0.1, "FO-SOL": 0.003, "ZO-SOL": 0.01}
    )
    momentum: float = 0.9
    weight_decay: float = 0.0
    mu: float = 5e-3
    sparsity: float = 0.95
    ratios: str = "zo-grasp"
    grasp_q: int = 192
    reshuffle_every: int = 1
    seed: int = 0
    methods: tuple[str, ...] = METHODS
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {self.methods}")
        overlap = sorted(set(self.train_reynolds) & set(self.test_reynolds))
        if overlap:
            raise ValueError(f"test Reynolds numbers {overlap} are also in the training set")
        for name in ("frames", "n_steps", "steps", "steps_per_epoch", "windows_per_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.n_steps > self.frames:
            raise ValueError(f"n_steps={self.n_steps} exceeds frames={self.frames}")
        if self.eval_steps is not None and not 1 <= self.eval_steps <= self.frames:
            raise ValueError(
                f"eval_steps must be in [1, frames={self.frames}], got {self.eval_steps}"
            )

    @property
    def epochs(self) -> int:
        return math.ceil(self.steps / self.steps_per_epoch)


# --------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------
def load_data(settings: SolSettings, progress: bool = True) -> tuple[Any, Any]:
    """Training and test :class:`~zoopt.torch.sol.Trajectories` (cached fine references)."""
    from oracles.wake_flow import reference_trajectories
    from zoopt.torch.sol import Trajectories

    def load(reynolds: tuple[float, ...]) -> Trajectories:
        frames = reference_trajectories(
            settings.res,
            list(reynolds),
            settings.frames,
            fine_res=settings.fine_res,
            warmup_steps=settings.warmup,
            cache_dir=settings.cache_dir,
            progress=progress,
        )
        return Trajectories(frames, np.asarray(reynolds))

    # one fine batch for all Re not cached yet (training and test alike)
    load(tuple(settings.train_reynolds) + tuple(settings.test_reynolds))
    return load(settings.train_reynolds), load(settings.test_reynolds)


def build_model(settings: SolSettings, normalization: Any, seed: int) -> Any:
    """The correction CNN with seeded initial weights (the same for every method)."""
    import torch

    from zoopt.torch.sol import CorrectionCNN

    torch.manual_seed(seed)
    return CorrectionCNN(
        normalization,
        width=settings.width,
        depth=settings.depth,
        kernel_size=settings.kernel_size,
    )


def train_config(settings: SolSettings, method: str, progress: bool) -> Any:
    from zoopt.torch.train import TrainConfig

    return TrainConfig(
        method="deepzero" if method == "ZO-SOL" else "fo",
        epochs=settings.epochs,
        lr=settings.lr[method],
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
        mu=settings.mu,
        sparsity=settings.sparsity,
        ratios=settings.ratios,
        grasp_q=settings.grasp_q,
        grasp_mu=settings.mu,
        reshuffle_every=settings.reshuffle_every,
        seed=settings.seed,
        max_steps_per_epoch=settings.steps_per_epoch,
        progress=progress,
        plots=True,
    )


def zo_step_seconds(oracle: Any) -> dict[str, float]:
    """Wall seconds per ZO step (base rollout + coordinate queries), first step excluded.

    The first step of each batch size traces the jit-compiled solver; it is reported apart.
    """
    per_step = np.add(oracle.seconds["base_value"], oracle.seconds["coordinate_steps"])
    rest = per_step[1:] if per_step.size > 1 else per_step
    return {
        "mean": float(rest.mean()),
        "median": float(np.median(rest)),
        "first": float(per_step[0]),
    }


def train_method(
    method: str,
    settings: SolSettings,
    simulator: Any,
    train: Any,
    test: Any,
    pairs: Any,
    normalization: Any,
    out: Path,
    *,
    resume: bool,
    progress: bool,
) -> tuple[Any, dict[str, Any]]:
    """Train one of NON / FO-SOL / ZO-SOL through the Trainer; returns (task, info)."""
    from zoopt.torch.sol import SolverInTheLoopTask, SupervisedCorrectionTask
    from zoopt.torch.train import Trainer

    model = build_model(settings, normalization, settings.seed)
    if method == "NON":
        task = SupervisedCorrectionTask(
            model,
            pairs,
            simulator,
            test,
            batch_size=settings.non_batch_size,
            eval_steps=settings.eval_steps,
        )
    else:
        task = SolverInTheLoopTask(
            model,
            simulator,
            train,
            test,
            n_steps=settings.n_steps,
            batch_size=settings.windows_per_step,
            eval_steps=settings.eval_steps,
        )
    start = time.perf_counter()
    summary = Trainer(
        task,
        train_config(settings, method, progress),
        out / method.lower(),
        resume=resume,
        extra_summary={"application": "zo_sol", "sol_method": method},
    ).fit()
    info: dict[str, Any] = {
        "steps": summary["steps"],
        "queries": summary["queries"],
        "train_seconds": summary["wall_seconds"],
        "run_seconds": time.perf_counter() - start,
        "parameters": task.oracle.dim,
        # the method's own objective on its whole training set: what picks its lr (docs)
        "train_loss": task.training_loss(),
    }
    if method == "ZO-SOL" and task.oracle.seconds["base_value"]:
        info["seconds_per_step"] = zo_step_seconds(task.oracle)
        info["queries_per_step"] = zo_queries_per_step(summary["keep_ratios"], task.groups)
        info["keep_ratios"] = summary["keep_ratios"]
    elif task.oracle.seconds["loss_and_grad"]:
        info["seconds_per_step"] = {"mean": float(np.mean(task.oracle.seconds["loss_and_grad"]))}
    return task, info


def zo_queries_per_step(keep_ratios: dict[str, float], groups: list[Any]) -> int:
    """1 (the unperturbed rollout) + the coordinates the sparse mask keeps per step."""
    from zoopt import sparsity as sp

    return 1 + sum(sp.kept_count(keep_ratios.get(g.name, 1.0), g.size) for g in groups)


def gap_closed(mae: dict[str, float]) -> float | None:
    """Fraction of the SRC -> FO-SOL improvement that ZO-SOL achieves (paper: 0.57)."""
    if not all(m in mae for m in ("SRC", "FO-SOL", "ZO-SOL")):
        return None
    gap = mae["SRC"] - mae["FO-SOL"]
    return float((mae["SRC"] - mae["ZO-SOL"]) / gap) if gap > 0 else None


# --------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------
def plot_mae(mae: dict[str, float], per_sim: dict[str, list[float]], reynolds, path: Path) -> None:
    """Bar chart of the mean test MAE per method, with each test simulation as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(mae)
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    colors = {"SRC": "0.6", "NON": "C1", "FO-SOL": "C0", "ZO-SOL": "C3"}
    ax.bar(methods, [mae[m] for m in methods], color=[colors[m] for m in methods])
    for i, m in enumerate(methods):
        ax.scatter(np.full(len(per_sim[m]), i), per_sim[m], color="k", s=8, zorder=3)
        top = max(mae[m], *per_sim[m])
        ax.text(i + 0.05, top, f"{mae[m]:.3f}", ha="left", va="bottom", fontsize=9)
    ax.set_ylabel("test MAE (velocity, inflow units)")
    ax.set_title(f"wake flow, test Re {', '.join(f'{r:g}' for r in reynolds)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_vorticity(
    snapshots: dict[str, np.ndarray], spacing: tuple[float, float], title: str, path: Path
) -> None:
    """Vorticity of one state per panel (``snapshots``: name -> (2, H, W)), common colour scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from oracles.wake_flow import vorticity

    fields = {k: vorticity(v[None], spacing)[0] for k, v in snapshots.items()}
    vmax = float(np.percentile(np.abs(fields["reference"]), 99)) or 1.0
    fig, axes = plt.subplots(len(fields), 1, figsize=(5, 1.6 * len(fields)), squeeze=False)
    for ax, (name, w) in zip(axes[:, 0], fields.items(), strict=True):
        ax.imshow(w, origin="lower", cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="equal")
        ax.set_ylabel(name, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------
def run(settings: SolSettings, out: str | Path, *, resume: bool = False, progress: bool = True):
    """Train and evaluate every method of ``settings.methods``; returns the ``mae.json`` dict."""
    from oracles.wake_flow import WakeFlowSimulator
    from zoopt.torch.sol import Normalization, corrected_rollout, one_step_pairs, rollout_mae

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train, test = load_data(settings, progress=progress)
    data_seconds = time.perf_counter() - t0
    simulator = WakeFlowSimulator(settings.res)
    pairs = one_step_pairs(simulator, train)
    normalization = Normalization.fit(train.frames, train.reynolds, pairs[2] - pairs[0])

    n_eval = settings.eval_steps or settings.frames
    snap_sim = test.n_sims // 2  # the middle test Re
    snapshots = {"reference": test.frames[snap_sim, n_eval]}
    per_sim: dict[str, list[float]] = {}
    info: dict[str, dict[str, Any]] = {}
    for method in settings.methods:
        if method == "SRC":
            model = None
            start = time.perf_counter()
            per_sim[method] = rollout_mae(None, simulator, test, n_eval).tolist()
            info[method] = {"eval_seconds": time.perf_counter() - start}
        else:
            task, info[method] = train_method(
                method,
                settings,
                simulator,
                train,
                test,
                pairs,
                normalization,
                out,
                resume=resume,
                progress=progress,
            )
            model = task.model
            per_sim[method] = task.test_mae_per_simulation().tolist()
        rollout = corrected_rollout(
            model,
            simulator,
            test.frames[snap_sim : snap_sim + 1, 0],
            test.reynolds[snap_sim : snap_sim + 1],
            n_eval,
        )
        snapshots[method] = rollout[0, -1]
        if progress:
            print(f"zo_sol: {method:7s} test MAE {np.mean(per_sim[method]):.4f}", flush=True)

    mae = {m: float(np.mean(v)) for m, v in per_sim.items()}
    zo = info.get("ZO-SOL", {})
    result = {
        "mae": mae,
        "per_simulation": per_sim,
        "test_reynolds": list(test.reynolds),
        "train_reynolds": list(train.reynolds),
        "gap_closed_by_zo": gap_closed(mae),
        "zo_seconds_per_step": zo.get("seconds_per_step"),
        "zo_queries": zo.get("queries"),
        "zo_queries_per_step": zo.get("queries_per_step"),
        "methods": info,
        "loss": "MSE over the n unrolled steps, each channel / RMS one-step correction",
        "metric": "MAE of corrected vs downsampled fine velocity, all test steps and cells",
        "data_seconds": data_seconds,
        "total_seconds": time.perf_counter() - t0,
        "settings": asdict(settings),
        "normalization": normalization.as_dict(),
    }
    (out / "mae.json").write_text(json.dumps(result, indent=2))
    plot_mae(mae, per_sim, test.reynolds, out / "mae.png")
    plot_vorticity(
        snapshots,
        simulator.spacing,
        f"vorticity, test Re {test.reynolds[snap_sim]:g}, step {n_eval}",
        out / "vorticity.png",
    )
    return result


def _resolution(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW like 16x32, got {text!r}") from None
    return h, w


def parse_args(argv: list[str] | None = None) -> tuple[SolSettings, argparse.Namespace]:
    d = SolSettings()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/zo_sol")
    ap.add_argument("--res", type=_resolution, default=d.res, help="coarse HxW")
    ap.add_argument("--fine-res", type=_resolution, default=d.fine_res, help="reference HxW")
    ap.add_argument("--train-re", type=float, nargs="+", default=list(d.train_reynolds))
    ap.add_argument("--test-re", type=float, nargs="+", default=list(d.test_reynolds))
    ap.add_argument("--frames", type=int, default=d.frames)
    ap.add_argument("--warmup", type=int, default=d.warmup)
    ap.add_argument("--n-steps", type=int, default=d.n_steps, help="unrolled steps (SOL)")
    ap.add_argument("--eval-steps", type=int, default=None)
    ap.add_argument("--width", type=int, default=d.width)
    ap.add_argument("--depth", type=int, default=d.depth)
    ap.add_argument("--kernel-size", type=int, default=d.kernel_size)
    ap.add_argument("--steps", type=int, default=d.steps, help="optimizer steps per method")
    ap.add_argument("--steps-per-epoch", type=int, default=d.steps_per_epoch)
    ap.add_argument("--windows-per-step", type=int, default=d.windows_per_step)
    ap.add_argument("--non-batch-size", type=int, default=d.non_batch_size)
    for m in ("NON", "FO-SOL", "ZO-SOL"):
        ap.add_argument(f"--lr-{m.lower()}", type=float, default=d.lr[m])
    ap.add_argument("--momentum", type=float, default=d.momentum)
    ap.add_argument("--weight-decay", type=float, default=d.weight_decay)
    ap.add_argument("--mu", type=float, default=d.mu)
    ap.add_argument("--sparsity", type=float, default=d.sparsity)
    ap.add_argument("--ratios", default=d.ratios)
    ap.add_argument("--grasp-q", type=int, default=d.grasp_q)
    ap.add_argument("--reshuffle-every", type=int, default=d.reshuffle_every)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--methods", nargs="+", default=list(d.methods), choices=METHODS)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the solver uses 1)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    settings = replace(
        d,
        res=a.res,
        fine_res=a.fine_res,
        train_reynolds=tuple(a.train_re),
        test_reynolds=tuple(a.test_re),
        frames=a.frames,
        warmup=a.warmup,
        n_steps=a.n_steps,
        eval_steps=a.eval_steps,
        width=a.width,
        depth=a.depth,
        kernel_size=a.kernel_size,
        steps=a.steps,
        steps_per_epoch=a.steps_per_epoch,
        windows_per_step=a.windows_per_step,
        non_batch_size=a.non_batch_size,
        lr={
            m: getattr(a, f"lr_{m.lower().replace('-', '_')}") for m in ("NON", "FO-SOL", "ZO-SOL")
        },
        momentum=a.momentum,
        weight_decay=a.weight_decay,
        mu=a.mu,
        sparsity=a.sparsity,
        ratios=a.ratios,
        grasp_q=a.grasp_q,
        reshuffle_every=a.reshuffle_every,
        seed=a.seed,
        methods=tuple(a.methods),
        cache_dir=a.cache_dir,
    )
    return settings, a


def main(argv: list[str] | None = None) -> int:
    import warnings

    import torch

    settings, a = parse_args(argv)
    if a.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {a.threads}")
    torch.set_num_threads(a.threads)
    # phiml's jit uses torch.jit.trace (deprecated in torch 2.13) and PhiFlow's pressure matrix
    # is a beta sparse-CSR tensor: warnings that are not ours to fix, printed every trace
    warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    result = run(settings, a.out, resume=a.resume, progress=not a.no_progress)
    mae = result["mae"]
    print("\n" + "=" * 64)
    for m, v in mae.items():
        print(
            f"{m:7s} test MAE {v:.4f}   per simulation {np.round(result['per_simulation'][m], 4)}"
        )
    if result["gap_closed_by_zo"] is not None:
        print(
            f"ZO-SOL closes {result['gap_closed_by_zo']:.0%} of the SRC -> FO-SOL gap (paper: 57%)"
        )
    if result["zo_seconds_per_step"]:
        s = result["zo_seconds_per_step"]
        print(
            f"ZO-SOL: {s['mean']:.2f} s per step (median {s['median']:.2f}), "
            f"{result['zo_queries_per_step']} queries per step, {result['zo_queries']:,} in all"
        )
    print(f"results in {a.out}/mae.json, mae.png, vorticity.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
