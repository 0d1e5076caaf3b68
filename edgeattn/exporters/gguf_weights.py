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

The graph is an ``onnx_ir`` model: a weight's node is replaced where it stands
(``replace_nodes_and_values``), and a float weight leaves once no node reads it, a subgraph's
included (``Value.uses``). A walk over the nodes rather than onnxscript rewrite rules: whether a
weight matches depends on its bytes, and every weight, matched or not, is recorded.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from edgeattn.exporters import gguf_blocks
from edgeattn.exporters.gguf_blocks import BlockRows, NotExact
from edgeattn.exporters.graph_names import in_use, replace_node

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


def carry_gguf_blocks(model: ir.Model, gguf_path: Path, weights: str) -> CarryReport:
    """Rewrite ``model`` in place: every constant MatMul weight / Gather table that is exactly a GGUF
    tensor's rows becomes MatMulNBits / GatherBlockQuantized on its blocks, at ``weights`` precision
    (``int4``: 4-bit codes only; ``int8``: every type at 8 bits; ``source``: 4 bits for Q4 types, else 8)."""
    rows = GgufRows(gguf_path)
    return _GraphCarrier(model.graph, rows, weights).run()


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
    node: ir.Node
    op: str  # "MatMul" | "Gather"
    values_RK: np.ndarray  # rows = output features (MatMul) or table rows (Gather)
    initializer: ir.Value


