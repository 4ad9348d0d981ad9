"""From stored features to training batches: deterministic order, on-the-fly interleaving, prefetch.

The data order is a pure function of (seed, epoch): shards are permuted, grouped `shuffle_shards` at
a time, and the examples of each group permuted. A position in the run (micro-step) therefore maps
to the same examples whether the run was resumed or not, and whatever the number of processes:
the global micro-batch is rows [m·G, (m+1)·G) of the epoch order and process r takes its
contiguous slice of it. Noise and edge-token dropout are drawn from a generator seeded with
(seed, micro-step), for the global batch, and sliced the same way.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass

import numpy as np
import torch

from ..core.errors import InterleaveError
from ..core.interleave import plan_positions
from .store import FeatureStore

log = logging.getLogger("lambda_eclipse.trainer")

_MIX = 0x9E3779B97F4A7C15


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64-style), stable across processes and Python runs."""
    x = 0x2545F4914F6CDD1D
    for v in values:
        x = (x ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * _MIX & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


def is_val(global_index: int, fraction: float, salt: int = 0) -> bool:
    """Held-out membership by a fixed hash of the example's index (independent of the training seed)."""
    if fraction <= 0:
        return False
    return (_mix(global_index, 0xE7A1, salt) % 1_000_000) < fraction * 1_000_000


@dataclass
class Split:
    store: FeatureStore
    indices_by_shard: list[np.ndarray]  # global indices of this split, per shard

    @property
    def size(self) -> int:
        return int(sum(len(a) for a in self.indices_by_shard))

    @classmethod
    def make(cls, store: FeatureStore, val_fraction: float, want_val: bool) -> "Split":
        out = []
        for s, n in enumerate(store.sizes):
            idx = np.arange(store.offsets[s], store.offsets[s] + n)
            mask = np.array([is_val(int(i), val_fraction) for i in idx], dtype=bool) if val_fraction > 0 else np.zeros(n, bool)
            out.append(idx[mask] if want_val else idx[~mask])
        return cls(store, out)

    def epoch_order(self, seed: int, epoch: int, shuffle_shards: int = 8) -> np.ndarray:
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), 0x5EED])
        shard_perm = rng.permutation(len(self.indices_by_shard))
        parts = []
        for start in range(0, len(shard_perm), max(1, shuffle_shards)):
            group = np.concatenate([self.indices_by_shard[s] for s in shard_perm[start:start + shuffle_shards]] or [np.zeros(0, np.int64)])
            parts.append(group[rng.permutation(len(group))])
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def fixed_order(self) -> np.ndarray:
        return np.concatenate(self.indices_by_shard) if self.indices_by_shard else np.zeros(0, np.int64)


@dataclass
class Batch:
    image: torch.Tensor  # [B,E] target
    pooled: torch.Tensor  # [B,E]
    control: torch.Tensor  # [B,E]
    tokens: torch.Tensor  # [B,L,E] interleaved
    mask: torch.Tensor  # [B,L] bool
    noise: torch.Tensor  # [B,E]
    pooled_global: torch.Tensor  # [G,E] pooled text of the whole global batch (contrastive columns)
    row_offset: int  # where this process's rows start in the global batch
    dropped: int = 0  # edge tokens replaced by blank in this batch


class Assembler:
    """Builds padded, interleaved batches from a store; memoises subject positions per example."""

    def __init__(self, store: FeatureStore, context_length: int | None = None):
        self.store = store
        self.L = context_length or store.context_length
        self._plans: dict[int, list[list[int]] | None] = {}
        self.interleave_failures = 0

    def plan(self, g: int, shard, i: int) -> list[list[int]] | None:
        if g not in self._plans:
            ex = shard.examples[i]
            a, e = int(shard.tok_off[i]), int(shard.tok_off[i + 1])
            ids = shard.ids[a:e].tolist()
            try:
                self._plans[g] = plan_positions(ex["caption"], ids, ex["words"], ex["word_ids"], self.L)
            except InterleaveError as exc:
                self.interleave_failures += 1
                log.warning("example %s: subjects not interleaved (%s)", ex.get("key"), exc)
                self._plans[g] = None
        return self._plans[g]

    def gather(self, indices) -> dict[str, torch.Tensor]:
        E, L = self.store.embed_dim, self.L
        B = len(indices)
        image = torch.empty(B, E)
        pooled = torch.empty(B, E)
        control = torch.empty(B, E)
        tokens = torch.zeros(B, L, E)
        mask = torch.zeros(B, L, dtype=torch.bool)
        tok_parts, rows, cols = [], [], []
        sub_parts, srows, scols = [], [], []
        for b, g in enumerate(indices):
            s, i = self.store.locate(int(g))
            sh = self.store.shard(s)
            image[b] = sh.image[i]
            pooled[b] = sh.pooled[i]
            control[b] = sh.control[i]
            a, e = int(sh.tok_off[i]), int(sh.tok_off[i + 1])
            n = min(e - a, L)
            tok_parts.append(sh.tokens[a:a + n])
            rows.extend([b] * n)
            cols.extend(range(n))
            mask[b, :n] = True
            plan = self.plan(int(g), sh, i)
            if plan:
                sa = int(sh.subj_off[i])
                for k, pos in enumerate(plan):
                    if not pos:
                        continue
                    sub_parts.append(sh.subj[sa + k:sa + k + 1].expand(len(pos), -1))
                    srows.extend([b] * len(pos))
                    scols.extend(pos)
        if tok_parts:
            tokens[rows, cols] = torch.cat(tok_parts).float()
        if sub_parts:  # the same write as core.interleave.substitute (weight 1), for the whole batch at once
            tokens[srows, scols] = torch.cat(sub_parts).float()
        return {"image": image, "pooled": pooled, "control": control, "tokens": tokens, "mask": mask}

    def pooled_of(self, indices) -> torch.Tensor:
        out = torch.empty(len(indices), self.store.embed_dim)
        for b, g in enumerate(indices):
            s, i = self.store.locate(int(g))
            out[b] = self.store.shard(s).pooled[i]
        return out


