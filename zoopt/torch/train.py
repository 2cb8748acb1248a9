"""The one training loop: DeepZero (sparse CGE), first-order and RGE/CGE baselines, and any
gradient source and optimizer of the core.

Every application trains through :class:`Trainer`. What is trained is a :class:`Task` (the
parameters, the oracle over them, the data and the evaluation); how is a
:class:`~zoopt.step.GradientSource` and an :class:`~zoopt.optim.Optimizer` (built from the
:class:`TrainConfig`'s :class:`~zoopt.recipe.Recipe` through :mod:`zoopt.registry`, or
given); everything around the loop (checkpoints, metrics, the
summary, plots, progress, the query budget) is a :mod:`callback <zoopt.torch.callbacks>`.

Per step (``method="deepzero"``):

1. ``oracle.set_batch(*batch)``; ``fx = oracle.base_value(x)`` — the one unperturbed
   forward, which also updates BatchNorm running statistics;
2. ``x, est = step(ZO(CGE(mu), coords=mask), optimizer, oracle, x, fx=fx)`` — sparse CGE on
   per-layer random coordinates with the ZO-GraSP keep ratios, then SGD with momentum and
   weight decay on the dense model (:func:`zoopt.step.step`, the one step of the library).

Checkpoints (``DIR/checkpoint.pt``) are written at the end of every epoch, every
``checkpoint_every`` steps, after ZO-GraSP scoring (and half-way through it), on Ctrl-C, on
an exhausted query budget and on any exception. They always hold the state as of the last
*completed* step: a step that is interrupted or fails is undone (parameters, optimizer,
random streams, BatchNorm statistics, query counts), and a Ctrl-C while a step is being
committed is held until the commit is done. ``resume=True`` continues exactly: data order,
augmentation, masks, RGE directions and optimizer state all come from saved or re-derivable
random streams, and the result is bit-identical to an uninterrupted run, which is why a
resumed run must have the checkpoint's :class:`~zoopt.recipe.Recipe` (every field compared,
:func:`zoopt.recipe.check_resume`). Checkpoints hold only tensors, numbers, strings, lists
and dicts and are read with ``weights_only=True``.
See docs/reliability.md.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from .. import registry
from .. import sparsity as sp
from ..estimators import CGE, RGE, Estimate
from ..interrupts import InterruptLatch, deferred_interrupt, latched_interrupts
from ..optim import SGD, Adam, Optimizer, SignSGD
from ..oracle import BudgetExceeded, TrainableOracle
from ..recipe import Recipe, RunOptions, check_recipe, check_resume, check_run_options
from ..schedules import Schedule
from ..step import ZO, Autograd, GradientSource, accepts, propose, update, value_at
from .callbacks import Callback, Checkpoint, default_callbacks, tensors

#: Methods whose update is applied in place into the trainer's x from the seeds (a lazy
#: gradient): no gradient vector and no copy of x per step (see Trainer._step).
IN_PLACE_METHODS = ("mezo", "rge", "forward-grad")


class Task(Protocol):
    """What the trainer needs to know about the thing being trained.

    Attributes:
        oracle: a :class:`~zoopt.oracle.TrainableOracle` over the flat parameter vector
            (``set_batch(*batch)``, ``base_value(x) -> float``); for first-order methods
            also a :class:`~zoopt.oracle.DifferentiableOracle` (``loss_and_grad``).
        groups: the parameter groups (``name``, ``start``, ``stop``, ``kind``).
    """

    oracle: TrainableOracle
    groups: list[Any]
    batch_size: int

    def parameters_vector(self) -> torch.Tensor: ...

    def load_vector(self, x: torch.Tensor) -> None: ...

    def train_batches(self, epoch: int, rng: np.random.Generator) -> Iterator[tuple]: ...

    def steps_per_epoch(self) -> int: ...

    def evaluate(self) -> dict[str, float]: ...

    def scoring_batch(self, rng: np.random.Generator) -> tuple: ...

    def buffers_state(self) -> dict[str, torch.Tensor]: ...

    def load_buffers_state(self, state: dict[str, torch.Tensor]) -> None: ...


@dataclass(frozen=True)
class TrainConfig(RunOptions, Recipe):
    """The trainer's configuration: a :class:`~zoopt.recipe.Recipe` (what the run computes:
    method, optimizer, schedule, sparsity, seed, ...; see there for each field) and
    :class:`~zoopt.recipe.RunOptions` (how it runs: ``max_queries``, ``checkpoint_every``,
    ``progress``, ``plots``) as one flat frozen value: ``TrainConfig(method="fo", epochs=3,
    progress=False)``, or :meth:`of` the two parts; ``config.recipe`` and ``config.run`` are
    the parts. Resuming checks the recipe part only.
    """

    def __post_init__(self) -> None:
        check_recipe(self)
        check_run_options(self)

    @classmethod
    def of(cls, recipe: Recipe, run: RunOptions | None = None) -> TrainConfig:
        """The configuration made of ``recipe`` and ``run`` (default :class:`RunOptions`)."""
        run = RunOptions() if run is None else run
        return cls(**asdict(recipe.recipe), **asdict(run.run))


@dataclass
class TrainState:
    """Where training stands; everything in it goes into the checkpoint."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    queries: int = 0
    wall_seconds: float = 0.0
    keep_ratios: dict[str, float] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False
    epoch_losses: list[float] = field(default_factory=list)  # of the epoch under way
    epoch_queries: int = 0
    grasp: dict[str, Any] = field(default_factory=dict)  # resumable ZO-GraSP scoring
    rejected_steps: int = 0  # ZO-SGD-Cons: steps whose candidate raised the loss


