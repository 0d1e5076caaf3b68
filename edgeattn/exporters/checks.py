"""Graph checks after export: the ONNX checker, the op histogram, one fused attention node per layer."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx

from edgeattn.errors import EdgeattnError
from edgeattn.exporters.lowering_contract import AttentionLowering

_STANDARD_DOMAINS = ("", "ai.onnx", "com.microsoft")


class GraphCheckError(EdgeattnError, RuntimeError):
    """The exported graph is not what the lowering promised."""


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    """Node counts of the main graph by ``domain.op_type`` (default domain shown bare), sorted by count.

    Function bodies are not counted: a custom-domain node is one node however it is implemented.
    A control-flow node (``If``) adds the nodes of its branches, per op the most that one
    branch holds: what one step can run (an ``If`` with an ``Attention`` in each branch is one
    attention per layer).
    """
    return dict(_graph_counts(model.graph).most_common())


def _graph_counts(graph: onnx.GraphProto) -> Counter:
    counts = Counter()
    for node in graph.node:
        counts[_op_name(node)] += 1
        branches = [_graph_counts(attribute.g) for attribute in node.attribute if attribute.type == attribute.GRAPH]
        for op in {op for branch in branches for op in branch}:
            counts[op] += max(branch[op] for branch in branches)
    return counts


def check_graph(path: Path, fused_ops: list[str]) -> dict[str, int]:
    """Run onnx.checker on ``path``; require the fused node of each layer (``fused_ops``, in layer order,
    given as ``domain.op_type`` or a bare standard op type), a body for every custom-domain node, and no
    Softmax outside the fused ops. Returns the op histogram."""
    onnx.checker.check_model(str(path), full_check=False)
    model = onnx.load(str(path), load_external_data=False)
    histogram = op_histogram(model)
    for op, layers in Counter(fused_ops).items():
        if histogram.get(op, 0) != layers:
            raise GraphCheckError(f"expected {layers} {op} node(s) (one per layer), found {histogram.get(op, 0)}")
    bodies = {(function.domain, function.name) for function in model.functions}
    missing = sorted({_op_name(node) for node in model.graph.node
                      if node.domain not in _STANDARD_DOMAINS and (node.domain, node.op_type) not in bodies})
    if missing:
        raise GraphCheckError(f"custom op(s) without a function body in the model: {', '.join(missing)}")
    if histogram.get("Softmax"):
        raise GraphCheckError(f"{histogram['Softmax']} Softmax node(s) outside the fused attention ops")
    return histogram


def fused_op_name(lowering: AttentionLowering) -> str:
    """How a lowering's fused node appears in the op histogram."""
    return f"{lowering.domain}.{lowering.op_type}" if lowering.domain else lowering.op_type


def _op_name(node: onnx.NodeProto) -> str:
    return f"{node.domain}.{node.op_type}" if node.domain else node.op_type
