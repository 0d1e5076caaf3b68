"""A GGUF's own quantized blocks carried into the exported graph, instead of re-quantizing its floats.

transformers dequantizes a GGUF to float32 (permuting the rows of llama's q/k weights back), and
edgeattn may pack or rewrite the result (q/k/v as one MatMul in the ort lowering, merged k/v
for MQA). So nothing is assumed about names: a constant MatMul weight or Gather table is carried
when each of its rows *is*, bit for bit, the dequantized row of some GGUF tensor (in any order,
from any tensors), found by the row's float bytes and checked in full. Such a weight becomes
MatMulNBits (and GatherBlockQuantized for an embedding table) on that tensor's own codes and
scales (``edgeattn.exporters.gguf_blocks``); a weight the rewrite changed no longer matches
and is left to the caller (re-quantized by onnxruntime's quantizer, or kept float), and the
record of each weight says which path it took and why.

Types with a minimum per block (Q4_1 ...) add ``(x @ S) @ offsets^T`` to the MatMulNBits output,
where ``x @ S`` sums x over each block of 32 (one small MatMul per distinct input, shared by the
weights that read it): the same split llama.cpp's Q4_1 dot product makes.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeattn.exporters import gguf_blocks
from edgeattn.exporters.gguf_blocks import BlockRows, NotExact
from edgeattn.exporters.graph_names import names_read

# MatMulNBits accuracy_level 4: int8 activations per block on CPU (as the quantizer path, and as llama.cpp
# quantizes activations for its Q4/Q8 dot products); the packed kernel is used either way.
ACCURACY_LEVEL = 4
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
CARRIED, FALLBACK = "carried", "fallback"


@dataclass
class CarryReport:
    """What ``carry_gguf_blocks`` did: one record per constant MatMul weight / Gather table."""

    records: list[dict] = field(default_factory=list)
    helper_nodes: set[str] = field(default_factory=set)  # MatMuls it added, which no quantizer may touch

    def summary(self) -> dict:
        """Counts per path and per tensor kind (``attn_q+attn_k+attn_v``, ``ffn_down`` ...)."""
        kinds: dict[str, dict] = {}
        for record in self.records:
            entry = kinds.setdefault(record["kind"], {"count": 0, "paths": Counter(), "types": set(), "reasons": set()})
            entry["count"] += 1
            entry["paths"][record["path"]] += 1
            entry["types"].update(record["types"])
            if record.get("reason"):
                entry["reasons"].add(record["reason"])
        return {
            "paths": dict(Counter(record["path"] for record in self.records)),
            "kinds": {kind: {"count": entry["count"], "paths": dict(entry["paths"]), "types": sorted(entry["types"]),
                             **({"reasons": sorted(entry["reasons"])} if entry["reasons"] else {})}
                      for kind, entry in kinds.items()},
        }


def carry_gguf_blocks(model: onnx.ModelProto, gguf_path: Path, weights: str) -> CarryReport:
    """Rewrite ``model`` in place: every constant MatMul weight / Gather table that is exactly a GGUF
    tensor's rows becomes MatMulNBits / GatherBlockQuantized on its blocks, at ``weights`` precision
    (``int4``: 4-bit codes only; ``int8``: every type at 8 bits; ``source``: 4 bits for Q4 types, else 8)."""
    rows = GgufRows(gguf_path)
    return _GraphCarrier(model, rows, weights).run()


def describe(summary: dict) -> str:
    """One line for convert's summary: how many weights kept the GGUF's blocks."""
    paths = summary["paths"]
    total = sum(paths.values())
    carried = paths.get(CARRIED, 0)
    text = f"{carried} of {total} weights carry the GGUF's own blocks exactly"
    others = []
    for kind, entry in summary["kinds"].items():
        for path, count in entry["paths"].items():
            if path != CARRIED:
                types = "/".join(entry["types"])
                others.append(f"{count} {path} ({kind}{', ' + types if types else ''}: {'; '.join(entry.get('reasons', []))})")
    return text + ("; " + ", ".join(others) if others else "")


class GgufRows:
    """Every row of every 2-D tensor of a GGUF file, found by its dequantized float32 bytes."""

    def __init__(self, path: Path) -> None:
        from gguf import GGUFReader
        from gguf.quants import dequantize

        self._dequantize = dequantize
        self.tensors = [tensor for tensor in GGUFReader(str(path)).tensors if len(tensor.shape) == 2]
        self._index: dict[tuple[int, int], tuple[int, int]] = {}
        self._decoded: tuple[int, BlockRows | None] = (-1, None)
        for tensor_id in range(len(self.tensors)):
            for row, values in enumerate(self.floats(tensor_id)):
                self._index.setdefault((values.shape[0], hash(values.tobytes())), (tensor_id, row))

    def floats(self, tensor_id: int) -> np.ndarray:
        """float32 [R, K], as transformers read it (before any row permutation)."""
        tensor = self.tensors[tensor_id]
        return np.asarray(self._dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(
            -1, int(tensor.shape[0]))

    def type_name(self, tensor_id: int) -> str:
        return self.tensors[tensor_id].tensor_type.name

    def find(self, weight_RK: np.ndarray) -> list[tuple[int, int] | None]:
        """The (tensor, row) each row of ``weight_RK`` is, by its bytes (None where no GGUF row matches)."""
        length = weight_RK.shape[1]
        return [self._index.get((length, hash(row.tobytes()))) for row in weight_RK]

    def decoded(self, tensor_id: int) -> BlockRows:
        """The tensor's blocks in MatMulNBits' form (the last one kept: a tied head and its embedding)."""
        if self._decoded[0] != tensor_id:
            tensor = self.tensors[tensor_id]
            raw = np.asarray(tensor.data).reshape(int(tensor.shape[1]), -1)
            self._decoded = (tensor_id, gguf_blocks.decode(raw, self.type_name(tensor_id), int(tensor.shape[0])))
        return self._decoded[1]


@dataclass
class _Weight:
    node: onnx.NodeProto
    op: str  # "MatMul" | "Gather"
    values_RK: np.ndarray  # rows = output features (MatMul) or table rows (Gather)
    initializer: str


class _GraphCarrier:
    def __init__(self, model: onnx.ModelProto, rows: GgufRows, weights: str) -> None:
        self.model, self.rows, self.weights = model, rows, weights
        self.graph = model.graph
        self.initializers = {init.name: init for init in self.graph.initializer}
        self.report = CarryReport()
        self.tables: dict[tuple, tuple[str, str, str | None, BlockRows, int]] = {}  # shared codes per source rows
        self.block_sums: dict[tuple[str, int, int], str] = {}  # (input, K, block) -> x @ S
        self.new_initializers: list[onnx.TensorProto] = []
        self.replaced: set[str] = set()  # initializers of carried weights

    def run(self) -> CarryReport:
        transposed = {node.output[0]: node.input[0] for node in self.graph.node
                      if node.op_type == "Transpose" and node.input[0] in self.initializers
                      and _attribute(node, "perm", [1, 0]) == [1, 0] and len(self.initializers[node.input[0]].dims) == 2}
        nodes = []
        for node in self.graph.node:
            weight = self._weight(node, transposed)
            nodes += self._carry(weight) if weight is not None else [node]
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        self.graph.initializer.extend(self.new_initializers)
        _drop_unused(self.graph, self.replaced)
        return self.report

    def _weight(self, node: onnx.NodeProto, transposed: dict[str, str]) -> _Weight | None:
        if node.op_type == "MatMul" and not node.domain:
            name = node.input[1]
            if name in self.initializers and len(self.initializers[name].dims) == 2:
                return _Weight(node, "MatMul", numpy_helper.to_array(self.initializers[name]).T, name)
            if name in transposed:
                return _Weight(node, "MatMul", numpy_helper.to_array(self.initializers[transposed[name]]),
                               transposed[name])
        if (node.op_type == "Gather" and not node.domain and node.input[0] in self.initializers
                and len(self.initializers[node.input[0]].dims) == 2 and _attribute(node, "axis", 0) == 0):
            return _Weight(node, "Gather", numpy_helper.to_array(self.initializers[node.input[0]]), node.input[0])
        return None

    def _carry(self, weight: _Weight) -> list[onnx.NodeProto]:
        record = {"node": weight.node.name, "op": weight.op, "weight": weight.initializer,
                  "shape": list(weight.values_RK.shape)}
        found = self.rows.find(np.ascontiguousarray(weight.values_RK, dtype=np.float32))
        sources = list(dict.fromkeys(source[0] for source in found if source is not None))  # in row order
        record.update(kind=_kind([self.rows.tensors[t].name for t in sources]) if sources else "not in the GGUF",
                      gguf=[self.rows.tensors[t].name for t in sources],
                      types=sorted({self.rows.type_name(t) for t in sources}))
        try:
            if weight.values_RK.dtype != np.float32:
                raise NotExact(f"{weight.values_RK.dtype} weight")
            missing = sum(source is None for source in found)
            if missing:
                raise NotExact(f"{missing} of {len(found)} rows are no GGUF tensor's rows (rewritten)")
            if any(t in FLOAT_TYPES for t in record["types"]):
                raise NotExact("float tensor in the GGUF: no blocks to carry")
            names = self._table(weight, found)
        except NotExact as error:
            self.report.records.append({**record, "path": FALLBACK, "reason": str(error)})
            return [weight.node]
        codes, scales, offsets, rows, bits = names
        self.replaced.add(weight.initializer)
        self.report.records.append({**record, "path": CARRIED, "bits": bits, "block": rows.block,
                                    "offsets": offsets is not None})
        if weight.op == "MatMul":
            return self._matmul_nbits(weight.node, codes, scales, offsets, rows, bits)
        return self._gather_block_quantized(weight.node, codes, scales, offsets, rows, bits)

    def _table(self, weight: _Weight, found: list[tuple[int, int]]):
        """Codes/scales/offsets initializers for these source rows (shared: a tied head and its embedding)."""
        order = np.array(found, dtype=np.int64)  # [R, 2]: tensor, row
        key = (order.tobytes(), self.weights)
        if key in self.tables:
            return self.tables[key]
        parts, positions = [], []
        for tensor_id in np.unique(order[:, 0]):
            selected = np.flatnonzero(order[:, 0] == tensor_id)
            source_rows = order[selected, 1]
            if not np.array_equal(self.rows.floats(int(tensor_id))[source_rows], weight.values_RK[selected]):
                raise NotExact("rows differ from the GGUF tensor's")  # a hash collision, in theory
            parts.append(self.rows.decoded(int(tensor_id)).take(source_rows))
            positions.append(selected)
        rows = gguf_blocks.concat(parts).take(np.argsort(np.concatenate(positions)))
        bits = _target_bits(rows.bits, self.weights)
        if not np.array_equal(gguf_blocks.reconstruct(rows), weight.values_RK):
            raise NotExact("the decoded blocks do not reproduce the dequantized rows")
        prefix = f"gguf/{weight.initializer}"
        self.new_initializers += [numpy_helper.from_array(gguf_blocks.pack(rows, bits), f"{prefix}/codes"),
                                  numpy_helper.from_array(rows.scales, f"{prefix}/scales")]
        offsets = None
        if rows.offsets is not None:
            offsets = f"{prefix}/offsets_T"  # [nb, R]: what the block sums multiply
            self.new_initializers.append(numpy_helper.from_array(np.ascontiguousarray(rows.offsets.T), offsets))
        self.tables[key] = (f"{prefix}/codes", f"{prefix}/scales", offsets, rows, bits)
        return self.tables[key]

    def _matmul_nbits(self, node, codes, scales, offsets, rows: BlockRows, bits: int) -> list[onnx.NodeProto]:
        x, y = node.input[0], node.output[0]
        count, length = rows.codes.shape
        name = f"gguf/{node.name or y}"
        nodes = [helper.make_node("MatMulNBits", [x, codes, scales], [f"{name}/codes_out" if offsets else y],
                                  domain="com.microsoft", name=f"{name}/MatMulNBits", K=length, N=count, bits=bits,
                                  block_size=rows.block, accuracy_level=ACCURACY_LEVEL)]
        if offsets is None:
            return nodes
        sums, sums_nodes = self._block_sums(x, length, rows.block)
        nodes = sums_nodes + nodes + [
            helper.make_node("MatMul", [sums, offsets], [f"{name}/offsets_out"], name=f"{name}/offsets"),
            helper.make_node("Add", [f"{name}/codes_out", f"{name}/offsets_out"], [y], name=f"{name}/add")]
        self.report.helper_nodes.add(f"{name}/offsets")
        return nodes

    def _block_sums(self, x: str, length: int, block: int) -> tuple[str, list[onnx.NodeProto]]:
        """x [..., K] @ S [K, nb] (S[k, b] = 1 where k // block == b): sums over each block, once per input."""
        key = (x, length, block)
        if key in self.block_sums:
            return self.block_sums[key], []
        matrix = f"gguf/block_sum_{length}x{block}"
        if not any(init.name == matrix for init in self.new_initializers):
            ones = np.kron(np.eye(length // block, dtype=np.float32), np.ones((block, 1), np.float32))
            self.new_initializers.append(numpy_helper.from_array(ones, matrix))
        sums = f"gguf/{x}/block_sums_{block}"
        self.block_sums[key] = sums
        self.report.helper_nodes.add(sums)
        return sums, [helper.make_node("MatMul", [x, matrix], [sums], name=sums)]

    def _gather_block_quantized(self, node, codes, scales, offsets, rows: BlockRows, bits: int) -> list[onnx.NodeProto]:
        """Gather(table, ids) -> Reshape(GatherBlockQuantized(codes, ids, scales) [+ Gather(offsets, ids)])."""
        ids, embedded = node.input[1], node.output[0]
        count, length = rows.codes.shape
        blocks = length // rows.block
        name = f"gguf/{node.name or embedded}"
        self.new_initializers += [numpy_helper.from_array(np.array([count, blocks, 1], np.int64), f"{name}/scales_shape"),
                                  numpy_helper.from_array(np.array([length], np.int64), f"{name}/hidden")]
        gathered = f"{name}/blocks"  # [..., nb, block]
        nodes = [
            helper.make_node("Reshape", [scales, f"{name}/scales_shape"], [f"{name}/scales"], name=f"{name}/scales"),
            helper.make_node("GatherBlockQuantized", [codes, ids, f"{name}/scales"], [gathered], domain="com.microsoft",
                             name=f"{name}/GatherBlockQuantized", bits=bits, block_size=rows.block, gather_axis=0,
                             quantize_axis=2),
        ]
        if offsets is not None:
            nodes += [
                helper.make_node("Transpose", [offsets], [f"{name}/offsets_RB"], perm=[1, 0], name=f"{name}/offsets_RB"),
                helper.make_node("Reshape", [f"{name}/offsets_RB", f"{name}/scales_shape"], [f"{name}/offsets_RB1"],
                                 name=f"{name}/offsets_RB1"),
                helper.make_node("Gather", [f"{name}/offsets_RB1", ids], [f"{name}/offsets"], axis=0,
                                 name=f"{name}/offsets"),
                helper.make_node("Add", [gathered, f"{name}/offsets"], [f"{name}/sum"], name=f"{name}/add"),
            ]
            self.report.helper_nodes.add(f"{name}/offsets")
            gathered = f"{name}/sum"
        return nodes + [
            helper.make_node("Shape", [ids], [f"{name}/ids_shape"], name=f"{name}/ids_shape"),
            helper.make_node("Concat", [f"{name}/ids_shape", f"{name}/hidden"], [f"{name}/shape"], axis=0,
                             name=f"{name}/shape"),
            helper.make_node("Reshape", [gathered, f"{name}/shape"], [embedded], name=f"{name}/reshape"),
        ]


def _target_bits(code_bits: int, weights: str) -> int:
    if weights == "int4":
        if code_bits > 4:
            raise NotExact(f"{code_bits}-bit codes have no exact 4-bit form")
        return 4
    if weights == "int8":
        return 8
    return 4 if code_bits <= 4 else 8


def _kind(names: list[str]) -> str:
    """blk.3.attn_q.weight + blk.3.attn_k.weight -> attn_q+attn_k (the same for every layer)."""
    return "+".join(dict.fromkeys(re.sub(r"^blk\.\d+\.|\.weight$", "", name) for name in names))


def _attribute(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            value = helper.get_attribute_value(attribute)
            return list(value) if isinstance(value, (list, tuple)) else value
    return default


def _drop_unused(graph: onnx.GraphProto, replaced: set[str]) -> None:
    """Remove what the carried weights left behind: their float initializers and the Transposes of them."""
    used = names_read(graph) | {output.name for output in graph.output}
    for node in [node for node in graph.node
                 if node.op_type == "Transpose" and node.input[0] in replaced and node.output[0] not in used]:
        graph.node.remove(node)
    used = names_read(graph)
    for init in [init for init in graph.initializer if init.name in replaced and init.name not in used]:
        graph.initializer.remove(init)