class Trainer:
    """Train ``task`` with ``config``; the loop is set_batch → base value → step.

    Args:
        task: see :class:`Task`.
        config: the recipe.
        out_dir: output folder for the default callbacks (``checkpoint.pt``,
            ``metrics.jsonl``, ``summary.json``, ``curves.png``); not needed when
            ``callbacks`` are given.
        resume: continue from the :class:`~zoopt.torch.callbacks.Checkpoint` callback's file
            if it exists (bit-exact; the recipe must match, :func:`zoopt.recipe.check_resume`).
        extra_summary: merged into the summary (e.g. dataset and model names).
        callbacks: replace :func:`~zoopt.torch.callbacks.default_callbacks`.
        source: the gradient source (default: from ``config.method``; required for
            ``method="custom"``).
        optimizer: the update rule (default: ``config.optimizer`` with the learning-rate
            schedule of ``config``).
        oracle: the oracle to query (default ``task.oracle``; e.g. a parallel oracle over
            it, see :mod:`zoopt.parallel`).
    """

    def __init__(
        self,
        task: Task,
        config: TrainConfig,
        out_dir: str | os.PathLike | None = None,
        *,
        resume: bool = False,
        extra_summary: dict[str, Any] | None = None,
        callbacks: list[Callback] | None = None,
        source: GradientSource | None = None,
        optimizer: Optimizer | None = None,
        oracle: TrainableOracle | None = None,
    ):
        self.task = task
        self.config = config
        self.oracle = task.oracle if oracle is None else oracle
        self.extra_summary = dict(extra_summary or {})
        if callbacks is None:
            if out_dir is None:
                raise ValueError("out_dir is required unless callbacks are given")
            callbacks = default_callbacks(config, out_dir, self.extra_summary)
        self.callbacks = list(callbacks)
        self.out = None if out_dir is None else Path(out_dir)
        if config.batch_size is not None and config.batch_size != task.batch_size:
            raise ValueError(
                f"the recipe's batch_size={config.batch_size!r} is not the task's "
                f"batch_size={task.batch_size!r}; build the task with it, or leave it None"
            )
        self.steps_per_epoch = task.steps_per_epoch()
        if config.max_steps_per_epoch is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, config.max_steps_per_epoch)
        self.optimizer = optimizer if optimizer is not None else self._default_optimizer()
        if source is None and config.method == "custom":
            raise ValueError("method='custom' needs a gradient source: Trainer(..., source=...)")
        self.source = source if source is not None else self._default_source()
        self.estimator_rng = np.random.default_rng([config.seed, 1])
        self.state = TrainState()
        self.mask: sp.DynamicMask | None = None
        self.x = task.parameters_vector()
        self._t_start: float | None = None
        self._t_epoch = time.perf_counter()
        self._interrupts = InterruptLatch()  # replaced by fit's; checked between steps
        if resume:
            checkpoints = [c for c in self.callbacks if isinstance(c, Checkpoint)]
            if not checkpoints:
                raise ValueError("resume=True needs a Checkpoint callback")
            checkpoints[0].restore(self)

    # -- how: source and optimizer --------------------------------------------------
    @property
    def recipe(self) -> Recipe:
        """The recipe this run follows (``batch_size``: the task's); what resuming checks."""
        return dataclasses.replace(self.config.recipe, batch_size=int(self.task.batch_size))

    def _lr_schedule(self) -> Schedule:
        cfg = self.config
        total = max(1, cfg.epochs * self.steps_per_epoch)
        warmup = min(cfg.warmup_epochs * self.steps_per_epoch, total - 1)
        return registry.schedule(
            cfg.lr_schedule, cfg.lr, total=total, warmup=warmup, final=cfg.final_lr
        )

    def _default_optimizer(self) -> Optimizer:
        # each option the registered optimizer takes that the recipe has a field for
        cfg = self.config
        recipe_fields = {f.name for f in dataclasses.fields(Recipe)}
        entry = registry.OPTIMIZERS[cfg.optimizer]
        options = {k: getattr(cfg, k) for k in entry.options if k in recipe_fields}
        return registry.optimizer(cfg.optimizer, self._lr_schedule(), **options)

    def _default_source(self) -> GradientSource:
        cfg = self.config
        if cfg.method == "fo":
            return Autograd()
        if cfg.method in ("rge", "mezo"):
            q = 1 if cfg.method == "mezo" else cfg.rge_q
            return ZO(RGE(q=q, mu=cfg.mu, mu_mode="absolute"))  # the paper's step μ·u
        if cfg.method == "forward-grad":
            from .forward_gradient import ForwardGradient

            return ForwardGradient(q=cfg.rge_q)
        estimator = CGE(mu=cfg.mu, scheme=cfg.scheme)
        if cfg.method == "deepzero":
            return ZO(estimator, coords=lambda iteration: self.mask.coords())
        return ZO(estimator)

    @property
    def in_place(self) -> bool:
        """Whether steps update x in place from the seeds (:data:`IN_PLACE_METHODS`)."""
        return self.config.method in IN_PLACE_METHODS

    def queries_next_step(self) -> int:
        """Queries the next step will spend (base value and ZO-SGD-Cons's query included)."""
        base = 1 if self.source.wants_base_value else 0
        cons = 1 if self.config.conservative else 0
        return (
            base
            + cons
            + self.source.queries_per_step(
                int(self.x.shape[0]), fx_known=bool(base), iteration=self.state.global_step
            )
        )

    # -- sparsity -------------------------------------------------------------------
    def _compute_keep_ratios(self) -> dict[str, float]:
        cfg, task, oracle = self.config, self.task, self.oracle
        groups = task.groups
        if cfg.ratios == "uniform":
            return sp.uniform_ratios(groups, cfg.sparsity)
        if cfg.ratios == "smart":
            try:
                return sp.smart_ratios(groups, cfg.sparsity)
            except ValueError as exc:
                # small models: the paper's fixed 30% for the last layer can exceed the budget
                print(f"zoopt train: {exc}; applying the Smart Ratio formula to the last layer too")
                return sp.smart_ratios(groups, cfg.sparsity, last_layer_keep=None)
        rng = np.random.default_rng([cfg.seed, 2])
        if cfg.ratios == "random":
            return sp.random_ratios(groups, cfg.sparsity, rng)
        oracle.set_batch(*task.scoring_batch(rng))
        if cfg.ratios == "fo-grasp":
            scores = sp.fo_grasp_scores(
                lambda v: oracle.loss_and_grad(v)[1], self.x, mu=cfg.grasp_mu
            )
        else:
            # resumable: the first half's estimate is kept in the state (and checkpoint)
            progress = self.state.grasp
            done_before = int(progress.get("queries", 0))
            before = oracle.queries
            scores = sp.zo_grasp_scores(
                oracle, self.x, q=cfg.grasp_q, mu=cfg.grasp_mu, rng=rng, progress=progress
            )
            spent_now = oracle.queries - before
            self.state.queries += spent_now + (done_before if "g0" in progress else 0)
            self.state.grasp = {}
        return sp.keep_ratios_from_scores(scores, groups, cfg.sparsity)

    def _ensure_mask(self) -> None:
        if self.config.method != "deepzero" or self.mask is not None:
            return
        if self.state.keep_ratios is None:
            self.state.keep_ratios = self._compute_keep_ratios()
        self.mask = sp.DynamicMask(
            self.task.groups,
            self.state.keep_ratios,
            reshuffle_every=self.config.reshuffle_every,
            seed=self.config.seed,
        )

    # -- one step -------------------------------------------------------------------
    def _step(self, batch: tuple) -> tuple[Callable[[], None], float, int]:
        """The queries of one step on ``batch``; returns ``(commit, loss at x, queries)``.

        Nothing here writes x (queries perturb the parameters and restore them exactly from
        x), so a Ctrl-C or an error leaves x as it was. ``commit()`` applies the update and
        is run by the caller in one block held against Ctrl-C, with the bookkeeping:

        * in-place methods (:data:`IN_PLACE_METHODS`): the optimizer writes x in place from
          the seeds, chunk by chunk (no gradient vector, no copy of x), then the parameters
          are assigned from x (bit-identical);
        * the others: the new x (computed here, pure) replaces the old one;
        * ``conservative`` (ZO-SGD-Cons): the candidate (computed here, pure) is queried
          once; the commit keeps it only if the loss did not rise, else x and the optimizer
          state stay as they were.
        """
        oracle = self.oracle
        oracle.set_batch(*batch)
        before = oracle.queries
        fx = oracle.base_value(self.x) if self.source.wants_base_value else None
        est = self.source.estimate(
            oracle, self.x, fx=fx, rng=self.estimator_rng, iteration=self.state.global_step
        )
        loss = est.fx if fx is None else fx
        if self.state.global_step == 0 and loss is not None and not math.isfinite(float(loss)):
            raise FloatingPointError(
                f"the loss at the initial parameters is {float(loss)} on the first batch, "
                "before any step: the model, its weights or the data give non-finite values "
                "(not a learning-rate problem)"
            )
        if self.config.conservative:
            if loss is None:
                loss = value_at(oracle, self.x)
            x_new, new_state = propose(self.optimizer, self.x, est)
            keep = accepts(float(loss), value_at(oracle, x_new))
            if keep:
                _assert_finite(x_new, "the parameters")
            commit = self._replacing(x_new, new_state) if keep else self._rejecting()
        elif self.in_place:
            _assert_finite_estimate(est)
            commit = self._updating_in_place(est)
        else:
            x_new, new_state = self.optimizer.update(self.optimizer.state, self.x, est.gradient)
            _assert_finite(x_new, "the parameters")
            commit = self._replacing(x_new, new_state)
        assert loss is not None, "the gradient source gave no f(x) and wants no base value"
        return commit, float(loss), oracle.queries - before

    def _replacing(self, x_new: torch.Tensor, new_state: Any) -> Callable[[], None]:
        def commit() -> None:
            self.x = x_new
            self.optimizer.state = new_state
            self.task.load_vector(self.x)

        return commit

    def _rejecting(self) -> Callable[[], None]:
        def commit() -> None:
            self.state.rejected_steps += 1

        return commit

    def _updating_in_place(self, est: Estimate) -> Callable[[], None]:
        def commit() -> None:
            update(self.optimizer, self.x, est, inplace=True)
            self.task.load_vector(self.x)

        return commit

    # -- the loop -------------------------------------------------------------------
    def _emit(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def fit(self) -> dict[str, Any]:
        """Train until ``config.epochs``; returns the summary."""
        try:  # the first statement: a Ctrl-C anywhere in training is handled below
            # a Ctrl-C that Python drops (raised inside a finalizer, e.g. an abandoned batch
            # generator being closed) is still latched and stops the run at the next step
            with latched_interrupts() as self._interrupts:
                return self._fit()
        except KeyboardInterrupt:
            self._stop("interrupted")
            raise
        except BudgetExceeded:
            self._stop("query budget exhausted")
            return self.summary(stopped="query budget exhausted")
        except BaseException:
            self._stop("error")
            raise

    def _stop(self, why: str | None) -> None:
        if self._t_start is not None:
            self.state.wall_seconds = time.perf_counter() - self._t_start
        self._emit("on_stop", why)

    def _fit(self) -> dict[str, Any]:
        cfg, st = self.config, self.state
        self._t_start = time.perf_counter() - st.wall_seconds
        if st.epoch >= cfg.epochs:
            st.finished = True
            self._emit("on_stop", None)
            return self.summary()
        st.finished = False  # e.g. resumed with a larger --epochs
        if self.mask is None and cfg.method == "deepzero":
            self._ensure_mask()  # ZO-GraSP scoring counts towards wall time and queries
            st.wall_seconds = time.perf_counter() - self._t_start
            self._emit("on_checkpoint")  # the scores are paid for: keep them
        self._emit("on_start")
        while st.epoch < cfg.epochs:
            self._interrupts.check()
            self._run_epoch()
        st.finished = True
        self._stop(None)
        return self.summary()

    def epoch_elapsed(self) -> float:
        """Seconds since the current epoch started (for progress displays)."""
        return time.perf_counter() - self._t_epoch

    def _epoch_batches(self, epoch: int) -> Iterable[tuple]:
        rng = np.random.default_rng([self.config.seed, 3, epoch])
        for i, batch in enumerate(self.task.train_batches(epoch, rng)):
            if i >= self.steps_per_epoch:
                return
            yield batch

    def _run_epoch(self) -> None:
        st = self.state
        self._t_epoch = time.perf_counter()
        for i, batch in enumerate(self._epoch_batches(st.epoch)):
            if i < st.step_in_epoch:
                continue  # resuming mid-epoch: the same batches, already used
            self._interrupts.check()
            self._emit("before_step")
            before = self._snapshot()
            committed = False
            try:
                commit, loss, q = self._step(batch)
                with deferred_interrupt():  # the update and its bookkeeping: all or none
                    commit()
                    st.epoch_losses.append(loss)
                    st.epoch_queries += q
                    st.queries += q
                    st.step_in_epoch += 1
                    st.global_step += 1
                    committed = True
            except BaseException:
                if not committed:  # (a Ctrl-C held during the commit arrives after it)
                    with deferred_interrupt():
                        self._restore(before)  # the checkpoint stays at a step boundary
                raise
            if self.in_place:
                _assert_finite(self.x, "the parameters")  # after the (kept) step: see docs
            self._emit("on_step", loss, q)
        metrics = self.task.evaluate()
        assert self._t_start is not None
        row = {
            "epoch": st.epoch + 1,
            "train_loss": float(np.mean(st.epoch_losses)) if st.epoch_losses else math.nan,
            "queries": st.queries,
            "epoch_seconds": time.perf_counter() - self._t_epoch,
            "wall_seconds": time.perf_counter() - self._t_start,
            "lr": self.optimizer.current_lr(),
            **metrics,
        }
        with deferred_interrupt():
            st.history.append(row)
            self._emit("on_epoch", row)
            st.epoch += 1
            st.step_in_epoch = 0
            st.epoch_losses = []
            st.epoch_queries = 0
            if self.mask is not None:
                self.mask.advance()
        st.wall_seconds = time.perf_counter() - self._t_start
        self._emit("on_checkpoint")
        self._emit("after_epoch", row)

    def _snapshot(self) -> dict[str, Any]:
        """Everything a step changes before its commit, to undo it: x itself is not copied
        (queries never write it; only the commit does, and a committed step is not undone),
        nor is the optimizer state (a value, replaced or updated only by the commit)."""
        return {
            "x": self.x,
            "optimizer": self.optimizer.state,
            "rng": copy.deepcopy(self.estimator_rng.bit_generator.state),
            "buffers": self.task.buffers_state(),
            "state": copy.deepcopy({k: getattr(self.state, k) for k in _STEP_FIELDS}),
        }

    def _restore(self, snap: dict[str, Any]) -> None:
        self.x = snap["x"]
        self.task.load_vector(self.x)
        self.optimizer.state = snap["optimizer"]
        self.estimator_rng.bit_generator.state = snap["rng"]
        self.task.load_buffers_state(snap["buffers"])
        # the oracle keeps counting the queries the undone step really spent
        # (summary: queries_spent); the state counts those of completed steps
        for key, value in snap["state"].items():
            setattr(self.state, key, value)

    # -- state in and out (checkpoints) ----------------------------------------------
    def state_payload(self) -> dict[str, Any]:
        """Everything to continue exactly, as tensors, numbers, strings, lists and dicts."""
        state = asdict(self.state)
        if self._t_start is not None:
            state["wall_seconds"] = time.perf_counter() - self._t_start
        if "g0" in state["grasp"]:
            state["grasp"] = {**state["grasp"], "g0": torch.as_tensor(state["grasp"]["g0"])}
        return {
            "recipe": asdict(self.recipe),
            "run": asdict(self.config.run),
            "state": state,
            "x": self.x.detach().cpu(),
            "buffers": {k: v.detach().cpu() for k, v in self.task.buffers_state().items()},
            "optimizer": tensors(self.optimizer.state_dict()),
            "estimator_rng": self.estimator_rng.bit_generator.state,
            "mask": None if self.mask is None else self.mask.state_dict(),
            "oracle_queries": self.oracle.queries,
        }

    def load_payload(self, payload: dict[str, Any], source: str = "checkpoint") -> None:
        """Continue from :meth:`state_payload`'s output (``ValueError`` naming ``source`` if
        its recipe differs from :attr:`recipe` (:func:`zoopt.recipe.check_resume`), or it does
        not fit)."""
        check_resume(saved_recipe(payload), self.recipe, source)
        try:
            state = dict(payload["state"])
            if "g0" in state.get("grasp", {}):
                state["grasp"] = {**state["grasp"], "g0": state["grasp"]["g0"].numpy()}
            self.state = TrainState(**state)
            self.x = payload["x"].to(device=self.x.device, dtype=self.x.dtype)
            self.task.load_vector(self.x)
            self.task.load_buffers_state(payload["buffers"])
            self.optimizer.load_state_dict(payload["optimizer"])
            self.estimator_rng.bit_generator.state = payload["estimator_rng"]
            if payload["mask"] is not None:
                self._ensure_mask()
                assert self.mask is not None
                self.mask.load_state_dict(payload["mask"])
            self.oracle.queries = int(payload["oracle_queries"])
        except (TypeError, ValueError, KeyError, RuntimeError) as exc:
            raise ValueError(f"cannot resume from checkpoint {source}: {exc}") from exc

    # -- outputs --------------------------------------------------------------------
    def summary(self, stopped: str | None = None) -> dict[str, Any]:
        """The run's outcome: method, progress, queries, the last test metrics, the recipe."""
        st, cfg = self.state, self.config
        last = st.history[-1] if st.history else {}
        return {
            "method": cfg.method,
            "path": describe_path(cfg, int(self.x.shape[0]), self.optimizer),
            "sparsity": cfg.sparsity if cfg.method == "deepzero" else 0.0,
            **({"rejected_steps": st.rejected_steps} if cfg.conservative else {}),
            "epochs_completed": st.epoch,
            "steps": st.global_step,
            "queries": st.queries,
            "queries_spent": int(self.oracle.queries),
            "wall_seconds": st.wall_seconds,
            "finished": st.finished,
            "stopped": stopped,
            **{k: v for k, v in last.items() if k.startswith("test_")},
            "config": asdict(dataclasses.replace(cfg, batch_size=self.recipe.batch_size)),
            "keep_ratios": st.keep_ratios,
            **self.extra_summary,
        }


def _assert_finite(x: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise FloatingPointError(f"{what} became non-finite; lower the learning rate or mu")


def _assert_finite_estimate(est: Estimate) -> None:
    """Before an in-place update: a finite estimate (a seeded one: its q coefficients)."""
    if est.lazy is not None and est.gradient is est.lazy:
        if not np.all(np.isfinite(est.lazy.coef)):
            raise FloatingPointError(
                "the gradient estimate is non-finite (a query returned inf or nan); the step "
                "was not taken; lower the learning rate or mu"
            )
    else:
        _assert_finite(est.grad, "the gradient estimate")


def optimizer_label(optimizer: Optimizer, conservative: bool = False) -> str:
    """ZO-Bench's name for an optimizer of :mod:`zoopt.optim` (e.g. ``ZO-SGD-MMT``)."""
    if conservative:
        return f"ZO-SGD-Cons (on {optimizer_label(optimizer)})"
    if isinstance(optimizer, SGD):
        return "ZO-SGD-MMT" if optimizer.momentum else "ZO-SGD"
    if isinstance(optimizer, SignSGD):
        return "ZO-SGD-Sign"
    if isinstance(optimizer, Adam):
        return "ZO-Adam"
    return type(optimizer).__name__


def describe_path(config: TrainConfig, dim: int, optimizer: Optimizer | None = None) -> str:
    """One line: which step ``config`` runs and what it keeps in memory (``--explain``)."""
    m = config.method
    n_bufs = 0 if optimizer is None else sum(_uses_buffer(optimizer, b) for b in optimizer.buffers)
    bufs = "" if not n_bufs else f" + {n_bufs} buffer{'s' if n_bufs > 1 else ''} like x"
    opt = "" if optimizer is None else f"; {optimizer_label(optimizer, config.conservative)}"
    cons = (
        "; ZO-SGD-Cons: +1 query per step (f at the candidate, kept only if the loss does not "
        "rise) and one candidate copy of x during the step"
        if config.conservative
        else ""
    )
    if m in ("mezo", "rge"):
        q = 1 if m == "mezo" else config.rge_q
        name = "RGE q=1 in place (MeZO)" if m == "mezo" else f"RGE q={q} in place"
        return (
            f"{name}: seeded directions regenerated chunk by chunk into the parameters, exact restore from "
            f"x, update applied in place from the seeds (no gradient vector); {q + 1} queries "
            f"per step; memory ≈ model + x{bufs} ({dim:,} trainable parameters){opt}{cons}"
        )
    if m == "forward-grad":
        q = config.rge_q
        return (
            f"forward gradient q={q}: {q} directional derivatives per step (torch.func.jvp) "
            "along seeded directions, update applied in place from the seeds; 0 ZO queries "
            f"(counted in grad_evaluations); memory ≈ model + x + one direction + forward-mode "
            f"activations{bufs} ({dim:,} trainable parameters){opt}{cons}"
        )
    if m == "deepzero":
        return (
            f"sparse CGE (DeepZero, sparsity {config.sparsity:g}) through the feature-reuse "
            f"engine; x replaced by the updated copy each step ({dim:,} trainable "
            f"parameters){opt}{cons}"
        )
    if m == "cge":
        return f"CGE on all {dim:,} coordinates through the feature-reuse engine{opt}{cons}"
    if m == "fo":
        name = "" if optimizer is None else f"; {type(optimizer).__name__}"
        return f"first order (autograd; {dim:,} trainable parameters){name}{cons}"
    return f"a custom gradient source ({dim:,} trainable parameters){opt}{cons}"


def _uses_buffer(optimizer: Optimizer, name: str) -> bool:
    """Whether the rule keeps ``name`` (SGD / SignSGD without momentum keep none)."""
    if isinstance(optimizer, SGD | SignSGD):
        return bool(optimizer.momentum)
    return True


def saved_recipe(payload: dict[str, Any]) -> dict[str, Any]:
    """The recipe a checkpoint payload was written with, as a dict of its fields.

    Format 3 stores it (``"recipe"``); format 2 stored the whole configuration (``"config"``,
    run options included) and the batch size beside it.
    """
    if "recipe" in payload:
        return dict(payload["recipe"])
    run_fields = {f.name for f in dataclasses.fields(RunOptions)}
    saved = {k: v for k, v in dict(payload["config"]).items() if k not in run_fields}
    saved["batch_size"] = payload.get("batch_size")
    return saved


#: TrainState fields one step changes (undone when the step does not complete).
_STEP_FIELDS = (
    "epoch_losses", "epoch_queries", "queries", "step_in_epoch", "global_step", "rejected_steps",
)  # fmt: skip
