"""Make MLX use an optimized BLAS on Linux.

The Linux `mlx[cpu]` wheel bundles the netlib reference BLAS, whose float32
matrix products run at a few GFLOP/s. `libmlx.so` leaves `cblas_sgemm`,
`sgetrf_` and friends undefined, and the dynamic linker looks them up in the
global symbol scope before libmlx's own dependencies. So a system OpenBLAS
loaded with RTLD_GLOBAL *before* `mlx.core` is first imported takes their
place. `load_blas()` does that once at start-up; `setup_blas()` then checks which
library really provides `cblas_sgemm` instead of assuming it worked.

`MLXD_BLAS=off` keeps the bundled BLAS; `MLXD_BLAS=/path/to/lib.so` loads
that library instead of searching. Only float32 products go through BLAS:
float16/bfloat16 and quantized matmuls use MLX's own kernels either way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Optional

BUNDLED = "bundled reference BLAS"
ACCELERATE = "Accelerate"
INSTALL_HINT = "sudo apt-get install libopenblas0-pthread"

# pthread builds first: MLX calls BLAS from its own thread and wants the
# library to parallelize the product itself.
_FIXED_PATHS = (
    "/usr/lib64/libopenblasp.so.0",  # Fedora, pthread
    "/usr/lib64/libopenblas.so.0",  # Fedora, serial
    "/usr/lib64/libopenblaso.so.0",  # Fedora, OpenMP
    "/usr/lib/libopenblas.so.0",  # Arch, Alpine
)


@dataclass(frozen=True)
class BlasInfo:
    """Which BLAS MLX's CPU backend calls, and how we know."""

    library: str  # path of the library providing cblas_sgemm, BUNDLED or ACCELERATE
    interposed: bool  # a symbol lookup confirmed that `library` replaced the bundled BLAS
    gflops: Optional[float]  # measured float32 256x256 matmul on the CPU; None on macOS
    reason: str = ""  # why the bundled BLAS is still in effect, or what else went wrong


class _DlInfo(ctypes.Structure):
    """glibc's Dl_info, filled by dladdr()."""

    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def candidate_paths() -> list[str]:
    """System OpenBLAS builds in the order we prefer them (Debian/Ubuntu, Fedora, Arch)."""
    multiarch = f"/usr/lib/{platform.machine()}-linux-gnu"
    debian = [
        f"{multiarch}/openblas-pthread/libopenblas.so.0",
        f"{multiarch}/libopenblas.so.0",  # update-alternatives' choice
        f"{multiarch}/openblas-openmp/libopenblas.so.0",
        f"{multiarch}/openblas-serial/libopenblas.so.0",
    ]
    return debian + list(_FIXED_PATHS)


def find_openblas() -> Optional[str]:
    """The first system OpenBLAS present, or None."""
    for path in candidate_paths():
        if os.path.exists(path):
            return path
    return ctypes.util.find_library("openblas")


def sgemm_path(lib: ctypes.CDLL) -> Optional[str]:
    """Path of the library in which `lib`'s symbol lookup finds `cblas_sgemm`, or None."""
    try:
        address = ctypes.cast(lib.cblas_sgemm, ctypes.c_void_p).value
    except AttributeError:
        return None
    libc = ctypes.CDLL(None)
    dladdr = getattr(libc, "dladdr", None) or ctypes.CDLL("libdl.so.2").dladdr
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    info = _DlInfo()
    if not dladdr(address, ctypes.byref(info)) or not info.dli_fname:
        return None
    return os.fsdecode(info.dli_fname)


def sgemm_provider() -> Optional[str]:
    """The library that global symbol lookup resolves `cblas_sgemm` to, or None.

    libmlx.so is loaded with RTLD_LOCAL, so its bundled BLAS never appears in
    the global scope: a hit here is exactly a library that takes precedence
    over the bundled one (loaded RTLD_GLOBAL or via LD_PRELOAD).
    """
    return sgemm_path(ctypes.CDLL(None))


def measure_gflops(n: int = 256, repeats: int = 3) -> float:
    """GFLOP/s of a float32 n x n matmul on MLX's CPU stream (~35 ms on the reference BLAS)."""
    import mlx.core as mx

    with mx.stream(mx.cpu):
        a = mx.random.normal((n, n))
        b = mx.random.normal((n, n))
        mx.eval(a @ b)  # warm-up: thread pools, page faults
        start = time.perf_counter()
        for _ in range(repeats):
            mx.eval(a @ b)
        elapsed = time.perf_counter() - start
    return 2 * n**3 * repeats / elapsed / 1e9


def _load(choice: Optional[str]) -> tuple[Optional[ctypes.CDLL], str]:
    """Load the chosen or found library globally; return it, or None and why not."""
    if choice and choice.lower() == "off":
        return None, "disabled by MLXD_BLAS=off"
    path = choice or find_openblas()
    if path is None:
        return None, "no system OpenBLAS found"
    try:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as e:
        return None, f"could not load {path}: {e}"
    if sgemm_path(lib) is None:
        return None, f"{path} does not export cblas_sgemm (prefixed symbols?)"
    return lib, ""


@functools.cache
def load_blas() -> tuple[Optional[ctypes.CDLL], str]:
    """Load an optimized BLAS before MLX binds its own; call before importing mlx.core.

    Cheap (no MLX import), so the CLI calls it first for every command. Cached:
    a second load would change nothing. Returns the library loaded, if any, and
    why none was.
    """
    if sys.platform == "darwin":
        return None, ""
    if "mlx.core" in sys.modules:
        return None, "mlx.core was imported before setup_blas(); too late to switch"
    return _load(os.environ.get("MLXD_BLAS"))


@functools.cache
def setup_blas() -> BlasInfo:
    """`load_blas()`, then which BLAS is really in effect and how fast it is
    (this imports MLX and times a small product: for logs, doctor and benchmarks)."""
    if sys.platform == "darwin":
        return BlasInfo(ACCELERATE, interposed=False, gflops=None)
    lib, reason = load_blas()
    provider = sgemm_provider()
    gflops = measure_gflops()
    if provider is None:
        return BlasInfo(BUNDLED, interposed=False, gflops=gflops, reason=reason)
    loaded = sgemm_path(lib) if lib is not None else None
    if loaded is not None and loaded != provider:
        reason = f"loaded earlier (e.g. LD_PRELOAD), it takes precedence over {loaded}"
    return BlasInfo(provider, interposed=True, gflops=gflops, reason=reason)


def describe(info: BlasInfo) -> str:
    """One start-up log line: the BLAS in effect, and how to get a faster one if needed."""
    speed = f", {info.gflops:.1f} GFLOP/s float32 256x256" if info.gflops else ""
    if info.library == ACCELERATE:
        return "BLAS: Accelerate (macOS; MLX runs on Metal)"
    if info.interposed:
        note = f"; {info.reason}" if info.reason else ""
        return f"BLAS: {info.library}{speed}{note}"
    return (
        f"BLAS: {BUNDLED} ({info.reason}){speed}. float32 matrix products run 10-30x"
        f" slower than with OpenBLAS: `{INSTALL_HINT}` on Debian/Ubuntu, or your"
        " distribution's openblas package"
    )
