"""What a run reports: the per-method summary, the goal check, the table and the plot."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: the goal of issue 21: the best ZO method reaches this fraction of first-order accuracy
GOAL_FRACTION = 0.9
COLORS = {"zo-sgd": "C1", "rge-q16": "C2", "zo-adam": "C4", "deepzero": "C3", "fo": "C0"}


def summary_rows(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (mode, method): means over seeds (accuracy also its std, min and max)."""
    keys: list[tuple[str, str]] = []
    for r in runs:
        if (r["mode"], r["method"]) not in keys:
            keys.append((r["mode"], r["method"]))
    rows = []
    for mode, method in keys:
        group = [r for r in runs if r["mode"] == mode and r["method"] == method]
        acc = np.array([r["test_accuracy"] for r in group])
        rows.append(
            {
                "mode": mode,
                "method": method,
                "label": group[0]["label"],
                "zeroth_order": group[0]["budget_unit"] == "queries",
                "seeds": [r["seed"] for r in group],
                "trainable_parameters": group[0]["trainable_parameters"],
                "budget": group[0]["budget"],
                "budget_unit": group[0]["budget_unit"],
                "queries": float(np.mean([r["queries"] for r in group])),
                "steps": float(np.mean([r["steps"] for r in group])),
                "wall_seconds": float(np.mean([r["wall_seconds"] for r in group])),
                "lr": group[0]["lr"],
                "test_accuracy": float(acc.mean()),
                "test_accuracy_std": float(acc.std()),
                "test_accuracy_min": float(acc.min()),
                "test_accuracy_max": float(acc.max()),
                "test_accuracy_before": float(np.mean([r["test_accuracy_before"] for r in group])),
            }
        )
    return rows


def goal(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Best ZO (mean over seeds, any mode) against the best first-order fine-tuning (any
    mode); ``None`` unless both ran. ``met``: the ratio is at least :data:`GOAL_FRACTION`."""
    zo = [r for r in rows if r["zeroth_order"]]
    fo = [r for r in rows if not r["zeroth_order"]]
    if not zo or not fo:
        return None
    best_zo = max(zo, key=lambda r: r["test_accuracy"])
    best_fo = max(fo, key=lambda r: r["test_accuracy"])
    ratio = best_zo["test_accuracy"] / best_fo["test_accuracy"]
    per_mode = {}
    for mode in dict.fromkeys(r["mode"] for r in rows):
        z = [r for r in zo if r["mode"] == mode]
        f = [r for r in fo if r["mode"] == mode]
        if z and f:
            b = max(z, key=lambda r: r["test_accuracy"])
            per_mode[mode] = {
                "best_zo": b["method"],
                "ratio": b["test_accuracy"] / f[0]["test_accuracy"],
            }
    return {
        "fraction": GOAL_FRACTION,
        "best_zo": {"method": best_zo["method"], "mode": best_zo["mode"],
                    "test_accuracy": best_zo["test_accuracy"]},
        "best_fo": {"mode": best_fo["mode"], "test_accuracy": best_fo["test_accuracy"]},
        "ratio": ratio,
        "met": bool(ratio >= GOAL_FRACTION),
        "per_mode": per_mode,
    }  # fmt: skip


def summary_table(result: dict[str, Any]) -> str:
    """The markdown table of ``summary.md`` (and docs/finetune.md), with the goal line."""
    rows = result["summary"]
    seeds = len(result["settings"]["seeds"])
    lines = [
        f"Fashion-MNIST test accuracy after fine-tuning (mean ± std over {seeds} seed(s); "
        f"{result['data']['test_images']['fashion']:,} test images).",
        "",
        "| mode | method | trainable | budget | queries used | steps | wall s | lr | "
        "test acc | % of FO |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    fo = {r["mode"]: r["test_accuracy"] for r in rows if not r["zeroth_order"]}
    for r in rows:
        budget = f"{r['budget']:,} {'q' if r['zeroth_order'] else 'steps'}"
        queries = f"{r['queries']:,.0f}" if r["zeroth_order"] else "–"
        share = f"{100 * r['test_accuracy'] / fo[r['mode']]:.1f}" if r["mode"] in fo else "–"
        lines.append(
            f"| {r['mode']} | {r['label']} | {r['trainable_parameters']:,} | {budget} | "
            f"{queries} | {r['steps']:,.0f} | {r['wall_seconds']:.1f} | {r['lr']:g} | "
            f"{r['test_accuracy']:.4f} ± {r['test_accuracy_std']:.4f} | {share} |"
        )
    g = result.get("goal")
    if g is not None:
        lines += [
            "",
            f"Goal (best ZO ≥ {g['fraction']:.0%} of the best first-order fine-tuning): best ZO "
            f"= {g['best_zo']['method']} ({g['best_zo']['mode']}) "
            f"{g['best_zo']['test_accuracy']:.4f}, best FO ({g['best_fo']['mode']}) "
            f"{g['best_fo']['test_accuracy']:.4f}: ratio {g['ratio']:.3f} → "
            f"**{'met' if g['met'] else 'not met'}**.",
        ]
    pre = result["pretraining"]
    lines.append("")
    lines.append(
        "Pretraining (first order, MNIST 60k): test accuracy "
        + ", ".join(f"{p['mnist_test_accuracy']:.4f}" for p in pre)
        + f" ({pre[0]['steps']} steps); before fine-tuning, Fashion-MNIST accuracy "
        f"{np.mean([r['test_accuracy_before'] for r in rows]):.4f}."
    )
    return "\n".join(lines)


def _mean_curve(runs: Sequence[dict[str, Any]], key: str) -> tuple[np.ndarray, ...]:
    """Mean x and accuracy (and min, max) over seeds, point by point (same eval schedule)."""
    n = min(len(r["curve"]) for r in runs)
    x = np.array([[p[key] for p in r["curve"][:n]] for r in runs], dtype=float)
    y = np.array([[p["test_accuracy"] for p in r["curve"][:n]] for r in runs], dtype=float)
    return x.mean(0), y.mean(0), y.min(0), y.max(0)


def plot_curves(runs: Sequence[dict[str, Any]], path: Path) -> None:
    """Accuracy vs queries (top) and vs wall time (bottom), one column per mode; the line is
    the mean over seeds, the band their min–max. First order has no queries: a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r["mode"] for r in runs))
    methods = list(dict.fromkeys(r["method"] for r in runs))
    fig, axes = plt.subplots(2, len(modes), figsize=(5.5 * len(modes), 7), squeeze=False)
    for col, mode in enumerate(modes):
        for method in methods:
            group = [r for r in runs if r["mode"] == mode and r["method"] == method]
            if not group:
                continue
            color, label = COLORS.get(method), group[0]["label"]
            zo = group[0]["budget_unit"] == "queries"
            for row, key in enumerate(("queries", "wall_seconds")):
                ax = axes[row][col]
                if key == "queries" and not zo:
                    acc = np.mean([r["test_accuracy"] for r in group])
                    ax.axhline(acc, color=color, ls="--", label=f"{label} (final)")
                    continue
                x, y, lo, hi = _mean_curve(group, key)
                ax.plot(x, y, marker="o", ms=3, color=color, label=label)
                ax.fill_between(x, lo, hi, color=color, alpha=0.15)
        for row, xlabel in enumerate(("queries (forward passes)", "wall time (s)")):
            ax = axes[row][col]
            ax.set_xscale("symlog", linthresh=100 if row == 0 else 1)
            ax.set_xlim(left=0)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("Fashion-MNIST test accuracy")
            ax.set_title(f"{mode} fine-tuning")
            ax.grid(alpha=0.3)
        axes[0][col].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
