"""Shard directories → samples (pretraining) or examples (SFT, DPO) in a deterministic global order, sliced by
data-parallel rank.

Every sample is addressed by its position in the global order, so the loader has no state: a step reads the
positions its BatchPlan names from the consumed-sample count, on any number of processes, and resuming needs
only that count. Memory stays constant in the corpus size: shards are memory-mapped and the shuffle is a keyed
permutation computed on the fly.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import os

import numpy as np
import torch

from preprocess.errors import UserError
from preprocess.shards import read_manifest, verify_shard

from .losses import IGNORE
from .plan import BatchPlan

PERIOD = 10_000  # mixing pattern length: weights are honoured to 1/PERIOD


class ShardDir:
    """A shard directory checked cheaply against its manifest (every file present, with the recorded size) and
    read through memory maps, as one token stream over its shards."""

    def __init__(self, path: str, kind: str):
        self.path = path
        self.manifest = read_manifest(path)
        if self.manifest["kind"] != kind:
            raise UserError(f"{path}: holds {self.manifest['kind']} shards, this stage needs {kind} shards")
        self.shards = self.manifest["shards"]
        for shard in self.shards:
            for meta in shard["files"].values():
                file = os.path.join(path, meta["path"])
                if not os.path.isfile(file):
                    raise UserError(f"{file}: missing (listed in {path}/manifest.json)")
                if os.path.getsize(file) != meta["bytes"]:
                    raise UserError(f"{file}: {os.path.getsize(file)} bytes, manifest says {meta['bytes']}; "
                                    f"run `python -m preprocess verify {path}`")
        self.starts = np.concatenate([[0], np.cumsum([s["tokens"] for s in self.shards])]).astype(np.int64)
        self.total_tokens = int(self.starts[-1])
        # memory maps opened on demand, a bounded number at a time: thousands of shards never hold thousands of files
        self._maps = functools.lru_cache(maxsize=128)(self._open)

    def _open(self, i: int, key: str) -> np.ndarray:
        return np.load(os.path.join(self.path, self.shards[i]["files"][key]["path"]), mmap_mode="r")

    def read(self, start: int, length: int, key: str = "tokens") -> np.ndarray:
        """Positions [start, start + length) of the directory's tokens (or mask), across shard boundaries."""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        i = bisect.bisect_right(self.starts, start) - 1
        while filled < length:
            offset = start + filled - int(self.starts[i])
            piece = self._maps(i, key)[offset:offset + length - filled]
            out[filled:filled + len(piece)] = piece
            filled += len(piece)
            i += 1
        return out

    def document_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Start and end positions of every document in the token stream."""
        ends = np.concatenate([self._maps(i, "offsets") + self.starts[i] for i in range(len(self.shards))] or [[]])
        ends = ends.astype(np.int64)
        return np.concatenate([[0], ends[:-1]]).astype(np.int64), ends

    def locate(self, position: int) -> str:
        i = bisect.bisect_right(self.starts, position) - 1
        return f"{self.path}/{self.shards[i]['files']['tokens']['path']}[{position - int(self.starts[i])}]"

    @property
    def tokenizer(self) -> dict:
        return self.manifest["tokenizer"]

    @functools.cached_property
    def fingerprint(self) -> str:
        """What the directory holds, independent of where it lies (a copy on node-local disk has the same):
        its kind, tokenizer and the sha256 of every shard file, in order."""
        parts = [self.manifest["kind"], self.tokenizer["sha256"]]
        parts += [meta["sha256"] for shard in self.shards for _, meta in sorted(shard["files"].items())]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    def verify(self, rank: int, world: int) -> list[str]:
        """Re-hash this rank's share of the shards."""
        tok = self.manifest["tokenizer"]
        return [f"{self.path}: {p}" for s in self.shards[rank::world]
                for p in verify_shard(self.path, s, self.manifest["dtype"], tok["vocab_size"], tok["special_ids"]["eos"])]


