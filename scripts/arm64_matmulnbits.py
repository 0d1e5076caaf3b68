"""Which arithmetic onnxruntime's int4 MatMulNBits runs on this machine, told apart with numpy models.

edgeattn exports int4 weights as MatMulNBits (4 bits, symmetric, block 32, accuracy_level 4:
activations quantized to int8 on CPU). The int8 scheme depends on the CPU's kernels. One node
with random weights runs on each machine on two inputs: gaussian activations with a few outlier
channels, and activations that are multiples of one step (as an int4 embedding row through an
RMSNorm is), where x/scale often lands exactly on k + 0.5 and the formula for the codes decides.
Each output is matched against numpy models of the candidate arithmetics (float64 sums).

    python arm64_matmulnbits.py build DIR                       # needs onnx (the convert extra)
    python arm64_matmulnbits.py run DIR x86_64                   # onnxruntime + numpy: any machine
    python arm64_matmulnbits.py run DIR pi5-kleidiai-off --disable-kleidiai
    python arm64_matmulnbits.py explain DIR x86_64 pi5 pi5-kleidiai-off pi4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

K, N, BLOCK, ROWS = 576, 256, 32, 8  # SmolLM2's hidden size; prefill rows (decode is row 0 alone)


def build(folder: Path) -> None:
    """The node (accuracy levels 0 and 4), its weights' codes and scales, and the two inputs."""
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(0)
    weights_NK = rng.standard_normal((N, K)).astype(np.float32) * 0.05
    blocks = weights_NK.reshape(N, K // BLOCK, BLOCK)
    scales = (np.abs(blocks).max(-1) / 7).astype(np.float32)
    codes = np.clip(np.rint(blocks / scales[..., None]), -8, 7).astype(np.int64)
    stored = (codes + 8).astype(np.uint8)  # MatMulNBits' default zero point is 8
    packed = stored[..., 0::2] | (stored[..., 1::2] << 4)  # low nibble first
    folder.mkdir(parents=True, exist_ok=True)
    for level in (0, 4):
        node = helper.make_node("MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft",
                                K=K, N=N, bits=4, block_size=BLOCK, accuracy_level=level)
        graph = helper.make_graph(
            [node], "matmulnbits", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])],
            [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales.reshape(-1), "scales")])
        opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
        save(helper.make_model(graph, opset_imports=opsets), str(folder / f"level{level}.onnx"))
    gaussian = rng.standard_normal((ROWS, K)).astype(np.float32)
    gaussian[:, ::37] *= 8  # outlier channels, as real hidden states have
    embedding = rng.integers(-8, 8, size=(ROWS, K)).astype(np.float32)  # int4 codes of an embedding row
    steps = (embedding / np.sqrt((embedding ** 2).mean(1, keepdims=True))).astype(np.float32)  # RMSNorm, unit weight
    np.savez(folder / "inputs.npz", codes=codes, scales=scales, gaussian=gaussian, steps=steps)


def run(folder: Path, label: str, disable_kleidiai: bool) -> None:
    import onnxruntime

    inputs = np.load(folder / "inputs.npz")
    outputs = {}
    for level in (0, 4):
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        if disable_kleidiai:
            options.add_session_config_entry("mlas.disable_kleidiai", "1")
        session = onnxruntime.InferenceSession(str(folder / f"level{level}.onnx"), options,
                                               providers=["CPUExecutionProvider"])
        for name in ("gaussian", "steps"):
            for rows in (1, ROWS):
                outputs[f"level{level}/{name}/M{rows}"] = session.run(None, {"A": inputs[name][:rows]})[0]
    np.savez(folder / f"out-{label}.npz", **outputs)
    print(f"{label}: onnxruntime {onnxruntime.__version__}, {len(outputs)} outputs")


def _models(codes: np.ndarray, scales: np.ndarray) -> dict:
    """Candidate arithmetics: activations [M, K] float32 -> outputs [M, N] float64."""
    bf16 = (scales.view(np.uint32) & 0xFFFF0000).view(np.float32)
    weights = {"fp32": (codes * scales[..., None].astype(np.float64)).reshape(N, K),
               "bf16": (codes * bf16[..., None].astype(np.float64)).reshape(N, K)}

    def per_block(reciprocal):
        def model(a):
            blocks = a.reshape(len(a), -1, BLOCK)
            amax = np.abs(blocks).max(-1, keepdims=True)
            scale = amax / np.float32(127)
            inverse = np.float32(1) / scale if reciprocal else np.float32(127) / amax
            quantized = np.rint((blocks * inverse).astype(np.float64)) * scale.astype(np.float64)
            return quantized.reshape(len(a), K) @ weights["fp32"].T
        return model

    def per_row_asymmetric(a):
        a = a.astype(np.float64)
        low, high = np.minimum(a.min(1), 0), np.maximum(a.max(1), 0)
        scale = (high - low) / 255
        zero = np.clip(np.rint(-128 - low / scale), -128, 127)
        codes_a = np.clip(np.rint(a / scale[:, None]) + zero[:, None], -128, 127) - zero[:, None]
        return (codes_a * scale[:, None]) @ weights["bf16"].T

    return {
        "exact (float activations, fp32 scales)": lambda a: a.astype(np.float64) @ weights["fp32"].T,
        "int8 per 32-block, codes round(x*(127/amax))": per_block(reciprocal=False),
        "int8 per 32-block, codes round(x*(1/(amax/127)))": per_block(reciprocal=True),
        "int8 per row asymmetric, bf16 weight scales": per_row_asymmetric,
    }


def explain(folder: Path, labels: list[str]) -> None:
    inputs = np.load(folder / "inputs.npz")
    models = _models(inputs["codes"], inputs["scales"])
    exact = next(iter(models))
    for label in labels:
        outputs = np.load(folder / f"out-{label}.npz")
        for key in outputs.files:
            level, name, rows = key.split("/")
            a = inputs[name][:int(rows[1:])]
            y = outputs[key].astype(np.float64)
            size = np.abs(y).max()
            errors = {model: np.abs(y - compute(a)).max() / size for model, compute in models.items()}
            best = min(errors, key=errors.get)
            print(f"{label:18} {level} {name:8} {rows:3}  closest: {best:50} {errors[best]:.0e}   "
                  f"vs exact {errors[exact]:.1e}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("build").add_argument("folder", type=Path)
    running = commands.add_parser("run")
    running.add_argument("folder", type=Path)
    running.add_argument("label")
    running.add_argument("--disable-kleidiai", action="store_true")
    explaining = commands.add_parser("explain")
    explaining.add_argument("folder", type=Path)
    explaining.add_argument("labels", nargs="+")
    arguments = parser.parse_args()
    if arguments.command == "build":
        build(arguments.folder)
    elif arguments.command == "run":
        run(arguments.folder, arguments.label, arguments.disable_kleidiai)
    else:
        explain(arguments.folder, arguments.labels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
