"""fvlab.runtime: precision "auto" from the CPU's real feature flags, and glibc malloc tuning."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.plugins.precision import MixedPrecision, Precision

from fvlab.runtime import (cpu_flags_from_cpuinfo, cpu_has_native_bf16, cuda_device_indices,
                           native_bf16_from_flags, resolve_precision)

ROOT = Path(__file__).resolve().parents[1]

# Abridged /proc/cpuinfo texts of real CPUs (one processor each; the kernel repeats it per core).
ZEN5 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R45
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_vnni
bugs\t\t: sysret_ss_attrs
"""
ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9654 96-Core Processor
flags\t\t: fpu sse sse2 avx avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_bf16 avx512_vnni avx512vbmi
"""
BROADWELL = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) CPU E5-2686 v4 @ 2.30GHz
flags\t\t: fpu vme sse sse2 ssse3 sse4_1 sse4_2 avx f16c avx2 fma bmi2
"""
SKYLAKE = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8175M CPU @ 2.50GHz
flags\t\t: fpu sse sse2 avx avx2 avx512f avx512dq avx512cd avx512bw avx512vl
"""
SAPPHIRE_RAPIDS = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu avx2 avx512f avx512_vnni amx_bf16 avx512_fp16 amx_tile amx_int8
"""
GRAVITON3 = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics sve i8mm bf16 dgh rng
CPU implementer\t: 0x41
"""
GRAVITON2 = """processor\t: 0
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm
"""


@pytest.mark.parametrize("text, machine, expected", [
    (ZEN5, "x86_64", True),
    (ZEN4, "x86_64", True),
    (BROADWELL, "x86_64", False),
    (SAPPHIRE_RAPIDS, "x86_64", True),
    (SKYLAKE, "x86_64", False),  # AVX-512 without bf16: oneDNN only emulates it
    (GRAVITON3, "aarch64", True),
    (GRAVITON2, "aarch64", False),
    ("processor\t: 0\n", "x86_64", False),  # no flags line: unknown means no
    (GRAVITON3, "riscv64", False),
])
def test_native_bf16_read_from_cpuinfo_flags(text: str, machine: str, expected: bool) -> None:
    assert native_bf16_from_flags(cpu_flags_from_cpuinfo(text), machine) is expected


def test_flags_are_whole_words() -> None:
    # "bf16" must not match inside "avx512_bf16" on arm64, nor "avx512_bf16" inside a longer name.
    assert not native_bf16_from_flags(cpu_flags_from_cpuinfo("flags : avx512_bf16x\n"), "x86_64")
    assert not native_bf16_from_flags(cpu_flags_from_cpuinfo("Features : avx512_bf16\n"), "aarch64")


# CPU -> what precision "auto" must pick on it: bf16 only where the hardware computes it.
CPU_TABLE = {
    "zen4": (ZEN4, "x86_64", "bf16-mixed"),  # avx512_bf16
    "sapphire_rapids": (SAPPHIRE_RAPIDS, "x86_64", "bf16-mixed"),  # amx_bf16
    "skylake": (SKYLAKE, "x86_64", "32-true"),  # AVX-512, bf16 emulated only
    "broadwell": (BROADWELL, "x86_64", "32-true"),  # an old Xeon: no AVX-512 at all
    "graviton3": (GRAVITON3, "aarch64", "bf16-mixed"),
    "graviton2": (GRAVITON2, "aarch64", "32-true"),
}


@pytest.fixture
def fake_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Makes this process read a given /proc/cpuinfo text on a given Linux machine."""
    import fvlab.runtime

    def use(text: str, machine: str) -> None:
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(text)
        monkeypatch.setattr(fvlab.runtime, "CPUINFO_PATH", str(cpuinfo))
        monkeypatch.setattr(fvlab.runtime.sys, "platform", "linux")
        monkeypatch.setattr(fvlab.runtime.platform, "machine", lambda: machine)
        cpu_has_native_bf16.cache_clear()

    yield use
    cpu_has_native_bf16.cache_clear()  # no faked answer outlives the test


@pytest.mark.parametrize("cpu", CPU_TABLE)
def test_cpu_has_native_bf16_reads_the_kernels_cpuinfo(cpu: str, fake_cpu) -> None:
    text, machine, precision = CPU_TABLE[cpu]
    fake_cpu(text, machine)
    assert cpu_has_native_bf16() is (precision == "bf16-mixed")


def test_unreadable_cpuinfo_means_no_native_bf16(fake_cpu, tmp_path: Path, monkeypatch) -> None:
    import fvlab.runtime

    fake_cpu(ZEN4, "x86_64")
    monkeypatch.setattr(fvlab.runtime, "CPUINFO_PATH", str(tmp_path / "missing"))
    assert cpu_has_native_bf16() is False


