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

The passes edit an ``onnx_ir`` model (weights mapped from the data file, saved back with
``ir.save``) and find producers and readers through ``Value.producer`` / ``Value.uses``,
subgraphs included. onnxruntime's quantizer edits an onnx ModelProto: the model crosses to one
(``ir.to_proto``) and back (``ir.from_proto``). onnx_ir has no clean way to hand that proto the
weights' bytes (``ir.to_proto`` keeps mapped tensors as file references, and loading them into the
ir model first holds every weight twice), so onnx's own loader fills the proto.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from edgeattn.choices import WEIGHTS_PRECISIONS
from edgeattn.errors import InvalidOptionError
from edgeattn.exporters.gguf_weights import ACCURACY_LEVEL, CARRIED, CarryReport, carry_gguf_blocks
from edgeattn.exporters.graph_names import in_use, replace_node, stand_in

DEFAULT_BLOCK_SIZE = 32
MATMUL_NBITS_BLOCK_SIZES = (16, 32, 64, 128, 256)  # what onnxruntime's quantizer (MLAS) accepts
_MIN_FP16_ELEMENTS = 1024  # small tensors (norm weights, scales) stay fp32
_INLINE_BYTES = 1023  # larger tensors (1 KiB and up) go to the data file
_QUANTIZED_OPS = ("MatMulNBits", "GatherBlockQuantized")


def check_weights_option(weights: str, gguf: Path | None) -> None:
    """Refuse a precision this source cannot have, before any long work."""
    if weights not in WEIGHTS_PRECISIONS:
        raise InvalidOptionError(f"weights must be one of {', '.join(WEIGHTS_PRECISIONS)}; got {weights!r}")
    if weights == "source" and gguf is None:
        raise InvalidOptionError("--weights source keeps a GGUF's own quantization: the model must be a .gguf file "
                                 "(or smollm2); use int4/int8 for other sources")


def quantize_weights(path: Path, weights: str, block_size: int = DEFAULT_BLOCK_SIZE, gguf: Path | None = None) -> dict:
    """Rewrite the model at ``path`` (external data beside it) to ``weights`` precision, in place.

    ``gguf``: the GGUF file the model was read from, whose blocks are carried where they match.
    Returns what the manifest's ``weights`` records beyond the request: for a GGUF source the
    precision reached (``dtype``) and, per weight, which path it took (``gguf``). A request other
    than ``source`` that converts no weight is an error: the graph's weights went unrecognised.
    """
    check_weights_option(weights, gguf)
    if weights == "fp32":
        return {}
    model = ir.load(path)
    if weights == "fp16":
        converted, record = _fp16_storage(model.graph), {}
    else:
        model, converted, record = _integer_weights(model, path.parent, weights, block_size, gguf)
    if not converted and weights != "source":
        raise InvalidOptionError(f"--weights {weights}: the model has no weight large enough to store in {weights}; "
                                 "keep --weights fp32")
    # What is still mapped from the data file is read first: the save replaces that file.
    ir.save(ir.external_data.load_to_model(model), path, external_data=path.name + ".data",
            size_threshold_bytes=_INLINE_BYTES)
    return record


def _integer_weights(model: ir.Model, base_dir: Path, weights: str, block_size: int,
                     gguf: Path | None) -> tuple[ir.Model, int, dict]:
    """int4 / int8 / source: the model, how many weights were converted, and the manifest's record."""
    carried = carry_gguf_blocks(model, gguf, weights) if gguf is not None else None
    converted = sum(entry["path"] == CARRIED for entry in carried.records) if carried else 0
    tied = {}
    if weights != "source":
        bits = 4 if weights == "int4" else 8
        tied = _materialize_transposed_weights(model.graph)
        # GatherBlockQuantized reads MatMulNBits codes as [vocab, blocks, block]: whole blocks only.
        tied = {head: table for head, table in tied.items() if _hidden_size(model.graph, table) % block_size == 0}
        model, quantized = _matmul_nbits(model, base_dir, bits, block_size, quantize_gather=bits == 4 and not tied,
                                         exclude=carried.helper_nodes if carried else ())
        converted += quantized + _share_tied_embeddings(model.graph, tied)
    return model, converted, _gguf_record(carried, weights, set(tied.values())) if carried else {}


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


def _matmul_nbits(model: ir.Model, base_dir: Path, bits: int, block_size: int, quantize_gather: bool,
                  exclude=()) -> tuple[ir.Model, int]:
    """onnxruntime's quantizer on ``model``; returns the quantized model and how many nodes it quantized."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=True, accuracy_level=ACCURACY_LEVEL, bits=bits,
        op_types_to_quantize=("MatMul", "Gather") if quantize_gather else ("MatMul",),
        quant_axes=(("MatMul", 0), ("Gather", 1)),
    )
    proto = ir.to_proto(model)
    onnx.load_external_data_for_model(proto, str(base_dir))  # the quantizer reads each weight's raw data
    quantizer = MatMulNBitsQuantizer(proto, nodes_to_exclude=list(exclude), algo_config=config)
    with _quantizer_logs_quiet():
        quantizer.process()
    quantized = ir.from_proto(quantizer.model.model)
    return quantized, _count_ops(quantized, _QUANTIZED_OPS) - _count_ops(model, _QUANTIZED_OPS)


@contextlib.contextmanager
def _quantizer_logs_quiet():
    """The quantizer logs two INFO lines per node (hundreds for a real model) and its module configures the root
    logger at INFO when imported; while it runs its logger passes warnings only, then the caller's level is back."""
    logger = logging.getLogger("onnxruntime.quantization")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _count_ops(model: ir.Model, op_types: tuple[str, ...]) -> int:
    return sum(node.op_type in op_types for node in ir.traversal.RecursiveGraphIterator(model.graph))


