"""The on-device runtime: onnxruntime + numpy + tokenizers only (no torch, no transformers).

    from edgeattn.runtimes import EdgeLM, generate
    lm = EdgeLM.load("out/", provider="cpu", threads=4)
    print(generate(lm, "The capital of France is", max_new_tokens=32).text)
"""

from edgeattn.runtimes.generate import Generation, SamplingConfig, generate, stream
from edgeattn.runtimes.session import ContextFullError, EdgeLM, RuntimeLoadError

__all__ = ["ContextFullError", "EdgeLM", "Generation", "RuntimeLoadError", "SamplingConfig", "generate", "stream"]
