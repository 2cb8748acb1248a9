"""Certified black-box defense (DeepZero Sec. 6.2, Table 2): denoised smoothing through an API.

The owner of a classifier exposes only a prediction API. The defender trains a denoiser D in
front of it so that randomized smoothing of ``classifier o D`` is certifiably robust, with three
gradient sources trained by the one Trainer at matched settings (FO-DS: white box; ZO-AE-DS:
CGE over an autoencoder's latent code; DeepZero: sparse CGE over D's own weights), then
certifies each through the same API. See docs/certified_defense.md.

Modules:

- :mod:`~applications.defense.config`: the settings (frozen dataclasses, checked);
- :mod:`~applications.defense.data`: the images;
- :mod:`~applications.defense.owner`: the owner's classifier and its API;
- :mod:`~applications.defense.models`: denoiser, denoised classifier, autoencoder;
- :mod:`~applications.defense.methods`: FO-DS and DeepZero oracles, DeepZero's budget;
- :mod:`~applications.defense.zo_ae_ds`: ZO-AE-DS's oracle and gradient source;
- :mod:`~applications.defense.tasks`: what the Trainer trains;
- :mod:`~applications.defense.recipe`: the shared training recipe;
- :mod:`~applications.defense.training`: pretraining and each method's training;
- :mod:`~applications.defense.selection`: the validation split and each method's
  learning-rate sweep on it;
- :mod:`~applications.defense.certification`: CERTIFY in blocks (resumable), table and plot;
- :mod:`~applications.defense.statistics`: Clopper-Pearson intervals, McNemar's exact test,
  the image bootstrap;
- :mod:`~applications.defense.experiment`: :func:`run`, the whole experiment;
- :mod:`~applications.defense.summary`: several seeds: tables, paired tests, plot;
- :mod:`~applications.defense.cli`: flags -> config, ``main``.
"""
