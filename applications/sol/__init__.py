"""Solver-in-the-loop training of a flow-correction network (DeepZero Sec. 6.3, Um et al. 2020).

A coarse solver ``P`` advances a velocity state one time step; a network ``N_θ(s, Re)`` adds a
correction to the state's values so that the corrected coarse trajectory tracks a reference
(a fine simulation downsampled onto the coarse grid). From a reference frame ``r_0``::

    c_0 = r_0,    f_j = P(c_{j-1}),    c_j = f_j + N_θ(f_j, Re)        (j = 1 .. n)

``c_j`` is the corrected state (Um et al. apply the network to the solver output). The
solver-in-the-loop loss is Um et al.'s per-step L2 loss: the MSE between ``c_1..c_n`` and
``r_1..r_n``, each velocity channel divided by the typical size of a one-step correction
(``Normalization.correction_std``), so the loss is O(1) whatever the grid. Because the
solver adds corrections *before* it steps, ``f_j = P(f_{j-1} + N(f_{j-1}))`` is one call
``solver.step(f_{j-1}, N(f_{j-1}))``.

Three ways to train ``θ``, all as oracles over the flat parameter vector for
:class:`~zoopt.torch.train.Trainer`:

* ZO-SOL — ``SolverInTheLoopOracle`` queried as a black box: for a batch of ``Q`` parameter
  vectors it runs, at every unrolled step, the ``Q`` perturbed networks (``torch.func.vmap``
  over ``functional_call``) and then the solver **once** on all ``Q * B`` states through its
  numpy ``step`` (no autograd anywhere).
* FO-SOL — the same oracle's ``loss_and_grad``: autograd through the unrolled
  differentiable solver (``step_torch``).
* NON — ``SupervisedCorrectionOracle``: pre-computed one-step pairs ``(f = P(r_{k-1}), r_k)``;
  the MSE of ``f + N(f)`` against ``r_k``; no solver in training.

Arrays: states are ``(batch, 2, H, W)`` float32 in the solver's layout (see
``oracles/wake_flow.py``); Reynolds numbers ``(batch,)``; trajectories
``(sims, frames, 2, H, W)``. Velocities are in inflow speeds, time in solver steps.

Modules (this package imports nothing heavy; import from them):

* ``config``     — :class:`SolSettings` (frozen, validated; each trained method's
  :class:`zoopt.recipe.Recipe`, torch-free) and :class:`RunOptions`;
* ``data``       — the solver protocols, :class:`Trajectories`, one-step pairs, loading;
* ``model``      — :class:`Normalization`, :class:`CorrectionCNN`;
* ``oracle``     — the correction oracles (``TrainableOracle``s);
* ``rollout``    — corrected rollouts and their MAE (the test metric);
* ``tasks``      — the Trainer tasks of NON and SOL;
* ``training``   — training one method through the Trainer, what it reports;
* ``report``     — gap closed, figures, the printed table;
* ``experiment`` — :func:`run`: one whole run;
* ``cli``        — flags -> settings (no torch import); ``python applications/zo_sol.py`` runs
  its ``main``.
"""
