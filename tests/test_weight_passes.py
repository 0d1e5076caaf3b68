"""The weight passes on small hand-built graphs, checked against numpy.

The oracle dequantizes the saved MatMulNBits codes itself (zero point 2^(bits-1), low nibble
first) and onnxruntime runs the written graph: the tied embedding must read exactly the head's
dequantized rows, and the codes must be a rounding of the float table they replaced.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeattn.errors import InvalidOptionError
from edgeattn.exporters.norms import SKIP_DOMAIN, SKIP_OP, drop_unused_skip_norm_outputs
from edgeattn.exporters.weights import quantize_weights

VOCAB, HIDDEN = 64, 64
OPSETS = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]


def _table(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.5, (VOCAB, HIDDEN)).astype(np.float32)


def _save(nodes, inputs, outputs, initializers, path) -> None:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    onnx.save(helper.make_model(graph, opset_imports=OPSETS), str(path), save_as_external_data=True,
              location=path.name + ".data", size_threshold=0)


def _tied_model(path, table: np.ndarray, branch_reads_table: bool = False) -> None:
    """embedded = W[ids] and logits = embedded @ W^T (the head reads W through a Transpose), both graph outputs;
    optionally an If whose branch sums W (the table is then still read after the embedding moved off it)."""
    nodes = [helper.make_node("Gather", ["W", "ids"], ["embedded"], name="embedding"),
             helper.make_node("Transpose", ["W"], ["W_T"], perm=[1, 0], name="transpose"),
             helper.make_node("MatMul", ["embedded", "W_T"], ["logits"], name="head")]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", "sequence", size])
               for name, size in (("embedded", HIDDEN), ("logits", VOCAB))]
    if branch_reads_table:
        branch = helper.make_graph([helper.make_node("ReduceSum", ["W"], ["total"], keepdims=0)], "branch", [],
                                   [helper.make_tensor_value_info("total", TensorProto.FLOAT, [])])
        nodes.append(helper.make_node("If", ["flag"], ["table_sum"], then_branch=branch, else_branch=branch))
        outputs.append(helper.make_tensor_value_info("table_sum", TensorProto.FLOAT, []))
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "sequence"])]
    if branch_reads_table:
        inputs.append(helper.make_tensor_value_info("flag", TensorProto.BOOL, []))
    _save(nodes, inputs, outputs, [numpy_helper.from_array(table, "W")], path)


def _centred_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits' B [N, blocks, block * bits / 8] -> its integer codes [N, K] less the zero point 2^(bits-1)."""
    values = np.stack([codes & 0x0F, codes >> 4], axis=-1) if bits == 4 else codes
    return values.reshape(codes.shape[0], -1).astype(np.float32) - (1 << (bits - 1))


