"""How the residual stream's norms leave the exporter.

* ``standard``: every RMSNorm is one ``RMSNormalization`` node (ai.onnx opset >= 23) and
  each residual add an ``Add``: any ONNX runtime runs it.
* ``skip``: onnxruntime's ``com.microsoft.SkipSimplifiedLayerNormalization`` computes
  ``sum = input + skip`` and ``RMSNorm(sum)`` in one node with two outputs (the normed
  value and the sum, which carries the residual on), as onnxruntime-genai's builder
  emits it: 2 nodes per block where ``standard`` has 2 Adds + 2 norms. Used when the graph
  already needs onnxruntime (a ``com.microsoft`` attention lowering) and the family
  normalises with RMSNorm; LayerNorm families keep the standard path.

Like the attention ops, the fused node is emitted at export (``torch.onnx.ops.symbolic_multi_out``),
never pattern-matched afterwards. The op's optional ``mean`` and ``inv_std_var`` outputs
are not computed by onnxruntime's CPU kernel; ``drop_unused_skip_norm_outputs`` blanks
them after export so that no graph output name promises a tensor that never exists.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
import torch
import torch.nn.functional as F
from torch import nn

from edgeattn.exporters.graph_names import in_use
from edgeattn.exporters.lowering_contract import AttentionLowering
from edgeattn.models.decoder import RMSNorm

STANDARD = "standard"
SKIP = "skip"
SKIP_DOMAIN = "com.microsoft"
SKIP_OP = "SkipSimplifiedLayerNormalization"
_UNUSED_OUTPUTS = (1, 2)  # mean, inv_std_var


def choose_norm_fusion(decoder, lowerings: list[AttentionLowering]) -> str:
    """``skip`` when the graph is onnxruntime-only already and every norm is an RMSNorm."""
    ort_only = any(lowering.domain == SKIP_DOMAIN for lowering in lowerings)
    norms = [module for module in decoder.modules() if isinstance(module, (RMSNorm, nn.LayerNorm))]
    return SKIP if ort_only and all(isinstance(norm, RMSNorm) for norm in norms) else STANDARD


def norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One norm on its own (RMSNorm as ``RMSNormalization``)."""
    if isinstance(module, RMSNorm):
        return F.rms_norm(x, module.weight.shape, module.weight, module.eps)
    return module(x)


def skip_rms_norm(module: RMSNorm, x: torch.Tensor, skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + skip), x + skip) as one SkipSimplifiedLayerNormalization node."""
    statistics_shape = (*x.shape[:-1], 1)
    normed, _mean, _inv_std_var, total = torch.onnx.ops.symbolic_multi_out(
        f"{SKIP_DOMAIN}::{SKIP_OP}", (x, skip, module.weight), {"epsilon": float(module.eps)},
        dtypes=(x.dtype, torch.float32, torch.float32, x.dtype),
        shapes=(x.shape, statistics_shape, statistics_shape, x.shape),
        version=1,
    )
    return normed, total


def drop_unused_skip_norm_outputs(model: onnx.ModelProto) -> bool:
    """Blank the optional outputs of SkipSimplifiedLayerNormalization nodes; True when any changed.

    The proto is read as an ``onnx_ir`` model (which finds readers in subgraphs too) and, when a node
    changed, written back into ``model``: the caller keeps editing and saving that proto.
    """
    graph_model = ir.from_proto(model)
    blanked = [output for node in graph_model.graph if node.domain == SKIP_DOMAIN and node.op_type == SKIP_OP
               for index, output in enumerate(node.outputs) if index in _UNUSED_OUTPUTS and output.name]
    if not blanked:
        return False
    consumed = sorted(output.name for output in blanked if in_use(output))
    if consumed:
        raise RuntimeError(f"{SKIP_OP} statistics are consumed in the graph: {consumed}")
    for output in blanked:
        output.name = ""  # an unnamed output is an omitted one; its value_info goes with the name
    model.CopyFrom(ir.to_proto(graph_model))
    return True
