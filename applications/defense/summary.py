"""Several seeds of the experiment side by side: tables with intervals, paired tests, a plot.

    python -m applications.defense.summary runs/groceries26/seed0 runs/groceries26/seed1 \\
        runs/groceries26/seed2 --plot docs/certified_defense_groceries.png

Reads each ``DIR/certified_accuracy.json`` and, where present, each method's per-image
``DIR/<method>/certificates.json`` (a run still certifying is summarized from those, on the
images every method has certified so far, and marked partial). Prints:

- per seed: certified accuracy (%) per method and radius with its 95 % Clopper-Pearson
  interval, and McNemar's exact test of every pair of methods on that seed's images;
- pooled over the seeds: each image averaged over the seeds that certified it, the mean over
  images with a 95 % bootstrap interval (images resampled; the seeds certify the same fixed
  test photos, so they are not independent samples of images), per method and for every
  pair's difference.

- what the runs support: per pair and radius an ordering only where the pooled difference's
  interval excludes 0 and no seed's McNemar test points the other way
  (:func:`supported_orderings`).

Writes nothing but the plot (``--plot``: pooled accuracy with its interval per method and
radius) and, with ``--json``, these statistics.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

from .config import METHOD_NAMES, METHODS, PAPER_RADII
from .statistics import correct_at, image_bootstrap, run_statistics


def _certificates(folder: Path, method: str) -> dict[str, Any] | None:
    path = folder / method / "certificates.json"
    return json.loads(path.read_text()) if path.is_file() else None


def load_run(folder: str | Path) -> dict[str, Any]:
    """``folder/certified_accuracy.json`` with ``folder``, ``last_loss`` (method -> the last
    epoch's mean training loss of the run it certified, or None) and ``certificates``
    (method -> its ``certificates.json``, when present). A run without
    ``certified_accuracy.json`` but with certificates is built from them, on the images every
    method has certified so far, at the paper's radii (``partial``: True).

    Raises:
        FileNotFoundError: naming the folder that has neither.
    """
    folder = Path(folder)
    path = folder / "certified_accuracy.json"
    certificates = {m: c for m in METHODS if (c := _certificates(folder, m)) is not None}
    if path.is_file():
        run = json.loads(path.read_text())
        run["partial"] = False
    elif certificates:
        first = next(iter(certificates.values()))
        run = {
            "certified_accuracy": {},
            "clean_accuracy": None,
            "settings": {"seed": first["seed"], "sigma": first["sigma"]},
            "partial": True,
        }
    else:
        raise FileNotFoundError(
            f"{folder} has no certified_accuracy.json and no certificates (run not started?)"
        )
    run["folder"] = str(folder)
    run["certificates"] = certificates
    methods = list(run["certified_accuracy"]) or list(certificates)
    if run["partial"]:  # the images every method has certified so far
        count = min(len(c["certificates"]) for c in certificates.values())
        for m, c in certificates.items():
            labels = c["labels"][:count]
            run["certified_accuracy"][m] = {
                f"{r:g}": float(correct_at(c["certificates"][:count], labels, r).mean())
                if count
                else 0.0
                for r in PAPER_RADII
            }
    run["last_loss"] = {}
    for method in methods:
        selection = folder / method / "selection.json"
        trained = folder / method
        if selection.is_file():
            trained = Path(json.loads(selection.read_text())["folder"])
            if not trained.is_absolute() and not trained.exists():
                trained = folder / method / trained.name
        metrics = trained / "metrics.jsonl"
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
        clean = run.get("clean_accuracy")
        rows.append(
            f"| {run['settings']['seed']}{' (partial)' if run.get('partial') else ''} | "
            + ("-" if clean is None else f"{100 * clean:.1f} %")
            + " | "
            + " | ".join(cells(run["certified_accuracy"][m]) for m in methods)
            + f" | {losses} |"
        )
    rows.append(
        "| mean | | " + " | ".join(cells(means[m]) for m in methods) + " | |",
    )
    return "\n".join(rows) + f"\n\n(certified accuracy in % at r = {radii}.)"


def done_criterion(runs: Sequence[dict[str, Any]]) -> dict[str, bool]:
    """Issue 15's ordering on the means: DeepZero >= ZO-AE-DS at every radius, FO-DS >=
    DeepZero at r = 0 (only what the runs' methods allow). Point estimates only: see
    :func:`pooled_statistics` for what the intervals and paired tests support."""
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


# -- intervals and paired tests from the per-image certificates ------------------------------
def _common(run: dict[str, Any]) -> tuple[list[str], int]:
    """The methods with certificates and how many images all of them have certified."""
    certs = run["certificates"]
    methods = [m for m in METHODS if m in certs]
    count = min((len(certs[m]["certificates"]) for m in methods), default=0)
    return methods, count


def per_seed_statistics(run: dict[str, Any], radii: Sequence[float]) -> dict[str, Any] | None:
    """:func:`~applications.defense.statistics.run_statistics` of one run on the images every
    method has certified (None without certificates)."""
    methods, count = _common(run)
    if not methods or count == 0:
        return None
    certs = run["certificates"]
    labels = certs[methods[0]]["labels"][:count]
    return run_statistics({m: certs[m]["certificates"][:count] for m in methods}, labels, radii)


def pooled_statistics(runs: Sequence[dict[str, Any]], radii: Sequence[float]) -> dict[str, Any]:
    """Over the seeds: per method and radius the mean over images (each averaged over the seeds
    that certified it) with a 95 % image-bootstrap interval; per pair of methods and radius
    the mean paired difference (A - B) with its interval. Images are matched by content
    (``image_ids``)."""
    methods = [m for m in METHODS if all(m in r["certificates"] for r in runs)]
    per_image: dict[tuple[str, float], dict[str, list[float]]] = {}
    for run in runs:
        _, count = _common(run)
        for m in methods:
            c = run["certificates"][m]
            for r in radii:
                hits = correct_at(c["certificates"][:count], c["labels"][:count], r)
                bucket = per_image.setdefault((m, r), {})
                for image, hit in zip(c["image_ids"][:count], hits, strict=True):
                    bucket.setdefault(image, []).append(float(hit))
    accuracy = {
        m: {f"{r:g}": _interval(per_image[m, r]) for r in radii if per_image.get((m, r))}
        for m in methods
    }
    differences = []
    for a, b in combinations(methods, 2):
        for r in radii:
            pa, pb = per_image.get((a, r), {}), per_image.get((b, r), {})
            diff = {i: [x - y for x, y in zip(pa[i], pb[i], strict=True)] for i in pa if i in pb}
            if diff:
                differences.append({"a": a, "b": b, "radius": f"{r:g}"} | _interval(diff))
    images = len(next(iter(per_image.values()), {}))
    return {"images": images, "accuracy": accuracy, "differences": differences}


def supported_orderings(
    runs: Sequence[dict[str, Any]], radii: Sequence[float], level: float = 0.05
) -> list[dict[str, Any]]:
    """What the runs support about each pair of methods (A, B) at each radius.

    ``verdict`` is ``"A > B"`` (with the methods' keys) only where the pooled difference's 95 %
    bootstrap interval lies above 0 **and** no seed's McNemar test points the other way
    (``a_only < b_only``); ``"B > A"`` symmetrically; else ``"not resolved"``. Also:
    the pooled ``mean`` difference and its ``interval``, each seed's discordant counts
    ``(a_only, b_only)`` and ``pvalue``, and ``seeds_significant``: seeds whose McNemar
    p < ``level`` in the verdict's direction (``None`` when not resolved). This is the rule
    docs/certified_defense.md states an ordering by; a point estimate alone orders nothing.
    """
    per_seed = [per_seed_statistics(run, radii) for run in runs]
    return _orderings(per_seed, pooled_statistics(runs, radii), level)


def _orderings(
    per_seed: Sequence[dict[str, Any] | None], pooled: dict[str, Any], level: float = 0.05
) -> list[dict[str, Any]]:
    """:func:`supported_orderings` from statistics already computed."""
    out = []
    for d in pooled["differences"]:
        a, b, r = d["a"], d["b"], d["radius"]
        tests = [
            next(t for t in stats["paired_tests"] if (t["a"], t["b"], t["radius"]) == (a, b, r))
            for stats in per_seed
            if stats is not None
        ]
        signs = [t["a_only"] - t["b_only"] for t in tests]
        lo, hi = d["interval"]
        if lo > 0 and all(x >= 0 for x in signs):
            verdict, wins = f"{a} > {b}", [t for t in tests if t["a_only"] > t["b_only"]]
        elif hi < 0 and all(x <= 0 for x in signs):
            verdict, wins = f"{b} > {a}", [t for t in tests if t["b_only"] > t["a_only"]]
        else:
            verdict, wins = "not resolved", None
        out.append({
            "a": a, "b": b, "radius": r, "mean": d["mean"], "interval": d["interval"],
            "per_seed": [
                {"a_only": t["a_only"], "b_only": t["b_only"], "pvalue": t["pvalue"]}
                for t in tests
            ],
            "verdict": verdict,
            "seeds_significant": None if wins is None
            else sum(t["pvalue"] < level for t in wins),
        })  # fmt: skip
    return out


def seed_statistics(runs: Sequence[dict[str, Any]], radii: Sequence[float]) -> dict[str, Any]:
    """Everything the summary reports from per-image certificates, computed once:
    ``per_seed`` (:func:`per_seed_statistics` of each run, None without certificates),
    ``pooled`` (:func:`pooled_statistics`) and ``orderings`` (:func:`supported_orderings`)."""
    per_seed = [per_seed_statistics(run, radii) for run in runs]
    pooled = pooled_statistics(runs, radii)
    return {"per_seed": per_seed, "pooled": pooled, "orderings": _orderings(per_seed, pooled)}


def orderings_table(orderings: Sequence[dict[str, Any]], radii: Sequence[float], seeds: int) -> str:
    """Markdown: :func:`supported_orderings` per pair and radius, over ``seeds`` seeds."""
    rows = ["| pair | " + " | ".join(f"r = {r:g}" for r in radii) + " |",
            "|---|" + "---|" * len(radii)]  # fmt: skip
    grouped: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for o in orderings:
        grouped.setdefault((o["a"], o["b"]), {})[o["radius"]] = o
    for (a, b), cells in grouped.items():
        shown = []
        for r in radii:
            o = cells.get(f"{r:g}")
            if o is None:
                shown.append("-")
            elif o["verdict"] == "not resolved":
                shown.append("not resolved")
            else:
                first, second = o["verdict"].split(" > ")
                shown.append(
                    f"**{METHOD_NAMES[first]} > {METHOD_NAMES[second]}** "
                    f"({o['seeds_significant']}/{seeds} seeds p < 0.05)"
                )
        rows.append(f"| {METHOD_NAMES[a]} vs {METHOD_NAMES[b]} | " + " | ".join(shown) + " |")
    return "\n".join(rows)


def _interval(values: dict[str, list[float]]) -> dict[str, Any]:
    mean, (low, high) = image_bootstrap(values)
    return {"mean": mean, "interval": [low, high]}


def _pct(cell: dict[str, Any], key: str = "accuracy") -> str:
    lo, hi = cell["interval"]
    return f"{100 * cell[key]:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def statistics_tables(
    runs: Sequence[dict[str, Any]], radii: Sequence[float], stats: dict[str, Any] | None = None
) -> str:
    """Markdown: per seed the accuracy with Clopper-Pearson intervals and McNemar's tests;
    pooled over the seeds the accuracy and the paired differences with bootstrap intervals;
    the orderings they support. ``stats``: :func:`seed_statistics` of ``runs`` at ``radii``
    (computed here when not given)."""
    if stats is None:
        stats = seed_statistics(runs, radii)
    out: list[str] = []
    head = "| seed | method | images | " + " | ".join(f"r = {r:g}" for r in radii) + " |"
    rows = [head, "|---|---|---:|" + "---:|" * len(radii)]
    tests = ["| seed | pair (A vs B) | " + " | ".join(f"r = {r:g}" for r in radii) + " |",
             "|---|---|" + "---|" * len(radii)]  # fmt: skip
    for run, one in zip(runs, stats["per_seed"], strict=True):
        if one is None:
            continue
        seed = f"{run['settings']['seed']}{' (partial)' if run.get('partial') else ''}"
        for m, cells in one["certified"].items():
            rows.append(
                f"| {seed} | {METHOD_NAMES[m]} | {one['images']} | "
                + " | ".join(_pct(cells[f"{r:g}"]) for r in radii)
                + " |"
            )
        pairs: dict[tuple[str, str], list[str]] = {}
        for t in one["paired_tests"]:
            pairs.setdefault((t["a"], t["b"]), []).append(
                f"{t['a_only']} vs {t['b_only']}, p = {t['pvalue']:.2g}"
            )
        for (a, b), cells in pairs.items():
            tests.append(
                f"| {seed} | {METHOD_NAMES[a]} vs {METHOD_NAMES[b]} | " + " | ".join(cells) + " |"
            )
    if len(rows) == 2:
        return "(no per-image certificates: intervals and paired tests need them)"
    out += ["Certified accuracy (%) per seed, [95 % Clopper-Pearson interval]:", "", *rows, ""]
    out += ["McNemar's exact test per seed (images certified only by A vs only by B, "
            "two-sided p):", "", *tests, ""]  # fmt: skip
    pooled = stats["pooled"]
    out += [f"Pooled over {len(runs)} seeds ({pooled['images']} distinct test images; each "
            "image averaged over its seeds; [95 % bootstrap interval over images]):", "",
            "| method | " + " | ".join(f"r = {r:g}" for r in radii) + " |",
            "|---|" + "---:|" * len(radii)]  # fmt: skip
    for m, cells in pooled["accuracy"].items():
        out.append(
            f"| {METHOD_NAMES[m]} | "
            + " | ".join(_pct(cells[f"{r:g}"], "mean") for r in radii)
            + " |"
        )
    out += ["", "| difference (A - B), points | " + " | ".join(f"r = {r:g}" for r in radii) + " |",
            "|---|" + "---:|" * len(radii)]  # fmt: skip
    grouped: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for d in pooled["differences"]:
        grouped.setdefault((d["a"], d["b"]), {})[d["radius"]] = d
    for (a, b), cells in grouped.items():
        out.append(
            f"| {METHOD_NAMES[a]} - {METHOD_NAMES[b]} | "
            + " | ".join(_pct(cells[f"{r:g}"], "mean") for r in radii if f"{r:g}" in cells)
            + " |"
        )
    out += ["", "What the runs support (an ordering only where the pooled difference's interval "
            "excludes 0 and no seed's McNemar test points the other way):", "",
            orderings_table(stats["orderings"], radii,
                            sum(st is not None for st in stats["per_seed"]))]  # fmt: skip
    return "\n".join(out)


def plot_means(
    runs: Sequence[dict[str, Any]], path: str | Path, pooled: dict[str, Any] | None = None
) -> None:
    """Certified accuracy vs radius over ``runs``: with per-image certificates the pooled mean
    and its 95 % image-bootstrap interval; otherwise the mean with the seeds' min-max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = mean_accuracy(runs)
    radii_keys = list(next(iter(means.values()))) if means else []
    have_certificates = all(r["certificates"] for r in runs)
    if pooled is None and have_certificates:
        pooled = pooled_statistics(runs, [float(r) for r in radii_keys])
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, (m, acc) in enumerate(means.items()):
        radii = [float(r) for r in acc]
        if pooled is not None and m in pooled["accuracy"]:
            cells = pooled["accuracy"][m]
            values = [cells[r]["mean"] for r in acc]
            low = [v - cells[r]["interval"][0] for r, v in zip(acc, values, strict=True)]
            high = [cells[r]["interval"][1] - v for r, v in zip(acc, values, strict=True)]
        else:
            values = [acc[r] for r in acc]
            low = [v - min(run["certified_accuracy"][m][r] for run in runs) for r, v in acc.items()]
            high = [
                max(run["certified_accuracy"][m][r] for run in runs) - v for r, v in acc.items()
            ]
        shift = (i - 1) * 0.008  # keep the bars apart
        ax.errorbar(
            [r + shift for r in radii], values, yerr=[low, high], fmt="-o", capsize=3,
            color=f"C{i}", label=METHOD_NAMES[m],
        )  # fmt: skip
    sigma = runs[0]["settings"]["sigma"]
    bars = (
        f"95 % bootstrap over {pooled['images']} images"
        if pooled is not None
        else "min-max over seeds"
    )
    ax.set_xlabel("L2 radius")
    ax.set_ylabel("certified accuracy")
    ax.set_title(f"{len(runs)} seeds, sigma = {sigma:g} (bars: {bars})", fontsize=9)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="+", help="output folders of runs (finished or certifying)")
    p.add_argument("--plot", help="write the plot here (PNG)")
    p.add_argument("--json", help="write the per-seed and pooled statistics and the orderings here")
    args = p.parse_args(argv)
    runs = [load_run(d) for d in args.dirs]
    print(seed_table(runs))
    for name, ok in done_criterion(runs).items():
        print(f"{name} (point estimates): {'yes' if ok else 'no'}")
    stats = None
    if all(r["certificates"] for r in runs):
        radii = [float(r) for r in next(iter(mean_accuracy(runs).values()), {})]
        stats = seed_statistics(runs, radii)  # the bootstraps run once, for all that follows
        print()
        print(statistics_tables(runs, radii, stats))
        if args.json:
            record = {"runs": [str(d) for d in args.dirs]} | stats
            Path(args.json).write_text(json.dumps(record, indent=2))
            print(f"statistics: {args.json}")
    if args.plot:
        plot_means(runs, args.plot, None if stats is None else stats["pooled"])
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
