"""Sparsity for ZO training: ZO-GraSP scores, layer-wise keep ratios, dynamic random masks.

DeepZero trains with sparse CGE: only a random subset of the coordinates of each layer is
estimated per step. How many coordinates each layer gets — the layer-wise pruning ratios
(LPR) — comes from pruning at initialization with a zeroth-order version of GraSP; the
*which* is a fresh random draw every so often (:class:`DynamicMask`).

Everything works on flat parameter vectors of shape ``(d,)`` (numpy or torch; scores come
back as host numpy float64). Layers are described by *groups*: any objects with ``.name``
(str), ``.start`` / ``.stop`` (the slice of the flat vector) and ``.kind`` — ``"weight"``
for conv/linear weights (prunable) or ``"other"`` (BatchNorm, biases: never pruned). This is
what ``zoopt.torch.ParamView.groups`` holds; nothing here imports torch.

Conventions: *sparsity* is the fraction of the **prunable** weights that are pruned, in
``[0, 1)``; a *keep ratio* is the fraction of a group that is kept, in ``[0, 1]``; a group of
``n`` coordinates with keep ratio ``r`` keeps ``kept_count(r, n)`` = round-half-up(r·n)
coordinates, at least 1 when ``r > 0``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from ._array import Array, like, namespace, to_numpy
from .estimators import RGE, check_mu
from .oracle import BaseOracle, as_oracle

PruneRule = Literal["highest", "lowest", "lowest_abs"]

__all__ = [
    "DynamicMask",
    "format_sparsity_report",
    "fo_grasp_scores",
    "keep_mask_from_scores",
    "keep_ratios_from_scores",
    "kept_count",
    "magnitude_scores",
    "random_ratios",
    "smart_ratios",
    "sparsity_report",
    "uniform_ratios",
    "zo_grasp_scores",
]


# -- groups ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Group:
    name: str
    start: int
    stop: int
    prunable: bool

    @property
    def size(self) -> int:
        return self.stop - self.start

    @property
    def kind(self) -> str:  # so validated groups can be passed back in as groups
        return "weight" if self.prunable else "other"


def _read_groups(groups: Iterable[Any], dim: int | None = None) -> list[_Group]:
    """Validate duck-typed groups → list of :class:`_Group` in the given (network) order."""
    if groups is None or isinstance(groups, str | bytes):
        raise TypeError(f"groups must be a sequence of parameter groups, got {groups!r}")
    out: list[_Group] = []
    seen: set[str] = set()
    for g in groups:
        try:
            name, start, stop, kind = g.name, g.start, g.stop, g.kind
        except AttributeError as exc:
            raise TypeError(
                f"each group needs .name, .start, .stop and .kind attributes, got {g!r}"
            ) from exc
        if not isinstance(name, str):
            raise TypeError(f"group name must be a string, got {name!r}")
        if name in seen:
            raise ValueError(f"duplicate group name {name!r}")
        seen.add(name)
        for label, v in (("start", start), ("stop", stop)):
            if isinstance(v, bool) or not isinstance(v, int | np.integer):
                raise TypeError(f"group {name!r}: {label} must be an integer, got {v!r}")
        if not 0 <= start < stop:
            raise ValueError(f"group {name!r}: need 0 <= start < stop, got [{start}, {stop})")
        if dim is not None and stop > dim:
            raise ValueError(f"group {name!r} ends at {stop}, beyond the vector length {dim}")
        if kind not in ("weight", "other"):
            raise ValueError(f"group {name!r}: kind must be 'weight' or 'other', got {kind!r}")
        out.append(_Group(name, int(start), int(stop), kind == "weight"))
    if not out:
        raise ValueError("groups is empty")
    by_start = sorted(out, key=lambda g: g.start)
    for a, b in zip(by_start, by_start[1:], strict=False):
        if b.start < a.stop:
            raise ValueError(f"groups {a.name!r} and {b.name!r} overlap")
    return out


def _prunable(groups: list[_Group]) -> list[_Group]:
    layers = [g for g in groups if g.prunable]
    if not layers:
        raise ValueError("no prunable group (kind='weight') among the groups")
    return layers


def _check_sparsity(sparsity: Any) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, int | float | np.number):
        raise TypeError(f"sparsity must be a number, got {sparsity!r}")
    if not (0.0 <= float(sparsity) < 1.0):
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    return float(sparsity)


def kept_count(ratio: float, size: int) -> int:
    """Coordinates a group of ``size`` keeps at keep ratio ``ratio``.

    round-half-up(ratio·size), at least 1 when ``ratio > 0`` (so no layer with a positive
    ratio is cut off), at most ``size``.
    """
    if not (0.0 <= ratio <= 1.0):
        raise ValueError(f"keep ratio must be in [0, 1], got {ratio!r}")
    if ratio == 0.0:
        return 0
    return int(min(size, max(1, math.floor(ratio * size + 0.5))))


# -- importance scores -------------------------------------------------------------------


def _host_f64(a: Array) -> np.ndarray:
    return np.asarray(to_numpy(a), dtype=np.float64)


def zo_grasp_scores(
    oracle: BaseOracle | Callable[[Array], float],
    x: Array,
    *,
    q: int = 192,
    mu: float = 5e-3,
    rng: np.random.Generator | int | None = None,
    progress: dict[str, Any] | None = None,
) -> np.ndarray:
    """ZO-GraSP scores S = −x ⊙ [ĝ(x + μ·ĝ(x)) − ĝ(x)] / μ (DeepZero, Sec. 4).

    ĝ is the forward Gaussian RGE with ``q`` directions and radius ``mu``; the bracket is a
    finite-difference Hessian-gradient product H·g. Both estimates share their directions
    (common random numbers). Costs exactly 2(q+1) queries.

    Args:
        oracle: the loss as an oracle (or a callable ``f(x) -> float``), ``dim == d``.
        x: the (initial) parameters, shape ``(d,)``, numpy or torch.
        q: random directions per gradient estimate.
        mu: the RGE radius and the Hessian finite-difference step.
        rng: generator or seed for the directions.
        progress: a dict to make the scoring resumable (e.g. kept in a checkpoint). After
            the first estimate it holds ``seed``, ``g0`` (host float64) and ``queries``
            spent; given such a dict, the first estimate is not recomputed (nor paid for
            again) and ``rng`` is not used.

    Returns:
        Scores, host numpy float64 of shape ``(d,)``. GraSP prunes the *highest* scores.
    """
    if getattr(x, "ndim", None) != 1:
        raise ValueError(f"x must be a 1-D parameter vector, got shape {getattr(x, 'shape', x)}")
    oracle = oracle if isinstance(oracle, BaseOracle) else as_oracle(oracle, dim=int(x.shape[0]))
    estimator = RGE(q=q, mu=mu, mu_mode="absolute")  # the paper's formula (docs/sparsity.md)
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    # Common random numbers: both estimates use the SAME directions u_i. Each ĝ alone carries
    # noise of order |∇f|·sqrt(d/q), which divided by μ would swamp H·g. With shared u_i the
    # difference is (1/q) Σ u_i [f(x'+μu_i) − f(x') − f(x+μu_i) + f(x)]/μ² with x' = x + μĝ:
    # the first-order terms u_iᵀ∇f(x) cancel exactly, leaving (1/q) Σ u_i u_iᵀ H ĝ + O(μ)
    # (exactly that on a quadratic). The price is a small bias, tr(H)/q · ∇f (docs/sparsity.md).
    progress = {} if progress is None else progress
    if "g0" in progress:
        seed = int(progress["seed"])
        g0 = like(np.asarray(progress["g0"], dtype=np.float64), x)
    else:
        seed = int(gen.integers(2**63))
        before = oracle.queries
        g0 = estimator.estimate(oracle, x, rng=np.random.default_rng(seed)).grad
        progress.update(seed=seed, g0=_host_f64(g0), queries=oracle.queries - before)
    shifted = x + mu * g0
    g1 = estimator.estimate(oracle, shifted, rng=np.random.default_rng(seed)).grad
    hg = (_host_f64(g1) - _host_f64(g0)) / mu
    return -_host_f64(x) * hg


def fo_grasp_scores(grad_fn: Callable[[Array], Any], x: Array, *, mu: float = 5e-3) -> np.ndarray:
    """FO-GraSP with exact gradients: S = −x ⊙ [∇f(x + μ∇f(x)) − ∇f(x)] / μ.

    The same finite-difference Hessian-gradient product as :func:`zo_grasp_scores`, for
    comparison. ``grad_fn(x)`` returns the gradient (shape ``(d,)``, like ``x``) or a
    ``(loss, gradient)`` pair such as ``ModuleOracle.loss_and_grad``. Two gradient calls.

    Returns:
        Scores, host numpy float64 of shape ``(d,)``.
    """
    if not callable(grad_fn):
        raise TypeError(f"grad_fn must be callable, got {grad_fn!r}")
    mu = check_mu(mu)

    def gradient(point: Array) -> Array:
        out = grad_fn(point)
        g = out[1] if isinstance(out, tuple) and len(out) == 2 else out
        if tuple(getattr(g, "shape", ())) != tuple(x.shape):
            raise ValueError(
                f"grad_fn returned shape {tuple(getattr(g, 'shape', ()))}, expected {tuple(x.shape)}"
            )
        return g

    g0 = gradient(x)
    xp = namespace(x)
    g1 = gradient(x + mu * xp.asarray(g0, dtype=x.dtype))
    return -_host_f64(x) * (_host_f64(g1) - _host_f64(g0)) / mu


def magnitude_scores(x: Array) -> np.ndarray:
    """|x| as host numpy float64 (prune the *lowest*: ``prune="lowest"``)."""
    return np.abs(_host_f64(x))


# -- keep ratios -------------------------------------------------------------------------


def _keep_preference(scores: np.ndarray, prune: str) -> np.ndarray:
    """A key where larger means 'keep first'."""
    if prune == "highest":
        return -scores
    if prune == "lowest":
        return scores
    if prune == "lowest_abs":
        return np.abs(scores)
    raise ValueError(f"prune must be 'highest', 'lowest' or 'lowest_abs', got {prune!r}")


def _floors(layers: list[_Group], min_keep: int, min_keep_ratio: float) -> np.ndarray:
    if isinstance(min_keep, bool) or not isinstance(min_keep, int | np.integer) or min_keep < 0:
        raise ValueError(f"min_keep must be a non-negative integer, got {min_keep!r}")
    if not (0.0 <= min_keep_ratio <= 1.0):
        raise ValueError(f"min_keep_ratio must be in [0, 1], got {min_keep_ratio!r}")
    return np.array(
        [min(g.size, max(int(min_keep), math.ceil(min_keep_ratio * g.size))) for g in layers],
        dtype=np.int64,
    )


def keep_mask_from_scores(
    scores: Array,
    groups: Iterable[Any],
    sparsity: float,
    *,
    prune: PruneRule = "highest",
    min_keep: int = 1,
    min_keep_ratio: float = 0.0,
) -> np.ndarray:
    """Global pruning of the prunable groups → boolean keep mask of shape ``(d,)``.

    Exactly ``round(sparsity · N)`` of the N prunable weights are pruned, chosen globally by
    score: ``prune="highest"`` removes the highest scores (GraSP's convention: S_i = −θ_i·(Hg)_i
    is, up to a factor 2, the first-order change of the gradient norm ‖∇f‖² when weight i
    is removed, so the highest scores are the weights whose removal hurts gradient flow
    least), ``"lowest"`` the lowest (magnitude pruning with
    :func:`magnitude_scores`), ``"lowest_abs"`` the lowest |score| (what DeepZero's reference
    code does with ``L1Unstructured`` on the scores). Ties go by position (stable sort).

    Each prunable group keeps at least ``max(min_keep, ceil(min_keep_ratio · size))``
    weights (capped at its size): those floors are filled with the group's best weights and
    the rest of the budget goes globally, so the total stays exact. Non-prunable groups and
    coordinates outside every group are always kept.
    """
    s = _check_sparsity(sparsity)
    scores_np = _host_f64(scores)
    if scores_np.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {scores_np.shape}")
    if not np.all(np.isfinite(scores_np)):
        bad = int(np.flatnonzero(~np.isfinite(scores_np))[0])
        raise ValueError(f"scores must be finite; scores[{bad}] = {scores_np[bad]}")
    layers = _prunable(_read_groups(groups, dim=scores_np.shape[0]))
    floors = _floors(layers, min_keep, min_keep_ratio)
    key = _keep_preference(scores_np, prune)

    sizes = np.array([g.size for g in layers], dtype=np.int64)
    total = int(sizes.sum())
    budget = total - math.floor(s * total + 0.5)  # weights kept
    if int(floors.sum()) > budget:
        raise ValueError(
            f"the per-layer minimum (min_keep={min_keep}, min_keep_ratio={min_keep_ratio}) "
            f"keeps {int(floors.sum())} weights but sparsity={s} leaves only {budget}"
        )
    flat_idx = np.concatenate([np.arange(g.start, g.stop) for g in layers])
    flat_key = key[flat_idx]
    mandatory = np.zeros(total, dtype=bool)
    offset = 0
    for g, f in zip(layers, floors, strict=True):
        mandatory[offset + _top_k(flat_key[offset : offset + g.size], int(f))] = True
        offset += g.size
    pool = np.flatnonzero(~mandatory)
    chosen = pool[_top_k(flat_key[pool], budget - int(floors.sum()))]
    keep = np.ones(scores_np.shape[0], dtype=bool)
    keep[flat_idx] = False
    keep[flat_idx[mandatory]] = True
    keep[flat_idx[chosen]] = True
    return keep


def _top_k(values: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` largest values, ties broken by lower position; O(n)."""
    n = values.shape[0]
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k >= n:
        return np.arange(n, dtype=np.int64)
    threshold = np.partition(values, n - k)[n - k]  # the k-th largest value
    above = np.flatnonzero(values > threshold)
    tied = np.flatnonzero(values == threshold)[: k - above.size]
    return np.concatenate([above, tied])


