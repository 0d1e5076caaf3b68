"""Whether this process runs under an emulator (qemu user mode), where timings time the emulator.

qemu user mode reports the guest architecture through uname, so ``platform.machine()`` says
aarch64, but it shows through elsewhere: qemu 7 (Debian 12) passes the host's ``/proc/cpuinfo``
through, an x86 CPU under an aarch64 process; newer qemu writes its own for Arm with implementer
code 0x00, which Arm reserves for software and no silicon carries; and an emulated CPU model is
chosen with ``QEMU_CPU``, which qemu leaves in the process's environment.
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Mapping
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
ARM_MACHINES = {"aarch64", "arm64", "armv7l", "armv8l"}
X86_MACHINES = {"x86_64", "amd64", "i386", "i686"}
X86_VENDORS = ("GenuineIntel", "AuthenticAMD", "HygonGenuine")


def detect_emulation(machine: str | None = None, cpuinfo: str | None = None,
                     environ: Mapping[str, str] | None = None) -> str | None:
    """A sentence saying why this looks emulated, or None when the CPU is what the process runs as."""
    machine = (machine or platform.machine()).lower()
    qemu_cpu = (os.environ if environ is None else environ).get("QEMU_CPU")
    if qemu_cpu:
        return f"an {machine} process with QEMU_CPU={qemu_cpu} in its environment: qemu user mode emulating {qemu_cpu}"
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text(errors="replace")
        except OSError:
            return None
    vendor = next((name for name in X86_VENDORS if name in cpuinfo), None)
    implementers = set(re.findall(r"^CPU implementer\s*:\s*(0x[0-9a-fA-F]+)", cpuinfo, re.MULTILINE))
    if machine in ARM_MACHINES and vendor:
        return f"an {machine} process on an x86 CPU ({vendor} in /proc/cpuinfo): qemu user mode"
    if machine in ARM_MACHINES and implementers and all(int(code, 16) == 0 for code in implementers):
        return f"an {machine} process on a CPU with implementer 0x00 in /proc/cpuinfo (qemu's software CPU)"
    if machine in X86_MACHINES and implementers and not vendor:
        return f"an {machine} process on an Arm CPU (CPU implementer in /proc/cpuinfo): an emulator"
    return None
