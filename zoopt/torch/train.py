"""The one training loop: DeepZero (sparse CGE), first-order SGD and RGE baselines.

Every application trains through :class:`Trainer`. What is trained is described by a
:class:`Task` (the parameters, the oracle over them, the data and the evaluation); the
trainer owns the method, the optimizer, the schedule, sparsity, checkpoints, metrics,
progress and plots.

Per step (``method="deepzero"``):

1. ``oracle.set_batch(batch)``; ``fx = oracle.base_value(x)`` — the one unperturbed forward,
   which also updates BatchNorm running statistics;
2. ``coords = mask.coords()`` — per-layer random coordinates with the ZO-GraSP keep ratios;
3. ``grad = CGE(mu).estimate(oracle, x, fx=fx, coords=coords).grad`` — sparse gradient;
4. ``x = SGD(momentum, weight_decay).step(x, grad)`` — dense model: every weight keeps
   momentum and weight decay.

Checkpoints (``DIR/checkpoint.pt``) are written at the end of every epoch, every
``checkpoint_every`` steps, after ZO-GraSP scoring (and half-way through it), on Ctrl-C, on
an exhausted query budget and on any exception. They always hold the state as of the last
*completed* step: a step that is interrupted or fails is undone (parameters, optimizer,
random streams, BatchNorm statistics, query counts), and a Ctrl-C while a step is being
committed is held until the commit is done. ``resume=True`` continues exactly: data order,
augmentation, masks, RGE directions and optimizer state all come from saved or re-derivable
random streams, and the result is bit-identical to an uninterrupted run. Checkpoints hold
only tensors, numbers, strings, lists and dicts and are read with ``weights_only=True``.
See docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from .. import sparsity as sp
from ..estimators import CGE, RGE
from ..optim import SGD
from ..oracle import BudgetExceeded
from ..schedules import Cosine

METHODS = ("deepzero", "fo", "rge", "cge")
RATIO_METHODS = ("zo-grasp", "fo-grasp", "random", "uniform", "smart")


class Task(Protocol):
    """What the trainer needs to know about the thing being trained.

    Attributes:
        oracle: a :class:`~zoopt.BaseOracle` over the flat parameter vector with
            ``set_batch(*batch)``, ``base_value(x) -> float`` and, for first-order methods,
            ``loss_and_grad(x) -> (float, grad)``.
        groups: the parameter groups (``name``, ``start``, ``stop``, ``kind``).
    """

    oracle: Any
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


@dataclass
class TrainConfig:
    """Training recipe. Defaults follow the paper's ResNet-20/CIFAR-10 recipe.

    ``reshuffle_every`` counts epochs (the sparse mask is redrawn every that many epochs);
    ``max_steps_per_epoch`` truncates epochs for quick runs; ``max_queries`` stops training
    (with a checkpoint) before a step would exceed the budget.
    """

    method: str = "deepzero"
    epochs: int = 50
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    warmup_epochs: int = 0
    final_lr: float = 0.0
    mu: float = 5e-3
    scheme: str = "forward"
    sparsity: float = 0.9
    ratios: str = "zo-grasp"
    grasp_q: int = 192
    grasp_mu: float = 5e-3
    reshuffle_every: int = 5
    rge_q: int = 192
    seed: int = 0
    max_steps_per_epoch: int | None = None
    max_queries: int | None = None
    checkpoint_every: int = 0
    progress: bool = True
    plots: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.ratios not in RATIO_METHODS:
            raise ValueError(f"ratios must be one of {RATIO_METHODS}, got {self.ratios!r}")
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be an integer >= 1, got {self.epochs!r}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity!r}")
        if not (self.lr >= 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number >= 0, got {self.lr!r}")
        if not (self.mu > 0 and math.isfinite(self.mu)):
            raise ValueError(f"mu must be a finite number > 0, got {self.mu!r}")
        if not isinstance(self.reshuffle_every, int) or self.reshuffle_every < 1:
            raise ValueError(
                f"reshuffle_every must be an integer >= 1, got {self.reshuffle_every!r}"
            )
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(
                f"warmup_epochs must be in [0, epochs={self.epochs}), got {self.warmup_epochs!r}"
            )
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ValueError(f"max_steps_per_epoch must be >= 1, got {self.max_steps_per_epoch!r}")


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


class Trainer:
    """Train ``task`` with ``config``, writing checkpoints, metrics and plots into ``out_dir``.

    Args:
        task: see :class:`Task`.
        config: the recipe.
        out_dir: output folder (created). Files: ``checkpoint.pt``, ``metrics.jsonl``
            (one JSON object per epoch), ``summary.json``, ``curves.png``.
        resume: continue from ``out_dir/checkpoint.pt`` if it exists.
        extra_summary: merged into ``summary.json`` (e.g. dataset and model names).
    """

    def __init__(
        self,
        task: Task,
        config: TrainConfig,
        out_dir: str | os.PathLike,
        *,
        resume: bool = False,
        extra_summary: dict[str, Any] | None = None,
    ):
        self.task = task
        self.config = config
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt_path = self.out / "checkpoint.pt"
        self.extra_summary = dict(extra_summary or {})
        self.steps_per_epoch = task.steps_per_epoch()
        if config.max_steps_per_epoch is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, config.max_steps_per_epoch)
        total = max(1, config.epochs * self.steps_per_epoch)
        lr = Cosine(
            base=config.lr,
            total=total,
            warmup=min(config.warmup_epochs * self.steps_per_epoch, total - 1),
            final=config.final_lr,
        )
        self.optimizer = SGD(
            lr=lr,
            momentum=config.momentum,
            nesterov=config.nesterov,
            weight_decay=config.weight_decay,
        )
        self.estimator_rng = np.random.default_rng([config.seed, 1])
        self.state = TrainState()
        self._t_start: float | None = None
        self._bar: Any = None
        self.mask: sp.DynamicMask | None = None
        self.x = task.parameters_vector()
        if resume and self.ckpt_path.exists():
            self._load_checkpoint()
        elif resume:
            print(f"zoopt train: no checkpoint in {self.out}; starting from scratch")

    # -- sparsity -------------------------------------------------------------------
    def _compute_keep_ratios(self) -> dict[str, float]:
        cfg, task = self.config, self.task
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
        task.oracle.set_batch(*task.scoring_batch(rng))
        if cfg.ratios == "fo-grasp":
            scores = sp.fo_grasp_scores(
                lambda v: task.oracle.loss_and_grad(v)[1], self.x, mu=cfg.grasp_mu
            )
        else:
            # resumable: the first half's estimate is kept in the state (and checkpoint)
            progress = self.state.grasp
            done_before = int(progress.get("queries", 0))
            before = task.oracle.queries
            scores = sp.zo_grasp_scores(
                task.oracle, self.x, q=cfg.grasp_q, mu=cfg.grasp_mu, rng=rng, progress=progress
            )
            spent_now = task.oracle.queries - before
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
    def _step(self, batch: tuple) -> tuple[float, int]:
        """One update on ``batch``; returns (loss at x before the update, queries spent)."""
        cfg, oracle = self.config, self.task.oracle
        oracle.set_batch(*batch)
        before = oracle.queries
        if cfg.method == "fo":
            loss, grad = oracle.loss_and_grad(self.x)
        else:
            loss = oracle.base_value(self.x)
            if cfg.method == "rge":
                est = RGE(q=cfg.rge_q, mu=cfg.mu).estimate(
                    oracle, self.x, fx=loss, rng=self.estimator_rng
                )
            else:
                coords = self.mask.coords() if cfg.method == "deepzero" else None
                est = CGE(mu=cfg.mu, scheme=cfg.scheme).estimate(
                    oracle, self.x, fx=loss, coords=coords
                )
            grad = est.grad
        x_new = self.optimizer.step(self.x, grad)
        _assert_finite(x_new, "the parameters")
        self.x = x_new
        self.task.load_vector(self.x)
        return float(loss), oracle.queries - before

    # -- the loop -------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train until ``config.epochs``; returns the summary (also in ``summary.json``)."""
        try:  # the first statement: a Ctrl-C anywhere in training leaves a checkpoint
            return self._fit()
        except (KeyboardInterrupt, BudgetExceeded) as exc:
            self._close_after_stop()
            why = "interrupted" if isinstance(exc, KeyboardInterrupt) else "query budget exhausted"
            print(
                f"\nzoopt train: {why}; checkpoint saved to {self.ckpt_path} (resume with --resume)"
            )
            if isinstance(exc, KeyboardInterrupt):
                raise
            return self._summary(stopped=why)
        except BaseException:
            self._close_after_stop()
            raise

    def _close_after_stop(self) -> None:
        if self._t_start is not None:
            self.state.wall_seconds = time.perf_counter() - self._t_start
        self._save_checkpoint()
        if self._bar is not None:
            self._bar.close()

    def _fit(self) -> dict[str, Any]:
        cfg, st = self.config, self.state
        self._t_start = t_start = time.perf_counter() - st.wall_seconds
        if st.epoch >= cfg.epochs:
            st.finished = True
            return self._summary()
        st.finished = False  # e.g. resumed with a larger --epochs
        if self.mask is None and cfg.method == "deepzero":
            self._ensure_mask()  # ZO-GraSP scoring counts towards wall time and queries
            st.wall_seconds = time.perf_counter() - t_start
            self._save_checkpoint()  # the scores are paid for: keep them
        self._bar = self._progress_bar()
        while st.epoch < cfg.epochs:
            self._run_epoch(self._bar, t_start)
        st.finished = True
        if self._bar is not None:
            self._bar.close()
        st.wall_seconds = time.perf_counter() - t_start
        self._save_checkpoint()
        return self._summary()

    def _progress_bar(self) -> Any:
        if not self.config.progress:
            return None
        from tqdm.auto import tqdm

        total = self.config.epochs * self.steps_per_epoch
        done = self.state.epoch * self.steps_per_epoch + self.state.step_in_epoch
        return tqdm(
            total=total,
            initial=done,
            desc=f"train[{self.config.method}]",
            unit="step",
            mininterval=1.0,
        )

    def _epoch_batches(self, epoch: int) -> Iterable[tuple]:
        rng = np.random.default_rng([self.config.seed, 3, epoch])
        for i, batch in enumerate(self.task.train_batches(epoch, rng)):
            if i >= self.steps_per_epoch:
                return
            yield batch

    def _run_epoch(self, bar: Any, t_start: float) -> None:
        cfg, st = self.config, self.state
        t_epoch = time.perf_counter()
        for i, batch in enumerate(self._epoch_batches(st.epoch)):
            if i < st.step_in_epoch:
                continue  # resuming mid-epoch: the same batches, already used
            if cfg.max_queries is not None and self.mask is not None:
                need = self.mask.coords().size + 1
                if st.queries + need > cfg.max_queries:
                    raise BudgetExceeded(st.queries, cfg.max_queries, None, math.nan)
            before = self._snapshot()
            try:
                loss, q = self._step(batch)
                with deferred_interrupt():  # all of it, or (undone below) none of it
                    st.epoch_losses.append(loss)
                    st.epoch_queries += q
                    st.queries += q
                    st.step_in_epoch += 1
                    st.global_step += 1
            except BaseException:
                with deferred_interrupt():
                    self._restore(before)  # the checkpoint stays at a step boundary
                raise
            if bar is not None:
                elapsed = time.perf_counter() - t_epoch
                last = st.history[-1] if st.history else {}
                bar.update(1)
                bar.set_postfix(
                    loss=f"{loss:.4f}",
                    acc=f"{last.get('test_accuracy', float('nan')):.4f}",
                    qps=f"{st.epoch_queries / max(elapsed, 1e-9):.0f}",
                    refresh=False,
                )
            if cfg.checkpoint_every and st.global_step % cfg.checkpoint_every == 0:
                st.wall_seconds = time.perf_counter() - t_start
                self._save_checkpoint()
        metrics = self.task.evaluate()
        row = {
            "epoch": st.epoch + 1,
            "train_loss": float(np.mean(st.epoch_losses)) if st.epoch_losses else math.nan,
            "queries": st.queries,
            "epoch_seconds": time.perf_counter() - t_epoch,
            "wall_seconds": time.perf_counter() - t_start,
            "lr": self.optimizer.current_lr(),
            **metrics,
        }
        with deferred_interrupt():
            st.history.append(row)
            with open(self.out / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")
            st.epoch += 1
            st.step_in_epoch = 0
            st.epoch_losses = []
            st.epoch_queries = 0
            if self.mask is not None:
                self.mask.advance()
        st.wall_seconds = time.perf_counter() - t_start
        self._save_checkpoint()
        if cfg.plots:
            self._plot()

    def _snapshot(self) -> dict[str, Any]:
        """Everything a step changes, to undo it (on the device, no host copies of x)."""
        return {
            "x": self.x.clone(),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "rng": copy.deepcopy(self.estimator_rng.bit_generator.state),
            "buffers": self.task.buffers_state(),
            "state": copy.deepcopy({k: getattr(self.state, k) for k in _STEP_FIELDS}),
        }

    def _restore(self, snap: dict[str, Any]) -> None:
        self.x = snap["x"]
        self.task.load_vector(self.x)
        self.optimizer.load_state_dict(snap["optimizer"])
        self.estimator_rng.bit_generator.state = snap["rng"]
        self.task.load_buffers_state(snap["buffers"])
        # the oracle keeps counting the queries the undone step really spent
        # (summary: queries_spent); the state counts those of completed steps
        for key, value in snap["state"].items():
            setattr(self.state, key, value)

    # -- checkpoints ----------------------------------------------------------------
    def _save_checkpoint(self) -> None:
        """Write ``checkpoint.pt`` atomically (a crash mid-write keeps the old one). Only
        tensors, numbers, strings, lists and dicts: it loads with ``weights_only=True``."""
        state = asdict(self.state)
        if "g0" in state["grasp"]:
            state["grasp"] = {**state["grasp"], "g0": torch.as_tensor(state["grasp"]["g0"])}
        payload = {
            "format": CHECKPOINT_FORMAT,
            "config": asdict(self.config),
            "batch_size": int(self.task.batch_size),
            "state": state,
            "x": self.x.detach().cpu(),
            "buffers": {k: v.detach().cpu() for k, v in self.task.buffers_state().items()},
            "optimizer": _tensors(self.optimizer.state_dict()),
            "estimator_rng": self.estimator_rng.bit_generator.state,
            "mask": None if self.mask is None else self.mask.state_dict(),
            "oracle_queries": self.task.oracle.queries,
        }
        tmp = self.ckpt_path.with_suffix(".tmp")
        with deferred_interrupt():
            torch.save(payload, tmp)
            os.replace(tmp, self.ckpt_path)

    def _read_checkpoint(self) -> dict[str, Any]:
        """The checkpoint's payload, or ``ValueError`` naming the file and what is wrong."""
        path = self.ckpt_path
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a bad file
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ValueError(
                f"cannot read checkpoint {path} ({type(exc).__name__}: {detail[:300]})"
            ) from exc
        needed = {"config", "state", "x", "buffers", "optimizer", "estimator_rng", "mask"}
        if not isinstance(payload, dict) or needed - set(payload):
            missing = sorted(needed - set(payload)) if isinstance(payload, dict) else "all"
            raise ValueError(
                f"cannot read checkpoint {path} (not a zoopt checkpoint: missing {missing})"
            )
        return payload

    def _load_checkpoint(self) -> None:
        payload = self._read_checkpoint()
        saved = dict(payload["config"])
        saved["batch_size"] = payload.get("batch_size")
        mine = {**asdict(self.config), "batch_size": int(self.task.batch_size)}
        for key in _RESUME_MUST_MATCH:
            if saved.get(key) != mine[key]:
                raise ValueError(
                    f"checkpoint {self.ckpt_path} was written with {key}={saved.get(key)!r}, "
                    f"but this run has {key}={mine[key]!r}; resume with the same setting, or "
                    "start a new run in another folder"
                )
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
                self.mask.load_state_dict(payload["mask"])
            self.task.oracle.queries = int(payload["oracle_queries"])
        except (TypeError, ValueError, KeyError, RuntimeError) as exc:
            raise ValueError(f"cannot resume from checkpoint {self.ckpt_path}: {exc}") from exc
        # metrics.jsonl is rewritten from the checkpoint's history: a row written just before
        # an interrupt, for an epoch the checkpoint does not count, would otherwise repeat
        rows = "".join(json.dumps(row) + "\n" for row in self.state.history)
        tmp = self.out / "metrics.jsonl.tmp"
        tmp.write_text(rows)
        os.replace(tmp, self.out / "metrics.jsonl")
        print(
            f"zoopt train: resumed from {self.ckpt_path} at epoch {self.state.epoch}, "
            f"step {self.state.step_in_epoch}"
        )

    # -- outputs --------------------------------------------------------------------
    def _summary(self, stopped: str | None = None) -> dict[str, Any]:
        st, cfg = self.state, self.config
        last = st.history[-1] if st.history else {}
        summary = {
            "method": cfg.method,
            "sparsity": cfg.sparsity if cfg.method == "deepzero" else 0.0,
            "epochs_completed": st.epoch,
            "steps": st.global_step,
            "queries": st.queries,
            "queries_spent": int(self.task.oracle.queries),
            "wall_seconds": st.wall_seconds,
            "finished": st.finished,
            "stopped": stopped,
            **{k: v for k, v in last.items() if k.startswith("test_")},
            "config": asdict(cfg),
            "keep_ratios": st.keep_ratios,
            **self.extra_summary,
        }
        with open(self.out / "summary.json", "w") as fh:
            json.dump(summary, fh, indent=2)
        return summary

    def _plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        hist = self.state.history
        epochs = [h["epoch"] for h in hist]
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        axes[0].plot(epochs, [h["train_loss"] for h in hist], marker="o", label="train loss")
        if "test_loss" in hist[-1]:
            axes[0].plot(epochs, [h["test_loss"] for h in hist], marker="s", label="test loss")
        axes[0].set_xlabel("epoch")
        axes[0].legend()
        metric = next((k for k in hist[-1] if k.startswith("test_") and k != "test_loss"), None)
        if metric is not None:
            axes[1].plot(epochs, [h[metric] for h in hist], marker="o", color="C2")
            axes[1].set_ylabel(metric)
        axes[1].set_xlabel("epoch")
        fig.suptitle(f"{self.config.method} (sparsity {self.config.sparsity:g})")
        fig.tight_layout()
        fig.savefig(self.out / "curves.png", dpi=100)
        plt.close(fig)


def _assert_finite(x: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise FloatingPointError(f"{what} became non-finite; lower the learning rate or mu")


#: Settings a resumed run must share with the checkpoint (they shape the trajectory);
#: ``epochs`` may grow (the run continues), budgets and outputs may change.
_RESUME_MUST_MATCH = (
    "method", "sparsity", "seed", "ratios", "mu", "scheme", "lr", "momentum", "nesterov",
    "weight_decay", "warmup_epochs", "final_lr", "grasp_q", "grasp_mu", "reshuffle_every",
    "rge_q", "max_steps_per_epoch", "batch_size",
)  # fmt: skip

#: TrainState fields one step changes (undone when the step does not complete).
_STEP_FIELDS = ("epoch_losses", "epoch_queries", "queries", "step_in_epoch", "global_step")

CHECKPOINT_FORMAT = 2


def _tensors(state: dict[str, Any]) -> dict[str, Any]:
    """numpy arrays in a (flat) state dict as tensors, so it loads with weights_only=True."""
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in state.items()}


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) until the block is done, then raise it.

    For short blocks that must not be cut in half (committing a step, writing a checkpoint).
    Only the main thread receives signals; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[tuple[int, Any]] = []
    previous = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, lambda signum, frame: held.append((signum, frame)))
    except ValueError:  # not allowed here (e.g. an embedded interpreter)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held and callable(previous):
            previous(*held[0])
        elif held and previous == signal.SIG_DFL:
            raise KeyboardInterrupt
