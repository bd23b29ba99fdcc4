"""L2 clipping of a model update, the same function on the device and on the server.

Clipping bounds how far one device can move the global model (and is the first half of
DP-FedAvg, McMahan et al., 2018, https://arxiv.org/abs/1710.06963). The device clips before it
uploads; the server clips again, so a device that lies about having clipped gains nothing.
"""

from __future__ import annotations

import math

import numpy as np

Tensors = dict[str, np.ndarray]


def squared_norm(t: np.ndarray) -> float:
    """Σ t², accumulated in float64 by numpy's own loop on the float32 data in place.

    Not `np.dot` on a float64 copy: that is OpenBLAS, whose worker threads spin-wait after every
    call; in the server (16 request threads and the folder calling this ~40 times a second) that
    spinning cost 13 ms of CPU per accepted update. `einsum` needs no copy and no BLAS: ~0.5 ms
    for 1M parameters.
    """
    flat = np.ravel(t)  # a view of a contiguous array
    return float(np.einsum("i,i->", flat, flat, dtype=np.float64))


def global_norm(tensors: Tensors) -> float:
    """L2 norm of all tensors taken together, accumulated in float64."""
    return math.sqrt(sum(squared_norm(t) for t in tensors.values()))


def clip_by_global_norm(tensors: Tensors, clip_norm: float) -> tuple[Tensors, float]:
    """Scale all tensors by min(1, clip_norm / norm); return (clipped, norm before clipping).

    Raises:
        ValueError: clip_norm is not a positive finite number.
    """
    if not (clip_norm > 0 and math.isfinite(clip_norm)):
        raise ValueError(f"clip_norm must be positive and finite, got {clip_norm}")
    norm = global_norm(tensors)
    if norm <= clip_norm:
        return dict(tensors), norm
    scale = clip_norm / norm
    return {name: (t * scale).astype(t.dtype) for name, t in tensors.items()}, norm
