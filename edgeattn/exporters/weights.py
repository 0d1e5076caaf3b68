"""Weight precision of the exported graph (``--weights``), with onnxruntime's own tools.

* int4 / int8: onnxruntime's MatMulNBits quantizer — every MatMul with a constant
  weight (the LM head included) becomes MatMulNBits (symmetric, ``block_size`` per block,
  accuracy_level 4 = int8 activations on CPU). The embedding Gather becomes
  GatherBlockQuantized: with a tied LM head it reads the head's own codes and scales
  (one copy of the table on disk, as onnxruntime-genai does; at 8 bits too, which the
  quantizer cannot do for a Gather: SmolLM2 int4 118 -> 100 MB, int8 281 -> 168 MB);
  an untied embedding is quantized by the quantizer at 4 bits and stays fp32 at 8.
* fp16: weights are stored in fp16 and cast to fp32 when the session loads them: half the
  disk size, fp32 compute (CPU execution providers have no fast fp16 matmul).
* From a GGUF source, int4 / int8 first carry the file's own quantized blocks into the graph
  wherever a weight is exactly a GGUF tensor (``edgeattn.exporters.gguf_weights``): no second
  rounding. Only what is left (rewritten weights, types with no exact form at that width) goes
  to the quantizer. ``source`` keeps each GGUF tensor at its own width (Q4 types 4-bit, Q5/Q6/Q8
  8-bit) and leaves everything else in float.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeattn.errors import InvalidOptionError
from edgeattn.exporters.gguf_weights import ACCURACY_LEVEL, CARRIED, CarryReport, carry_gguf_blocks
from edgeattn.exporters.graph_names import names_read

WEIGHT_DTYPES = ("fp32", "fp16", "int8", "int4", "source")
DEFAULT_BLOCK_SIZE = 32
MATMUL_NBITS_BLOCK_SIZES = (16, 32, 64, 128, 256)  # what onnxruntime's quantizer (MLAS) accepts
_MIN_FP16_ELEMENTS = 1024  # small tensors (norm weights, scales) stay fp32


def check_weights_option(weights: str, gguf: Path | None) -> None:
    """Refuse a precision this source cannot have, before any long work."""
    if weights not in WEIGHT_DTYPES:
        raise InvalidOptionError(f"weights must be one of {', '.join(WEIGHT_DTYPES)}; got {weights!r}")
    if weights == "source" and gguf is None:
        raise InvalidOptionError("--weights source keeps a GGUF's own quantization: the model must be a .gguf file "
                                 "(or smollm2); use int4/int8 for other sources")


def quantize_weights(path: Path, weights: str, block_size: int = DEFAULT_BLOCK_SIZE, gguf: Path | None = None) -> dict:
    """Rewrite the model at ``path`` (external data beside it) to ``weights`` precision, in place.

    ``gguf``: the GGUF file the model was read from, whose blocks are carried where they match.
    Returns what the manifest's ``weights`` records beyond the request: for a GGUF source the
    precision reached (``dtype``) and, per weight, which path it took (``gguf``).
    """
    check_weights_option(weights, gguf)
    if weights == "fp32":
        return {}
    model = onnx.load(str(path))
    record = {}
    if weights == "fp16":
        model = _fp16_storage(model)
    else:
        carried = carry_gguf_blocks(model, gguf, weights) if gguf is not None else None
        tied = {}
        if weights != "source":
            bits = 4 if weights == "int4" else 8
            tied = _materialize_transposed_weights(model)
            # GatherBlockQuantized reads MatMulNBits codes as [vocab, blocks, block]: whole blocks only.
            tied = {head: source for head, source in tied.items() if _hidden_size(model, source) % block_size == 0}
            model = _matmul_nbits(model, bits, block_size, quantize_gather=bits == 4 and not tied,
                                  exclude=carried.helper_nodes if carried else ())
            _share_tied_embeddings(model, tied)
        if carried is not None:
            record = _gguf_record(carried, weights, set(tied.values()))
    for stale in path.parent.glob(path.name + ".data"):
        stale.unlink()
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=1024)
    return record


def _gguf_record(carried: CarryReport, weights: str, shared_tables: set[str]) -> dict:
    """The manifest's view of a GGUF source: the precision reached and each weight's path.

    A weight not carried was re-quantized by onnxruntime's quantizer (int4/int8: symmetric, the
    requested block size), reads a tied LM head's re-quantized codes (its embedding), or stayed float
    (``source``, and an untied embedding at 8 bits, as without a GGUF).
    """
    for record in carried.records:
        if record["path"] != CARRIED:
            if weights == "source" or (record["op"] == "Gather" and weights == "int8"
                                       and record["weight"] not in shared_tables):
                record["path"] = "float"
            else:
                record["path"] = "requantized"
    bits = {record["bits"] for record in carried.records if record["path"] == CARRIED}
    dtype = weights if weights != "source" else ("int4" if 4 in bits else "int8" if bits else "fp32")
    return {"dtype": dtype, "requested": weights, "gguf": {**carried.summary(), "weights": carried.records}}


def _matmul_nbits(model: onnx.ModelProto, bits: int, block_size: int, quantize_gather: bool,
                  exclude=()) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    # The quantizer logs two INFO lines per node (hundreds for a real model); convert shows its own progress.
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    config = DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=True, accuracy_level=ACCURACY_LEVEL, bits=bits,
        op_types_to_quantize=("MatMul", "Gather") if quantize_gather else ("MatMul",),
        quant_axes=(("MatMul", 0), ("Gather", 1)),
    )
    quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=list(exclude), algo_config=config)
    quantizer.process()
    return quantizer.model.model


def _materialize_transposed_weights(model: onnx.ModelProto) -> dict[str, str]:
    """MatMul(x, Transpose(W)) -> MatMul(x, W^T) with W^T an initializer, so the quantizer sees it.

    This is the tied LM head (it reads the embedding transposed). Returns {MatMul output: W}
    for each one, so that the embedding can share the quantized head afterwards.
    """
    tied = {}
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
            tied[node.output[0]] = transpose.input[0]
    used = names_read(graph)
    for transpose in transposes.values():
        if transpose.output[0] not in used:
            graph.node.remove(transpose)
    return tied


def _hidden_size(model: onnx.ModelProto, table: str) -> int:
    return next(init.dims[1] for init in model.graph.initializer if init.name == table)


def _share_tied_embeddings(model: onnx.ModelProto, tied: dict[str, str]) -> None:
    """Gather(W, ids) -> Reshape(GatherBlockQuantized(codes, ids, scales), [..., hidden]) on the codes and
    scales of the MatMulNBits head that computes x @ W^T; W and its copy leave the model.

    MatMulNBits stores codes [vocab, blocks, block * bits / 8] (unsigned, zero point 2^(bits-1), low
    nibble first), exactly GatherBlockQuantized's uint8 layout with quantize_axis 2; its scales
    [vocab, blocks] are reshaped to the [vocab, blocks, 1] that op wants (folded at session load).
    """
    graph = model.graph
    producers = {output: node for node in graph.node for output in node.output}
    for head_output, table in tied.items():
        head = producers[head_output]
        attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
        codes, scales = head.input[1], head.input[2]
        vocab, hidden, bits, block = attrs["N"], attrs["K"], attrs["bits"], attrs["block_size"]
        gathers = [node for node in graph.node if node.op_type == "Gather" and node.input[0] == table]
        for index, gather in enumerate(gathers):
            prefix = f"{gather.name or table}_shared_{index}"
            graph.initializer.extend([
                numpy_helper.from_array(np.array([vocab, hidden // block, 1], np.int64), f"{prefix}_scales_shape"),
                numpy_helper.from_array(np.array([hidden], np.int64), f"{prefix}_hidden")])
            ids, embedded = gather.input[1], gather.output[0]
            nodes = [
                helper.make_node("Reshape", [scales, f"{prefix}_scales_shape"], [f"{prefix}_scales"]),
                helper.make_node("GatherBlockQuantized", [codes, ids, f"{prefix}_scales"], [f"{prefix}_blocks"],
                                 domain="com.microsoft", bits=bits, block_size=block, gather_axis=0,
                                 quantize_axis=2, name=f"{prefix}_GatherBlockQuantized"),  # [..., blocks, block]
                helper.make_node("Shape", [ids], [f"{prefix}_ids_shape"]),
                helper.make_node("Concat", [f"{prefix}_ids_shape", f"{prefix}_hidden"], [f"{prefix}_shape"], axis=0),
                helper.make_node("Reshape", [f"{prefix}_blocks", f"{prefix}_shape"], [embedded]),
            ]
            position = list(graph.node).index(gather)
            graph.node.remove(gather)
            for offset, node in enumerate(nodes):
                graph.node.insert(position + offset, node)
    used = names_read(graph)
    unused = [init for init in graph.initializer if init.name not in used]
    for init in unused:
        graph.initializer.remove(init)


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