class _GraphCarrier:
    def __init__(self, graph: ir.Graph, rows: GgufRows, weights: str) -> None:
        self.graph, self.rows, self.weights = graph, rows, weights
        self.report = CarryReport()
        self.tables: dict[tuple, tuple[ir.Value, ir.Value, ir.Value | None, BlockRows, int]] = {}  # per source rows
        self.block_sums: dict[tuple[ir.Value, int, int], ir.Value] = {}  # (input, K, block) -> x @ S
        self.replaced: dict[ir.Value, None] = {}  # initializers of carried weights, in order

    def run(self) -> CarryReport:
        for node in list(self.graph):
            weight = self._weight(node)
            carried = self._carry(weight) if weight is not None else None
            if carried is not None:
                replace_node(node, *carried)
        self._drop_unused()
        return self.report

    def _weight(self, node: ir.Node) -> _Weight | None:
        if node.domain:
            return None
        if node.op_type == "MatMul":
            weight = node.inputs[1]
            if _matrix(weight):
                return _Weight(node, "MatMul", weight.const_value.numpy().T, weight)
            transpose = weight.producer()
            if (transpose is not None and transpose.op_type == "Transpose" and _matrix(transpose.inputs[0])
                    and list(transpose.attributes.get_ints("perm", [1, 0])) == [1, 0]):
                return _Weight(node, "MatMul", transpose.inputs[0].const_value.numpy(), transpose.inputs[0])
        if node.op_type == "Gather" and _matrix(node.inputs[0]) and node.attributes.get_int("axis", 0) == 0:
            return _Weight(node, "Gather", node.inputs[0].const_value.numpy(), node.inputs[0])
        return None

    def _carry(self, weight: _Weight) -> tuple[list[ir.Node], ir.Value] | None:
        """The nodes that replace the weight's node and the value they end in; None where it stays."""
        record = {"node": weight.node.name, "op": weight.op, "weight": weight.initializer.name,
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
            codes, scales, offsets, rows, bits = self._table(weight, found)
        except NotExact as error:
            self.report.records.append({**record, "path": FALLBACK, "reason": str(error)})
            return None
        self.replaced[weight.initializer] = None
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
        prefix = f"gguf/{weight.initializer.name}"
        codes = self._initializer(gguf_blocks.pack(rows, bits), f"{prefix}/codes")
        scales = self._initializer(rows.scales, f"{prefix}/scales")
        offsets = None
        if rows.offsets is not None:  # [nb, R]: what the block sums multiply
            offsets = self._initializer(np.ascontiguousarray(rows.offsets.T), f"{prefix}/offsets_T")
        self.tables[key] = (codes, scales, offsets, rows, bits)
        return self.tables[key]

    def _matmul_nbits(self, node: ir.Node, codes, scales, offsets, rows: BlockRows, bits: int):
        x = node.inputs[0]
        count, length = rows.codes.shape
        name = f"gguf/{node.name or node.outputs[0].name}"
        tape = ir.tape.Tape()
        sums = self._block_sums(tape, x, length, rows.block) if offsets is not None else None
        y = tape.op("MatMulNBits", [x, codes, scales],
                    dict(K=length, N=count, bits=bits, block_size=rows.block, accuracy_level=ACCURACY_LEVEL),
                    domain="com.microsoft", name=f"{name}/MatMulNBits",
                    output=ir.val(f"{name}/codes_out") if offsets is not None else None)
        if offsets is not None:
            through_offsets = tape.op("MatMul", [sums, offsets], name=f"{name}/offsets", output=ir.val(f"{name}/offsets_out"))
            y = tape.op("Add", [y, through_offsets], name=f"{name}/add")
            self.report.helper_nodes.add(f"{name}/offsets")
        return list(tape.nodes), y

    def _block_sums(self, tape: ir.tape.Tape, x: ir.Value, length: int, block: int) -> ir.Value:
        """x [..., K] @ S [K, nb] (S[k, b] = 1 where k // block == b): sums over each block, once per input."""
        key = (x, length, block)
        if key not in self.block_sums:
            matrix = f"gguf/block_sum_{length}x{block}"
            if matrix not in self.graph.initializers:
                self._initializer(np.kron(np.eye(length // block, dtype=np.float32), np.ones((block, 1), np.float32)),
                                  matrix)
            name = f"gguf/{x.name}/block_sums_{block}"
            self.block_sums[key] = tape.op("MatMul", [x, self.graph.initializers[matrix]], name=name, output=ir.val(name))
            self.report.helper_nodes.add(name)
        return self.block_sums[key]

    def _gather_block_quantized(self, node: ir.Node, codes, scales, offsets, rows: BlockRows, bits: int):
        """Gather(table, ids) -> Reshape(GatherBlockQuantized(codes, ids, scales) [+ Gather(offsets, ids)])."""
        ids = node.inputs[1]
        count, length = rows.codes.shape
        name = f"gguf/{node.name or node.outputs[0].name}"
        scales_shape = self._initializer(np.array([count, length // rows.block, 1], np.int64), f"{name}/scales_shape")
        hidden = self._initializer(np.array([length], np.int64), f"{name}/hidden")
        tape = ir.tape.Tape()

        def op(op_type, inputs, attributes=None, *, output: str, node: str | None = None, domain: str = ""):
            return tape.op(op_type, inputs, attributes, domain=domain, name=f"{name}/{node or output}",
                           output=ir.val(f"{name}/{output}"))

        gathered = op("GatherBlockQuantized", [codes, ids, op("Reshape", [scales, scales_shape], output="scales")],
                      dict(bits=bits, block_size=rows.block, gather_axis=0, quantize_axis=2), output="blocks",
                      node="GatherBlockQuantized", domain="com.microsoft")  # [..., nb, block]
        if offsets is not None:
            offsets_RB = op("Transpose", [offsets], dict(perm=[1, 0]), output="offsets_RB")
            offsets_RB1 = op("Reshape", [offsets_RB, scales_shape], output="offsets_RB1")
            gathered = op("Add", [gathered, op("Gather", [offsets_RB1, ids], dict(axis=0), output="offsets")], output="sum",
                          node="add")
            self.report.helper_nodes.add(f"{name}/offsets")
        shape = op("Concat", [op("Shape", [ids], output="ids_shape"), hidden], dict(axis=0), output="shape")
        embedded = tape.op("Reshape", [gathered, shape], name=f"{name}/reshape")
        return list(tape.nodes), embedded

    def _initializer(self, array: np.ndarray, name: str) -> ir.Value:
        value = ir.val(name, const_value=ir.tensor(array))
        self.graph.register_initializer(value)
        return value

    def _drop_unused(self) -> None:
        """Remove what the carried weights left behind: their float initializers and the Transposes of them."""
        for weight in self.replaced:
            for transpose in weight.consumers():
                if transpose.op_type == "Transpose" and transpose.graph is self.graph and not in_use(transpose.outputs[0]):
                    self.graph.remove(transpose, safe=True)
            if not in_use(weight):
                self.graph.initializers.pop(weight.name)


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


def _matrix(value: ir.Value | None) -> bool:
    """A 2-D initializer."""
    return (value is not None and value.is_initializer() and value.const_value is not None
            and len(value.const_value.shape) == 2)

