"""torch.onnx.export (dynamo) of a rewritten Decoder into one prefill+decode graph."""

from __future__ import annotations

from pathlib import Path

import onnx
import torch

from edgeattn.exporters.edgeattn_ops import attach_functions
from edgeattn.exporters.graph import ExportGraph
from edgeattn.exporters.lowering_contract import AttentionLowering
from edgeattn.exporters.norms import choose_norm_fusion, drop_unused_skip_norm_outputs
from edgeattn.exporters.onnx_ring_function import inline_all_functions

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8, "uint8": torch.uint8}


PAST_NAME = "past_key_values.{layer}.{kind}"
PRESENT_NAME = "present.{layer}.{kind}"


def cache_names(num_layers: int, kinds: tuple[str, ...] = ("key", "value")) -> tuple[list[str], list[str]]:
    """The past inputs and present outputs, layer by layer: each of ``kinds`` (key, value, extra buffers)."""
    layers_kinds = [(i, kind) for i in range(num_layers) for kind in kinds]
    return ([PAST_NAME.format(layer=i, kind=kind) for i, kind in layers_kinds],
            [PRESENT_NAME.format(layer=i, kind=kind) for i, kind in layers_kinds])


def model_opset(lowerings: list[AttentionLowering]) -> int:
    """The default-domain opset of the graph: the newest any layer's lowering needs."""
    return max(lowering.opset for lowering in lowerings)


def export_graph(decoder, lowerings: list[AttentionLowering], path: Path, norm_fusion: str | None = None) -> onnx.ModelProto:
    """Export ``decoder`` with one lowering per layer to ``path`` (+ ``path.data``); returns the proto.

    ``norm_fusion`` (``edgeattn.exporters.norms``) defaults to ``choose_norm_fusion``.
    The model carries the function bodies its custom-domain nodes need (the ``edgeattn``
    lowering's), so every caller gets a model onnxruntime can load.
    """
    norm_fusion = norm_fusion or choose_norm_fusion(decoder, lowerings)
    graph = ExportGraph(decoder, lowerings, norm_fusion).eval()
    graph.lowering_modules = torch.nn.ModuleList(lowerings)  # their buffers become initializers
    batch = torch.export.Dim("batch", min=1, max=64)
    length = torch.export.Dim("sequence", min=1, max=1 << 20)
    total = torch.export.Dim("total", min=1, max=1 << 30)
    # Sample sizes >= 2 so the exporter does not specialize batch or sequence to 1.
    sample_ids = torch.zeros((2, 3), dtype=torch.long)
    sample_past = []
    for lowering in lowerings:
        layout = lowering.cache_layout()
        tensor = torch.zeros((2, *layout.shape_tail), dtype=_TORCH_DTYPES[layout.dtype])
        sample_past += [tensor, tensor.clone()]
        sample_past += [torch.zeros((2, *buffer.shape_tail), dtype=_TORCH_DTYPES[buffer.dtype])
                        for buffer in layout.extra]
    past_names, present_names = cache_names(len(lowerings), lowerings[0].cache_layout().kinds)
    dynamic_shapes = ({0: batch, 1: length}, {0: batch, 1: total}, tuple({0: batch} for _ in sample_past))
    with torch.no_grad():
        program = torch.onnx.export(
            graph, (sample_ids, torch.ones((2, 8), dtype=torch.long), *sample_past),
            input_names=["input_ids", "attention_mask", *past_names],
            output_names=["logits", *present_names],
            dynamic_shapes=dynamic_shapes, opset_version=model_opset(lowerings), dynamo=True, optimize=True,
            verbose=False,
        )
    program.save(str(path), external_data=True)
    model = onnx.load(str(path), load_external_data=False)
    changed = drop_unused_skip_norm_outputs(model)
    if attach_functions(model, lowerings) or changed:
        if any(lowering.inline_functions for lowering in lowerings):
            model = inline_all_functions(model)
        onnx.save(model, str(path))  # the weights stay in path.data, which the proto still points to
    return model
