"""Batches: what the model and the losses see of a micro-batch (Batch), how sequences are laid out in rows
(padded, or packed with each sequence attending only to itself), and the micro-batches of a rank (GlobalBatches:
positions of the global order → rows of picks → a Batch by a stage's collate). ExampleBatches lays out whole
examples (conversations); a stage whose examples hold more (pairs, labels) extends it and its Batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from preprocess.errors import UserError

from .order import BatchPlan, SampleOrder
from .packing import PackingPlan, pack
from .sources import pad_id as sources_pad_id

IGNORE = -100  # target id excluded from the loss (padding, prompt tokens)


@dataclass
class Batch:
    """A micro-batch as the model and the loss functions see it; a stage's batch adds what its loss needs."""
    inputs: torch.Tensor                   # (rows, width) token ids
    targets: torch.Tensor                  # (rows, width): the next token where it is learned, else IGNORE
    segments: torch.Tensor | None = None   # (rows, width): the sequence of each position in packed rows, -1 for
                                           # padding (see models/transformer.py); None: one causal
                                           # sequence per row
    real_tokens: int = 0                   # positions holding a token of some sequence; the rest is padding
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


def pinned(batch):
    """A stage's micro-batch (a dataclass: Batch and its kin, GRPO's prompts) with its tensors, and those of the
    batches it holds (KTO's KL rows), in pinned (page-locked) memory: their copies to a GPU then run
    asynchronously. Anything else as it is."""
    if not dataclasses.is_dataclass(batch) or isinstance(batch, type):
        return batch
    changes = {}
    for f in dataclasses.fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, torch.Tensor):
            changes[f.name] = value.pin_memory()
        elif dataclasses.is_dataclass(value):
            changes[f.name] = pinned(value)
    return dataclasses.replace(batch, **changes) if changes else batch


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


class ExampleBatches(GlobalBatches):
    """Whole examples (conversations); targets are the learned (assistant) tokens only. Padded: one example per
    row, rows as wide as the longest. Packed (`pack_window` > 0): rows of seq_len positions holding several
    examples, each attending only to itself; the unit of the batch plan is then a row. pad_id: the sources'."""

    def __init__(self, *args, seq_len: int, pack_window: int = 0, pad_id: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.pad_id = sources_pad_id(self.sources) if pad_id is None else pad_id
        self.seq_len = seq_len
        if pack_window:
            self.packing = PackingPlan(self.picks, [s.lengths for s in self.sources], seq_len, pack_window, self.seed)

    def filler(self) -> tuple[np.ndarray, np.ndarray]:
        """A two-token document that is no target anywhere."""
        return np.full(2, self.pad_id, dtype=np.int64), np.zeros(2, dtype=np.uint8)

    batch_type = Batch  # what collate() returns: a stage's Batch with its own fields

    def lay_out(self, rows: list[list[tuple[np.ndarray, np.ndarray, int]]], batch_type=None,
                packed: bool | None = None, **fields) -> Batch:
        """Rows of (tokens, mask, slot) sequences as a batch_type (default: the class's) with `fields` besides;
        packed (default: whether the examples are): rows of seq_len positions with segments."""
        make = batch_type or self.batch_type
        if not (self.packing is not None if packed is None else packed):
            inputs, targets, segments, real = layout_rows(rows, self.pad_id, limit=self.seq_len)
            return make(inputs, targets, real_tokens=real, positions=segments >= 0, **fields)
        # packed rows are nearly full: one width for every batch and rank, so compiled kernels see one shape
        inputs, targets, segments, real = layout_rows(rows, self.pad_id, width=self.seq_len)
        return make(inputs, targets, segments, real_tokens=real, **fields)

    def collate(self, rows):
        if not rows:
            return self.lay_out([[(*self.filler(), 0)]])
        picks = [p for row in rows for p in row]
        docs = [self.sources[s].example(j)[0] for s, j in picks]
        self.check_vocab([t for t, _ in docs], picks)
        return self.lay_out([[(*docs[i], i) for i in row] for row in numbered(rows)])
