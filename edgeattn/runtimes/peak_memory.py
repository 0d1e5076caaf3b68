"""Peak resident memory (RSS) of one model, measured in a fresh process.

A profile of several folders keeps them all loaded in one process (so their timings
can be interleaved), so that process's peak is the sum of all of them, and even a
reset high-water mark (Linux ``clear_refs``) would credit onnxruntime's one-time set-up
to the first model only and let later models reuse memory freed by earlier ones. A
fresh Python process per model that loads it, fills its cache to the longest context
profiled and decodes a few tokens measures what an app running only that model needs:
interpreter, onnxruntime, weights, KV cache, activations.

The peak is read from ``VmHWM`` in ``/proc/self/status`` on Linux and Android: it belongs
to the process's own address space. ``getrusage``'s ``ru_maxrss`` survives fork + exec on
Linux, so a child of a large process (a test runner holding a model) would report its
parent's size; it is the fallback elsewhere (macOS).
"""

from __future__ import annotations

import json
import subprocess
import sys

METHOD = "peak RSS (VmHWM, else getrusage) of a fresh process that loads the folder, fills its cache and decodes"


def measure_peak_rss(folder: str, provider: str, threads: int, tokens: int, decode_steps: int) -> dict:
    """{"bytes": peak RSS or None, "tokens": cache fill, "error": why it failed (only on failure)}."""
    command = [sys.executable, "-m", __name__, str(folder), provider, str(threads), str(tokens), str(decode_steps)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or [f"exit code {result.returncode}"]
        return {"bytes": None, "tokens": tokens, "error": lines[-1]}
    return {"bytes": json.loads(result.stdout.strip().splitlines()[-1])["peak_rss_bytes"], "tokens": tokens}


def process_peak_bytes() -> int | None:
    """This process's peak RSS since it started, or None where the platform cannot tell (Windows)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # "VmHWM:  123456 kB"
    except OSError:
        pass
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB elsewhere


def _main(folder: str, provider: str, threads: str, tokens: str, decode_steps: str) -> None:
    import numpy as np

    from edgeattn.runtimes.decode_steps import decode_step, fill_cache
    from edgeattn.runtimes.session import EdgeLM

    lm = EdgeLM.load(folder, provider=provider, threads=int(threads))
    token = fill_cache(lm, int(tokens), lm.manifest.model.vocab_size, np.random.default_rng(0))
    for _ in range(int(decode_steps)):
        token, _ = decode_step(lm, token)
    print(json.dumps({"peak_rss_bytes": process_peak_bytes()}))


if __name__ == "__main__":
    _main(*sys.argv[1:])
