"""Forward parallelization: the queries of one sparse-CGE step, split across Dask workers.

The coordinate-wise finite differences of sparse CGE (DeepZero eq. 5) are independent, so a
step's coordinates are cut into one chunk per worker and each worker evaluates its chunk with
its own replica of the oracle. See docs/scaling.md.

* :mod:`~zoopt.parallel.protocol` — :class:`ReplicableOracle`, what an oracle offers to be
  replicated; :func:`replicable` for plain oracles;
* :mod:`~zoopt.parallel.oracle` — :class:`ParallelOracle`, the client's oracle, and the
  :func:`parallel_oracle` context manager;
* :mod:`~zoopt.parallel.balance` — cutting coordinates at equal measured cost (pure numpy);
* :mod:`~zoopt.parallel.cluster` — :func:`connect` and the Dask calls;
* :mod:`~zoopt.parallel.worker` — what runs on the workers.

The torch side (a :class:`~zoopt.torch.ModuleOracle` 's factory and its buffers) lives in
:mod:`zoopt.torch.oracle` and :mod:`zoopt.torch.replica`; this package never imports torch. Dask is imported when a
cluster is used.

    with parallel_oracle(task.oracle, workers=2) as oracle:
        Trainer(task, config, out_dir, oracle=oracle).fit()

Independent points of any Python function (``minimize``'s plans, an ``AskTell`` loop) need no
replica: they go through the executor protocol of :mod:`zoopt.executors`, for which a
client of :func:`connect` is one more backend (:class:`DaskExecutor`, re-exported here)::

    with connect(workers=4) as client:
        res = zoopt.minimize(f, x0, workers=client)
"""

from ..executors import DaskExecutor
from .balance import GroupCosts, plan_probes, predict_group_cost, split_by_cost, split_equal
from .cluster import OracleTimeout, cluster, connect
from .oracle import Balance, ParallelOracle, parallel_oracle
from .protocol import (
    CostClock,
    OracleFactory,
    ReplicableOracle,
    StatelessFactory,
    StatelessReplica,
    check_replicable,
    replicable,
)

__all__ = [
    "Balance",
    "CostClock",
    "DaskExecutor",
    "GroupCosts",
    "OracleFactory",
    "OracleTimeout",
    "ParallelOracle",
    "ReplicableOracle",
    "StatelessFactory",
    "StatelessReplica",
    "check_replicable",
    "cluster",
    "connect",
    "parallel_oracle",
    "plan_probes",
    "predict_group_cost",
    "replicable",
    "split_by_cost",
    "split_equal",
]
