"""The C++ CPU kernels (``csrc/sparse_cpu.cpp``): compiled at first use, cached, and chosen per call.

The source is compiled with ``torch.utils.cpp_extension.load`` into ``$ATPRUNE_CACHE_DIR/sparse-kernels/<hash>``
(default ``~/.cache/atprune``), where ``<hash>`` covers the source text, the compiler flags, the torch version and
the Python version, so an edit or an upgrade recompiles and an unchanged source loads in well under a second. The
file is compiled without ``-march``: every instruction-set path carries its own ``target`` attribute and the path
is picked at run time from the CPU's features (``cpu_kernels()``), so one build runs on every x86-64 CPU.

Kernel names: ``avx512`` (AVX-512 F/BW/VL/DQ + VBMI2 + BF16 + BITALG + VPOPCNTDQ: Intel Sapphire Rapids and later,
AMD Zen 4 and later), ``avx2`` (AVX2 + FMA), ``scalar`` (portable C++),
and ``torch`` (no C++: the weight is unpacked and multiplied with ``torch.nn.functional.linear``; what runs when
the extension cannot be built).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import threading
import warnings
from pathlib import Path

import torch

from atprune.errors import ConfigError

SOURCE = Path(__file__).with_name("csrc") / "sparse_cpu.cpp"
KERNELS = ("avx512", "avx2", "scalar", "torch")
KERNEL_IDS = {"scalar": 0, "avx2": 1, "avx512": 2}
_FLAGS = ["-O3", "-fopenmp", "-std=c++17"]

_lock = threading.Lock()
_module = None
_failure: str | None = None


class KernelUnavailable(RuntimeError):
    """The C++ extension could not be built or loaded (the message says why in one line)."""


def cache_dir() -> Path:
    """``$ATPRUNE_CACHE_DIR``, else ``$XDG_CACHE_HOME/atprune``, else ``~/.cache/atprune`` (as the model cache)."""
    if os.environ.get("ATPRUNE_CACHE_DIR"):
        return Path(os.environ["ATPRUNE_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "atprune"


def source_hash() -> str:
    """First 16 hex digits of sha256 over the source, the flags, torch's and Python's versions."""
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(" ".join(_FLAGS + [torch.__version__, sys.version, platform.machine()]).encode())
    return h.hexdigest()[:16]


def compiler() -> str:
    """The C++ compiler cpp_extension will call: ``$CXX``, else ``c++``."""
    return os.environ.get("CXX", "c++")


def _ninja_on_path() -> None:
    """cpp_extension runs ``ninja`` from PATH; the ``ninja`` package (a dependency) installs it beside the Python
    executable, which is not on PATH when a virtual environment's Python is run without activating it."""
    if shutil.which("ninja"):
        return
    try:
        import ninja

        where = getattr(ninja, "BIN_DIR", None)
    except ImportError:
        where = None
    for folder in (where, str(Path(sys.executable).parent)):
        if folder and (Path(folder) / "ninja").exists():
            os.environ["PATH"] = folder + os.pathsep + os.environ.get("PATH", "")
            return
    raise KernelUnavailable("ninja (needed by torch.utils.cpp_extension) was not found: pip install ninja")


def _build():
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise KernelUnavailable(f"the sparse CPU kernels are x86-64 only (this machine is {platform.machine()})")
    cxx = compiler()
    if shutil.which(cxx) is None:
        raise KernelUnavailable(f"no C++ compiler: {cxx!r} was not found (install g++, or set CXX to a compiler)")
    _ninja_on_path()
    from torch.utils import cpp_extension

    digest = source_hash()
    build = cache_dir() / "sparse-kernels" / digest
    try:
        build.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise KernelUnavailable(f"cannot create the kernel cache folder {build} ({err.strerror}); set "
                                "$ATPRUNE_CACHE_DIR to a writable folder") from None
    try:
        return cpp_extension.load(name=f"atprune_sparse_{digest}", sources=[str(SOURCE)], extra_cflags=_FLAGS,
                                  extra_ldflags=["-fopenmp"], build_directory=str(build), verbose=False)
    except Exception as err:  # noqa: BLE001 - any build failure becomes a one-line reason
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        # the compiler's own "error:" lines say why; torch's wrapper line ("Error building extension ...") does not
        errs = [ln for ln in lines if "error:" in ln.lower()] or [ln for ln in lines if "error" in ln.lower()]
        raise KernelUnavailable(f"compiling {SOURCE.name} with {cxx} failed: {(errs or lines or ['?'])[0]}") from None


def extension():
    """The compiled extension module (built on first call).

    Raises:
        KernelUnavailable: no compiler, not x86-64, or the build failed (cached: later calls fail at once).
    """
    global _module, _failure
    with _lock:
        if _module is None and _failure is None:
            try:
                _module = _build()
            except KernelUnavailable as err:
                _failure = str(err)
        if _module is None:
            raise KernelUnavailable(_failure)
        return _module


def cpu_kernels() -> list[str]:
    """The kernel names this machine can run, fastest first (``torch`` is always there)."""
    try:
        names = list(extension().cpu_kernels())
    except KernelUnavailable:
        names = []
    return [k for k in KERNELS if k in names] + ["torch"]


def skip_reason(kernel: str) -> str | None:
    """Why ``kernel`` cannot run here (None when it can): the CPU lacks its instruction set, or no build."""
    if kernel not in KERNELS:
        return f"unknown kernel {kernel!r}; one of {', '.join(('auto',) + KERNELS)}"
    if kernel == "torch":
        return None
    try:
        names = list(extension().cpu_kernels())
    except KernelUnavailable as err:
        return str(err)
    if kernel in names:
        return None
    need = {"avx512": "AVX-512 F/BW/VL/DQ with VBMI2, BF16, BITALG and VPOPCNTDQ", "avx2": "AVX2 and FMA"}[kernel]
    return f"kernel {kernel!r} needs {need}, which this CPU ({cpu_model()}) does not have"


def resolve_kernel(kernel: str = "auto") -> str:
    """``auto`` -> the fastest kernel this machine runs (``torch``, with a warning saying why, when the extension
    cannot be built); a named kernel is checked.

    Raises:
        ConfigError: an unknown name, or a named C++ kernel this CPU or build cannot run (one line: why).
    """
    if kernel == "auto":
        try:
            return [k for k in KERNELS if k in extension().cpu_kernels()][0]
        except KernelUnavailable as err:
            _warn_once(str(err))
            return "torch"
    reason = skip_reason(kernel)
    if reason:
        raise ConfigError(reason)
    return kernel


_warned: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"atprune sparse: using the portable torch path (unpack + dense matmul, no speed-up): {reason}",
                      RuntimeWarning, stacklevel=3)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def last_level_cache_bytes() -> int | None:
    """Size in bytes of the largest CPU cache sysfs lists for cpu0 (the L3 on most machines), or None."""
    best = None
    for idx in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (idx / "size").read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}.get(text[-1:], 1)
        try:
            size = int(text.rstrip("KMG")) * scale
        except ValueError:
            continue
        best = max(best or 0, size)
    return best