def _session(path, accuracy_level: int | None = None) -> ort.InferenceSession:
    model = onnx.load(str(path))
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and accuracy_level is not None:
            next(a for a in node.attribute if a.name == "accuracy_level").i = accuracy_level
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(("weights", "bits"), [("int4", 4), ("int8", 8)])
def test_a_tied_embedding_reads_the_quantized_head(tmp_path, weights, bits):
    table = _table()
    path = tmp_path / "model.onnx"
    _tied_model(path, table)
    assert quantize_weights(path, weights, block_size=32) == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]  # rewritten in place

    model = onnx.load(str(path))
    assert [output.name for output in model.graph.output] == ["embedded", "logits"]
    assert not {"Gather", "MatMul", "Transpose"} & {node.op_type for node in model.graph.node}
    (head,) = [node for node in model.graph.node if node.op_type == "MatMulNBits"]
    (gather,) = [node for node in model.graph.node if node.op_type == "GatherBlockQuantized"]
    assert gather.input[0] == head.input[1]  # one table of codes
    initializers = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    assert not any(array.dtype == np.float32 and array.size == table.size for array in initializers.values())
    codes, scales = initializers[head.input[1]], initializers[head.input[2]]
    assert codes.shape == (VOCAB, HIDDEN // 32, 32 * bits // 8)
    centred = _centred_codes(codes, bits)
    step = np.repeat(scales.reshape(VOCAB, -1), 32, axis=1)
    dequantized = centred * step  # as MatMulNBits computes it: (code - zero point) * scale
    # Each code is the nearest step to the float weight, but the top code, which the range clips (the block's
    # largest magnitude sits at the bottom one: scale = max / -2^(bits-1)).
    error, clipped = np.abs(dequantized - table), centred == (1 << (bits - 1)) - 1
    assert np.all(error[~clipped] <= np.abs(step[~clipped]) / 2 * (1 + 1e-6))
    assert np.all(error <= np.abs(step) * (1 + 1e-6))

    ids = np.array([[3, 0, 63, 3]], np.int64)
    embedded, logits = _session(path, accuracy_level=0).run(None, {"ids": ids})
    np.testing.assert_array_equal(embedded, dequantized[ids])
    np.testing.assert_allclose(logits, dequantized[ids] @ dequantized.T, rtol=1e-5, atol=1e-5)
    shipped = _session(path).run(["logits"], {"ids": ids})[0]  # accuracy level 4: int8 activations per block
    np.testing.assert_allclose(shipped, logits, rtol=0, atol=0.02 * np.abs(logits).max())


def test_a_tied_table_read_in_a_subgraph_stays(tmp_path):
    table = _table(1)
    path = tmp_path / "model.onnx"
    _tied_model(path, table, branch_reads_table=True)
    quantize_weights(path, "int4", block_size=32)
    model = onnx.load(str(path))
    assert {node.op_type for node in model.graph.node} >= {"MatMulNBits", "GatherBlockQuantized", "If"}
    np.testing.assert_array_equal(next(numpy_helper.to_array(init) for init in model.graph.initializer
                                       if init.name == "W"), table)
    onnx.checker.check_model(model)
    total = _session(path).run(["table_sum"], {"ids": np.array([[1]], np.int64), "flag": np.array(True)})[0]
    np.testing.assert_allclose(total, table.sum(), rtol=1e-5)


def test_a_table_whose_rows_are_not_whole_blocks_stays_float_at_8_bits(tmp_path):
    """block 128 > hidden 64: the embedding cannot read the head's codes; at 8 bits it stays a float Gather."""
    table = _table(2)
    path = tmp_path / "model.onnx"
    _tied_model(path, table)
    quantize_weights(path, "int8", block_size=128)
    model = onnx.load(str(path))
    assert sorted(node.op_type for node in model.graph.node) == ["Gather", "MatMulNBits"]
    ids = np.array([[5, 9]], np.int64)
    np.testing.assert_array_equal(_session(path).run(["embedded"], {"ids": ids})[0], table[ids])


def test_fp16_storage_casts_large_weights_back_under_their_names(tmp_path):
    rng = np.random.default_rng(3)
    weight, bias = rng.normal(0, 1, (HIDDEN, HIDDEN)).astype(np.float32), rng.normal(0, 1, HIDDEN).astype(np.float32)
    path = tmp_path / "model.onnx"
    _save([helper.make_node("MatMul", ["x", "W"], ["h"], name="matmul"),
           helper.make_node("Add", ["h", "b"], ["y"], name="add")],
          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", HIDDEN])],
          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
          [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b")], path)
    quantize_weights(path, "fp16")
    model = onnx.load(str(path))
    initializers = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    assert set(initializers) == {"W_fp16", "b"} and initializers["W_fp16"].dtype == np.float16  # b: too small
    cast = model.graph.node[0]
    assert (cast.op_type, list(cast.input), list(cast.output)) == ("Cast", ["W_fp16"], ["W"])
    x = rng.normal(0, 1, (2, HIDDEN)).astype(np.float32)
    expected = x @ weight.astype(np.float16).astype(np.float32) + bias
    np.testing.assert_allclose(_session(path).run(None, {"x": x})[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weights", ["fp16", "int8", "int4"])
def test_a_precision_with_nothing_to_convert_is_refused(tmp_path, weights):
    path = tmp_path / "model.onnx"
    _save([helper.make_node("MatMul", ["x", "w"], ["y"])],
          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
           helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 4])],
          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [], path)
    with pytest.raises(InvalidOptionError, match=f"--weights {weights}: the model has no weight large enough"):
        quantize_weights(path, weights)


def _skip_norm_model(statistic_reader: str | None = None) -> onnx.ModelProto:
    """One SkipSimplifiedLayerNormalization with its mean and inv_std_var named (as torch exports it); ``branch``
    reads the mean inside an If, ``output`` makes it a graph output."""
    value = helper.make_tensor_value_info
    nodes = [helper.make_node(SKIP_OP, ["x", "skip", "gamma"], ["normed", "mean", "inv_std_var", "total"],
                              domain=SKIP_DOMAIN, epsilon=1e-6, name="norm")]
    outputs = [value("normed", TensorProto.FLOAT, None), value("total", TensorProto.FLOAT, None)]
    if statistic_reader == "branch":
        branch = helper.make_graph([helper.make_node("Identity", ["mean"], ["seen"])], "branch", [],
                                   [value("seen", TensorProto.FLOAT, None)])
        nodes.append(helper.make_node("If", ["flag"], ["read"], then_branch=branch, else_branch=branch))
        outputs.append(value("read", TensorProto.FLOAT, None))
    elif statistic_reader == "output":
        outputs.append(value("mean", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [value(name, TensorProto.FLOAT, [1, 4]) for name in ("x", "skip")]
                              + [value("flag", TensorProto.BOOL, [])], outputs,
                              [numpy_helper.from_array(np.ones(4, np.float32), "gamma")],
                              value_info=[value("mean", TensorProto.FLOAT, None),
                                          value("inv_std_var", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=OPSETS)


def test_unused_skip_norm_statistics_are_blanked_in_the_proto():
    model = _skip_norm_model()
    assert drop_unused_skip_norm_outputs(model)
    assert list(model.graph.node[0].output) == ["normed", "", "", "total"]
    assert not {"mean", "inv_std_var"} & {info.name for info in model.graph.value_info}
    assert not drop_unused_skip_norm_outputs(model)  # nothing left to blank


@pytest.mark.parametrize("reader", ["branch", "output"])
def test_a_skip_norm_statistic_read_anywhere_is_refused(reader):
    with pytest.raises(RuntimeError, match=r"statistics are consumed in the graph: \['mean'\]"):
        drop_unused_skip_norm_outputs(_skip_norm_model(reader))
