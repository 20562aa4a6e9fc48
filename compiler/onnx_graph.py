"""Queries over emitted ONNX graphs, shared by the passes and analyses that read them."""
from __future__ import annotations

import onnx


def reads(node: onnx.NodeProto) -> set[str]:
    """The values a node reads: its inputs and, in subgraphs (If, Loop), the names they use."""
    names = {name for name in node.input if name}
    for attr in node.attribute:
        for graph in [attr.g] if attr.HasField("g") else list(attr.graphs):
            for inner in graph.node:
                names |= reads(inner)
    return names


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    """Each value a node of `graph` makes, and that node."""
    return {out: node for node in graph.node for out in node.output}
