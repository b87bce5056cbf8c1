"""Machine-dependent run-time settings: the numeric precision and the allocator's state.

``resolve_precision("auto")`` picks a Lightning precision for the hardware a run lands on,
decided when it runs (never assumed from the config). ``tune_allocator()`` fixes glibc
malloc's state for the whole process, so throughput measured early or late in a process,
or in different trials of a sweep, is measured under the same conditions; the ``fvlab`` command
calls it at start-up unless ``FVLAB_TUNE_ALLOCATOR=0`` (``allocator_tuning_enabled``).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform
import subprocess
import sys
from functools import lru_cache
from typing import Any, Iterator, Mapping

# x86 /proc/cpuinfo flags of CPUs that execute bf16 arithmetic in hardware: AVX512-BF16
# (dot products VDPBF16PS; Cooper Lake, Sapphire Rapids, AMD Zen 4/5) and AMX-BF16
# (tile matrix multiply; Sapphire Rapids and later).
X86_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# arm64 (Linux "Features" line): FEAT_BF16 (BFDOT/BFMMLA; Graviton 3, Neoverse V1/N2, Apple M2+).
ARM_NATIVE_BF16_FLAGS = ("bf16",)

# Where Linux lists the CPU's feature flags.
CPUINFO_PATH = "/proc/cpuinfo"

ALLOCATOR_ENV = "FVLAB_TUNE_ALLOCATOR"

# mallopt(3) parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4


def cpu_flags_from_cpuinfo(text: str) -> set[str]:
    """The feature flags listed in a Linux ``/proc/cpuinfo`` text (x86 ``flags``, arm64 ``Features``)."""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            # Every core lists the same flags; the first line is enough.
            return set(value.split())
    return set()


def native_bf16_from_flags(flags: set[str], machine: str) -> bool:
    """Whether CPU feature ``flags`` of a ``machine`` (``platform.machine()``) include native bf16."""
    machine = machine.lower()
    if machine in ("x86_64", "amd64", "i386", "i686"):
        return any(flag in flags for flag in X86_NATIVE_BF16_FLAGS)
    if machine in ("aarch64", "arm64"):
        return any(flag in flags for flag in ARM_NATIVE_BF16_FLAGS)
    return False


def _macos_arm_bf16() -> bool:
    try:
        out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True,
                             text=True, timeout=5, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return out.strip() == "1"


def _read_cpuinfo() -> str | None:
    """The kernel's ``/proc/cpuinfo`` text, or None where there is none (not Linux, no access)."""
    try:
        with open(CPUINFO_PATH, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def cpu_description() -> tuple[str, frozenset[str]]:
    """This CPU's model name and feature flags (from /proc/cpuinfo on Linux, else what ``platform`` knows)."""
    text = _read_cpuinfo() if sys.platform.startswith("linux") else None
    if text is None:
        return platform.processor() or platform.machine(), frozenset()
    names = [line.partition(":")[2].strip() for line in text.splitlines()
             if line.lower().startswith(("model name", "hardware", "cpu part"))]
    return (names[0] if names else platform.processor() or platform.machine()), frozenset(cpu_flags_from_cpuinfo(text))


@lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """True only when this CPU executes bf16 arithmetic in hardware; False when unknown.

    Read from the kernel's feature flags, not from PyTorch: oneDNN's
    ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` answers True on every AVX-512 CPU,
    because oneDNN can *emulate* bf16 there (convert, compute in fp32, round), and emulated
    bf16 autocast is several times slower than plain fp32. Only AVX512-BF16/AMX-BF16 (x86) or
    FEAT_BF16 (arm64) make bf16-mixed worth using.
    """
    machine = platform.machine()
    if sys.platform.startswith("linux"):
        return native_bf16_from_flags(set(cpu_description()[1]), machine)
    if sys.platform == "darwin" and machine == "arm64":
        return _macos_arm_bf16()
    return False


def _accelerator_name(accelerator: Any) -> str:
    import torch

    if not isinstance(accelerator, str):  # a Lightning Accelerator instance
        # CUDAAccelerator -> "cuda", CPUAccelerator -> "cpu", MPSAccelerator -> "mps".
        return type(accelerator).__name__.lower().removesuffix("accelerator")
    name = accelerator.lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if name == "gpu" else name


def cuda_device_indices(devices: Any, count: int) -> list[int]:
    """The CUDA device indices Lightning's ``devices`` selects out of ``count`` visible GPUs."""
    # Lightning's devices: "auto" or -1 (all), an int count, a "0,1" string, or a list of indices.
    if isinstance(devices, (list, tuple)):
        return [int(d) for d in devices]
    if isinstance(devices, str):
        text = devices.strip()
        if text in ("auto", "-1"):
            return list(range(count))
        if "," in text:
            return [int(d) for d in text.split(",") if d.strip()]
        devices = int(text)
    if isinstance(devices, int) and devices >= 0:
        return list(range(min(devices, count)))
    return list(range(count))


def _cuda_native_bf16(devices: Any) -> bool:
    import torch

    for index in cuda_device_indices(devices, torch.cuda.device_count()):
        # including_emulation=False: the default also answers True on pre-Ampere GPUs, which
        # only emulate bf16 (slower than fp16 there).
        with torch.cuda.device(index):
            if not torch.cuda.is_bf16_supported(including_emulation=False):
                return False
    return True


def resolve_precision(precision: Any, accelerator: Any = "auto", devices: Any = "auto") -> Any:
    """A concrete Lightning precision for fvlab's ``"auto"``; any other value unchanged.

    CPU: ``"bf16-mixed"`` when the CPU has native bf16 (``cpu_has_native_bf16``), else ``"32-true"``.
    CUDA: ``"bf16-mixed"`` when every GPU used has native bf16 (Ampere and later, ROCm),
    else ``"16-mixed"``; this initialises CUDA in the calling process. Anything else (MPS,
    TPU ...): ``"32-true"``, the one precision every backend runs.
    """
    if precision != "auto":
        return precision
    import torch

    name = _accelerator_name(accelerator)
    if name == "cpu":
        return "bf16-mixed" if cpu_has_native_bf16() else "32-true"
    if name == "cuda":
        if not torch.cuda.is_available():
            return "32-true"  # Lightning then reports the missing GPU itself
        return "bf16-mixed" if _cuda_native_bf16(devices) else "16-mixed"
    return "32-true"


_allocator_tuned = False


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # absent from musl and other C libraries
    except (OSError, AttributeError):
        return None
    return libc


def allocator_tuning_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether :func:`tune_allocator` may change malloc's settings: not when ``FVLAB_TUNE_ALLOCATOR``
    is ``0``, ``false``, ``no`` or ``off`` (any case) in ``environ`` (default: ``os.environ``).

    The ``fvlab`` command (and each sweep worker) calls ``tune_allocator()`` at start-up, which
    changes glibc malloc for the whole process; ``import fvlab`` alone never does.
    """
    value = (os.environ if environ is None else environ).get(ALLOCATOR_ENV, "1")
    return value.strip().lower() not in ("0", "false", "no", "off")


def tune_allocator() -> bool:
    """Keep glibc malloc from handing freed memory back to the OS; True when settings took effect.

    By default glibc serves blocks above a (dynamic) threshold with ``mmap`` and unmaps them on
    ``free``, and trims the heap top; every large tensor then page-faults all its pages afresh,
    and how often depends on what the process did before. With trimming and mmap turned off,
    freed memory stays in the heap and is reused without faults, at the cost of keeping the
    process's peak heap mapped (the peak RSS of a training step or FasterViT-0 inference moved
    by under 4%, benchmarks/allocator.py). Call once at start-up, before large allocations;
    no-op (False) on non-glibc systems or when ``FVLAB_TUNE_ALLOCATOR=0``. Idempotent.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    if not allocator_tuning_enabled():
        return False
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    settings = (
        # Never trim the heap top: freed memory stays mapped and is reused without faults.
        # glibc reads the int as size_t, so -1 is SIZE_MAX: no threshold at all. Setting it
        # also ends glibc's dynamic thresholds, which would reset it on the next munmap.
        (M_TRIM_THRESHOLD, -1),
        # No mmap'd chunks at all. Raising M_MMAP_THRESHOLD instead is not enough: glibc caps it
        # at 32 MiB on 64-bit, so every tensor above 32 MiB would still be mmapped and unmapped
        # on free (the official FasterViT-0 at batch 16 then still faults 37k pages per call).
        (M_MMAP_MAX, 0),
    )
    # With no mmap the mmap threshold is moot; M_TOP_PAD is left alone: without trimming the heap
    # stops growing once warm, and a 64 MiB pad changed nothing measurable.
    # mallopt returns 1 on success, 0 on error.
    results = [libc.mallopt(param, value) for param, value in settings]
    _allocator_tuned = all(result == 1 for result in results)
    return _allocator_tuned


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Hide what is alive now (imported modules, mostly) from the cyclic collector for the block.

    The full collections that free models and trainers between runs and trials otherwise walk
    every object torch, Lightning and timm created at import: about 0.3 s each. A block inside
    another does nothing: a second freeze would keep whatever the outer block's code holds at
    that moment, and later drops into a reference cycle, until the outer block ends.
    """
    global _freeze_depth
    if _freeze_depth == 0:
        gc.collect()  # garbage frozen now would be kept until the block ends
        gc.freeze()
    _freeze_depth += 1
    try:
        yield
    finally:
        _freeze_depth -= 1
        if _freeze_depth == 0:
            gc.unfreeze()


_freeze_depth = 0


# Lightning's per-run start-up chatter and warnings that say nothing about fvlab's runs.
_QUIET_WARNINGS = (r".*isinstance\(treespec, LeafSpec\).*", r".*does not have many workers.*",
                   r".*args parameter is intended to run from within Python.*",
                   r".*smaller than the logging interval.*", r".*instantiate_classes.*deprecated.*")


def quiet_lightning() -> None:
    """Keep Lightning's start-up lines (accelerator, adverts) and known warnings off the terminal.

    ``fvlab fit`` prints one table and ``fvlab sweep`` one line per trial; Lightning would
    otherwise print its chatter for every run.
    """
    import logging
    import warnings

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def hide_password(url: str) -> str:
    """A storage URL as fvlab prints or writes it: the password, if any, replaced by ``***``."""
    if "://" not in url or "@" not in url:
        return url  # a journal path or a URL without credentials: as the user gave it
    try:
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
    except Exception:  # not a URL SQLAlchemy understands: mask user:password@ by hand
        scheme, _, rest = url.partition("://")
        credentials, at, host = rest.rpartition("@")
        user = credentials.split(":", 1)[0]
        return f"{scheme}://{user}{':***' if ':' in credentials else ''}{at}{host}"
    return parsed.render_as_string(hide_password=True) if parsed.password else url


def scrub_password(text: str, url: str | None) -> str:
    """``text`` with ``url``'s password (and the URL itself) masked: for error messages that quote it."""
    if not url:
        return text
    text = text.replace(url, hide_password(url))
    try:
        from sqlalchemy.engine import make_url

        password = make_url(url).password if "://" in url else None
    except Exception:
        password = None
    return text.replace(str(password), "***") if password else text