def keep_ratios_from_scores(
    scores: Array,
    groups: Iterable[Any],
    sparsity: float,
    *,
    prune: PruneRule = "highest",
    min_keep: int = 1,
    min_keep_ratio: float = 0.0,
) -> dict[str, float]:
    """Layer-wise keep ratios (LPR) of global score-based pruning; see
    :func:`keep_mask_from_scores` for the convention and the floors.

    Returns ``{group name: kept / size}`` for every group (non-prunable groups: 1.0). A
    :class:`DynamicMask` built from these ratios keeps exactly the same count per layer.
    """
    groups = _read_groups(groups)
    keep = keep_mask_from_scores(
        scores,
        groups,
        sparsity,
        prune=prune,
        min_keep=min_keep,
        min_keep_ratio=min_keep_ratio,
    )
    return {
        g.name: (float(keep[g.start : g.stop].sum()) / g.size if g.prunable else 1.0)
        for g in groups
    }


def uniform_ratios(groups: Iterable[Any], sparsity: float) -> dict[str, float]:
    """Every prunable group keeps 1 − sparsity; non-prunable groups 1.0."""
    s = _check_sparsity(sparsity)
    gs = _read_groups(groups)
    _prunable(gs)
    return {g.name: (1.0 - s if g.prunable else 1.0) for g in gs}


