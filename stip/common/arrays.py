"""numpy first, torch where the caller brought it: the shared helpers that let the client's maths run on numpy alone
(the light client, `pip install stip[client]`) while callers holding torch tensors (the server, the enclave, tests)
keep getting torch tensors back.

Nothing here imports torch. A torch tensor is recognised by its type's module, and turned back into one with the
torch module it came from (`sys.modules`), which is loaded whenever such a tensor exists.
"""

from __future__ import annotations

import sys

import numpy as np


def is_torch(x) -> bool:
    """Whether `x` is a torch tensor (without importing torch)."""
    return type(x).__module__.startswith("torch")


def to_numpy(x, dtype=None) -> np.ndarray:
    """`x` (a numpy array, a list, a scalar, or a torch tensor on any device) as a numpy array; bfloat16 tensors
    become float32 (numpy has no bfloat16)."""
    if is_torch(x):
        x = x.detach()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.cpu().numpy()
    return np.asarray(x, dtype=dtype)


def like(a: np.ndarray, ref):
    """`a` as a torch tensor if `ref` is one (same device), else `a` itself."""
    if not is_torch(ref):
        return a
    out = sys.modules["torch"].from_numpy(np.ascontiguousarray(a))
    return out if ref.device.type == "cpu" else out.to(ref.device)


def bf16_to_float32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 values stored as uint16 -> float32 (exact: bfloat16 is float32's upper half)."""
    return (raw.astype(np.uint32) << np.uint32(16)).view(np.float32)


def float32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits as uint16, rounded to nearest even as torch's `.to(torch.bfloat16)` does (NaN stays
    NaN)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)
    return rounded
