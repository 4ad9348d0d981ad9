"""The one seed rule of the pack: image i of a batch uses (seed + i) mod 2**64.

So any image of a batch can be made again alone, with seed + i, in the command line, the library
and the nodes alike. Seeds are whole numbers 0 … 2**64 − 1 (ComfyUI's seed widget range).

torch note: `torch.Generator.manual_seed` takes any int in [−2**63, 2**64) and stores it mod 2**64,
so a seed in 0 … 2**64 − 1 is passed unchanged (`torch_seed` is the identity there: one-to-one).
The CPU generator (mt19937) then uses only the low 32 bits of the seed: on the CPU, seeds that differ
by a multiple of 2**32 draw the same noise (ComfyUI's own samplers behave the same way).
"""

from __future__ import annotations

import operator
from typing import Iterable

from .errors import InputError

SEED_MIN = 0
SEED_MAX = 2**64 - 1
_MODULUS = 2**64
_RANGE = f"{SEED_MIN} … {SEED_MAX} (2**64 − 1)"


def check_seed(value, what: str = "seed") -> int:
    """`value` as an int in 0 … 2**64 − 1, or an InputError saying the range. bool and floats are refused."""
    if isinstance(value, bool):
        raise InputError(f"{what} must be a whole number in {_RANGE}; got {value!r} (a bool). Give a number such as 0.")
    try:
        seed = operator.index(value)  # int, numpy integers, one-element integer tensors; not floats or strings
    except TypeError:
        raise InputError(
            f"{what} must be a whole number in {_RANGE}; got {value!r} ({type(value).__name__}). "
            "Give a whole number such as 0 or 42."
        ) from None
    if seed < SEED_MIN or seed > SEED_MAX:
        raise InputError(
            f"{what} {seed} is out of range: seeds go from {_RANGE}. "
            + ("Use a seed ≥ 0." if seed < 0 else f"Use a smaller seed (e.g. {seed % _MODULUS}, the same value mod 2**64).")
        )
    return int(seed)


def seed_for(seed, i: int) -> int:
    """The seed of image i of a batch that starts at `seed`: (seed + i) mod 2**64."""
    return (check_seed(seed) + int(i)) % _MODULUS


def seed_list(seed_or_list, batch: int, what: str = "seed") -> list[int]:
    """One seed per image: a start seed gives seed, seed+1, … (mod 2**64); a list must have `batch` entries."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise InputError(f"The batch size must be a whole number ≥ 1; got {batch!r}.")
    if _is_sequence(seed_or_list):
        seeds = list(seed_or_list)
        if len(seeds) != batch:
            raise InputError(
                f"Got {len(seeds)} seeds for a batch of {batch} images: give one seed per image, or a single start "
                f"seed (image i then uses seed + i)."
            )
        return [check_seed(s, f"{what} {k + 1} of {len(seeds)}") for k, s in enumerate(seeds)]
    start = check_seed(seed_or_list, what)
    return [(start + i) % _MODULUS for i in range(batch)]


def torch_seed(seed) -> int:
    """What `torch.Generator.manual_seed` gets for a seed: the seed itself (0 … 2**64 − 1 is inside its range)."""
    return check_seed(seed)


def generator(seed, device="cpu"):
    """A `torch.Generator` on `device` seeded with `seed` (checked)."""
    import torch

    return torch.Generator(device).manual_seed(torch_seed(seed))


def _is_sequence(value) -> bool:
    if isinstance(value, (str, bytes)):
        return False
    if hasattr(value, "ndim"):  # numpy arrays / tensors: a 0-d one is a single seed
        return value.ndim > 0
    return isinstance(value, Iterable)
