"""Two runs side by side: means, differences (B − A) and a bootstrap 95% interval of each difference.

Rows are paired by (subject, prompt, seed) — for Multibench (subjects, prompt, seed) — when the runs share them
(a paired bootstrap over the shared images); otherwise each run is resampled on its own (an unpaired bootstrap of
the difference of means). Multibench runs get one table per subject count, as the paper's Table 4 reports them.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .common import DatasetError, benchmark_of, means, read_scores
from .metrics import LABELS, METRICS


MAX_SAMPLES = 100_000


def check_samples(samples, seed=0) -> None:
    """--samples and --seed, checked before any file is read."""
    from ..core.errors import InputError
    from ..core.seeds import check_seed

    if isinstance(samples, bool) or not isinstance(samples, int) or not 1 <= samples <= MAX_SAMPLES:
        raise InputError(f"--samples must be a whole number from 1 to {MAX_SAMPLES:,} (bootstrap resamples; 2000 is "
                         f"plenty for a 95% interval); got {samples!r}.")
    check_seed(seed, "--seed")


def _key(row: dict) -> tuple:
    return row.get("subjects", row.get("subject")), row["prompt"], int(row["seed"])


def bootstrap_difference(a: Sequence[float], b: Sequence[float], paired: bool, samples: int = 2000,
                         seed: int = 0) -> tuple[float, float, float]:
    """(mean(b) − mean(a), low, high) with a percentile bootstrap 95% interval."""
    check_samples(samples, seed)
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    rng = np.random.default_rng(seed)
    if paired:
        diff = b - a
        idx = rng.integers(0, len(diff), size=(samples, len(diff)))
        boots = diff[idx].mean(axis=1)
        point = float(diff.mean())
    else:
        boots = (b[rng.integers(0, len(b), size=(samples, len(b)))].mean(axis=1)
                 - a[rng.integers(0, len(a), size=(samples, len(a)))].mean(axis=1))
        point = float(b.mean() - a.mean())
    low, high = np.percentile(boots, [2.5, 97.5])
    return point, float(low), float(high)


def compare_rows(rows_a: Sequence[dict], rows_b: Sequence[dict], samples: int = 2000, seed: int = 0) -> dict:
    if not rows_a or not rows_b:
        raise DatasetError(f"Nothing to compare: run {'A' if not rows_a else 'B'} has no scored images.")
    by_a = {_key(r): r for r in rows_a}
    by_b = {_key(r): r for r in rows_b}
    shared = sorted(set(by_a) & set(by_b))
    paired = bool(shared)
    out = {"paired": paired, "shared": len(shared), "n_a": len(rows_a), "n_b": len(rows_b), "metrics": {}}
    mean_a, mean_b = means(rows_a), means(rows_b)
    for k in METRICS:
        if paired:
            a, b = [by_a[key][k] for key in shared], [by_b[key][k] for key in shared]
        else:
            a, b = [r[k] for r in rows_a], [r[k] for r in rows_b]
        diff, low, high = bootstrap_difference(a, b, paired, samples, seed)
        out["metrics"][k] = {"a": mean_a[k], "b": mean_b[k], "diff": diff, "low": low, "high": high}
    return out


def compare_markdown(result: dict, name_a: str = "A", name_b: str = "B") -> str:
    how = (f"paired over the {result['shared']} images both runs share (subject(s), prompt, seed)"
           if result["paired"] else "unpaired (the runs share no subject(s)/prompt/seed)")
    lines = [f"| metric | {name_a} | {name_b} | {name_b} − {name_a} | 95% interval |", "|---|---:|---:|---:|---:|"]
    for k, m in result["metrics"].items():
        lines.append(f"| {LABELS[k]} | {m['a']:.4f} | {m['b']:.4f} | {m['diff']:+.4f} | [{m['low']:+.4f}, {m['high']:+.4f}] |")
    lines += ["", f"{name_a}: {result['n_a']} images; {name_b}: {result['n_b']} images. "
              f"Differences and intervals are {how}; bootstrap percentile interval. "
              "The A and B columns are each run's mean over all of its images."]
    return "\n".join(lines) + "\n"


def compare_runs(a, b, samples: int = 2000, seed: int = 0) -> str:
    check_samples(samples, seed)
    rows_a, rows_b = read_scores(a), read_scores(b)
    kinds = benchmark_of(rows_a), benchmark_of(rows_b)
    if kinds[0] != kinds[1]:
        raise DatasetError(f"{a} is a {kinds[0]} run and {b} a {kinds[1]} run: compare runs of the same benchmark.")
    if kinds[0] == "dreambench":
        return compare_markdown(compare_rows(rows_a, rows_b, samples, seed), str(a), str(b))
    from .multibench import COUNT_NAMES

    parts = []
    for n in sorted({r["count"] for r in rows_a} | {r["count"] for r in rows_b}):
        mine_a, mine_b = [r for r in rows_a if r["count"] == n], [r for r in rows_b if r["count"] == n]
        parts.append(f"### {COUNT_NAMES.get(n, n)} subjects\n\n")
        if not mine_a or not mine_b:
            parts.append(f"Only {a if mine_a else b} has {COUNT_NAMES.get(n, n)}-subject images.\n")
        else:
            parts.append(compare_markdown(compare_rows(mine_a, mine_b, samples, seed), str(a), str(b)))
        parts.append("\n")
    return "".join(parts).rstrip("\n") + "\n"