class ShardSource(ShardDir):
    """Pretraining: the token stream cut into samples of seq_len + 1 tokens (consecutive samples share one token).
    The last val_fraction of the samples is the validation split."""

    def __init__(self, path: str, seq_len: int, val_fraction: float, kind: str = "pretrain"):
        super().__init__(path, kind)
        self.seq_len = seq_len
        n = max(0, (self.total_tokens - 1) // seq_len)
        n_val = int(np.ceil(n * val_fraction)) if n > 1 else 0
        self.n_train, self.n_val = n - n_val, n_val
        if self.n_train < 1:
            raise UserError(f"{path}: {self.total_tokens:,} tokens make no training sample of data.seq_len={seq_len} "
                            f"(+1) after holding out data.val_fraction={val_fraction}")

    def sample(self, j: int) -> np.ndarray:
        """Sample j (train: 0..n_train-1, validation: n_train..n_train+n_val-1)."""
        return self.read(j * self.seq_len, self.seq_len + 1)


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


class ExampleSource(ShardDir):
    """SFT and DPO: whole examples, each `group` consecutive documents (1: a conversation; 2: a chosen and a
    rejected conversation). Examples that do not fit data.seq_len + 1 tokens are left out and counted; the last
    val_fraction of the rest is the validation split."""

    def __init__(self, path: str, seq_len: int, val_fraction: float, kind: str, group: int):
        super().__init__(path, kind)
        starts, ends = self.document_bounds()
        n = len(starts) // group
        self.doc_starts, self.doc_ends = starts[: n * group].reshape(n, group), ends[: n * group].reshape(n, group)
        fits = np.flatnonzero((self.doc_ends - self.doc_starts).max(axis=1, initial=0) <= seq_len + 1)
        self.too_long = n - len(fits)
        n_val = int(np.ceil(len(fits) * val_fraction)) if len(fits) > 1 else 0
        self.ids = fits  # train examples first, then validation ones
        self.n_train, self.n_val = len(fits) - n_val, n_val
        if self.n_train < 1:
            raise UserError(f"{path}: no training example of at most data.seq_len+1={seq_len + 1} tokens "
                            f"({self.too_long:,} longer ones left out)")

    def example(self, j: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(tokens, mask) of each document of example j (train: 0..n_train-1, then validation)."""
        e = int(self.ids[j])
        return [(self.read(int(a), int(b - a)), self.read(int(a), int(b - a), "mask"))
                for a, b in zip(self.doc_starts[e], self.doc_ends[e], strict=True)]


class GlobalBatches:
    """Micro-batches of a rank: the positions its BatchPlan names, through the global order, to (source, index)
    picks, and those to tensors by a subclass's collate(). collate([]) is a filler batch of one row that counts
    no unit, for ranks with less to evaluate than others."""

    def __init__(self, sources, weights: list[float], seed: int, plan: BatchPlan, vocab_size: int):
        self.sources, self.vocab_size, self.plan = sources, vocab_size, plan
        self.order = SampleOrder([s.n_train for s in sources], weights, seed)
        self.val_ends = np.cumsum([s.n_val for s in sources])  # validation entries of all sources, end to end

    def picks(self, positions: np.ndarray) -> list[tuple[int, int]]:
        source, sample = self.order(positions)
        return [(int(s), int(j)) for s, j in zip(source, sample, strict=True)]

    def micro_batch(self, consumed: int, micro: int):
        """(picks, tensors) of this rank's micro-step `micro` of the step that starts at `consumed`."""
        picks = self.picks(self.plan.micro_indices(consumed, micro))
        return picks, self.collate(picks)

    def val_picks(self, n_samples: int) -> list[tuple[int, int]]:
        """`n_samples` validation entries spread evenly over the split: the same subset whatever the number of
        ranks, so val_loss is comparable across runs."""
        n_val = int(self.val_ends[-1])
        if n_val == 0:
            return []
        want = min(n_val, n_samples)
        picks = []
        for v in (np.arange(want) * n_val) // want:
            s = int(np.searchsorted(self.val_ends, v, side="right"))
            first = int(self.val_ends[s - 1]) if s else 0
            picks.append((s, self.sources[s].n_train + int(v) - first))
        return picks

    def val_batches(self, n_samples: int):
        """This rank's share of the validation subset; every rank gets the same number of batches."""
        for picks in self.plan.share(self.val_picks(n_samples)):
            yield self.collate(picks)

    def check_vocab(self, rows: list[np.ndarray], picks: list[tuple[int, int]]) -> None:
        for row, (s, j) in zip(rows, picks, strict=True):
            if len(row) and (top := int(row.max())) >= self.vocab_size:
                raise UserError(f"token id {top} in {self.sources[s].path} (sample {j}) is outside the model's "
                                f"vocabulary (model.vocab_size={self.vocab_size})")

    def collate(self, picks: list[tuple[int, int]]):
        raise NotImplementedError


class PretrainData(GlobalBatches):
    """(inputs, targets) of seq_len tokens: every token is a target."""

    def collate(self, picks):
        if not picks:  # filler: targets that count nothing
            seq_len = self.sources[0].seq_len
            return torch.zeros(1, seq_len, dtype=torch.int64), torch.full((1, seq_len), IGNORE, dtype=torch.int64)
        rows = np.stack([self.sources[s].sample(j) for s, j in picks])
        if rows.size and (top := int(rows.max())) >= self.vocab_size:
            s, j = picks[int(np.argmax(rows.max(axis=1)))]
            src = self.sources[s]
            position = j * src.seq_len + int(np.argmax(src.sample(j)))
            raise UserError(f"token id {top} at {src.locate(position)} is outside the model's vocabulary "
                            f"(model.vocab_size={self.vocab_size})")
        tokens = torch.from_numpy(rows)
        return tokens[:, :-1], tokens[:, 1:]


def pad_sequences(docs: list[tuple[np.ndarray, np.ndarray]], pad_id: int, multiple: int = 8, limit: int | None = None):
    """Right-padded (inputs, targets): the target of position i is token i+1 where its mask is 1, else IGNORE.
    Padding sits after each sequence, so under causal attention no real token ever sees it or another example.
    The width is the longest input rounded up to `multiple`, but never past `limit` (the model's context)."""
    longest = max(len(t) - 1 for t, _ in docs)
    width = -(-longest // multiple) * multiple
    if limit is not None:
        width = max(longest, min(width, limit))
    inputs = np.full((len(docs), width), pad_id, dtype=np.int64)
    targets = np.full((len(docs), width), IGNORE, dtype=np.int64)
    for row, (tokens, mask) in enumerate(docs):
        n = len(tokens) - 1
        inputs[row, :n] = tokens[:-1]
        targets[row, :n] = np.where(mask[1:] == 1, tokens[1:], IGNORE)
    return torch.from_numpy(inputs), torch.from_numpy(targets)


class SFTData(GlobalBatches):
    """(inputs, targets) of whole conversations padded to the longest in the micro-batch; targets are the
    learned (assistant) tokens only."""

    def __init__(self, *args, pad_id: int, seq_len: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.pad_id, self.seq_len = pad_id, seq_len

    def filler(self) -> tuple[np.ndarray, np.ndarray]:
        """A two-token document that is no target anywhere."""
        return np.full(2, self.pad_id, dtype=np.int64), np.zeros(2, dtype=np.uint8)

    def pad(self, docs):
        return pad_sequences(docs, self.pad_id, limit=self.seq_len)

    def collate(self, picks):
        if not picks:
            return self.pad([self.filler()])
        docs = [doc for s, j in picks for doc in self.sources[s].example(j)]
        self.check_vocab([t for t, _ in docs], [p for p in picks for _ in range(len(docs) // len(picks))])
        return self.pad(docs)


class DPOData(SFTData):
    """(inputs, targets, reference log-probs, real) of pairs: the chosen sequences of the micro-batch, then their
    rejected sequences, padded together for one forward pass; `real` is 1 per pair (0 for a filler pair).
    Reference log-probs come from a precomputed array or from the frozen reference model."""

    def __init__(self, *args, reference, **kwargs):
        super().__init__(*args, **kwargs)
        self.reference = reference

    def collate(self, picks):
        if not picks:  # a filler pair; the reference still runs its forward, as on every other rank
            inputs, targets = self.pad([self.filler(), self.filler()])
            return inputs, targets, self.reference(None, inputs, targets), torch.zeros(1)
        pairs = [self.sources[s].example(j) for s, j in picks]
        docs = [p[0] for p in pairs] + [p[1] for p in pairs]
        self.check_vocab([t for t, _ in docs], picks + picks)
        inputs, targets = self.pad(docs)
        return inputs, targets, self.reference(picks, inputs, targets), torch.ones(len(picks))


def to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    return type(batch)(to_device(b, device) for b in batch)


def open_sources(paths: list[str], seq_len: int, val_fraction: float, kind: str = "pretrain"):
    if kind == "pretrain":
        sources = [ShardSource(p, seq_len, val_fraction) for p in paths]
    else:
        sources = [ExampleSource(p, seq_len, val_fraction, kind, group=2 if kind == "dpo" else 1) for p in paths]
    first = sources[0]
    for other in sources[1:]:
        if other.tokenizer["sha256"] != first.tokenizer["sha256"]:
            raise UserError(f"{other.path} was tokenized with tokenizer {other.tokenizer['sha256'][:12]}…, "
                            f"{first.path} with {first.tokenizer['sha256'][:12]}…: mixed sources need one tokenizer")
    return sources