def random_ratios(
    groups: Iterable[Any],
    sparsity: float,
    rng: np.random.Generator | int | None,
    *,
    min_keep: int = 1,
) -> dict[str, float]:
    """Keep ratios of random global pruning: i.i.d. uniform scores through
    :func:`keep_ratios_from_scores` (so each layer's count is hypergeometric around
    (1 − sparsity)·size, with the same ``min_keep`` floor)."""
    gs = _read_groups(groups)
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    dim = max(g.stop for g in gs)
    return keep_ratios_from_scores(
        gen.random(dim), gs, sparsity, prune="highest", min_keep=min_keep
    )


def smart_ratios(
    groups: Iterable[Any], sparsity: float, *, last_layer_keep: float | None = 0.3
) -> dict[str, float]:
    """Smart Ratio (Su et al., NeurIPS 2020, "Sanity-checking pruning methods").

    With the L prunable groups numbered l = 1..L in the given (network) order: the last one
    keeps ``last_layer_keep`` (the paper's 30% for the classifier), and layer l < L keeps
    c·[(L−l+1)² + (L−l+1)], with c chosen so the total kept is exactly (1 − sparsity)·N.
    Ratios above 1 are clipped to 1 and c is re-solved on the other layers (water filling;
    the reference code moves the overflow forward greedily, with the same total). If the
    other layers cannot hold their share even at 1.0, the last layer takes the rest. This
    is the ResNet form; the reference code additionally divides by l² for VGG.

    ``last_layer_keep=None`` applies the formula to the last layer too (weight 1² + 1 = 2):
    for small networks whose classifier holds most weights, where 30% of it alone would
    exceed the budget.

    Raises:
        ValueError: when the last layer alone needs more than the budget (pass a lower
            ``last_layer_keep`` or ``None``) or the sparsity is out of range.
    """
    s = _check_sparsity(sparsity)
    if last_layer_keep is not None and not (0.0 < last_layer_keep <= 1.0):
        raise ValueError(f"last_layer_keep must be in (0, 1] or None, got {last_layer_keep!r}")
    gs = _read_groups(groups)
    layers = _prunable(gs)
    sizes = np.array([g.size for g in layers], dtype=np.float64)
    target = (1.0 - s) * sizes.sum()
    depth_from_end = np.arange(len(layers), 0, -1, dtype=np.float64)  # L−l+1 for l = 1..L
    weight = depth_from_end**2 + depth_from_end
    if len(layers) == 1:
        ratios = np.array([1.0 - s])
    elif last_layer_keep is None:
        ratios = _water_fill(weight, sizes, target)
    else:
        body, last = sizes[:-1], sizes[-1]
        rest = target - last_layer_keep * last
        if rest <= 0:
            raise ValueError(
                f"sparsity={s} keeps {target:.0f} weights but the last layer alone keeps "
                f"{last_layer_keep * last:.0f} at last_layer_keep={last_layer_keep}; pass a "
                "lower last_layer_keep, or None to apply the formula to the last layer too"
            )
        if rest >= body.sum():  # the body cannot absorb its share: fill it, last layer rises
            ratios = np.append(np.ones(body.shape), (target - body.sum()) / last)
        else:
            ratios = np.append(_water_fill(weight[:-1], body, rest), last_layer_keep)
    named = iter(ratios.tolist())
    return {g.name: (min(1.0, next(named)) if g.prunable else 1.0) for g in gs}


