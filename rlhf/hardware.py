"""What this machine computes fast: the weights' dtype that `--dtype auto` resolves to, and torch's threads.

bfloat16 halves the weights' memory and, where the hardware has bf16 units, speeds up matrix products; where
it has none, torch runs bf16 products in a slow fallback (21x float32's time for a 512x576 @ 576x1536 product,
forward and backward, on an AVX2-only CPU). So `auto` picks bfloat16 only where the device computes it
natively: a CUDA device that reports bf16 support, or a CPU with AVX-512 BF16 or AMX tiles, as torch's own CPU
checks report them. Everything else gets float32. An explicit `--dtype bfloat16|float32` always wins.

Every command that loads a model calls `setup_compute` once at start-up: it sets torch's intra-op threads to
the cores this process may use and prints one line saying the dtype and threads it chose, and why.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Literal

DtypeName = Literal["auto", "bfloat16", "float32"]
DTYPE_NAMES: tuple[str, ...] = ("auto", "bfloat16", "float32")


@dataclass(frozen=True)
class Capabilities:
    """What the device can do, as torch reports it (faked in tests)."""

    device: str
    """"cuda", "mps" or "cpu": where the model runs."""
    bf16_units: bool
    """Whether that device computes bfloat16 natively."""
    detail: str
    """The hardware in a few words, for the start-up line (the GPU's name, the CPU's instruction set)."""


def detect_capabilities(device: str | None = None) -> Capabilities:
    """The capabilities of `device` ("cuda", "mps", "cpu"; default: CUDA when available, else the CPU)."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = str(device).split(":")[0]
    if device == "cuda":
        return Capabilities("cuda", bool(torch.cuda.is_bf16_supported()), torch.cuda.get_device_name())
    if device == "mps":  # bf16 runs on recent Apple GPUs, but not faster than float32 for these models
        return Capabilities("mps", False, "Apple GPU")
    avx512_bf16 = bool(torch.cpu._is_avx512_bf16_supported())
    amx = bool(torch.cpu._is_amx_tile_supported())
    units = [name for name, has in (("AVX-512 BF16", avx512_bf16), ("AMX", amx)) if has]
    detail = ", ".join(units) if units else f"{torch.backends.cpu.get_cpu_capability()}, no AVX-512 BF16 or AMX"
    return Capabilities("cpu", avx512_bf16 or amx, detail)


def cpu_description() -> str:
    """The CPU's model name and the instruction-set flags that decide its speed here (Linux; elsewhere what
    Python's platform module knows), e.g. "AMD EPYC 7B13; flags: avx2 fma"."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            info = dict(line.split(":", 1) for line in f if ":" in line)  # the first core's lines come last; same
    except OSError:
        return platform.processor() or platform.machine()
    name = " ".join(info.get("model name\t", platform.machine()).split())
    flags = set(info.get("flags\t\t", "").split())
    shown = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16") if f in flags]
    return f"{name}; flags: {' '.join(shown) or 'none of avx2, avx512f, avx512_bf16, amx'}"


def resolve_dtype(requested: str, capabilities: Capabilities | None = None) -> tuple[str, str]:
    """(dtype name, why) for a `--dtype` value: "auto" follows the device's bf16 units, anything else is kept."""
    if requested not in DTYPE_NAMES:
        from rlhf.errors import UserError

        raise UserError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}, got {requested!r}")
    if requested != "auto":
        return requested, "as asked"
    caps = capabilities or detect_capabilities()
    where = "GPU" if caps.device == "cuda" else "CPU" if caps.device == "cpu" else caps.device.upper()
    if caps.bf16_units:
        return "bfloat16", f"this {where} has bf16 units: {caps.detail}"
    return "float32", f"this {where} has no bf16 units: {caps.detail}"


def usable_cores() -> tuple[int, str]:
    """(threads, why): the cores in this process's CPU affinity mask, or fewer when OMP_NUM_THREADS says so."""
    try:
        cores = len(os.sched_getaffinity(0))
        source = "cores this process may use"
    except AttributeError:  # macOS and Windows have no affinity mask
        cores = os.cpu_count() or 1
        source = "cores"
    requested = os.environ.get("OMP_NUM_THREADS", "").strip()
    if requested.isdigit() and int(requested) >= 1:
        return int(requested), f"OMP_NUM_THREADS; {cores} {source}"
    return cores, source


_announced: set[str] = set()


def configure_threads() -> tuple[int, str]:
    """Set torch's intra-op threads to `usable_cores()` (torch counts the machine's cores, not the ones this
    process may use, and so oversubscribes a container or a `taskset`); returns (threads, why)."""
    import torch

    threads, why = usable_cores()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads, why


def announce(dtype_name: str, why: str) -> None:
    """Print `dtype: float32 (this CPU has no bf16 units: ...); threads: 2 (...)` on stderr (never mixed with a
    command's JSON on stdout), once per process and line; only the main process of an `accelerate launch`."""
    from rlhf.config_args import is_main_process

    threads, why_threads = configure_threads()
    line = f"dtype: {dtype_name} ({why}); threads: {threads} ({why_threads})"
    if line not in _announced and is_main_process():
        _announced.add(line)
        print(line, file=sys.stderr, flush=True)


def setup_compute(requested_dtype: str, device: str | None = None) -> str:
    """Start-up of a command that loads a model: set the threads, resolve `requested_dtype` for `device` (default:
    CUDA when available, else the CPU), say both; returns the dtype's name."""
    name, why = resolve_dtype(requested_dtype, detect_capabilities(device))
    announce(name, why)
    return name

