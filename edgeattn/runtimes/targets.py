"""Target presets for ``edgeattn profile --target``: the devices a converted model is meant for.

Each figure carries its source. Bandwidth is the *theoretical peak* of the memory
interface (transfer rate x bus width), the number a roofline needs: real read
bandwidth on these devices is lower (typically 50-80% of peak), so a projection from
it is a lower bound on decode time, never a promise. Memory budgets are rules of thumb
(stated per target): the operating system, the page cache and other apps need the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgeattn.errors import InvalidOptionError

GB = 10**9
GIB = 2**30
BOARD_BUDGET = 0.75  # Linux without a desktop leaves most RAM free; keep a quarter for the OS and page cache
PHONE_BUDGET = 0.5  # Android's low-memory killer and iOS's per-app limit stop a foreground app well before RAM is full


@dataclass(frozen=True)
class Target:
    """One device: CPU cores, memory, memory bandwidth, and where each figure comes from."""

    name: str
    description: str
    cores: str  # the CPU, in words
    threads: int  # onnxruntime intra-op threads: the cores that should run the model
    memory_bytes: int
    budget_fraction: float  # share of memory_bytes one process may use
    bandwidth_gb_per_s: float  # theoretical peak of the memory interface
    sources: dict[str, str] = field(default_factory=dict)  # figure -> source

    @property
    def budget_bytes(self) -> int:
        return int(self.memory_bytes * self.budget_fraction)

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "cores": self.cores, "threads": self.threads,
                "memory_bytes": self.memory_bytes, "budget_fraction": self.budget_fraction,
                "budget_bytes": self.budget_bytes, "bandwidth_gb_per_s": self.bandwidth_gb_per_s,
                "sources": dict(self.sources)}


_PI5_BRIEF = "Raspberry Pi 5 product brief (datasheets.raspberrypi.com/rpi5/raspberry-pi-5-product-brief.pdf)"
_PI5_BANDWIDTH = ("4267 MT/s x 32-bit LPDDR4X interface = 17.1 GB/s peak "
                  "(32-bit width: Raspberry Pi 5 launch coverage, circuitdigest.com, 2023-09)")
_BOARD_BUDGET_NOTE = f"rule of thumb: {BOARD_BUDGET:.0%} of RAM (Raspberry Pi OS Lite / L4T without a desktop)"
_PHONE_BUDGET_NOTE = f"rule of thumb: {PHONE_BUDGET:.0%} of RAM (the OS and background apps hold the rest)"

TARGETS: dict[str, Target] = {target.name: target for target in (
    Target("pi5", "Raspberry Pi 5, 8 GB", "4x Cortex-A76 @ 2.4 GHz (BCM2712)", 4, 8 * GIB, BOARD_BUDGET, 17.1,
           {"cores": _PI5_BRIEF, "memory": _PI5_BRIEF + ": LPDDR4X-4267, 2/4/8/16 GB",
            "bandwidth": _PI5_BANDWIDTH, "budget": _BOARD_BUDGET_NOTE}),
    Target("pi5-2gb", "Raspberry Pi 5, 2 GB", "4x Cortex-A76 @ 2.4 GHz (BCM2712 D0)", 4, 2 * GIB, BOARD_BUDGET, 17.1,
           {"cores": _PI5_BRIEF, "memory": _PI5_BRIEF + ": LPDDR4X-4267, 2 GB variant",
            "bandwidth": _PI5_BANDWIDTH, "budget": _BOARD_BUDGET_NOTE}),
    Target("pi4", "Raspberry Pi 4 Model B, 4 GB", "4x Cortex-A72 @ 1.8 GHz (BCM2711)", 4, 4 * GIB, BOARD_BUDGET, 12.8,
           {"cores": "Raspberry Pi 4 Model B product brief (datasheets.raspberrypi.com/rpi4/raspberry-pi-4-product-brief.pdf)",
            "memory": "Raspberry Pi 4 Model B product brief: LPDDR4-3200, 1/2/4/8 GB",
            "bandwidth": "3200 MT/s x 32-bit LPDDR4 interface = 12.8 GB/s peak", "budget": _BOARD_BUDGET_NOTE}),
    Target("pixel8", "Google Pixel 8 (Tensor G3), 8 GB", "1x Cortex-X3 + 4x Cortex-A715 + 4x Cortex-A510 (Tensor G3)", 4,
           8 * GIB, PHONE_BUDGET, 68.3,
           {"cores": "Tensor G3 CPU as reported by Android Authority (2023-10, Device Info HW listing); "
                     "threads = the four A715 cores (mixed-speed cores stall evenly split work)",
            "memory": "Google Store Pixel 8 tech specs: 8 GB LPDDR5X",
            "bandwidth": "estimate: LPDDR5X-8533 x 64-bit = 68.3 GB/s peak (Google publishes no figure)",
            "budget": _PHONE_BUDGET_NOTE}),
    Target("iphone15", "Apple iPhone 15 (A16 Bionic), 6 GB", "2 performance + 4 efficiency cores (A16 Bionic)", 2,
           6 * GIB, PHONE_BUDGET, 51.2,
           {"cores": "Apple iPhone 15 tech specs (apple.com/iphone-15/specs): 6-core CPU, 2 performance + 4 efficiency; "
                     "threads = the performance cores",
            "memory": "6 GB LPDDR5 (teardown reports; Apple publishes no RAM size)",
            "bandwidth": "LPDDR5-6400 x 64-bit = 51.2 GB/s peak (Wikipedia, Apple A16)", "budget": _PHONE_BUDGET_NOTE}),
    Target("jetson-orin-nano", "NVIDIA Jetson Orin Nano 8 GB", "6x Cortex-A78AE (+ 1024-core Ampere GPU, shared memory)", 6,
           8 * GIB, BOARD_BUDGET, 68.0,
           {"cores": "NVIDIA Jetson Orin Nano series data sheet: 6-core Arm Cortex-A78AE v8.2",
            "memory": "NVIDIA Jetson Orin Nano series data sheet: 8 GB 128-bit LPDDR5, shared by CPU and GPU",
            "bandwidth": "NVIDIA Jetson Orin Nano series data sheet: 68 GB/s (102 GB/s in JetPack 6.1's 'Super' mode)",
            "budget": _BOARD_BUDGET_NOTE}),
)}


def get_target(name: str) -> Target:
    """The preset called ``name``; an unknown name is an error that lists the presets."""
    try:
        return TARGETS[name]
    except KeyError:
        raise InvalidOptionError(f"unknown target {name!r}; choose from: {', '.join(TARGETS)}") from None