@pytest.mark.parametrize("value", ["32-true", "bf16-mixed", "16-mixed", "64-true", "bf16-true", 32, None])
def test_explicit_precision_passes_through(value) -> None:
    for accelerator in ("cpu", "auto", "gpu", "mps"):
        assert resolve_precision(value, accelerator) == value


@pytest.mark.parametrize("cpu", CPU_TABLE)
def test_auto_precision_follows_the_cpu(cpu: str, fake_cpu) -> None:
    text, machine, expected = CPU_TABLE[cpu]
    fake_cpu(text, machine)
    assert resolve_precision("auto", "cpu") == expected
    assert resolve_precision("auto", CPUAccelerator()) == expected
    if not torch.cuda.is_available():
        assert resolve_precision("auto") == expected
        assert resolve_precision("auto", "gpu") == "32-true"  # Lightning reports the missing GPU
    assert resolve_precision("auto", "mps") == "32-true"


@pytest.mark.parametrize("cpu, plugin_type, precision", [("zen4", MixedPrecision, "bf16-mixed"),
                                                          ("broadwell", Precision, "32-true")])
def test_auto_precision_builds_the_matching_trainer_plugin(cpu: str, plugin_type: type, precision: str,
                                                          fake_cpu) -> None:
    from fvlab.lit.build import build_run

    fake_cpu(*CPU_TABLE[cpu][:2])
    # The path of an experiment file's `trainer.precision: auto`: fvlab resolves it, Lightning builds.
    spec = build_run({"model": {"arch": {"name": "fastervit_micro"}},
                      "trainer": {"accelerator": "cpu", "devices": 1, "precision": "auto"}}, None)
    plugin = spec.trainer.precision_plugin
    assert type(plugin) is plugin_type and plugin.precision == precision
    assert spec.precision == precision and spec.hparams["precision"] == precision
    assert spec.config["trainer"]["precision"] == "auto"  # the saved config stays portable


def test_cuda_device_indices_follow_lightnings_devices() -> None:
    assert cuda_device_indices("auto", 4) == [0, 1, 2, 3]
    assert cuda_device_indices(-1, 2) == [0, 1]
    assert cuda_device_indices(2, 4) == [0, 1]
    assert cuda_device_indices("2", 4) == [0, 1]
    assert cuda_device_indices("1,3", 4) == [1, 3]
    assert cuda_device_indices("1,", 4) == [1]
    assert cuda_device_indices([2], 4) == [2]


# Writes a 64 MiB tensor (every page touched), frees it, then writes a 48 MiB one and reports
# the page faults of the second. With glibc's default state both are mmapped (glibc caps its
# mmap threshold at 32 MiB) and unmapped on free, so the second faults all of its pages again;
# once tuned, the freed 64 MiB stay in the heap and the 48 MiB are carved out of them.
FAULTS = """
import json, resource, torch
from fvlab.runtime import tune_allocator
tuned = tune_allocator()
again = tune_allocator()
block = torch.ones(16 * 2**20)
del block
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
block = torch.ones(12 * 2**20)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"tuned": tuned, "again": again, "faults": faults}))
"""


def run_faults(tune: str) -> dict:
    env = dict(os.environ, FVLAB_TUNE_ALLOCATOR=tune)
    for key in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "MALLOC_TOP_PAD_"):
        env.pop(key, None)
    out = subprocess.run([sys.executable, "-c", FAULTS], env=env, cwd=ROOT, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="mallopt tuning is glibc only")
def test_tune_allocator_stops_large_tensors_page_faulting() -> None:
    default, tuned = run_faults("0"), run_faults("1")
    assert default["tuned"] is False and default["again"] is False  # the opt-out is honoured
    assert tuned["tuned"] is True and tuned["again"] is True  # idempotent
    pages = 12 * 2**20 * 4 // os.sysconf("SC_PAGE_SIZE")
    assert default["faults"] > pages // 2, default  # glibc unmapped the freed block
    # Freed memory stays in the heap: the new tensor reuses it without faulting.
    assert tuned["faults"] < pages // 20, tuned


def test_a_frozen_heap_inside_another_keeps_collecting_what_the_outer_block_drops() -> None:
    import gc
    import weakref

    from fvlab.runtime import frozen_heap

    class Node:
        pass

    with frozen_heap():
        node = Node()
        node.self = node  # a reference cycle: only the cyclic collector frees it
        alive = weakref.ref(node)
        with frozen_heap():  # e.g. `fvlab` main() called from a script that froze already
            pass
        del node
        gc.collect()
        assert alive() is None  # a second freeze would have kept it until the outer block ended

