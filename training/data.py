"""Shard directories → fixed-length samples in a deterministic global order, sliced by data-parallel rank.

Every sample is addressed by a global index, so the loader has no state: step t of any run, on any number of
processes, reads the same samples, and resuming needs only the step number. Memory stays constant in the corpus
size: shards are memory-mapped and the shuffle is a keyed permutation computed on the fly.
"""

from __future__ import annotations

import bisect
import functools
import os

import numpy as np
import torch

from preprocess.errors import UserError
from preprocess.shards import read_manifest, verify_shard

PERIOD = 10_000  # mixing pattern length: weights are honoured to 1/PERIOD


class ShardSource:
    """One shard directory as a single token stream, cut into samples of seq_len + 1 tokens (consecutive samples
    share one token). The last val_fraction of the samples is the validation split."""

    def __init__(self, path: str, seq_len: int, val_fraction: float, kind: str = "pretrain"):
        self.path = path
        self.manifest = read_manifest(path)
        if self.manifest["kind"] != kind:
            raise UserError(f"{path}: holds {self.manifest['kind']} shards, this stage needs {kind} shards")
        self.shards = self.manifest["shards"]
        self.dtype = np.dtype(self.manifest["dtype"])
        for shard in self.shards:  # cheap checks: presence and size of every file
            for meta in shard["files"].values():
                file = os.path.join(path, meta["path"])
                if not os.path.isfile(file):
                    raise UserError(f"{file}: missing (listed in {path}/manifest.json)")
                if os.path.getsize(file) != meta["bytes"]:
                    raise UserError(f"{file}: {os.path.getsize(file)} bytes, manifest says {meta['bytes']}; "
                                    f"run `python -m preprocess verify {path}`")
        counts = [s["tokens"] for s in self.shards]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.total_tokens = int(self.starts[-1])
        self.seq_len = seq_len
        n = max(0, (self.total_tokens - 1) // seq_len)
        n_val = int(np.ceil(n * val_fraction)) if n > 1 else 0
        self.n_train, self.n_val = n - n_val, n_val
        # memory maps opened on demand, a bounded number at a time: thousands of shards never hold thousands of files
        self._tokens = functools.lru_cache(maxsize=64)(self._open_tokens)
        if self.n_train < 1:
            raise UserError(f"{path}: {self.total_tokens:,} tokens make no training sample of data.seq_len={seq_len} "
                            f"(+1) after holding out data.val_fraction={val_fraction}")

    @property
    def tokenizer(self) -> dict:
        return self.manifest["tokenizer"]

    def _open_tokens(self, i: int) -> np.ndarray:
        return np.load(os.path.join(self.path, self.shards[i]["files"]["tokens"]["path"]), mmap_mode="r")

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the whole directory, across shard boundaries."""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        i = bisect.bisect_right(self.starts, start) - 1
        while filled < length:
            offset = start + filled - int(self.starts[i])
            piece = self._tokens(i)[offset:offset + length - filled]
            out[filled:filled + len(piece)] = piece
            filled += len(piece)
            i += 1
        return out

    def sample(self, j: int) -> np.ndarray:
        """Sample j (train: 0..n_train-1, validation: n_train..n_train+n_val-1)."""
        return self.read(j * self.seq_len, self.seq_len + 1)

    def locate(self, position: int) -> str:
        i = bisect.bisect_right(self.starts, position) - 1
        return f"{self.path}/{self.shards[i]['files']['tokens']['path']}[{position - int(self.starts[i])}]"

    def verify(self, rank: int, world: int) -> list[str]:
        """Re-hash this rank's share of the shards."""
        tok = self.manifest["tokenizer"]
        return [f"{self.path}: {p}" for s in self.shards[rank::world]
                for p in verify_shard(self.path, s, self.manifest["dtype"], tok["vocab_size"], tok["special_ids"]["eos"])]


class KeyedPermutation:
    """A pseudo-random bijection of range(n) from a key, computed per index: a 4-round Feistel network over
    the next even power of two, with cycle walking back into range. O(1) memory for any n."""

    MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)

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


class PretrainData:
    """Train and validation micro-batches (inputs, targets) of a rank, addressed by step and micro-step."""

    def __init__(self, sources: list[ShardSource], weights: list[float], seed: int, micro_batch: int,
                 grad_accum: int, rank: int, world: int, vocab_size: int):
        self.sources, self.vocab_size = sources, vocab_size
        self.micro_batch, self.grad_accum, self.rank, self.world = micro_batch, grad_accum, rank, world
        self.order = SampleOrder([s.n_train for s in sources], weights, seed)
        self.global_batch = micro_batch * grad_accum * world
        self.val_ends = np.cumsum([s.n_val for s in sources])  # validation samples of all sources, end to end

    def micro_indices(self, step: int, micro: int) -> np.ndarray:
        """Global sample indices of this rank's micro-batch: each optimizer step consumes global_batch samples,
        micro-step m of rank r takes a contiguous slice of them."""
        first = step * self.global_batch + (micro * self.world + self.rank) * self.micro_batch
        return np.arange(first, first + self.micro_batch)

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        source, sample = self.order(self.micro_indices(step, micro))
        return self._stack([(int(s), int(j)) for s, j in zip(source, sample, strict=True)])

    def val_batches(self, n_samples: int):
        """This rank's share of `n_samples` validation samples spread evenly over the split: the same subset
        whatever the number of ranks, so val_loss is comparable across runs."""
        n_val = int(self.val_ends[-1])
        if n_val == 0:
            return
        want = min(n_val, n_samples)
        mine = []
        for v in ((np.arange(want) * n_val) // want)[self.rank::self.world]:
            s = int(np.searchsorted(self.val_ends, v, side="right"))
            first = int(self.val_ends[s - 1]) if s else 0
            mine.append((s, self.sources[s].n_train + int(v) - first))
        for i in range(0, len(mine), self.micro_batch):
            yield self._stack(mine[i:i + self.micro_batch])

    def _stack(self, picks: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([self.sources[s].sample(j) for s, j in picks])
        if rows.size and (top := int(rows.max())) >= self.vocab_size:
            s, j = picks[int(np.argmax(rows.max(axis=1)))]
            src = self.sources[s]
            position = j * src.seq_len + int(np.argmax(src.sample(j)))
            raise UserError(f"token id {top} at {src.locate(position)} is outside the model's vocabulary "
                            f"(model.vocab_size={self.vocab_size})")
        tokens = torch.from_numpy(rows)
        return tokens[:, :-1], tokens[:, 1:]


def open_sources(paths: list[str], seq_len: int, val_fraction: float, kind: str = "pretrain") -> list[ShardSource]:
    sources = [ShardSource(p, seq_len, val_fraction, kind) for p in paths]
    first = sources[0]
    for other in sources[1:]:
        if other.tokenizer["sha256"] != first.tokenizer["sha256"]:
            raise UserError(f"{other.path} was tokenized with tokenizer {other.tokenizer['sha256'][:12]}…, "
                            f"{first.path} with {first.tokenizer['sha256'][:12]}…: mixed sources need one tokenizer")
    return sources
