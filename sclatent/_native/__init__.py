"""Optional native kernels, compiled with the system C compiler on first use and loaded by ctypes.

Why C and not torch ops: the count likelihood is ~40 elementwise passes over a ``(B, G)`` matrix in
torch, each paying dispatch and a memory round trip, and torch evaluates ``lgamma``/``digamma``
without vectorisation. One C pass per row, with glibc's vectorised ``exp``/``log``, makes the
likelihood ~8x faster on CPU (``benchmarks/profile_step.py``). The count VAE's training step
(:mod:`sclatent.modules.fused_elbo`) also runs its BatchNorm-ReLU-dropout layers and Gaussian head
here, forward and backward, and its output layer's products as two single-threaded MKL calls side
by side (``gemm_pair.c``, with torch's own ``sgemm_``). Why not a torch C++ extension: compiling
against torch's headers takes a minute and needs ninja; these files compile in about a second
with plain ``cc``.

Everything here is optional, and one function decides whether it runs: :func:`kernels` answers
"native kernels for this device and dtype?" for every caller (the likelihood, the sparse layer,
dropout, the minibatch gather, the VAE's fused pass). Without a C compiler (or on a platform where
the build fails, or with ``SCLATENT_NATIVE=0``) it answers None and the torch implementations run
instead, with equal results to float32 rounding (tested). ``native_status()`` says which is in use
and why. (The VAE's fused training pass has a switch of its own, ``SCLATENT_FUSED=0``, read in
:func:`sclatent.modules.fused_elbo.applies`: it changes how gradients are computed, not which
kernels exist.)

The shared library is cached under ``$SCLATENT_CACHE_DIR`` (default ``~/.cache/sclatent``), keyed
by a hash of the source, the compiler flags and the CPU (it is built with ``-march=native``).
The OpenMP runtime it links is the one torch already loaded (same soname), so the kernel and
torch share one thread pool instead of competing for the cores.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_SOURCES = tuple(
    Path(__file__).with_name(name)
    for name in ("softmax_nb.c", "sparse_linear.c", "dropout.c", "csr_gather.c", "vae_layers.c", "gemm_pair.c")
)
_FLAGS_OPENMP = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-shared"]
_FLAGS_SERIAL = ["-O3", "-march=native", "-ffast-math", "-fPIC", "-shared"]

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_status: str | None = None


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            lines = [line for line in handle if line.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _cache_dir() -> Path:
    root = os.environ.get("SCLATENT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sclatent"
    )
    return Path(root) / "native"


def _build(compiler: str, flags: list[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename: concurrent processes never load a half-written file
    handle, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        subprocess.run(
            [compiler, *flags, *map(str, _SOURCES), "-o", partial, "-lm"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def _load() -> ctypes.CDLL:
    if sys.platform == "win32":
        raise OSError("native kernels are built on Linux and macOS only")
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise OSError("no C compiler found (set CC or install gcc)")
    source = b"\0".join(path.read_bytes() for path in _SOURCES)
    errors = []
    for flags in (_FLAGS_OPENMP, _FLAGS_SERIAL):
        key = hashlib.sha256(
            b"\0".join([source, " ".join([compiler, *flags]).encode(), _cpu_signature().encode()])
        ).hexdigest()[:16]
        target = _cache_dir() / f"kernels-{key}.so"
        try:
            if not target.exists():
                _build(compiler, flags, target)
            library = ctypes.CDLL(str(target))
        except (OSError, subprocess.SubprocessError) as error:
            stderr = getattr(error, "stderr", b"") or b""
            errors.append(f"{' '.join(flags)}: {error} {stderr.decode(errors='replace')[-300:]}")
            continue
        _declare(library)
        return library
    raise OSError("; ".join(errors))


def _declare(library: ctypes.CDLL) -> None:
    pointer, size, count = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    signatures = {
        "softmax_nb_log_likelihood": [size, size, pointer, size, pointer, size, pointer, pointer, pointer, size]
        + [pointer] * 10
        + [size, count],
        "sparse_linear_forward": [size, size] + [pointer] * 6 + [count],
        "sparse_linear_backward_weight": [size, size, size] + [pointer] * 5 + [count],
        "dropout_mask": [size, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_float, pointer, count],
        "csr_gather_rows": [size] + [pointer] * 10 + [count],
        "bn_relu_forward": [size, size, pointer, pointer, pointer, ctypes.c_float, ctypes.c_float] + [pointer] * 9,
        "bn_relu_backward": [size, size] + [pointer] * 8,
        "bn_held_relu_forward": [size, size] + [pointer] * 9,
        "bn_held_relu_backward": [size, size] + [pointer] * 8,
        "gaussian_head_forward": [size, size, pointer, pointer, ctypes.c_float, pointer, pointer, pointer],
        "gaussian_head_backward": [size, size] + [pointer] * 5 + [ctypes.c_float, pointer],
        "gemm_pair": [pointer] * 11,
    }
    for name, argtypes in signatures.items():
        function = getattr(library, name)
        function.restype = None
        function.argtypes = argtypes


def kernels(device: torch.device | str | None = "cpu", dtype: torch.dtype = torch.float32) -> ctypes.CDLL | None:
    """The native kernels for tensors of ``device`` and ``dtype``, or None: the one answer for every caller.

    The kernels are CPU float32 code: any other device or dtype gets None, and so does a machine
    where they cannot be built or ``SCLATENT_NATIVE=0`` (then the torch implementations run,
    equal to float32 rounding). Built on first call.
    """
    if device is None or torch.device(device).type != "cpu" or dtype != torch.float32:
        return None
    return library()


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first call; ``None`` when unavailable.

    Callers ask :func:`kernels` (which also checks the device and dtype) rather than this.
    """
    global _library, _status
    if _status is None:
        with _lock:
            if _status is None:
                if os.environ.get("SCLATENT_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
                    _status = "disabled by SCLATENT_NATIVE=0"
                else:
                    try:
                        _library = _load()
                        _status = f"native kernels loaded from {_library._name}"
                    except Exception as error:
                        _status = f"native kernels unavailable ({error}); using the torch implementation"
                        logger.info(_status)
    return _library


_blas: tuple[int, int] | bool | None = False  # False: not looked up yet


def blas_addresses() -> tuple[int, int] | None:
    """Addresses of ``sgemm_`` and ``MKL_Set_Num_Threads_Local`` in the MKL torch links, for
    ``gemm_pair``; None when torch's BLAS is not MKL or does not export them (then use torch's matmul).
    """
    global _blas
    if _blas is False:
        _blas = None
        try:
            if torch.backends.mkl.is_available() and library() is not None:
                lib_dir = Path(torch.__file__).parent / "lib"
                candidates = sorted(lib_dir.glob("libtorch_cpu.*"))
                if candidates:
                    torch_cpu = ctypes.CDLL(str(candidates[0]))
                    sgemm = ctypes.cast(torch_cpu.sgemm_, ctypes.c_void_p).value
                    set_threads = ctypes.cast(torch_cpu.MKL_Set_Num_Threads_Local, ctypes.c_void_p).value
                    if sgemm and set_threads:
                        _blas = (sgemm, set_threads)
        except (OSError, AttributeError) as error:
            logger.info("torch's MKL sgemm not reachable (%s); using torch's matmul", error)
    return _blas


def native_status() -> str:
    """One line: whether the native kernels are in use, and why not if they are not."""
    library()
    return _status or ""