def _materialize_transposed_weights(graph: ir.Graph) -> dict[str, str]:
    """MatMul(x, Transpose(W)) -> MatMul(x, W^T) with W^T an initializer, so the quantizer sees it.

    This is the tied LM head (it reads the embedding transposed). Returns {MatMul output: W}
    for each one, so that the embedding can share the quantized head afterwards.
    """
    tied = {}
    for node in list(graph):
        transpose = node.inputs[1].producer() if node.op_type == "MatMul" else None
        if transpose is None or transpose.op_type != "Transpose" or not transpose.inputs[0].is_initializer():
            continue
        table = transpose.inputs[0]
        name = table.name + "_transposed"
        if name not in graph.initializers:
            array = np.ascontiguousarray(table.const_value.numpy().transpose(transpose.attributes.get_ints("perm")))
            graph.register_initializer(ir.val(name, const_value=ir.tensor(array)))
        node.replace_input_with(1, graph.initializers[name])
        tied[node.outputs[0].name] = table.name
        if not in_use(transpose.outputs[0]):
            graph.remove(transpose, safe=True)
    return tied


def _hidden_size(graph: ir.Graph, table: str) -> int:
    return graph.initializers[table].const_value.shape[1]


def _share_tied_embeddings(graph: ir.Graph, tied: dict[str, str]) -> int:
    """Gather(W, ids) -> Reshape(GatherBlockQuantized(codes, ids, scales), [..., hidden]) on the codes and
    scales of the MatMulNBits head that computes x @ W^T; W leaves the model. Returns the Gathers replaced.

    MatMulNBits stores codes [vocab, blocks, block * bits / 8] (unsigned, zero point 2^(bits-1), low
    nibble first), exactly GatherBlockQuantized's uint8 layout with quantize_axis 2; its scales
    [vocab, blocks] are reshaped to the [vocab, blocks, 1] that op wants (folded at session load).
    """
    values = ir.convenience.create_value_mapping(graph)
    shared = 0
    for head_output, name in tied.items():
        head, table = values[head_output].producer(), graph.initializers.get(name)
        if head.op_type != "MatMulNBits":
            raise RuntimeError(f"the tied LM head {head.name!r} was not quantized: its embedding {name!r} has no codes to read")
        if table is None:  # shared already, with another head reading the same table
            continue
        gathers = [node for node in table.consumers() if node.op_type == "Gather" and node.inputs[0] is table]
        for index, gather in enumerate(gathers):
            replace_node(gather, *_gather_codes(graph, head, gather.inputs[1], f"{gather.name or name}_shared_{index}"))
        shared += len(gathers)
        if not in_use(table):
            graph.initializers.pop(name)
    return shared


def _gather_codes(graph: ir.Graph, head: ir.Node, ids: ir.Value, prefix: str) -> tuple[list[ir.Node], ir.Value]:
    """The rows ``ids`` of ``head``'s weight, from its codes and scales: the nodes and the embedded value."""
    codes, scales = head.inputs[1], head.inputs[2]
    vocab, hidden, bits, block = (head.attributes.get_int(key) for key in ("N", "K", "bits", "block_size"))
    scales_shape = ir.val(f"{prefix}_scales_shape", const_value=ir.tensor(np.array([vocab, hidden // block, 1], np.int64)))
    hidden_shape = ir.val(f"{prefix}_hidden", const_value=ir.tensor(np.array([hidden], np.int64)))
    graph.register_initializer(scales_shape)
    graph.register_initializer(hidden_shape)
    tape = ir.tape.Tape()

    def op(op_type, inputs, attributes=None, *, output: str, node: str | None = None, domain: str = ""):
        return tape.op(op_type, inputs, attributes, domain=domain, name=f"{prefix}_{node or output}",
                       output=ir.val(f"{prefix}_{output}"))

    blocks = op("GatherBlockQuantized", [codes, ids, op("Reshape", [scales, scales_shape], output="scales")],
                dict(bits=bits, block_size=block, gather_axis=0, quantize_axis=2), output="blocks",
                node="GatherBlockQuantized", domain="com.microsoft")  # [..., blocks, block]
    shape = op("Concat", [op("Shape", [ids], output="ids_shape"), hidden_shape], dict(axis=0), output="shape")
    embedded = tape.op("Reshape", [blocks, shape], name=f"{prefix}_reshape")
    return list(tape.nodes), embedded


def _fp16_storage(graph: ir.Graph) -> int:
    """Each large fp32 initializer W becomes W_fp16 and a Cast to fp32 named W; returns how many."""
    casts = []
    for value in list(graph.initializers.values()):
        tensor = value.const_value
        if tensor.dtype != ir.DataType.FLOAT or tensor.size < _MIN_FP16_ELEMENTS:
            continue
        name = value.name
        stored = ir.val(name + "_fp16", const_value=ir.tensor(tensor.numpy().astype(np.float16)))
        cast = ir.node("Cast", [stored], dict(to=ir.DataType.FLOAT), name=f"{name}_to_fp32")
        graph.initializers.pop(name)
        graph.register_initializer(stored)
        stand_in(cast.outputs[0], value)
        casts.append(cast)
    if casts:
        graph.insert_before(graph[0], casts)
    return len(casts)

