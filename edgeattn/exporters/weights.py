"""Weight precision of the exported graph (``--weights``), with onnxruntime's own tools.

* int4 / int8: onnxruntime's MatMulNBits quantizer — every MatMul with a constant
  weight (the LM head included) becomes MatMulNBits (symmetric, ``block_size`` per block,
  accuracy_level 4 = int8 activations on CPU), and at 4 bits the embedding Gather becomes
  GatherBlockQuantized, as in onnxruntime-genai's int4 builds (the quantizer has no 8-bit
  Gather, so int8 keeps an fp32 embedding table).
* fp16: weights are stored in fp16 and cast to fp32 when the session loads them: half the
  disk size, fp32 compute (CPU execution providers have no fast fp16 matmul).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeattn.errors import InvalidOptionError

WEIGHT_DTYPES = ("fp32", "fp16", "int8", "int4")
DEFAULT_BLOCK_SIZE = 32
_MIN_FP16_ELEMENTS = 1024  # small tensors (norm weights, scales) stay fp32


def quantize_weights(path: Path, weights: str, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
    """Rewrite the model at ``path`` (external data beside it) to ``weights`` precision, in place."""
    if weights not in WEIGHT_DTYPES:
        raise InvalidOptionError(f"weights must be one of {', '.join(WEIGHT_DTYPES)}; got {weights!r}")
    if weights == "fp32":
        return
    model = onnx.load(str(path))
    if weights == "fp16":
        model = _fp16_storage(model)
    else:
        _materialize_transposed_weights(model)
        model = _matmul_nbits(model, bits=4 if weights == "int4" else 8, block_size=block_size)
    for stale in path.parent.glob(path.name + ".data"):
        stale.unlink()
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=1024)


def _matmul_nbits(model: onnx.ModelProto, bits: int, block_size: int) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    # The quantizer logs two INFO lines per node (hundreds for a real model); convert shows its own progress.
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    config = DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=True, accuracy_level=4, bits=bits,
        op_types_to_quantize=("MatMul", "Gather"), quant_axes=(("MatMul", 0), ("Gather", 1)),
    )
    quantizer = MatMulNBitsQuantizer(model, algo_config=config)
    quantizer.process()
    return quantizer.model.model


def _materialize_transposed_weights(model: onnx.ModelProto) -> None:
    """MatMul(x, Transpose(W)) -> MatMul(x, W^T) with W^T an initializer, so the quantizer sees it.

    This is the tied LM head (it reads the embedding transposed). Quantizing it gives it its
    own copy of the (quantized) embedding; sharing one copy between the head and the
    embedding Gather, as onnxruntime-genai does, is left for later.
    """
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    transposes = {node.output[0]: node for node in graph.node
                  if node.op_type == "Transpose" and node.input[0] in initializers}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in transposes:
            transpose = transposes[node.input[1]]
            weight = numpy_helper.to_array(initializers[transpose.input[0]])
            perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
            name = transpose.input[0] + "_transposed"
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.transpose(perm)), name))
            node.input[1] = name
    used = {name for node in graph.node for name in node.input}
    for transpose in transposes.values():
        if transpose.output[0] not in used:
            graph.node.remove(transpose)


def _fp16_storage(model: onnx.ModelProto) -> onnx.ModelProto:
    graph = model.graph
    casts = []
    kept = []
    for initializer in graph.initializer:
        if initializer.data_type == onnx.TensorProto.FLOAT and np.prod(initializer.dims) >= _MIN_FP16_ELEMENTS:
            array = numpy_helper.to_array(initializer).astype(np.float16)
            stored = numpy_helper.from_array(array, initializer.name + "_fp16")
            kept.append(stored)
            casts.append(helper.make_node("Cast", [stored.name], [initializer.name], to=onnx.TensorProto.FLOAT,
                                          name=f"{initializer.name}_to_fp32"))
        else:
            kept.append(initializer)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    return model