def _water_fill(weight: np.ndarray, sizes: np.ndarray, kept: float) -> np.ndarray:
    """Ratios r_l = min(1, c·w_l) with Σ r_l·n_l = kept (0 < kept ≤ Σ n_l)."""
    ratios = np.zeros_like(weight)
    free = np.ones(weight.shape, dtype=bool)
    remaining = kept
    while free.any():
        c = remaining / float((weight[free] * sizes[free]).sum())
        trial = c * weight
        over = free & (trial >= 1.0)
        if not over.any():
            ratios[free] = trial[free]
            return ratios
        ratios[over] = 1.0
        remaining -= float(sizes[over].sum())
        free &= ~over
    return ratios


# -- dynamic masks -----------------------------------------------------------------------


class DynamicMask:
    """A random coordinate mask with fixed per-layer counts, redrawn on a schedule.

    Each prunable group keeps ``kept_count(ratio, size)`` coordinates drawn uniformly
    without replacement; non-prunable groups are fully kept; coordinates outside every
    group are never in the mask. The mask is redrawn every ``reshuffle_every`` calls of
    :meth:`advance` (0: never) — the caller decides whether a unit is a step or an epoch.

    Draw number r is a pure function of ``(seed, r)``, so the state is three integers and
    :meth:`load_state_dict` reproduces the exact current and future masks.

    Args:
        groups: parameter groups (``.name``, ``.start``, ``.stop``, ``.kind``).
        keep_ratios: ``{name: ratio}`` for every prunable group; non-prunable groups may be
            omitted or given as 1.0.
        reshuffle_every: advances between redraws, ``>= 0``.
        seed: non-negative integer.
    """

    def __init__(
        self,
        groups: Iterable[Any],
        keep_ratios: Mapping[str, float],
        *,
        reshuffle_every: int,
        seed: int,
    ):
        self._groups = _read_groups(groups)
        _prunable(self._groups)
        if isinstance(reshuffle_every, bool) or not isinstance(reshuffle_every, int | np.integer):
            raise TypeError(f"reshuffle_every must be an integer, got {reshuffle_every!r}")
        if reshuffle_every < 0:
            raise ValueError(f"reshuffle_every must be >= 0 (0: never), got {reshuffle_every}")
        if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.reshuffle_every = int(reshuffle_every)
        self.seed = int(seed)
        self.counts = _counts_from_ratios(self._groups, keep_ratios)
        self._calls = 0
        self._draws = 0
        self._coords: np.ndarray | None = None

    # -- schedule ----------------------------------------------------------------------
    def advance(self) -> bool:
        """Count one unit (step or epoch); redraw when the schedule says so.

        Returns whether the mask was redrawn.
        """
        self._calls += 1
        if self.reshuffle_every and self._calls % self.reshuffle_every == 0:
            self._draws += 1
            self._coords = None
            return True
        return False

    @property
    def calls(self) -> int:
        """Calls of :meth:`advance` so far."""
        return self._calls

    @property
    def draws(self) -> int:
        """Index of the current draw (0 for the initial mask)."""
        return self._draws

    # -- the mask ----------------------------------------------------------------------
    def coords(self) -> np.ndarray:
        """Sorted unique int64 indices into the flat vector (a cached array: don't modify)."""
        if self._coords is None:
            self._coords = self._draw(self._draws)
        return self._coords

    def boolean_mask(self, dim: int) -> np.ndarray:
        """The mask as booleans of shape ``(dim,)``."""
        end = max(g.stop for g in self._groups)
        if dim < end:
            raise ValueError(f"dim={dim} is shorter than the groups (they end at {end})")
        out = np.zeros(dim, dtype=bool)
        out[self.coords()] = True
        return out

    @property
    def density(self) -> float:
        """Fraction of the groups' coordinates in the mask (prunable and not)."""
        return sum(self.counts.values()) / sum(g.size for g in self._groups)

    @property
    def weight_density(self) -> float:
        """Fraction of the prunable coordinates in the mask (1 − achieved sparsity)."""
        layers = [g for g in self._groups if g.prunable]
        return sum(self.counts[g.name] for g in layers) / sum(g.size for g in layers)

    def _draw(self, r: int) -> np.ndarray:
        gen = np.random.default_rng([self.seed, r])
        parts = []
        for g in sorted(self._groups, key=lambda g: g.start):
            k = self.counts[g.name]
            if k == g.size:
                parts.append(np.arange(g.start, g.stop, dtype=np.int64))
            elif k:
                picked = gen.choice(g.size, size=k, replace=False)
                parts.append(g.start + np.sort(picked).astype(np.int64))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    # -- checkpointing -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state: the counters, the seed and the per-group counts (to check)."""
        return {
            "seed": self.seed,
            "calls": self._calls,
            "draws": self._draws,
            "reshuffle_every": self.reshuffle_every,
            "counts": dict(self.counts),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: the current and all future masks equal those of the saved run."""
        missing = {"seed", "calls", "draws", "reshuffle_every", "counts"} - set(state)
        if missing:
            raise ValueError(f"mask state lacks {sorted(missing)}")
        if dict(state["counts"]) != self.counts:
            raise ValueError(
                "mask state was saved for other groups or keep ratios "
                f"(saved counts {dict(state['counts'])}, these {self.counts})"
            )
        if int(state["reshuffle_every"]) != self.reshuffle_every:
            raise ValueError(
                f"mask state has reshuffle_every={state['reshuffle_every']}, "
                f"this mask {self.reshuffle_every}"
            )
        self.seed = int(state["seed"])
        self._calls = int(state["calls"])
        self._draws = int(state["draws"])
        self._coords = None

    def __repr__(self) -> str:
        return (
            f"DynamicMask(groups={len(self._groups)}, density={self.density:.4f}, "
            f"reshuffle_every={self.reshuffle_every}, draws={self._draws})"
        )


def _counts_from_ratios(groups: list[_Group], keep_ratios: Mapping[str, float]) -> dict[str, int]:
    if not isinstance(keep_ratios, Mapping):
        raise TypeError(f"keep_ratios must be a mapping name -> ratio, got {keep_ratios!r}")
    names = {g.name for g in groups}
    unknown = sorted(set(keep_ratios) - names)
    if unknown:
        raise ValueError(f"keep_ratios names unknown groups {unknown}; groups are {sorted(names)}")
    missing = sorted(g.name for g in groups if g.prunable and g.name not in keep_ratios)
    if missing:
        raise ValueError(f"keep_ratios lacks the prunable groups {missing}")
    counts = {}
    for g in groups:
        ratio = keep_ratios.get(g.name, 1.0)
        if isinstance(ratio, bool) or not isinstance(ratio, int | float | np.number):
            raise TypeError(f"keep ratio of {g.name!r} must be a number, got {ratio!r}")
        if not (0.0 <= float(ratio) <= 1.0):
            raise ValueError(f"keep ratio of {g.name!r} must be in [0, 1], got {ratio!r}")
        if not g.prunable and float(ratio) != 1.0:
            raise ValueError(f"group {g.name!r} is not prunable (kind 'other'), got ratio {ratio}")
        counts[g.name] = kept_count(float(ratio), g.size)
    return counts


# -- reporting ---------------------------------------------------------------------------


def sparsity_report(groups: Iterable[Any], keep_ratios: Mapping[str, float]) -> list[dict]:
    """One row per group: ``name``, ``kind``, ``size``, ``keep_ratio``, ``kept`` (the count a
    :class:`DynamicMask` keeps) and ``sparsity`` (1 − kept/size), plus a final ``"total"``
    row over the prunable groups."""
    gs = _read_groups(groups)
    counts = _counts_from_ratios(gs, keep_ratios)
    rows = [
        {
            "name": g.name,
            "kind": "weight" if g.prunable else "other",
            "size": g.size,
            "keep_ratio": float(keep_ratios.get(g.name, 1.0)),
            "kept": counts[g.name],
            "sparsity": 1.0 - counts[g.name] / g.size,
        }
        for g in gs
    ]
    size = sum(r["size"] for r in rows if r["kind"] == "weight")
    kept = sum(r["kept"] for r in rows if r["kind"] == "weight")
    rows.append(
        {
            "name": "total",
            "kind": "weight",
            "size": size,
            "keep_ratio": kept / size,
            "kept": kept,
            "sparsity": 1.0 - kept / size,
        }
    )
    return rows


def format_sparsity_report(rows: list[dict]) -> str:
    """The rows of :func:`sparsity_report` as a fixed-width text table."""
    width = max(4, *(len(str(r["name"])) for r in rows))
    lines = [
        f"{'name':<{width}}  {'kind':<6}  {'size':>10}  {'kept':>10}  {'keep':>7}  {'sparsity':>8}"
    ]
    for r in rows:
        lines.append(
            f"{r['name']:<{width}}  {r['kind']:<6}  {r['size']:>10d}  {r['kept']:>10d}  "
            f"{r['keep_ratio']:>7.4f}  {r['sparsity']:>8.4f}"
        )
    return "\n".join(lines)
