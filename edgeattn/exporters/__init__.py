"""PyTorch -> ONNX export with fused attention ops (see the export issue; not yet implemented)."""
