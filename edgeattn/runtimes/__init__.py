"""The on-device runtime: onnxruntime + numpy + tokenizers only (see the export issue; not yet implemented)."""
