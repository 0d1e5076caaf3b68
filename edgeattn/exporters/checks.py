"""Graph checks after export: the ONNX checker, the op histogram, one fused attention node per layer."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx

from edgeattn.errors import EdgeattnError


class GraphCheckError(EdgeattnError, RuntimeError):
    """The exported graph is not what the lowering promised."""


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    """Node counts by ``domain.op_type`` (default domain shown bare), sorted by count."""
    counts = Counter(f"{node.domain}.{node.op_type}" if node.domain else node.op_type for node in model.graph.node)
    return dict(counts.most_common())


def check_graph(path: Path, fused_op: str, num_layers: int) -> dict[str, int]:
    """Run onnx.checker on ``path``; require exactly ``num_layers`` fused nodes and no Softmax outside them."""
    onnx.checker.check_model(str(path), full_check=False)
    model = onnx.load(str(path), load_external_data=False)
    histogram = op_histogram(model)
    fused = sum(count for op, count in histogram.items() if op.split(".")[-1] == fused_op)
    if fused != num_layers:
        raise GraphCheckError(f"expected {num_layers} {fused_op} nodes (one per layer), found {fused}")
    if histogram.get("Softmax"):
        raise GraphCheckError(f"{histogram['Softmax']} Softmax node(s) outside the fused attention ops")
    return histogram
