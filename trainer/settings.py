"""Allowed ranges of the trainer's numeric settings, and what a resumed run may change.

One table per command serves both the command line (argparse `type=` functions, so a bad value is
refused before anything is loaded) and the Python API (`check_value`, used by the config dataclasses'
validation), so the two can never disagree.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    kind: type = float  # int or float
    lo: float | None = None
    lo_open: bool = False  # True: lo itself is not allowed
    hi: float | None = None
    hi_open: bool = False
    optional: bool = False  # None / 'none' allowed

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        if self.lo is not None and self.hi is not None:
            rng = f"{what} in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            rng = f"{what} {'>' if self.lo_open else '>='} {_num(self.lo)}"
        elif self.hi is not None:
            rng = f"{what} {'<' if self.hi_open else '<='} {_num(self.hi)}"
        else:
            rng = what
        return rng + (" or 'none'" if self.optional else "")

    def ok(self, v) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        if self.kind is int and not isinstance(v, int):
            return False
        if isinstance(v, float) and not math.isfinite(v):
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        if self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi):
            return False
        return True

    def __call__(self, text):
        """argparse type function: text → value, or ArgumentTypeError saying the allowed range."""
        s = str(text).strip()
        if self.optional and s.lower() in ("none", "null", ""):
            return None
        try:
            v = int(s) if self.kind is int else float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}") from None
        if not self.ok(v):
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}")
        return v

    @property
    def __name__(self):  # argparse names the type in some messages
        return self.describe()


def _num(x) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


def check_value(name: str, value, rule: Rule) -> str | None:
    """None if `value` is allowed, else a message naming the option and its allowed range."""
    if value is None and rule.optional:
        return None
    if rule.ok(value):
        return None
    return f"--{name.replace('_', '-')} must be {rule.describe()}, got {value!r}"


INT_POS = Rule(int, lo=1)
INT_NONNEG = Rule(int, lo=0)
FRACTION = Rule(float, lo=0, hi=1)  # [0, 1]
SEED = Rule(int, lo=0, hi=2**32 - 1)

TRAIN_RULES: dict[str, Rule] = {
    "val_fraction": Rule(float, lo=0, hi=1, hi_open=True),
    "max_steps": INT_POS,
    "batch_size": INT_POS,
    "grad_accum": INT_POS,
    "lr": Rule(float, lo=0, lo_open=True),
    "min_lr_ratio": FRACTION,
    "warmup_steps": INT_NONNEG,
    "weight_decay": Rule(float, lo=0),
    "adam_beta1": Rule(float, lo=0, hi=1, hi_open=True),
    "adam_beta2": Rule(float, lo=0, hi=1, hi_open=True),
    "adam_eps": Rule(float, lo=0, lo_open=True),
    "max_grad_norm": Rule(float, lo=0),
    "lam": Rule(float, lo=0),
    "temperature": Rule(float, lo=0, lo_open=True),
    "edge_drop": FRACTION,
    "seed": SEED,
    "log_every": INT_POS,
    "eval_every": INT_POS,
    "eval_batch_size": INT_POS,
    "eval_max_batches": Rule(int, lo=1, optional=True),
    "save_every": INT_POS,
    "keep_last": INT_NONNEG,
    "shuffle_shards": INT_POS,
    "prefetch": INT_NONNEG,
}

EVAL_RULES: dict[str, Rule] = {k: TRAIN_RULES[k] for k in ("val_fraction", "eval_batch_size", "lam", "temperature", "seed")}
EVAL_RULES["eval_max_batches"] = Rule(int, lo=1, optional=True)

EXTRACT_RULES: dict[str, Rule] = {
    "shard_size": INT_POS,
    "batch_size": INT_POS,
    "canny_low": Rule(float, lo=0),
    "canny_high": Rule(float, lo=0),
    "limit": Rule(int, lo=1, optional=True),
}

FILTER_RULES: dict[str, Rule] = {
    "min_box_area": FRACTION,
    "max_box_area": FRACTION,
    "min_mask_fill": FRACTION,
    "max_subjects": INT_NONNEG,
    "min_subjects": INT_NONNEG,
}

FINETUNE_RULES: dict[str, Rule] = {
    "steps": INT_POS,
    "rank": INT_POS,
    "alpha": Rule(float, lo=0, lo_open=True, optional=True),
    "lr": Rule(float, lo=0, lo_open=True, optional=True),
    "batch_size": INT_POS,
    "resolution": Rule(int, lo=64),  # and a multiple of 64 (FinetuneConfig.check)
    "seed": SEED,
    "save_every": INT_POS,
    "uncond_prob": Rule(float, lo=0, hi=1, hi_open=True),
    "weight_decay": Rule(float, lo=0),
    "max_grad_norm": Rule(float, lo=0),
    "sample_every": INT_NONNEG,
    "sample_steps": Rule(int, lo=1, hi=1000),
}

RULES = {"train": TRAIN_RULES, "eval": EVAL_RULES, "extract": {**EXTRACT_RULES, **FILTER_RULES}, "export": {},
         "finetune-decoder": FINETUNE_RULES}

# Minimum number of retrieval candidates for a top-1/top-5 figure to mean something (chance = 1/candidates).
MIN_RETRIEVAL_CANDIDATES = 32


# -- what a resumed run may change ----------------------------------------------------------------------

#: Never taken from the checkpoint: where and how this invocation runs.
NOT_INHERITED = frozenset({"out", "resume", "force", "crash_at_step"})
#: The run's identity: a different value is refused even with --force (start a new run instead).
LOCKED = ("data", "val_data", "val_fraction", "model", "init_from")
#: Do not touch the training math: a different value is used, and logged.
FREE = ("cpu", "log_every", "eval_every", "eval_batch_size", "eval_max_batches", "save_every", "keep_last",
        "prefetch", "verify_shards", "tensorboard")
# Every other setting is a hyperparameter: a different value is refused unless --force.


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def fmt_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    return repr(v) if isinstance(v, float) else str(v)


@dataclass
class Change:
    name: str
    checkpoint: object
    given: object

    def __str__(self) -> str:
        return f"{flag(self.name)}: checkpoint {fmt_value(self.checkpoint)}, given {fmt_value(self.given)}"

    def to_json(self) -> dict:
        return {"checkpoint": self.checkpoint, "given": self.given}


def same_path(a, b) -> bool:
    if not a or not b:
        return (a or None) == (b or None)
    return os.path.realpath(str(a)) == os.path.realpath(str(b))
