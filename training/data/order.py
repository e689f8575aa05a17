"""The global order of a run's samples and how each optimizer step's share of it is split: a keyed permutation
per source and epoch, weighted mixing of sources (SampleOrder), and the batch plan (micro-batch x accumulation x
processes) that names the positions each rank reads.

Every sample is addressed by its position in the global order, so the loader has no state: a step reads the
positions its BatchPlan names from the consumed-sample count, on any number of processes, and resuming needs
only that count. The shuffle is computed per index, in O(1) memory for any corpus size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PERIOD = 10_000  # mixing pattern length: weights are honoured to 1/PERIOD


class KeyedPermutation:
    """A pseudo-random bijection of range(n) from a key, computed per index: a 4-round Feistel network over
    the next even power of two, with cycle walking back into range. O(1) memory for any n."""

    def __init__(self, n: int, key: tuple[int, ...]):
        self.n = n
        bits = max(2, (max(n - 1, 1)).bit_length())
        self.half = (bits + 1) // 2
        self.half_mask = np.uint64((1 << self.half) - 1)
        rng = np.random.default_rng(list(key))
        self.round_keys = rng.integers(0, 2**63, size=4, dtype=np.uint64)

    def _mix(self, x: np.ndarray, k: np.uint64) -> np.ndarray:
        # splitmix64 finaliser: a fast, well-distributed 64-bit hash
        with np.errstate(over="ignore"):
            z = x ^ k
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            return z ^ (z >> np.uint64(31))

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(self.half), x & self.half_mask
        for k in self.round_keys:
            left, right = right, left ^ (self._mix(right, k) & self.half_mask)
        return (left << np.uint64(self.half)) | right

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        x = np.asarray(idx, dtype=np.uint64)
        x = self._encrypt(x)
        out_of_range = x >= np.uint64(self.n)
        while out_of_range.any():
            x[out_of_range] = self._encrypt(x[out_of_range])
            out_of_range = x >= np.uint64(self.n)
        return x.astype(np.int64)


class SampleOrder:
    """Global sample index → (source, sample) for weighted mixing of sources, every source reshuffled each
    epoch. Sources are interleaved by a fixed pattern of PERIOD slots built by largest deficit, so any prefix of
    the order holds each source in proportion to its weight."""

    def __init__(self, sizes: list[int], weights: list[float], seed: int):
        self.sizes, self.seed = sizes, seed
        quotas = np.floor(np.array(weights) * PERIOD).astype(np.int64)
        quotas[np.argsort(-(np.array(weights) * PERIOD - quotas))[: PERIOD - quotas.sum()]] += 1
        pattern, taken = np.empty(PERIOD, np.int64), np.zeros(len(sizes))
        for i in range(PERIOD):
            s = int(np.argmax(quotas * (i + 1) / PERIOD - taken))
            pattern[i] = s
            taken[s] += 1
        self.quotas, self.pattern = quotas, pattern
        self.before = np.zeros((PERIOD, len(sizes)), np.int64)  # samples of each source before slot i
        np.add.at(self.before, (np.arange(1, PERIOD), pattern[:-1]), 1)
        self.before = np.cumsum(self.before, axis=0)
        self._perms: dict[tuple[int, int], KeyedPermutation] = {}

    def picks(self, positions: np.ndarray) -> list[tuple[int, int]]:
        """(source, sample) of each global position."""
        source, sample = self(positions)
        return [(int(s), int(j)) for s, j in zip(source, sample, strict=True)]

    def __call__(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        g = np.asarray(g, dtype=np.int64)
        period, slot = np.divmod(g, PERIOD)
        source = self.pattern[slot]
        k = period * self.quotas[source] + self.before[slot, source]  # source's own running count
        sample = np.empty_like(g)
        for s in np.unique(source):
            sel = source == s
            epoch, i = np.divmod(k[sel], self.sizes[s])
            out = np.empty(sel.sum(), np.int64)
            for e in np.unique(epoch):
                at = epoch == e
                out[at] = self._perm(int(s), int(e))(i[at])
            sample[sel] = out
        return source, sample

    def _perm(self, s: int, epoch: int) -> KeyedPermutation:
        if (s, epoch) not in self._perms:
            if len(self._perms) > 16:
                self._perms.clear()
            self._perms[(s, epoch)] = KeyedPermutation(self.sizes[s], (self.seed, s, epoch))
        return self._perms[(s, epoch)]


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's global batch is split into micro-batches and ranks, and where in the global order
    a step starts: the one place that knows micro-batch x accumulation x processes. The data position of a run is
    the number of samples consumed so far (not step x today's world size), so a run resumed on another number of
    processes, or with another global batch, continues with the next unread sample of the global order."""
    micro_batch: int
    grad_accum: int
    world: int
    rank: int = 0

    @classmethod
    def of(cls, train_cfg, world: int = 1, rank: int = 0) -> BatchPlan:
        return cls(train_cfg.micro_batch_size, train_cfg.grad_accum, world, rank)

    @property
    def global_batch(self) -> int:
        """Samples (or examples, or pairs) per optimizer step, over every rank and micro-step."""
        return self.micro_batch * self.grad_accum * self.world

    def micro_indices(self, consumed: int, micro: int) -> np.ndarray:
        """Global order positions of this rank's micro-step `micro` of the step that starts at `consumed`:
        every step reads the next global_batch positions; micro-step m of rank r takes a contiguous slice."""
        first = consumed + (micro * self.world + self.rank) * self.micro_batch
        return np.arange(first, first + self.micro_batch)

    def share(self, items: list) -> list[list]:
        """This rank's share of `items` (every world-th) as micro-batches, padded with empty micro-batches to
        the count of the rank with the most: every rank runs the same number of forwards (a sharded model
        gathers its weights in every forward, and waits for every rank to do the same)."""
        mine = items[self.rank::self.world]
        most = -(-len(items[0::self.world]) // self.micro_batch) if items else 0
        batches = [mine[i:i + self.micro_batch] for i in range(0, len(mine), self.micro_batch)]
        return batches + [[] for _ in range(most - len(batches))]

    def describe(self, seq_len: int, unit: str) -> str:
        return (f"batch: {self.micro_batch} {unit} (≤ {seq_len} tokens each) per micro-step x {self.grad_accum} "
                f"micro-steps x {self.world} process{'es' if self.world != 1 else ''} = {self.global_batch:,} {unit} "
                f"per optimizer step")
