"""Which tensor names a graph reads, its If/Loop/Scan bodies included.

An initializer read only inside a subgraph (a ring's per-channel scales, read in both branches
of its ``If``) is still in use: pruning by the top-level nodes' inputs alone would drop it and
leave a graph onnx's checker refuses.
"""

from __future__ import annotations

import onnx


def names_read(graph: onnx.GraphProto) -> set[str]:
    """Every name a node of ``graph`` or of any subgraph inside it takes as an input."""
    names: set[str] = set()
    for node in graph.node:
        names.update(node.input)
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                names |= names_read(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    names |= names_read(subgraph)
    return names
