"""The cost model of ``explain``: multiply-adds per node, and per query for each path.

A query's cost is what it computes beyond the cached forward: the perturbed layer (nothing
to speak of on the fast path: one channel or feature), a ``1/C_in`` share of the next conv or
linear layer reading one changed channel, and every dense node downstream in full.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from .origins import FAST, SLOW, UNUSED, Use

if TYPE_CHECKING:
    from .graph import EngineGraph
    from .planner import Plan

#: Rule kinds that keep a change local to one slice (no multiply-adds to speak of).
LOCAL_KINDS = frozenset(
    {"elementwise", "batchnorm", "pool", "identity", "reshape", "permute", "index", "pad",
     "cat", "dropout", "arithmetic", "reduce", "shape", "split"}
)  # fmt: skip


class CostModel:
    """Multiply-adds per node from the unperturbed values' shapes (``meta``: node -> meta
    tensor, see :class:`~.cache.ActivationCache`), and per query for each path."""

    def __init__(self, plan: Plan, meta: dict[fx.Node, Any]):
        self.plan = plan
        self.macs = {n: node_macs(n, plan.graph, meta) for n in plan.graph.nodes}
        self.full = max(1.0, float(sum(self.macs.values())))

    def per_query(self, path: str, uses: list[Use]) -> float:
        """Estimated multiply-adds of one query on ``path`` through the nodes using a
        parameter (``uses``), as a share of a full forward (0 to 1)."""
        if path == UNUSED:
            return 0.0
        if path == SLOW:
            return 1.0
        eg = self.plan.graph
        state: dict[fx.Node, str] = {}
        cost = 0.0
        for u in uses:
            kind = self.plan.rules.get(u.node, (None, ""))[1]
            if path == FAST and kind in ("conv", "batchnorm", "linear", "layernorm"):
                state[u.node] = "local"  # one channel / feature: no multiply-adds to speak of
            else:
                state[u.node] = "dense"
                cost += self.macs[u.node]
        start = min(eg.position[u.node] for u in uses)
        for node in eg.nodes[start:]:
            if node in state or node.op in ("placeholder", "get_attr", "output"):
                continue
            ins = [state[n] for n in node.all_input_nodes if n in state]
            if not ins:
                continue
            kind = self.plan.rules[node][1]
            if kind in ("conv", "linear") and all(s == "local" for s in ins):
                cost += self.macs[node] / max(1, in_channels(node, eg))
                state[node] = "dense"
            elif kind in LOCAL_KINDS and all(s == "local" for s in ins):
                state[node] = "local"
            else:
                cost += self.macs[node]
                state[node] = "dense"
        return min(1.0, cost / self.full)


def in_channels(node: fx.Node, eg: EngineGraph) -> int:
    """Input channels (features) of a conv (linear) node; 1 for anything else."""
    m = eg.modules.get(node)
    if isinstance(m, nn.Conv2d):
        return max(1, m.in_channels)
    if isinstance(m, nn.Linear):
        return max(1, m.in_features)
    return 1


def node_macs(node: fx.Node, eg: EngineGraph, meta: dict[fx.Node, Any]) -> float:
    """Multiply-adds of one unperturbed run of ``node`` (convs, linear layers, matmuls,
    attention; 0 for anything else)."""
    out = meta.get(node)
    if not isinstance(out, torch.Tensor):
        return 0.0
    m = eg.modules.get(node)
    if isinstance(m, nn.modules.conv._ConvNd):
        k = 1
        for s in m.kernel_size:
            k *= s
        return float(out.numel()) * (m.in_channels // m.groups) * k
    if isinstance(m, nn.Linear):
        return float(out.numel()) * m.in_features
    if (
        node.op == "call_function"
        and node.target in (torch.matmul, torch.bmm)
        or (node.op == "call_function" and getattr(node.target, "__name__", "") == "matmul")
    ):
        a = meta.get(node.args[0])
        return float(out.numel()) * (a.shape[-1] if isinstance(a, torch.Tensor) else 1)
    if (
        node.op == "call_function"
        and node.target is torch.nn.functional.scaled_dot_product_attention
    ):
        qv, kv = meta.get(node.args[0]), meta.get(node.args[1])
        if isinstance(qv, torch.Tensor) and isinstance(kv, torch.Tensor):
            return 2.0 * qv.numel() * kv.shape[-2]
    if isinstance(m, nn.MultiheadAttention):
        e = m.embed_dim
        return 4.0 * out.numel() * e + 2.0 * out.numel() * out.shape[-2]
    return 0.0


__all__ = ["LOCAL_KINDS", "CostModel", "in_channels", "node_macs"]
