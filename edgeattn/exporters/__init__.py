"""PyTorch -> ONNX: the exportable graph, the attention lowerings (ort, onnx, edgeattn), weight precision, checks."""
