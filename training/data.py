"""Shard directories → samples (pretraining) or examples (SFT, DPO) in a deterministic global order, sliced by
data-parallel rank.

Every sample is addressed by its position in the global order, so the loader has no state: a step reads the
positions its BatchPlan names from the consumed-sample count, on any number of processes, and resuming needs
only that count. Memory stays constant in the corpus size: shards are memory-mapped and the shuffle is a keyed
permutation computed on the fly.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch

from preprocess.errors import UserError
from preprocess.shards import mask_max, read_manifest, verify_shard

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
                for p in verify_shard(self.path, s, self.manifest["dtype"], tok["vocab_size"], tok["special_ids"]["eos"],
                                           mask_max(self.manifest["kind"]))]


class ShardSource(ShardDir):
    """Pretraining: the token stream cut into samples of seq_len + 1 tokens (consecutive samples share one token).
    The last val_fraction of the samples is the validation split."""

    def __init__(self, path: str, seq_len: int, val_fraction: float, kind: str = "pretrain"):
        super().__init__(path, kind)
        self.seq_len = seq_len
        self.docs_before = np.concatenate([[0], np.cumsum([s["documents"] for s in self.shards])]).astype(np.int64)
        n = max(0, (self.total_tokens - 1) // seq_len)
        n_val = int(np.ceil(n * val_fraction)) if n > 1 else 0
        self.n_train, self.n_val = n - n_val, n_val
        if self.n_train < 1:
            raise UserError(f"{path}: {self.total_tokens:,} tokens make no training sample of data.seq_len={seq_len} "
                            f"(+1) after holding out data.val_fraction={val_fraction}")

    def sample(self, j: int) -> np.ndarray:
        """Sample j (train: 0..n_train-1, validation: n_train..n_train+n_val-1)."""
        return self.read(j * self.seq_len, self.seq_len + 1)

    def documents(self, j: int) -> np.ndarray:
        """Per input position of sample j, its document, counted from the sample's first (0, 0, 1, 1, 1, ...):
        found in each shard's offsets (memory-mapped), so no table of every document is held."""
        positions = j * self.seq_len + np.arange(self.seq_len, dtype=np.int64)
        shard = np.searchsorted(self.starts, positions, side="right") - 1
        before = np.empty_like(positions)  # documents that end at or before each position
        for i in np.unique(shard):
            at = shard == i
            local = np.searchsorted(self._maps(int(i), "offsets"), positions[at] - self.starts[i], side="right")
            before[at] = self.docs_before[i] + local
        return before - before[0]


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


