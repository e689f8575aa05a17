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
ANNEAL_PIECES = 50  # constant-weight pieces of a linear anneal at most: within 1% of its line


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


class Pattern:
    """One mixture's interleaving of the sources: PERIOD slots built by largest deficit, so any prefix of it holds
    each source in proportion to its weight (to 1/PERIOD)."""

    def __init__(self, weights: tuple[float, ...]):
        weights = np.array(weights, dtype=np.float64)
        quotas = np.floor(weights * PERIOD).astype(np.int64)
        quotas[np.argsort(-(weights * PERIOD - quotas))[: PERIOD - quotas.sum()]] += 1
        pattern, taken = np.empty(PERIOD, np.int64), np.zeros(len(weights))
        for i in range(PERIOD):
            s = int(np.argmax(quotas * (i + 1) / PERIOD - taken))
            pattern[i] = s
            taken[s] += 1
        self.quotas, self.pattern = quotas, pattern
        self.before = np.zeros((PERIOD, len(weights)), np.int64)  # samples of each source before slot i
        np.add.at(self.before, (np.arange(1, PERIOD), pattern[:-1]), 1)
        self.before = np.cumsum(self.before, axis=0)

    def counts(self, n: int) -> np.ndarray:
        """Samples of each source among the pattern's first n positions (repeated past PERIOD)."""
        return (n // PERIOD) * self.quotas + self.before[n % PERIOD]


@dataclass(frozen=True)
class Mixture:
    """The sources' weights over the global order: piece i, from position starts[i] (the first at 0) to the next
    piece's start, mixes them by weights[i]. One piece: a constant mixture; several: data.schedule's stages, a
    linear anneal as short pieces of constant weights."""
    starts: tuple[int, ...]
    weights: tuple[tuple[float, ...], ...]

    @classmethod
    def constant(cls, weights) -> Mixture:
        return cls((0,), (tuple(float(w) for w in weights),))

    @classmethod
    def scheduled(cls, stages, position) -> Mixture:
        """data.schedule's stages (config.MixStage) as pieces of the global order; position(step): where in it that
        step starts reading. An anneal is ANNEAL_PIECES pieces at most, each of whole steps, mixed by the line's
        weights at its middle."""
        starts, weights, begin, previous = [], [], 0, None
        for stage in stages:
            if stage.anneal:
                steps = stage.until_step - begin
                n = min(steps, ANNEAL_PIECES)
                for i in range(n):
                    a, b = begin + i * steps // n, begin + (i + 1) * steps // n
                    t = ((a + b) / 2 - begin) / steps
                    starts.append(position(a))
                    weights.append(tuple(p + t * (q - p) for p, q in zip(previous, stage.weights, strict=True)))
            else:
                starts.append(position(begin))
                weights.append(stage.weights)
            begin, previous = stage.until_step, stage.weights
        pieces: list[tuple[int, tuple[float, ...]]] = []
        for start, w in zip(starts, weights, strict=True):
            if pieces and pieces[-1][0] == start:  # a piece no step reads (steps that share a batch, GRPO's)
                pieces.pop()
            if not pieces or pieces[-1][1] != w:
                pieces.append((start, w))
        return cls(tuple(p for p, _ in pieces), tuple(w for _, w in pieces))


class SampleOrder:
    """Global sample index → (source, sample) for weighted mixing of sources, every source reshuffled each epoch.
    Each piece of the mixture interleaves the sources by its Pattern; a source's samples run on from piece to
    piece (its count before a piece is known from the pieces before it, in O(pieces)), so the order is a function
    of (seed, position) alone, and a stage boundary never repeats or skips a sample of any source."""

    def __init__(self, sizes: list[int], weights, seed: int):
        """weights: one per source, or a Mixture."""
        self.sizes, self.seed = sizes, seed
        self.mixture = weights if isinstance(weights, Mixture) else Mixture.constant(weights)
        self.starts = np.array(self.mixture.starts, np.int64)
        self._patterns: dict[tuple[float, ...], Pattern] = {}
        self._counts = [np.zeros(len(sizes), np.int64)]  # each source's samples before piece i, as far as known
        self._perms: dict[tuple[int, int], KeyedPermutation] = {}

    def pattern(self, piece: int) -> Pattern:
        weights = self.mixture.weights[piece]
        if weights not in self._patterns:
            self._patterns[weights] = Pattern(weights)
        return self._patterns[weights]

    def counts_before(self, piece: int) -> np.ndarray:
        while len(self._counts) <= piece:
            i = len(self._counts) - 1
            self._counts.append(self._counts[i] + self.pattern(i).counts(int(self.starts[i + 1] - self.starts[i])))
        return self._counts[piece]

    def counts(self, position: int) -> np.ndarray:
        """Samples of each source among the order's first `position` positions."""
        piece = int(np.searchsorted(self.starts, position, side="right")) - 1
        return self.counts_before(piece) + self.pattern(piece).counts(position - int(self.starts[piece]))

    def picks(self, positions: np.ndarray) -> list[tuple[int, int]]:
        """(source, sample) of each global position."""
        source, sample = self(positions)
        return [(int(s), int(j)) for s, j in zip(source, sample, strict=True)]

    def _sources_and_counts(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The source of each position, and how many samples of that source the order held before it."""
        source, k = np.empty_like(g), np.empty_like(g)
        piece = np.searchsorted(self.starts, g, side="right") - 1
        for p in np.unique(piece):
            at = piece == p
            pattern = self.pattern(int(p))
            period, slot = np.divmod(g[at] - self.starts[p], PERIOD)
            source[at] = pattern.pattern[slot]
            k[at] = (self.counts_before(int(p))[source[at]] + period * pattern.quotas[source[at]]
                     + pattern.before[slot, source[at]])
        return source, k

    def __call__(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        source, k = self._sources_and_counts(np.asarray(g, dtype=np.int64))
        sample = np.empty_like(k)
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
