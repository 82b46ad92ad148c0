"""Same inputs, same numbers: thread-count-independent matrix products and content hashes of tensors.

On CPU, a float32 result can depend on how many threads computed it: MKL splits some matrix products
along the summed dimension, and torch splits long reductions. kscope sets ``MKL_CBWR=AUTO,STRICT``
(MKL's strict conditional numerical reproducibility) when the package is imported, before torch loads
MKL, and reduces nothing whose order depends on threads where the result is kept (hashes read bytes).
A process that loaded torch first runs without it; ``numerics_info`` says so, and results record it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
from contextlib import contextmanager
from typing import Iterator, Mapping

import torch

_STRICT = 0x10000  # MKL_CBWR_STRICT


def mkl_strict() -> bool | None:
    """Whether MKL runs in strict reproducible mode (None: no MKL to ask, e.g. a build without it)."""
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        get = lib.mkl_serv_cbwr_get
    except (OSError, AttributeError):
        return None
    get.restype, get.argtypes = ctypes.c_int, [ctypes.c_int]
    return bool(get(-1) & _STRICT)  # MKL_CBWR_ALL


def numerics_info(device: str = "cpu") -> dict:
    """What decides whether a rerun on another machine gives the same digits (recorded beside results)."""
    return {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(), "mkl_strict": mkl_strict(),
            "reproducible_across_threads": str(device).startswith("cpu") and mkl_strict() is not False}


def tensor_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (16 hex digits) of named tensors' names, shapes, dtypes and bytes: exact, and independent of threads."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def unsound_tensor(tensors: Mapping[str, torch.Tensor]) -> tuple[str, str] | None:
    """``(name, what is wrong)`` of the first tensor that is not floating point or holds NaN or infinity (in the mapping's
    order), or None: weights are checked at load, so a broken file is refused instead of scoring every unit as NaN."""
    for name, t in tensors.items():
        if not t.is_floating_point():
            return name, f"tensor {name} is {t.dtype}, not floating point"
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            return name, f"tensor {name} holds {bad} of {t.numel()} values that are NaN or infinite"
    return None


@contextmanager
def fixed_threads(n: int) -> Iterator[None]:
    """Inside, torch runs on ``n`` intra-op threads whatever the process uses: torch's own long reductions (gradient
    norms, loss sums, statistics) split their work by thread count, and their last digits follow."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
