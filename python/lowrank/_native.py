"""Loads the native modules and holds what every op needs to call them.

``lowrank._C`` (CPU kernels) is always built; ``lowrank._cuda`` only where a
CUDA compiler was found at build time. Both take raw pointers, sizes and (for
CUDA) a stream, so torch enters only here in Python. ``lowrank.info()`` reports
what was built and what can run now.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Callable

import torch

# Must match cpp/include/lowrank/common.h (enum class DType).
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
CPU_NATIVE_DTYPES = (torch.float32, torch.float64)
CUDA_NATIVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Tests set this so outputs start as NaN: an element a kernel forgot to write
# then fails the comparison instead of passing by luck.
POISON_OUTPUTS = False


def _load(name: str) -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module(f"lowrank.{name}"), None
    except ImportError as error:
        return None, str(error)


_C, _C_ERROR = _load("_C")
_cuda, _CUDA_ERROR = _load("_cuda")


def cpu_module() -> ModuleType:
    if _C is None:
        raise ImportError(f"lowrank._C is not built or failed to load: {_C_ERROR}")
    return _C


def cuda_usable() -> bool:
    """True when the CUDA module is built and torch sees a GPU."""
    return _cuda is not None and torch.cuda.is_available()


def native_for(t: torch.Tensor) -> ModuleType | None:
    """The native module that runs ops for this tensor's device and dtype, or None."""
    if t.device.type == "cpu":
        return _C if t.dtype in CPU_NATIVE_DTYPES else None
    if t.device.type == "cuda":
        return _cuda if t.dtype in CUDA_NATIVE_DTYPES else None
    return None


def new_output(shape: Any, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Allocates an op output (NaN-filled while tests poison outputs)."""
    # Tensor.new_empty parses its arguments faster than torch.empty(..., dtype=, device=).
    out = like.new_empty(shape) if dtype is None else like.new_empty(shape, dtype=dtype)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


def cuda_stream(t: torch.Tensor) -> int:
    """Handle of torch's current stream on t's device: kernels always run there."""
    return torch.cuda.current_stream(t.device).cuda_stream


def upcast_on_cpu(t: torch.Tensor) -> bool:
    """float16/bfloat16 on the CPU run the float32 kernels (docs/architecture.md)."""
    return t.is_cpu and t.dtype not in CPU_NATIVE_DTYPES


def launch_args(t: torch.Tensor) -> tuple:
    """Trailing arguments of every native call: the CPU thread count, or the CUDA device
    and torch's current stream on it."""
    if t.is_cpu:
        return (torch.get_num_threads(),)
    return (t.device.index, cuda_stream(t))


def unavailable(t: torch.Tensor, smem_bytes: Callable[[], int] | None = None) -> str | None:
    """Why no native kernel can run on t's device and dtype, or None when one can.

    ``smem_bytes``, a callable, gives a CUDA kernel's shared-memory need; above the
    device's limit the kernel cannot run. CPU kernels take every floating dtype
    (float16/bfloat16 are computed in float32).
    """
    if t.is_cpu:
        return None if _C is not None else "the CPU module is not built"
    if t.device.type != "cuda":
        return f"no native kernels for {t.device.type} tensors"
    if _cuda is None:
        return "the CUDA module is not built"
    if t.dtype not in CUDA_NATIVE_DTYPES:
        return f"no CUDA kernel for {t.dtype}"
    if smem_bytes is not None:
        limit = torch.cuda.get_device_properties(t.device).shared_memory_per_block_optin
        need = smem_bytes()
        if need > limit:
            return f"the kernel needs {need} bytes of shared memory, the GPU has {limit}"
    return None


def tensor_cores_unavailable(t: torch.Tensor, smem_bytes: Callable[[], int]) -> str | None:
    """Why a tensor-core kernel cannot run on t (a CUDA float16/bfloat16 tensor), or None:
    the module, compute capability 8.0 or newer with device code built for it (a module built
    for older GPUs only, e.g. ``LOWRANK_CUDA_ARCHS=75``, leaves these kernels out), and
    ``smem_bytes()`` of shared memory."""
    why = unavailable(t)
    if why is not None:
        return why
    device = t.device.index if t.device.index is not None else torch.cuda.current_device()
    if not _cuda.tensor_cores(device):
        return ("tensor-core kernels need compute capability 8.0 or newer and a build for it "
                "(LOWRANK_CUDA_ARCHS)")  # fmt: skip
    return unavailable(t, smem_bytes)


def module(t: torch.Tensor) -> ModuleType:
    """The native module for t's device (the caller has checked :func:`unavailable`)."""
    return _C if t.is_cpu else _cuda


def info() -> dict[str, Any]:
    """What lowrank was built with and what can run on this machine now."""
    from lowrank import __version__

    report: dict[str, Any] = {
        "version": __version__,
        "torch": torch.__version__,
        "cpu_module": _C is not None,
        "cpu_isa": _C.isa() if _C is not None else None,
        "openmp": bool(getattr(_C, "openmp", False)),
        "cuda_module": _cuda is not None,
        "cuda_version": getattr(_cuda, "cuda_version", None),
        "cuda_architectures": getattr(_cuda, "architectures", None),
        "gpu_usable": cuda_usable(),
        "gpu": torch.cuda.get_device_name() if cuda_usable() else None,
    }
    if _C is None:
        report["cpu_module_error"] = _C_ERROR
    if _cuda is None:
        report["cuda_module_error"] = _CUDA_ERROR
    return report
