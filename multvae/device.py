"""Resolve the ``auto|cpu|cuda[:N]`` device setting shared by training and the service."""

from __future__ import annotations

import re

import torch

from multvae.errors import DeviceError

_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def resolve_device(spec: str) -> torch.device:
    """``auto`` picks the first GPU when one exists, else the CPU; ``cuda`` without one fails."""
    spec = spec.strip().lower()
    if not _PATTERN.match(spec):
        raise DeviceError(f"device {spec!r} is not one of: auto, cpu, cuda, cuda:N")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"device {spec!r} was requested but torch sees no CUDA GPU "
            f"(torch {torch.__version__}); use 'cpu' or 'auto'"
        )
    device = torch.device(spec)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(
            f"device {spec!r} does not exist: {torch.cuda.device_count()} GPU(s) visible"
        )
    return device
