"""What the bench ran on: CPU model, threads, torch build, load; and the allocator setting."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import re
from pathlib import Path

import torch


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def torch_build() -> str:
    """torch's version and the parts of ``torch.__config__.show()`` that set CPU speed:
    the BLAS, oneDNN, the threading runtime and the vector instructions in use."""
    config = torch.__config__.show()
    found = [f"{name} {m.group(1)}" for name, pattern in (
        ("MKL", r"Math Kernel Library Version ([\w.]+)"), ("oneDNN", r"MKL-DNN (v[\w.]+)"),
        ("OpenBLAS", r"OpenBLAS ([\w.]+)"), ("OpenMP", r"OpenMP (\d+)"))
        if (m := re.search(pattern, config))]
    git = (torch.version.git_version or "?")[:7]
    return ", ".join([f"torch {torch.__version__} (git {git})", *found,
                      f"CPU capability {torch.backends.cpu.get_cpu_capability()}"])


def gpu() -> str:
    return (f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}, "
            f"cuDNN {torch.backends.cudnn.version()})")


def key(devices: list[torch.device] | None = None) -> str:
    """The heading that names this machine in RESULTS.md: CPU model, cores, torch build,
    and the GPU where the run used one."""
    out = f"{cpu_model()}, {os.cpu_count()} logical cores; {torch_build()}"
    if any(d.type == "cuda" for d in devices or []):
        out += f"; GPU {gpu()}"
    return out


def load() -> str:
    if not hasattr(os, "getloadavg"):
        return "unknown"
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def info() -> dict[str, str]:
    out = {"CPU": f"{cpu_model()}, {os.cpu_count()} logical cores", "torch": torch_build(),
           "Python": platform.python_version(), "OS": platform.platform()}
    if torch.cuda.is_available():
        out["GPU"] = gpu()
    return out


def keep_freed_memory() -> str:
    """Keep memory that torch frees inside the process (glibc's malloc).

    By default glibc hands large freed blocks back to the OS and the next pass faults
    them in again, page by page: tens of thousands of faults per pass, a number that
    varies from pass to pass and moves a pass's time by up to 10%, for the bare pass
    and the probe alike. With trimming off and a fixed mmap threshold both sides reuse
    their memory, as a long training run's process does, and the ratio is steady.
    """
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    mallopt = getattr(libc, "mallopt", None)
    m_trim_threshold, m_mmap_threshold = -1, -3
    if mallopt is None or not (mallopt(m_trim_threshold, 1 << 30)
                               and mallopt(m_mmap_threshold, 1 << 25)):
        return "as is (no glibc mallopt here)"
    return "freed memory kept in the process (glibc mallopt: no trimming, mmap above 32 MiB)"
