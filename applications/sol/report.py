"""What a run reports: the gap ZO-SOL closes, the two figures and the printed table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: bar colour of each method in ``mae.png``
METHOD_COLORS = {"SRC": "0.6", "NON": "C1", "FO-SOL": "C0", "ZO-SOL": "C3"}


def gap_closed(mae: Mapping[str, float]) -> float | None:
    """Fraction of the SRC -> FO-SOL improvement that ZO-SOL achieves (paper: 0.57).

    ``None`` unless all three ran and FO-SOL improved on SRC.
    """
    if not all(m in mae for m in ("SRC", "FO-SOL", "ZO-SOL")):
        return None
    gap = mae["SRC"] - mae["FO-SOL"]
    return float((mae["SRC"] - mae["ZO-SOL"]) / gap) if gap > 0 else None


def plot_mae(
    mae: Mapping[str, float],
    per_sim: Mapping[str, Sequence[float]],
    reynolds: Sequence[float] | np.ndarray,
    path: Path,
) -> None:
    """Bar chart of the mean test MAE per method, with each test simulation as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(mae)
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.bar(methods, [mae[m] for m in methods], color=[METHOD_COLORS[m] for m in methods])
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
    snapshots: Mapping[str, np.ndarray], spacing: tuple[float, float], title: str, path: Path
) -> None:
    """Vorticity of one state per panel (``snapshots``: name -> ``(2, H, W)``, one of them
    ``"reference"``, which sets the common colour scale); ``spacing`` ``(dy, dx)``."""
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


def summary_lines(result: Mapping[str, Any], out: Path) -> list[str]:
    """The table the CLI prints at the end of a run (from the ``mae.json`` dict)."""
    lines = ["", "=" * 64]
    for m, v in result["mae"].items():
        lines.append(
            f"{m:7s} test MAE {v:.4f}   per simulation {np.round(result['per_simulation'][m], 4)}"
        )
    if result["gap_closed_by_zo"] is not None:
        lines.append(
            f"ZO-SOL closes {result['gap_closed_by_zo']:.0%} of the SRC -> FO-SOL gap (paper: 57%)"
        )
    if result["zo_seconds_per_step"]:
        s = result["zo_seconds_per_step"]
        lines.append(
            f"ZO-SOL: {s['mean']:.2f} s per step (median {s['median']:.2f}), "
            f"{result['zo_queries_per_step']} queries per step, {result['zo_queries']:,} in all"
        )
    lines.append(f"results in {out}/mae.json, mae.png, vorticity.png")
    return lines
