"""ZO-AE-DS (Zhang et al. 2022): ZO gradients over an autoencoder's latent code.

An autoencoder sits between the denoiser ``D`` and the black-box classifier; its decoder is
frozen and merged into the black box. The defender trains ``D`` (and the encoder) on

    f(x) = mean_i CE(api(decoder(z_i)), y_i),   z_i = encoder(D(inputs_i))   (B, d) codes,

with ``x`` the flat parameters of ``D`` then the encoder. Two pieces:

- :class:`AutoencoderZOOracle`: the queries. One query is one batch of ``B`` codes decoded
  and sent to the API (``B`` images); every evaluation goes through the oracle's error policy
  (:meth:`~zoopt.oracle.BaseOracle.guarded`) and is counted in ``oracle.queries``.
- :class:`LatentCGE`: the gradient source. Central coordinate-wise differences of each
  sample's loss w.r.t. its code, ``g_i[k] = (l_i(z_i + mu e_k) - l_i(z_i - mu e_k)) / (2 mu)``
  (``2 d`` queries), backpropagated through encoder and denoiser as the gradient of the
  surrogate ``mean_i <z_i, g_i>``. Trained with ``TrainConfig(method="custom")`` and
  ``Trainer(..., source=LatentCGE(d, mu))``: a step costs ``2 d + 1`` queries (the trainer's
  base value plus the ``2 d`` shifted codes), ``q + 1`` with ``q = 2 d``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from zoopt.estimators import Estimate
from zoopt.oracle import BaseOracle, ErrorPolicy
from zoopt.torch.blackbox import PredictionAPI, check_prediction_api
from zoopt.torch.params import ParamView, preserved_buffers


class AutoencoderZOOracle(BaseOracle):
    """``f(x) = mean_i CE(api(decoder(encoder(denoiser(inputs_i)))), targets_i)``.

    ``x`` is the flat vector of the denoiser's then the encoder's trainable parameters (the
    decoder is frozen, as in ZO-AE-DS's end-to-end stage); :attr:`view` maps it to them.
    Queries (each: ``B`` images sent to the API, counted in ``queries``, under the error
    policy): :meth:`base_value`, :meth:`batch` / ``__call__`` (a point ``x``), and
    :meth:`code_losses` (shifted latent codes). :meth:`codes` and :meth:`pullback` are
    white-box computations on the defender's own modules and cost no query.

    Args:
        denoiser, encoder, decoder: torch modules; ``encoder(denoiser(inputs))`` is ``(B, d)``.
        api: the classifier API (a :class:`~zoopt.torch.blackbox.PredictionAPI`).
        chunk_images: most decoded images sent per ``predict`` call.
        max_queries, on_error, on_nonfinite: see :class:`~zoopt.oracle.BaseOracle`.
    """

    _what = "black box (decoder -> classifier API)"

    def __init__(
        self,
        denoiser: nn.Module,
        encoder: nn.Module,
        decoder: nn.Module,
        api: PredictionAPI,
        *,
        chunk_images: int = 4096,
        max_queries: int | None = None,
        on_error: ErrorPolicy = "raise",
        on_nonfinite: ErrorPolicy = "raise",
    ):
        if isinstance(chunk_images, bool) or not isinstance(chunk_images, int) or chunk_images < 1:
            raise ValueError(f"chunk_images must be a positive integer, got {chunk_images!r}")
        self.api = check_prediction_api(api)
        self.trainable = nn.Sequential(denoiser, encoder)
        self.view = ParamView(self.trainable)
        super().__init__(
            self.view.dim, max_queries=max_queries, on_error=on_error, on_nonfinite=on_nonfinite
        )
        self.decoder = decoder.eval().requires_grad_(False)
        self.chunk_images = chunk_images
        self.inputs: torch.Tensor | None = None
        self.targets: torch.Tensor | None = None

    def __repr__(self) -> str:
        return f"AutoencoderZOOracle(dim={self.dim}, queries={self.queries})"

    # -- data -----------------------------------------------------------------------------
    def set_batch(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        """Use ``inputs (B, C, H, W)`` and integer ``targets (B,)`` for the following queries."""
        if inputs.ndim != 4 or targets.ndim != 1 or inputs.shape[0] != targets.shape[0]:
            raise ValueError(
                f"need inputs (B, C, H, W) and targets (B,), got {tuple(inputs.shape)} and "
                f"{tuple(targets.shape)}"
            )
        self.inputs = inputs.to(self.view.device, self.view.dtype)
        self.targets = targets.to(self.view.device)

    def _minibatch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inputs is None or self.targets is None:
            raise ValueError("no minibatch: call set_batch(inputs, targets) first")
        return self.inputs, self.targets

    # -- the black box (uncounted, unguarded: every caller below charges and guards) -------
    def _sample_losses(self, latents: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-image CE ``(m,)`` float64 of ``api(decoder(latents (m, d)))`` against
        ``targets (m,)``; sends ``m`` images, ``chunk_images`` per call. No autograd. float64
        so that differences divided by ``2 mu`` are not float32 rounding noise."""
        out = []
        with torch.no_grad():
            for s in range(0, latents.shape[0], self.chunk_images):
                images = self.decoder(latents[s : s + self.chunk_images])
                host = images.detach().to("cpu", torch.float32).contiguous().numpy()
                logits = torch.from_numpy(np.asarray(self.api.predict(host), dtype=np.float32))
                logits = logits.to(latents.device, torch.float64)
                out.append(
                    F.cross_entropy(logits, targets[s : s + self.chunk_images], reduction="none")
                )
        return torch.cat(out)

    def _evaluate(self, X: Any) -> Any:
        """Loss at each row of ``X`` ``(n, dim)`` (B images each); running statistics untouched."""
        inputs, targets = self._minibatch()
        as_numpy = isinstance(X, np.ndarray)
        Xt = torch.as_tensor(X, device=self.view.device, dtype=self.view.dtype)
        out = torch.empty(Xt.shape[0], dtype=torch.float64)
        with torch.no_grad(), preserved_buffers(self.trainable):
            for i in range(Xt.shape[0]):
                with self.view.loaded(Xt[i]):
                    out[i] = self._sample_losses(self.trainable(inputs), targets).mean()
        return out.numpy() if as_numpy else out

    # -- queries --------------------------------------------------------------------------
    def base_value(self, x: torch.Tensor) -> float:
        """``f(x)``: the training forward, which updates BatchNorm running statistics of the
        denoiser and encoder; 1 query."""
        x = self.view.check_flat(x, "x")
        inputs, targets = self._minibatch()
        first = self._charge(1)

        def forward() -> torch.Tensor:
            with torch.no_grad(), self.view.loaded(x):
                latents = self.trainable(inputs)
                return self._sample_losses(latents, targets).mean().reshape(1)

        values = self.guarded(forward, 1, first, x[None])
        self._track_best(values, lambda i: x)
        return float(values[0])

    def code_losses(self, codes: torch.Tensor) -> torch.Tensor:
        """Per-sample losses ``(n, B)`` float64 at ``n`` batches of latent codes ``(n, B, d)``
        (sample ``i`` of each against target ``i``): ``n`` queries, ``n * B`` images.

        The error policy sees one value per query (its mean loss); a query it sets to
        ``+inf`` (``on_error`` / ``on_nonfinite="inf"``) has all its per-sample losses ``+inf``.
        """
        _, targets = self._minibatch()
        if codes.ndim != 3 or codes.shape[1] != targets.shape[0]:
            raise ValueError(
                f"codes must be (n, B={targets.shape[0]}, d), got {tuple(codes.shape)}"
            )
        n, b, d = codes.shape
        first = self._charge(n)
        per_sample = torch.full((n, b), math.inf, dtype=torch.float64, device=codes.device)

        def evaluate() -> torch.Tensor:
            losses = self._sample_losses(codes.reshape(n * b, d), targets.repeat(n))
            per_sample.copy_(losses.view(n, b))
            return per_sample.mean(dim=1)

        means = self.guarded(evaluate, n, first, codes[:, 0])
        per_sample[~torch.isfinite(means)] = math.inf
        return per_sample

    # -- white box: the defender's own modules (no queries) --------------------------------
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The latent codes ``(B, d)`` of the batch at ``x`` (no autograd; running statistics
        untouched)."""
        x = self.view.check_flat(x, "x")
        inputs, _ = self._minibatch()
        with torch.no_grad(), self.view.loaded(x), preserved_buffers(self.trainable):
            latents = self.trainable(inputs)
        if latents.ndim != 2:
            raise ValueError(f"the encoder must return codes (B, d), got {tuple(latents.shape)}")
        return latents

    def pullback(self, x: torch.Tensor, code_grads: torch.Tensor) -> torch.Tensor:
        """The gradient ``(dim,)`` w.r.t. ``x`` of ``mean_i <z_i(x), code_grads_i>``: per-sample
        code gradients ``(B, d)`` backpropagated through encoder and denoiser (running
        statistics untouched)."""
        x = self.view.check_flat(x, "x")
        inputs, _ = self._minibatch()
        with self.view.loaded(x), preserved_buffers(self.trainable), torch.enable_grad():
            latents = self.trainable(inputs)
            if latents.shape != code_grads.shape:
                raise ValueError(
                    f"code_grads must have the codes' shape {tuple(latents.shape)}, "
                    f"got {tuple(code_grads.shape)}"
                )
            surrogate = (latents * code_grads).sum() / latents.shape[0]
            grads = torch.autograd.grad(surrogate, self.view.params, allow_unused=True)
        return self.view.flat_grad(grads)


@runtime_checkable
class LatentOracle(Protocol):
    """What :class:`LatentCGE` needs: an oracle over parameters ``x`` whose loss is a
    function of per-sample latent codes (see :class:`AutoencoderZOOracle`)."""

    def codes(self, x: torch.Tensor) -> torch.Tensor: ...

    def code_losses(self, codes: torch.Tensor) -> torch.Tensor: ...

    def pullback(self, x: torch.Tensor, code_grads: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class LatentCGE:
    """ZO-AE-DS's gradient source: central CGE over each sample's ``latent_dim`` code
    coordinates, backpropagated through the white-box modules in front of the code.

    A :class:`~zoopt.step.GradientSource`. Per :meth:`estimate`: ``2 * latent_dim`` queries
    (``+mu e_k`` then ``-mu e_k`` for every coordinate ``k``, each query shifting that
    coordinate of every sample's code), plus 1 for ``f(x)`` when ``fx`` is not given. In the
    trainer (``wants_base_value``) the base value is that one query, so a step costs
    ``2 * latent_dim + 1``.

    Args:
        latent_dim: ``d``, the length of the codes.
        mu: finite-difference step in latent units (ZO-AE-DS: 0.005).
    """

    latent_dim: int
    mu: float = 5e-3
    wants_base_value: bool = True

    def __post_init__(self) -> None:
        if (
            isinstance(self.latent_dim, bool)
            or not isinstance(self.latent_dim, int)
            or self.latent_dim < 1
        ):
            raise ValueError(f"latent_dim must be a positive integer, got {self.latent_dim!r}")
        if not (isinstance(self.mu, int | float) and self.mu > 0 and math.isfinite(self.mu)):
            raise ValueError(f"mu must be a positive finite number, got {self.mu!r}")

    def queries_per_step(self, dim: int, *, fx_known: bool = False, iteration: int = 0) -> int:
        return 2 * self.latent_dim + (0 if fx_known else 1)

    def code_gradients(self, oracle: LatentOracle, codes: torch.Tensor) -> torch.Tensor:
        """Per-sample central differences ``(B, d)`` of the loss w.r.t. ``codes (B, d)``;
        ``2 d`` queries: ``+mu e_k`` for ``k = 0..d-1``, then ``-mu e_k``."""
        b, d = codes.shape
        if d != self.latent_dim:
            raise ValueError(
                f"the oracle's codes have d={d}, this source latent_dim={self.latent_dim}"
            )
        eye = torch.eye(d, dtype=codes.dtype, device=codes.device)
        steps = torch.cat([eye, -eye]) * self.mu  # (2d, d)
        shifted = codes.unsqueeze(0) + steps.unsqueeze(1)  # (2d, B, d)
        losses = oracle.code_losses(shifted).view(2, d, b)
        grads = (losses[0] - losses[1]) / (2 * self.mu)  # (d, B)
        return grads.T.to(codes.dtype).contiguous()

    def estimate(
        self,
        oracle: LatentOracle,
        x: torch.Tensor,
        *,
        fx: float | None = None,
        rng: np.random.Generator | None = None,
        iteration: int = 0,
    ) -> Estimate:
        """The ZO-AE-DS gradient ``(dim,)`` at ``x`` on the oracle's batch: ``2 * latent_dim``
        queries, one more when ``fx`` (f(x)) is not given. ``rng`` is unused (the estimate is
        deterministic); BatchNorm running statistics are left as they are (the trainer's
        base value is the forward that updates them)."""
        if not isinstance(oracle, LatentOracle):
            raise TypeError(
                "LatentCGE needs an oracle with codes, code_losses and pullback "
                f"(an AutoencoderZOOracle), got {type(oracle).__name__}"
            )
        codes = oracle.codes(x)
        queries = 2 * self.latent_dim
        if fx is None:
            fx = float(oracle.code_losses(codes.unsqueeze(0)).mean())
            queries += 1
        grad = oracle.pullback(x, self.code_gradients(oracle, codes))
        return Estimate(grad=grad, fx=fx, queries=queries)
