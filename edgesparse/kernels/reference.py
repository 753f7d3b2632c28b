"""Numpy meaning of the fused activations shared by all edgesparse operators."""

from __future__ import annotations

import math

import numpy as np

ACTIVATIONS = ("none", "relu", "gelu", "silu", "relu6")

_erf = np.vectorize(math.erf, otypes=[np.float64])


def apply_activation(y: np.ndarray, activation: str) -> np.ndarray:
    """Applies an activation by name in float64, returns float32."""
    z = np.asarray(y, dtype=np.float64)
    if activation == "none":
        out = z
    elif activation == "relu":
        out = np.maximum(z, 0.0)
    elif activation == "relu6":
        out = np.clip(z, 0.0, 6.0)
    elif activation == "gelu":  # exact (erf) form, as torch.nn.GELU() by default
        out = 0.5 * z * (1.0 + _erf(z / math.sqrt(2.0)))
    elif activation == "silu":
        out = z / (1.0 + np.exp(-np.clip(z, -80.0, 80.0)))
    else:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    return out.astype(np.float32)


def check_activation(activation: str, allowed: tuple[str, ...]) -> None:
    if activation not in allowed:
        raise ValueError(f"activation must be one of {allowed}, got {activation!r}")
