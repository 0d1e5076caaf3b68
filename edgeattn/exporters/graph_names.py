"""Values of an ``onnx_ir`` graph as the weight passes edit it: still needed, or replaced under their names.

An initializer read only inside a subgraph (a ring's per-channel scales, read in both branches
of its ``If``) is still in use: pruning by the top-level nodes alone would drop it and leave a
graph onnx's checker refuses. In onnx_ir a subgraph's node reads the outer ``Value`` itself, so
``Value.uses`` counts it.

A replacement keeps the replaced value's name (graph outputs are read by name), type, shape and
metadata; ``replace_nodes_and_values`` alone carries all but the metadata.
"""

from __future__ import annotations

import onnx_ir as ir


def in_use(value: ir.Value) -> bool:
    """Read by a node of the graph or of any subgraph in it, or an output of the graph."""
    return bool(value.uses()) or value.is_graph_output()


def replace_node(node: ir.Node, nodes: list[ir.Node], output: ir.Value) -> None:
    """``nodes`` take the place of ``node``, and ``output`` that of its one output."""
    replaced = node.outputs[0]
    ir.convenience.replace_nodes_and_values(node.graph, node, [node], nodes, [replaced], [output])
    output.metadata_props.update(replaced.metadata_props)


def stand_in(value: ir.Value, replaced: ir.Value) -> None:
    """``value`` is read wherever ``replaced`` was, under its name, type, shape and metadata."""
    replaced.replace_all_uses_with(value, replace_graph_outputs=True)
    value.name, value.type, value.shape = replaced.name, replaced.type, replaced.shape
    value.metadata_props.update(replaced.metadata_props)
