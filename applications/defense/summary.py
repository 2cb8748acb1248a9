"""Several seeds of the experiment side by side: a Markdown table, the mean over seeds, a plot.

    python -m applications.defense.summary runs/groceries/seed0 runs/groceries/seed1 \\
        runs/groceries/seed2 --plot docs/certified_defense_groceries.png

Reads each ``DIR/certified_accuracy.json`` (and the last line of ``DIR/<method>/metrics.jsonl``
for the last-epoch training loss); writes nothing but the plot.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import METHOD_NAMES, METHODS


def load_run(folder: str | Path) -> dict[str, Any]:
    """``folder/certified_accuracy.json`` with ``folder``, and ``last_loss`` (method -> the
    last epoch's mean training loss, or None when that method's metrics are missing).

    Raises:
        FileNotFoundError: naming the folder that has no ``certified_accuracy.json``.
    """
    folder = Path(folder)
    path = folder / "certified_accuracy.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no certified_accuracy.json (run not finished?)")
    run = json.loads(path.read_text())
    run["folder"] = str(folder)
    run["last_loss"] = {}
    for method in run["certified_accuracy"]:
        metrics = folder / method / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        run["last_loss"][method] = json.loads(lines[-1]).get("train_loss") if lines else None
    return run


def mean_accuracy(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Method -> radius (the JSON's string keys) -> certified accuracy in [0, 1], averaged over
    ``runs``; only methods and radii present in every run."""
    methods = [m for m in METHODS if all(m in r["certified_accuracy"] for r in runs)]
    means: dict[str, dict[str, float]] = {}
    for m in methods:
        radii = list(runs[0]["certified_accuracy"][m])
        means[m] = {
            r: sum(run["certified_accuracy"][m][r] for run in runs) / len(runs) for r in radii
        }
    return means


def seed_table(runs: Sequence[dict[str, Any]]) -> str:
    """One row per run (seed, clean accuracy of the certified images, each method's certified
    accuracy in % at every radius, last-epoch training losses) and a row of means."""
    means = mean_accuracy(runs)
    methods = list(means)

    def cells(acc: dict[str, float]) -> str:
        return " / ".join(f"{100 * a:.1f}" for a in acc.values())

    radii = " / ".join(list(means[methods[0]])) if methods else ""
    head = (
        f"| seed | clean accuracy | {' | '.join(METHOD_NAMES[m] for m in methods)} | "
        f"last-epoch loss {' / '.join(METHOD_NAMES[m] for m in methods)} |"
    )
    rows = [head, "|---|---:|" + "---|" * len(methods) + "---|"]
    for run in runs:
        losses = " / ".join(
            "-" if run["last_loss"].get(m) is None else f"{run['last_loss'][m]:.3f}"
            for m in methods
        )
        rows.append(
            f"| {run['settings']['seed']} | {100 * run['clean_accuracy']:.1f} % | "
            + " | ".join(cells(run["certified_accuracy"][m]) for m in methods)
            + f" | {losses} |"
        )
    rows.append(
        "| mean | | " + " | ".join(cells(means[m]) for m in methods) + " | |",
    )
    return "\n".join(rows) + f"\n\n(certified accuracy in % at r = {radii}.)"


def done_criterion(runs: Sequence[dict[str, Any]]) -> dict[str, bool]:
    """Issue 15's ordering on the means: DeepZero >= ZO-AE-DS at every radius, FO-DS >=
    DeepZero at r = 0 (only what the runs' methods allow)."""
    means = mean_accuracy(runs)
    out: dict[str, bool] = {}
    if "deepzero" in means and "zo-ae-ds" in means:
        out["deepzero >= zo-ae-ds at every radius"] = all(
            means["deepzero"][r] >= means["zo-ae-ds"][r] for r in means["deepzero"]
        )
    if "deepzero" in means and "fo-ds" in means:
        first = next(iter(means["deepzero"]))
        out[f"fo-ds >= deepzero at r = {first}"] = means["fo-ds"][first] >= means["deepzero"][first]
    return out


def plot_means(runs: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Mean certified accuracy vs radius over ``runs``; bars span the seeds' min to max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = mean_accuracy(runs)
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, (m, acc) in enumerate(means.items()):
        radii = [float(r) for r in acc]
        values = [acc[r] for r in acc]
        low = [v - min(run["certified_accuracy"][m][r] for run in runs) for r, v in acc.items()]
        high = [max(run["certified_accuracy"][m][r] for run in runs) - v for r, v in acc.items()]
        shift = (i - 1) * 0.008  # keep the bars apart
        ax.errorbar(
            [r + shift for r in radii], values, yerr=[low, high], fmt="-o", capsize=3,
            color=f"C{i}", label=METHOD_NAMES[m],
        )  # fmt: skip
    sigma = runs[0]["settings"]["sigma"]
    ax.set_xlabel("L2 radius")
    ax.set_ylabel("certified accuracy")
    ax.set_title(f"mean of {len(runs)} seeds (bars: min-max), sigma = {sigma:g}")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", help="output folders of finished runs")
    p.add_argument("--plot", help="write the plot of the means here (PNG)")
    args = p.parse_args(argv)
    runs = [load_run(d) for d in args.dirs]
    print(seed_table(runs))
    for name, ok in done_criterion(runs).items():
        print(f"{name}: {'yes' if ok else 'no'}")
    if args.plot:
        plot_means(runs, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
