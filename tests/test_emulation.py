"""Emulation detection on /proc/cpuinfo texts of real boards and of qemu, and what profile's report says then.

The cpuinfo texts are the shapes each source writes: a Raspberry Pi 5's kernel, an x86 host's
kernel (which qemu 7 passes through to an aarch64 guest) and newer qemu's own Arm text; a CPU
model chosen for qemu (QEMU_CPU) gives it away whatever /proc/cpuinfo says.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgeattn.runtimes import profile as profile_module
from edgeattn.runtimes.emulation import detect_emulation
from edgeattn.runtimes.profile import Candidate, ProfileOptions, profile_candidates
from edgeattn.runtimes.profile_report import render_markdown, render_text
from edgeattn.runtimes.targets import TARGETS

PI5 = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x4
CPU part\t: 0xd0b
CPU revision\t: 1
"""
X86_HOST = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model name\t: Intel(R) Xeon(R) CPU @ 2.20GHz
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov avx2
"""
QEMU_ARM = """processor\t: 0
model name\t: ARMv8 Processor rev 0 (v8l)
BogoMIPS\t: 100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm
CPU implementer\t: 0x00
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0x051
CPU revision\t: 0
"""


@pytest.mark.parametrize("machine, cpuinfo, emulated", [
    ("aarch64", PI5, False),
    ("x86_64", X86_HOST, False),
    ("aarch64", X86_HOST, True),  # qemu 7 user mode: the host's file
    ("aarch64", QEMU_ARM, True),  # newer qemu user mode: its own file, implementer 0x00
    ("x86_64", PI5, True),  # an x86 process on an Arm host
    ("aarch64", "", False),  # nothing to go on (e.g. Android hides most of it): not claimed
])
def test_detects_an_emulator_from_cpuinfo(machine, cpuinfo, emulated):
    reason = detect_emulation(machine, cpuinfo, environ={})
    assert (reason is not None) == emulated
    if emulated:
        assert machine in reason


def test_a_cpu_model_chosen_for_qemu_is_emulation_whatever_cpuinfo_says():
    reason = detect_emulation("aarch64", PI5, environ={"QEMU_CPU": "cortex-a76"})
    assert reason is not None and "QEMU_CPU=cortex-a76" in reason


class _FakeLM:
    """A stand-in session: logits from a fixed random table, so profile has something to time."""

    def __init__(self) -> None:
        self.length, self.table = 0, np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)

    def reset(self, batch: int = 1) -> None:
        self.length = 0

    def forward(self, input_ids: np.ndarray) -> np.ndarray:
        self.length += input_ids.shape[1]
        return self.table[input_ids[:, -1] % 64]


def _report(monkeypatch, emulation: str | None) -> dict:
    monkeypatch.setattr(profile_module, "detect_emulation", lambda: emulation)
    kv = {"codec": "fp32", "bytes_per_token": 256, "capacity": 64, "ring": False, "growing": False,
          "max_positions": None}
    info = {"folder": "fake", "source": "fake", "spec": {}, "weights": "fp32", "lowering": ["ort"],
            "disk_bytes": 8192, "weights_bytes": 8192, "vocab_size": 32, "max_length": 64, "kv_cache": kv}
    options = ProfileOptions(threads=1, contexts=(16, 32), prompt_lengths=(8,), repeats=3, warmup=1,
                             target=TARGETS["pi5"])
    return profile_candidates([Candidate("fake", _FakeLM, info)], options)


def test_an_emulated_profile_says_its_times_are_not_timings(monkeypatch):
    report = _report(monkeypatch, "an aarch64 process on an x86 CPU (GenuineIntel in /proc/cpuinfo): qemu user mode")
    text = render_text(report)
    assert report["machine"]["emulation"].startswith("an aarch64 process")
    assert "EMULATED: an aarch64 process" in text and "not timings" in text
    assert "Decode (EMULATED: not timings)" in text and "## Decode (EMULATED: not timings)" in render_markdown(report)
    assert "PROJECTION" not in text
    rows = [row for row in report["models"][0]["decode"] if "ms_per_token" in row]
    assert rows and all("target_projected_ms" not in row for row in rows)  # nothing projected from emulated times
    assert all(row["target_roofline_ms"] > 0 and row["kv_bytes"] == 256 * row["context"] for row in rows)
    assert report["models"][0]["target_fit"]["fits"]  # the memory check does not depend on timings


def test_a_native_profile_projects_and_says_nothing_of_emulation(monkeypatch):
    report = _report(monkeypatch, None)
    text = render_text(report)
    assert report["machine"]["emulation"] is None and "EMULATED" not in text and "PROJECTION" in text
    rows = [row for row in report["models"][0]["decode"] if "ms_per_token" in row]
    assert rows and all(row["target_projected_ms"] > 0 for row in rows)
