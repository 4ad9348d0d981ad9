"""Checking a device name (`--device`, a node's device setting) before anything is loaded."""

from __future__ import annotations

import re

from .errors import DeviceError

CHOICES = "auto, cpu, cuda, cuda:N or mps"
_CUDA = re.compile(r"^cuda(?::(\d+))?$")


def torch_build() -> str:
    """'torch 2.4.0+cu121 built for CUDA 12.1' / '… built for ROCm 6.0' / '… a CPU-only build'."""
    import torch

    version = getattr(torch, "__version__", "?")
    cuda = getattr(torch.version, "cuda", None)
    hip = getattr(torch.version, "hip", None)
    if cuda:
        return f"torch {version} built for CUDA {cuda}"
    if hip:
        return f"torch {version} built for ROCm {hip}"
    return f"torch {version}, a CPU-only build"


def _mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def check_device(name, what: str = "--device") -> str:
    """A usable torch device string for `name` ('auto', 'cpu', 'cuda', 'cuda:N', 'mps'), or a DeviceError.

    'auto' becomes 'cuda' when torch sees a CUDA (or ROCm) GPU and 'cpu' otherwise (MPS is never picked by
    'auto': ask for it by name). Names are case- and space-insensitive; 'cuda' stays 'cuda' (the current GPU).
    """
    import torch

    raw = "" if name is None else str(name)
    key = raw.strip().lower()
    if key in ("", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if key == "cpu":
        return "cpu"
    match = _CUDA.match(key)
    if match:
        if not torch.cuda.is_available():
            build = torch_build()
            if getattr(torch.version, "cuda", None) or getattr(torch.version, "hip", None):
                fix = ("use --device cpu, or check the GPU driver (nvidia-smi) and that CUDA_VISIBLE_DEVICES "
                       "does not hide the GPU")
            else:
                fix = "use --device cpu or install a CUDA build of torch: see README Install"
            raise DeviceError(f"{what} {raw.strip()}: no CUDA GPU is visible to torch ({build}); {fix}.")
        if match.group(1) is not None:
            index, count = int(match.group(1)), torch.cuda.device_count()
            if index >= count:
                visible = "cuda:0" if count == 1 else f"cuda:0 … cuda:{count - 1}"
                raise DeviceError(
                    f"{what} {raw.strip()}: torch sees {count} CUDA GPU{'s' if count != 1 else ''} ({visible}). "
                    f"Use one of those, or --device cuda for the first."
                )
            return f"cuda:{index}"
        return "cuda"
    if key == "mps" or key.startswith("mps:"):
        if not _mps_available():
            raise DeviceError(
                f"{what} {raw.strip()}: MPS (Apple-silicon GPU) is not available to torch ({torch_build()}); it needs "
                "a Mac with Apple silicon, macOS 12.3+ and an arm64 build of torch. Use --device cpu."
            )
        return "mps"
    raise DeviceError(f"{what} {raw.strip()!r} is not a device name. Choose {CHOICES} (e.g. cuda:1 for the second GPU).")