class ExampleSource(ShardDir):
    """SFT and DPO: whole examples, each `group` consecutive documents (1: a conversation; 2: a chosen and a
    rejected conversation). An example needs one position per token but its last for each document; examples
    that do not fit data.seq_len positions (each document, or with `packed` the whole example, as it shares one
    row) are left out and counted. The last val_fraction of the rest is the validation split."""

    def __init__(self, path: str, seq_len: int, val_fraction: float, kind: str, group: int, packed: bool = False):
        super().__init__(path, kind)
        starts, ends = self.document_bounds()
        n = len(starts) // group
        self.doc_starts, self.doc_ends = starts[: n * group].reshape(n, group), ends[: n * group].reshape(n, group)
        positions = self.doc_ends - self.doc_starts - 1
        need = positions.sum(axis=1) if packed else positions.max(axis=1, initial=0)
        fits = np.flatnonzero(need <= seq_len)
        self.too_long = n - len(fits)
        n_val = int(np.ceil(len(fits) * val_fraction)) if len(fits) > 1 else 0
        self.ids = fits  # train examples first, then validation ones
        self.lengths = positions.sum(axis=1)[fits]  # positions of each example, in the order of ids
        self.n_train, self.n_val = len(fits) - n_val, n_val
        if self.n_train < 1:
            raise UserError(f"{path}: no training example of at most data.seq_len={seq_len} positions "
                            f"({self.too_long:,} longer ones left out)")

    def example(self, j: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(tokens, mask) of each document of example j (train: 0..n_train-1, then validation)."""
        e = int(self.ids[j])
        return [(self.read(int(a), int(b - a)), self.read(int(a), int(b - a), "mask"))
                for a, b in zip(self.doc_starts[e], self.doc_ends[e], strict=True)]


@dataclass
class Batch:
    """A micro-batch as the model and the loss functions see it."""
    inputs: torch.Tensor                   # (rows, width) token ids
    targets: torch.Tensor                  # (rows, width): the next token where it is learned, else IGNORE
    segments: torch.Tensor | None = None   # (rows, width): the sequence of each position in packed rows, -1 for
                                           # padding (see model.py); None: one causal sequence per row
    real_tokens: int = 0                   # positions holding a token of some sequence; the rest is padding
    reference: torch.Tensor | None = None  # DPO: the reference's log-probs, every chosen sequence then every rejected
                                           # (KTO: every completion's, then every KL sequence's)
    pairs: torch.Tensor | None = None      # DPO, KTO: 1 per pair (example), 0 for a filler
    labels: torch.Tensor | None = None     # KTO: 1 for a desirable completion, 0 for an undesirable one
    kl_batch: Batch | None = None          # KTO: each completion's KL sequence, laid out apart (moved by its user)
    kl: torch.Tensor | None = None         # KTO: the KL estimate of the whole global batch (Stage.prepare)
    positions: torch.Tensor | None = None  # (rows, width) bool: positions holding a token, for padded rows
                                           # without segments (None: see token_positions)

    def token_positions(self) -> torch.Tensor | None:
        """(rows, width) bool, True where a position holds a token of some sequence; None when all do."""
        if self.positions is not None:
            return self.positions
        return None if self.segments is None else self.segments >= 0

    def to(self, device: torch.device) -> Batch:
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device, non_blocking=True)
                                            for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})


def best_fit(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Indices of `lengths` packed into bins of `capacity`, best-fit decreasing: longest first, each into the
    fullest bin it fits (ties: the earlier bin, then the earlier item), so the result depends on the lengths alone."""
    room: list[tuple[int, int]] = []  # (space left, bin), sorted
    bins: list[list[int]] = []
    for i in np.argsort(-np.asarray(lengths), kind="stable").tolist():
        at = bisect.bisect_left(room, (int(lengths[i]), -1))
        if at < len(room):
            left, b = room.pop(at)
        else:
            left, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if left - int(lengths[i]) > 0:
            bisect.insort(room, (left - int(lengths[i]), b))
    return bins


def pack(picks: list[tuple[int, int]], lengths: list[np.ndarray], capacity: int) -> list[list[tuple[int, int]]]:
    """(source, example) picks packed into rows of `capacity` positions by best_fit."""
    sizes = np.array([lengths[s][j] for s, j in picks], dtype=np.int64)
    return [[picks[i] for i in row] for row in best_fit(sizes, capacity)]


class PackingPlan:
    """Rows of `capacity` positions from the global order: the examples at positions [w * window, (w+1) * window)
    are packed by best_fit, the rows of the window put in a keyed random order (best fit makes them longest
    first, and a step would otherwise see only long or only short examples), and row r of the run is the r-th row
    of that sequence, window after window. Rows depend on the seed, the global order and the example lengths
    alone, so step t reads the same rows on any number of processes and any accumulation, and a resume (a row
    count) continues exactly."""

    def __init__(self, picks, lengths: list[np.ndarray], capacity: int, window: int, seed: int):
        self.picks, self.lengths, self.capacity, self.window, self.seed = picks, lengths, capacity, window, seed
        self.first_window, self.row_ends = 0, [0]  # rows before windows first_window, first_window + 1, ...
        self._windows = functools.lru_cache(maxsize=8)(self._pack)

    def _pack(self, w: int) -> list[list[tuple[int, int]]]:
        rows = pack(self.picks(np.arange(w * self.window, (w + 1) * self.window)), self.lengths, self.capacity)
        order = KeyedPermutation(len(rows), (self.seed, 0x9ac, w))(np.arange(len(rows)))
        return [rows[k] for k in order.tolist()]

    def rows(self, indices: np.ndarray) -> list[list[tuple[int, int]]]:
        """The (source, example) picks of rows `indices` (from the cursor on, see start_at)."""
        out = []
        for r in np.asarray(indices).tolist():
            if r < self.row_ends[0]:
                raise ValueError(f"row {r} lies before the packing cursor (row {self.row_ends[0]})")
            while self.row_ends[-1] <= r:  # a fresh plan packs every window up to r once
                w = self.first_window + len(self.row_ends) - 1
                self.row_ends.append(self.row_ends[-1] + len(self._windows(w)))
            k = bisect.bisect_right(self.row_ends, r) - 1
            out.append(self._windows(self.first_window + k)[r - self.row_ends[k]])
        return out

    def cursor(self, row: int) -> list[int]:
        """[window, its first row] of the window holding `row`: where a resumed run's plan can start."""
        self.rows([row])
        k = bisect.bisect_right(self.row_ends, row) - 1
        return [self.first_window + k, self.row_ends[k]]

    def start_at(self, cursor: list[int]) -> None:
        """Continue from a saved cursor instead of packing every earlier window again."""
        self.first_window, self.row_ends = cursor[0], [cursor[1]]
        self._windows.cache_clear()

    def stats(self, windows: int = 4) -> tuple[float, float]:
        """Over the first `windows` windows: examples per row, and the share of the rows' positions they fill."""
        rows = [row for w in range(windows) for row in self._windows(w)]
        filled = sum(int(self.lengths[s][j]) for row in rows for s, j in row)
        return sum(len(row) for row in rows) / len(rows), filled / (len(rows) * self.capacity)


class GlobalBatches:
    """Micro-batches of a rank: the positions its BatchPlan names, through the global order, to rows of (source,
    index) picks, and those to a Batch by a subclass's collate(). A row holds one pick, or with packing several.
    collate([]) is a filler batch of one row that counts no unit, for ranks with less to evaluate than others."""

    def __init__(self, sources, weights: list[float], seed: int, plan: BatchPlan, vocab_size: int):
        self.sources, self.vocab_size, self.plan, self.seed = sources, vocab_size, plan, seed
        self.order = SampleOrder([s.n_train for s in sources], weights, seed)
        self.val_ends = np.cumsum([s.n_val for s in sources])  # validation entries of all sources, end to end
        self.packing: PackingPlan | None = None

    def picks(self, positions: np.ndarray) -> list[tuple[int, int]]:
        return self.order.picks(positions)

    def rows(self, positions: np.ndarray) -> list[list[tuple[int, int]]]:
        if self.packing is not None:
            return self.packing.rows(positions)
        return [[pick] for pick in self.picks(positions)]

    def micro_batch(self, consumed: int, micro: int) -> tuple[list[tuple[int, int]], Batch]:
        """(picks, batch) of this rank's micro-step `micro` of the step that starts at `consumed`."""
        rows = self.rows(self.plan.micro_indices(consumed, micro))
        return [p for row in rows for p in row], self.collate(rows)

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
        """(source, batch): this rank's share of the validation subset, source by source; every rank gets the
        same number of batches of each source."""
        picks = self.val_picks(n_samples)
        for s in range(len(self.sources)):
            mine = [p for p in picks if p[0] == s]
            if self.packing is not None:
                rows = pack(mine, [src.lengths for src in self.sources], self.packing.capacity)
            else:
                rows = [[p] for p in mine]
            for group in self.plan.share(rows):
                yield s, self.collate(group)

    def check_vocab(self, rows: list[np.ndarray], picks: list[tuple[int, int]]) -> None:
        for row, (s, j) in zip(rows, picks, strict=True):
            if len(row) and (top := int(row.max())) >= self.vocab_size:
                raise UserError(f"token id {top} in {self.sources[s].path} (sample {j}) is outside the model's "
                                f"vocabulary (model.vocab_size={self.vocab_size})")

    def collate(self, rows: list[list[tuple[int, int]]]) -> Batch:
        raise NotImplementedError


class PretrainData(GlobalBatches):
    """Samples of seq_len positions: every token is a target. With document_mask, attention stays inside each
    document of a sample (and positions restart at each), from the shards' document offsets."""

    def __init__(self, *args, document_mask: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.document_mask = document_mask

    def collate(self, rows):
        if not rows:  # filler: targets that count nothing
            seq_len = self.sources[0].seq_len
            return Batch(torch.zeros(1, seq_len, dtype=torch.int64), torch.full((1, seq_len), IGNORE, dtype=torch.int64))
        picks = [row[0] for row in rows]
        samples = np.stack([self.sources[s].sample(j) for s, j in picks])
        if samples.size and (top := int(samples.max())) >= self.vocab_size:
            s, j = picks[int(np.argmax(samples.max(axis=1)))]
            src = self.sources[s]
            position = j * src.seq_len + int(np.argmax(src.sample(j)))
            raise UserError(f"token id {top} at {src.locate(position)} is outside the model's vocabulary "
                            f"(model.vocab_size={self.vocab_size})")
        tokens = torch.from_numpy(samples)
        segments = None
        if self.document_mask:
            docs = np.stack([self.sources[s].documents(j) for s, j in picks])
            if (docs[:, -1] != docs[:, 0]).any():  # else every row is one causal sequence: the plain path
                segments = torch.from_numpy(docs)
        return Batch(tokens[:, :-1], tokens[:, 1:], segments, real_tokens=tokens[:, :-1].numel())


def layout_rows(rows: list[list[tuple[np.ndarray, np.ndarray, int]]], pad_id: int, multiple: int = 8,
                limit: int | None = None, width: int | None = None):
    """Rows of sequences (tokens, mask, slot) → (inputs, targets, segments, real positions). A sequence of n
    tokens fills n-1 positions: position i holds token i, its target is token i+1 where the mask of i+1 is 1,
    else IGNORE; its segment is the sequence's slot. Padding (pad_id, IGNORE, segment -1) fills each row up to
    `width`, or else the longest row rounded up to `multiple`, never past `limit` (the model's context). Padding
    sits after each sequence, so under causal attention no real token ever sees it."""
    fills = [sum(len(t) - 1 for t, _, _ in row) for row in rows]
    longest = max(fills)
    if width is None:
        width = -(-longest // multiple) * multiple
        if limit is not None:
            width = max(longest, min(width, limit))
    inputs = np.full((len(rows), width), pad_id, dtype=np.int64)
    targets = np.full((len(rows), width), IGNORE, dtype=np.int64)
    segments = np.full((len(rows), width), -1, dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for tokens, mask, slot in row:
            n = len(tokens) - 1
            inputs[r, at:at + n] = tokens[:-1]
            targets[r, at:at + n] = np.where(mask[1:] == 1, tokens[1:], IGNORE)
            segments[r, at:at + n] = slot
            at += n
    return torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(segments), sum(fills)


def numbered(rows: list[list]) -> list[list[int]]:
    """Each row's entries as their indices in the flattened order (an example may come twice: each is its own)."""
    starts = np.cumsum([0] + [len(row) for row in rows]).tolist()
    return [list(range(a, a + len(row))) for a, row in zip(starts, rows, strict=False)]


class SFTData(GlobalBatches):
    """Whole conversations; targets are the learned (assistant) tokens only. Padded: one conversation per row, rows
    as wide as the longest. Packed (`pack_window` > 0): rows of seq_len positions holding several conversations,
    each attending only to itself; the unit of the batch plan is then a row."""

    def __init__(self, *args, pad_id: int, seq_len: int, pack_window: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.pad_id, self.seq_len = pad_id, seq_len
        if pack_window:
            self.packing = PackingPlan(self.picks, [s.lengths for s in self.sources], seq_len, pack_window, self.seed)

    def filler(self) -> tuple[np.ndarray, np.ndarray]:
        """A two-token document that is no target anywhere."""
        return np.full(2, self.pad_id, dtype=np.int64), np.zeros(2, dtype=np.uint8)

    def lay_out(self, rows: list[list[tuple[np.ndarray, np.ndarray, int]]]) -> Batch:
        if self.packing is None:
            inputs, targets, segments, real = layout_rows(rows, self.pad_id, limit=self.seq_len)
            return Batch(inputs, targets, real_tokens=real, positions=segments >= 0)
        # packed rows are nearly full: one width for every batch and rank, so compiled kernels see one shape
        inputs, targets, segments, real = layout_rows(rows, self.pad_id, width=self.seq_len)
        return Batch(inputs, targets, segments, real_tokens=real)

    def collate(self, rows):
        if not rows:
            return self.lay_out([[(*self.filler(), 0)]])
        picks = [p for row in rows for p in row]
        docs = [self.sources[s].example(j)[0] for s, j in picks]
        self.check_vocab([t for t, _ in docs], picks)
        return self.lay_out([[(*docs[i], i) for i in row] for row in numbered(rows)])


class DPOData(SFTData):
    """Pairs: every chosen sequence of the micro-batch, then every rejected one (slots i and n + i for pair i), in
    one forward pass. Padded: one sequence per row. Packed: a pair's two sequences share a row. The reference's
    log-probs come from a precomputed array or from the frozen reference model (none: a loss without one)."""

    def __init__(self, *args, reference, **kwargs):
        super().__init__(*args, **kwargs)
        self.reference = reference

    @staticmethod
    def cache_tag(data_cfg) -> str:
        """What else than the weights, the shards and the row length a precomputed reference depends on."""
        return ""

    def collate(self, rows):
        if not rows:  # a filler pair; the reference still runs its forward, as on every other rank
            batch = self.lay_out([[(*self.filler(), 0)], [(*self.filler(), 1)]])
            return dataclasses.replace(batch, reference=self.reference_logps(None, batch), pairs=torch.zeros(1))
        picks = [p for row in rows for p in row]
        n = len(picks)
        pairs = [self.sources[s].example(j) for s, j in picks]
        self.check_vocab([t for pair in pairs for t, _ in pair], [p for p in picks for _ in range(2)])
        if self.packing is not None:
            laid = [[seq for i in row for seq in ((*pairs[i][0], i), (*pairs[i][1], n + i))] for row in numbered(rows)]
        else:  # chosen rows, then rejected rows
            laid = [[(*pairs[i][0], i)] for i in range(n)] + [[(*pairs[i][1], n + i)] for i in range(n)]
        batch = self.lay_out(laid)
        return dataclasses.replace(batch, reference=self.reference_logps(picks, batch), pairs=torch.ones(n))

    def reference_logps(self, picks, batch: Batch) -> torch.Tensor | None:
        return None if self.reference is None else self.reference(picks, batch)


class KTOData(DPOData):
    """Labelled completions (KTO), one per row, and for each its KL sequence: the example's prompt followed by the
    completion of its partner, a fixed other example of the same split, half the split away (so that the two
    halves of a preference pair, written side by side, are not partners). A split of fewer than MIN_SPLIT
    examples has no partners: its KL rows hold no target and count for nothing. The completions and the KL
    sequences are laid out apart, each as wide as its longest; the reference's log-probs (live or precomputed) are
    every completion's, then every KL sequence's, as a DPO pair's chosen then rejected. The policy's log-ratios
    on the KL sequences of a whole global batch estimate KTO's reference point (Stage.prepare)."""

    MIN_SPLIT = 4

    @staticmethod
    def cache_tag(data_cfg) -> str:
        return f"-kl{data_cfg.val_fraction}"  # the partners lie within the split

    def partner(self, s: int, j: int) -> int | None:
        source = self.sources[s]
        first, n = (0, source.n_train) if j < source.n_train else (source.n_train, source.n_val)
        return first + (j - first + n // 2) % n if n >= self.MIN_SPLIT else None

    def kl_sequence(self, s: int, j: int) -> tuple[np.ndarray, np.ndarray]:
        tokens, mask = self.sources[s].example(j)[0]
        prompt = int(np.argmax(mask > 0))
        partner = self.partner(s, j)
        if partner is None:  # the prompt alone, nothing learned: no KL term from it
            return tokens[: max(2, prompt)], np.zeros(max(2, prompt), np.uint8)
        other, other_mask = self.sources[s].example(partner)[0]
        completion = int(np.argmax(other_mask > 0))
        ids = np.concatenate([tokens[:prompt], other[completion:]])[: self.seq_len + 1]  # at most seq_len positions
        learned = np.concatenate([np.zeros(prompt, np.uint8), (other_mask[completion:] > 0).astype(np.uint8)])
        return ids, learned[: len(ids)]

    def collate(self, rows):
        if not rows:  # a filler example and its KL row; the reference still runs, as on every other rank
            matched, kl = self.lay_out([[(*self.filler(), 0)]]), self.lay_out([[(*self.filler(), 1)]])
            return dataclasses.replace(matched, reference=self.kto_reference(None, matched, kl), pairs=torch.zeros(1),
                                       labels=torch.zeros(1), kl_batch=kl)
        picks = [p for row in rows for p in row]
        docs = [self.sources[s].example(j)[0] for s, j in picks]
        kl_docs = [self.kl_sequence(s, j) for s, j in picks]
        self.check_vocab([t for t, _ in docs] + [t for t, _ in kl_docs], picks + picks)
        labels = torch.tensor([float(m.max() == 1) for _, m in docs])  # mask 1: desirable, 2: undesirable
        matched = self.lay_out([[(t, (m > 0).astype(np.uint8), i)] for i, (t, m) in enumerate(docs)])
        kl = self.lay_out([[(t, m, i)] for i, (t, m) in enumerate(kl_docs)])
        return dataclasses.replace(matched, reference=self.kto_reference(picks, matched, kl),
                                   pairs=torch.ones(len(picks)), labels=labels, kl_batch=kl)

    def kto_reference(self, picks, matched: Batch, kl: Batch) -> torch.Tensor | None:
        if self.reference is None:
            return None
        if getattr(self.reference, "per_row", False):  # a live reference: a forward of each layout
            return torch.cat([self.reference(picks, matched), self.reference(picks, kl)])
        return self.reference(picks, matched)  # precomputed: both columns, looked up by example


def open_sources(paths: list[str], seq_len: int, val_fraction: float, kind: str = "pretrain", packed: bool = False):
    if kind == "pretrain":
        sources = [ShardSource(p, seq_len, val_fraction) for p in paths]
    else:
        sources = [ExampleSource(p, seq_len, val_fraction, kind, group=2 if kind == "dpo" else 1, packed=packed)
                   for p in paths]
    first = sources[0]
    for other in sources[1:]:
        if other.tokenizer["sha256"] != first.tokenizer["sha256"]:
            raise UserError(f"{other.path} was tokenized with tokenizer {other.tokenizer['sha256'][:12]}…, "
                            f"{first.path} with {first.tokenizer['sha256'][:12]}…: mixed sources need one tokenizer")
    return sources
