"""Huge pages for XLA:CPU's buffers, opt-in: with `R1JAX_HUGE_PAGES=1` the CLIs (`python -m r1jax.train`,
`python -m r1jax.evaluate`) re-execute themselves with glibc's hugetlb tunable.

XLA:CPU allocates an executable's temporary buffers afresh on every call. glibc serves blocks that
large with `mmap` and unmaps them when they are freed, so the kernel faults in and zeroes every
4 KiB page again at the next call: for the bench model's GRPO update (bench/grpo_step.py) 263 MB per
device, ≈ 130 k page faults and ≈ 15 % of the update's CPU time. With
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc ≥ 2.35) malloc asks the kernel for transparent huge
pages on those blocks (`madvise`), 2 MiB per fault: 8–15 k faults and 9–19 % less CPU time per
update; the README demo's CPU time drops 9–13 % (bench/RESULTS.md, "GRPO step"). glibc reads its
tunables once, when the process starts, hence the re-exec.

Opt-in, because on the development VM (a Firecracker guest) the runs with huge pages saw more host
steal time (mean 12 % against 5 % over 8 alternating pairs), which ate the gain in wall time: freed
2 MiB pages are likely handed back to the host and faulted in there again. Not measured elsewhere.

Left alone even when asked: a GLIBC_TUNABLES that already sets `glibc.malloc.hugetlb` (the user's
choice stands), hosts where JAX will not run on the CPU (JAX_PLATFORMS not starting with `cpu`,
or, with it unset, a TPU or GPU device node present: the gain was measured on CPU only), other C libraries
(and so other systems than Linux) or glibc < 2.35, and kernels with transparent huge pages off.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb"
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the running glibc; None for another C library."""
    try:
        name, _, version = (os.confstr("CS_GNU_LIBC_VERSION") or "").partition(" ")
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (ValueError, OSError):
        return None


def transparent_huge_pages_mode(path: str = _THP_SETTING) -> str | None:
    """The kernel's THP mode ("always", "madvise" or "never"); None where it cannot be read."""
    try:
        with open(path) as f:
            setting = f.read()
    except OSError:
        return None
    start, end = setting.find("["), setting.find("]")
    return setting[start + 1 : end] if 0 <= start < end else None


def accelerator_present() -> bool:
    """Whether the host has a TPU (/dev/accel*, /dev/vfio/N) or an NVIDIA / AMD GPU device node."""
    return any(glob.glob(pattern) for pattern in ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd"))


def huge_pages_environment(environ: Mapping[str, str], glibc: tuple[int, int] | None, thp_mode: str | None,
                           accelerator: bool) -> dict[str, str] | None:
    """The environment to re-execute with (GLIBC_TUNABLES gains the hugetlb tunable), or None to
    leave the process as it is (module docstring: when)."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    platforms = environ.get("JAX_PLATFORMS", "")
    on_cpu = platforms.split(",")[0].strip() == "cpu" if platforms else not accelerator  # the first one JAX takes
    if (environ.get("R1JAX_HUGE_PAGES") != "1" or TUNABLE in tunables or not on_cpu
            or glibc is None or glibc < (2, 35)
            or thp_mode not in ("always", "madvise")):
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, (tunables, f"{TUNABLE}=1")))}


def reexec_with_huge_pages() -> None:
    """Replace this process by the same command line with the hugetlb tunable set, where it applies.

    Call it first thing in a program's entry point: everything done before it is done twice.
    The re-executed process sees the tunable set and carries on from there.
    """
    env = huge_pages_environment(os.environ, glibc_version(), transparent_huge_pages_mode(), accelerator_present())
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError as e:  # e.g. no executable path (embedded interpreters): run on without huge pages
        print(f"[r1jax] could not re-execute with {TUNABLE}=1 ({e}); running without huge pages", file=sys.stderr)