class TrainStream:
    """Micro-batches for this process from micro-step `start` on, optionally prefetched in a thread."""

    def __init__(self, split: Split, seed: int, global_batch: int, rank: int, world: int,
                 edge_drop: float, shuffle_shards: int = 8, prefetch: int = 2):
        if global_batch % world:
            raise ValueError(f"batch size {global_batch} must be divisible by the number of processes ({world}).")
        self.split, self.seed, self.G, self.rank, self.world = split, seed, global_batch, rank, world
        self.local = global_batch // world
        self.edge_drop = edge_drop
        self.shuffle_shards = shuffle_shards
        self.prefetch = prefetch
        self.per_epoch = split.size // global_batch
        if self.per_epoch == 0:
            raise ValueError(f"The training split has {split.size} examples, fewer than one batch of {global_batch}.")
        self.assembler = Assembler(split.store)
        self._order_cache: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        if self._order_cache is None or self._order_cache[0] != epoch:
            self._order_cache = (epoch, self.split.epoch_order(self.seed, epoch, self.shuffle_shards))
        return self._order_cache[1]

    def make(self, micro: int) -> Batch:
        epoch, m = divmod(micro, self.per_epoch)
        glob = self.order(epoch)[m * self.G:(m + 1) * self.G]
        lo, hi = self.rank * self.local, (self.rank + 1) * self.local
        data = self.assembler.gather(glob[lo:hi])
        gen = torch.Generator().manual_seed(_mix(self.seed, micro, 0x401CE))
        E = self.split.store.embed_dim
        noise = torch.randn(self.G, E, generator=gen)[lo:hi]
        drop = (torch.rand(self.G, generator=gen) < self.edge_drop)[lo:hi]
        control = data["control"]
        if drop.any():
            control = control.clone()
            control[drop] = self.split.store.blank.to(control.dtype)
        pooled_global = self.assembler.pooled_of(glob)
        return Batch(data["image"], data["pooled"], control, data["tokens"], data["mask"], noise,
                     pooled_global, lo, int(drop.sum()))

    def iterate(self, start: int, stop: int):
        if self.prefetch <= 0:
            for micro in range(start, stop):
                yield micro, self.make(micro)
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop_flag = threading.Event()

        def work():
            try:
                for micro in range(start, stop):
                    if stop_flag.is_set():
                        return
                    q.put((micro, self.make(micro)))
            except BaseException as exc:  # surface loader errors in the training thread
                q.put(exc)
                return
            q.put(None)

        thread = threading.Thread(target=work, daemon=True, name="batch-prefetch")
        thread.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop_flag.set()
            while thread.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(0.05)


def eval_batches(split: Split, batch_size: int, seed: int, max_batches: int | None = None):
    """Fixed order, fixed noise, stored control (no dropout): comparable across steps and runs."""
    order = split.fixed_order()
    asm = Assembler(split.store)
    E = split.store.embed_dim
    n_batches = len(order) // batch_size if len(order) >= batch_size else (1 if len(order) else 0)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    for k in range(n_batches):
        idx = order[k * batch_size:(k + 1) * batch_size]
        data = asm.gather(idx)
        gen = torch.Generator().manual_seed(_mix(seed, k, 0xE7A1))
        noise = torch.randn(len(idx), E, generator=gen)
        yield Batch(data["image"], data["pooled"], data["control"], data["tokens"], data["mask"], noise, data["pooled"], 0)
