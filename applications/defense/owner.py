"""The classifier owner's side: the model behind the API, and the API itself.

The owner trains a ResNet first-order (once per output folder) and exposes it only as a
prediction API: a remote Open Inference Protocol server (ours, Triton, KServe, MLServer...),
the checkpoint served by :mod:`oracles.http_service` over real HTTP on 127.0.0.1, or an
in-process :class:`oracles.classifier.LocalClassifier`. The defender sees nothing else.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from oracles.classifier import ClassifierAPI, HTTPClassifier, LocalClassifier
from oracles.http_service import make_server, serve_in_background
from oracles.resnet import build_resnet, load_classifier, save_classifier_checkpoint
from zoopt.torch.tasks import ClassificationTask
from zoopt.torch.train import Trainer

from .config import TOKEN_ENV_VAR, DefenseConfig
from .data import ImageData
from .recipe import fit, train_config

#: The owner's checkpoint in the output folder: what is served, and FO-DS's white box.
CHECKPOINT_NAME = "classifier.pt"


def train_classifier(config: DefenseConfig, data: ImageData, out: Path) -> Path:
    """Train the owner's ResNet (``config.classifier.arch``) first-order, once: reused if
    ``out/classifier.pt`` exists. Saved with ``save_classifier_checkpoint`` (input
    normalization inside: the model takes pixels in [0, 1]). Returns the checkpoint path."""
    clf = config.classifier
    path = out / CHECKPOINT_NAME
    if path.exists():
        print(f"classifier: reusing {path}")
        return path
    mean, std = float(data.X_train.mean()), float(data.X_train.std())
    channels = data.shape[0]
    torch.manual_seed(config.seed)
    model = build_resnet(
        clf.arch, num_classes=data.num_classes, in_channels=channels, small_input=False
    )
    task = ClassificationTask(
        model,
        ((data.X_train - mean) / std, data.y_train),
        ((data.X_test - mean) / std, data.y_test),
        batch_size=64,
        device=config.device,
    )
    recipe = train_config(
        config, "fo", clf.lr, epochs=clf.epochs, weight_decay=5e-4, max_steps_per_epoch=None
    )
    summary = fit(Trainer(task, recipe, out / "classifier_training"), "--classifier-lr")
    print(f"classifier: {clf.arch} held-out accuracy {summary['test_accuracy']:.4f}")
    save_classifier_checkpoint(
        path,
        model.cpu().eval(),
        clf.arch,
        input_shape=data.shape,
        mean=[mean] * channels,
        std=[std] * channels,
    )
    return path


def provide_checkpoint(config: DefenseConfig, data: ImageData, out: Path) -> Path:
    """The owner's weights at ``out/classifier.pt``: a copy of ``config.classifier.weights``,
    or trained here unless the classifier is remote (then the path may not exist)."""
    checkpoint = out / CHECKPOINT_NAME
    weights = config.classifier.weights
    if weights is not None:
        if weights.resolve() != checkpoint.resolve():
            shutil.copyfile(weights, checkpoint)
    elif not config.classifier.url:
        train_classifier(config, data, out)
    return checkpoint


@contextlib.contextmanager
def classifier_api(config: DefenseConfig, checkpoint: Path | None) -> Iterator[ClassifierAPI]:
    """The black box: the remote Open Inference Protocol server ``config.classifier.url`` (a
    server root or ``.../v2/models/NAME``; token from ``$ZOOPT_CLASSIFIER_TOKEN``), the
    checkpoint served over real HTTP on 127.0.0.1 in a background thread (default), or
    in-process (``config.classifier.local``)."""
    clf = config.classifier
    if clf.url:
        token = os.environ.get(TOKEN_ENV_VAR) or None
        api = HTTPClassifier(clf.url, token=token, max_batch=clf.api_batch)
        print(f"classifier API: {clf.url}")
        try:
            yield api
        finally:
            api.close()
        return
    module, spec = load_classifier(checkpoint)
    local = LocalClassifier(
        module, device=config.device, max_batch=clf.api_batch, input_shape=spec["input_shape"],
        name=spec["arch"],
    )  # fmt: skip
    if clf.local:
        print("classifier API: in-process LocalClassifier (--local)")
        yield local
        return
    token = secrets.token_urlsafe(16)
    server = make_server(local, host="127.0.0.1", port=0, token=token, max_batch=clf.api_batch)
    serve_in_background(server)
    # Our own server: name the model and the encoding, no discovery round trips needed.
    model_url = f"{server.url}/v2/models/{server.model_name}"
    api = HTTPClassifier(model_url, token=token, max_batch=clf.api_batch, binary=True)
    print(f"classifier API: {spec['arch']} served on {model_url} (bearer token)")
    try:
        yield api
    finally:
        api.close()
        server.shutdown()
        server.server_close()


def api_labels(api: ClassifierAPI, images: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """The classifier's labels ``(n,)`` int64 of ``images`` ``(n, C, H, W)``, through the API
    (``n`` images sent, ``chunk`` per ``predict`` call)."""
    parts = [np.argmax(api.predict(images[s : s + chunk]), 1) for s in range(0, len(images), chunk)]
    return np.concatenate(parts).astype(np.int64)
