"""Shard directories as the training data reads them: checked cheaply against their manifests, memory-mapped, and
cut into samples of the token stream (pretraining) or whole examples of one or more documents (SFT, DPO, KTO),
each with its validation split.

Memory stays constant in the corpus size: shards are memory-mapped, opened a bounded number at a time.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import os

import numpy as np

from preprocess.errors import UserError
from preprocess.hf_tokenizer import SAVED
from preprocess.shards import file_problem, read_manifest, shard_array, verify_shard


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
                if problem := file_problem(path, meta):
                    raise UserError(f"{path}/{problem}; run `python -m preprocess verify {path}`")
        self.starts = np.concatenate([[0], np.cumsum([s["tokens"] for s in self.shards])]).astype(np.int64)
        self.docs_before = np.concatenate([[0], np.cumsum([s["documents"] for s in self.shards])]).astype(np.int64)
        self.total_tokens = int(self.starts[-1])
        # memory maps opened on demand, a bounded number at a time: thousands of shards never hold thousands of files
        self._maps = functools.lru_cache(maxsize=128)(self._open)

    def _open(self, i: int, key: str) -> np.ndarray:
        return shard_array(self.path, self.shards[i]["files"][key])

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
        return [f"{self.path}: {p}" for s in self.shards[rank::world] for p in verify_shard(self.path, s, self.manifest)]


class ShardSource(ShardDir):
    """Pretraining: the token stream cut into samples of seq_len + 1 tokens (consecutive samples share one token).
    The last val_fraction of the samples is the validation split."""

    def __init__(self, path: str, seq_len: int, val_fraction: float, kind: str):
        super().__init__(path, kind)
        self.seq_len = seq_len
        n = max(0, (self.total_tokens - 1) // seq_len)
        n_val = int(np.ceil(n * val_fraction)) if n > 1 else 0
        self.n_train, self.n_val = n - n_val, n_val
        if self.n_train < 1:
            raise UserError(f"{path}: {self.total_tokens:,} tokens make no training sample of data.seq_len={seq_len} "
                            f"(+1) after holding out data.val_fraction={val_fraction}")

    @property
    def positions_per_sample(self) -> float:
        return float(self.seq_len)

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


class ExampleSource(ShardDir):
    """Whole examples, each `group` consecutive documents (1: a conversation; 2: a chosen and a rejected
    conversation). An example needs one position per token but its last for each document; examples
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

    @property
    def positions_per_sample(self) -> float:
        """Of a training example, on average."""
        return float(np.mean(self.lengths[:self.n_train]))

    def example(self, j: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(tokens, mask) of each document of example j (train: 0..n_train-1, then validation); a kind without a
        mask (prompts) learns nothing: zeros."""
        e = int(self.ids[j])
        masked = "mask" in self.shards[0]["files"]
        return [(self.read(int(a), int(b - a)),
                 self.read(int(a), int(b - a), "mask") if masked else np.zeros(int(b - a), np.uint8))
                for a, b in zip(self.doc_starts[e], self.doc_ends[e], strict=True)]

    def record(self, j: int) -> dict:
        """The record kept beside example j's first document (prompts: {"record": the prompt as given and the
        record's other fields, "where": its file:line})."""
        doc = int(self.ids[j]) * self.doc_starts.shape[1]
        i = bisect.bisect_right(self.docs_before, doc) - 1
        local = doc - int(self.docs_before[i])
        ends = self._maps(i, "field_ends")
        start = int(ends[local - 1]) if local else 0
        return json.loads(bytes(self._maps(i, "fields")[start:int(ends[local])]))


def open_sources(paths: list[str], seq_len: int, val_fraction: float, kind: str, documents: int = 0,
                 packed: bool = False) -> list[ShardDir]:
    """The shard directories of one run, all of `kind` and of one tokenizer: samples of the token stream
    (documents=0), or examples of `documents` consecutive documents each (packed: a whole example shares one row)."""
    if documents:
        sources = [ExampleSource(p, seq_len, val_fraction, kind, group=documents, packed=packed) for p in paths]
    else:
        sources = [ShardSource(p, seq_len, val_fraction, kind) for p in paths]
    first = sources[0]
    for other in sources[1:]:
        if other.tokenizer["sha256"] != first.tokenizer["sha256"]:
            raise UserError(f"{other.path} was tokenized with tokenizer {other.tokenizer['sha256'][:12]}…, "
                            f"{first.path} with {first.tokenizer['sha256'][:12]}…: mixed sources need one tokenizer")
        if chat_template(other.manifest) != chat_template(first.manifest):
            raise UserError(f"{other.path} was written in chat template {chat_template(other.manifest)}, {first.path} "
                            f"in {chat_template(first.manifest)}: mixed sources need one template and its options")
    for source in sources:
        check_saved_template(source)
    return sources


def chat_template(manifest: dict) -> str:
    """The chat template a chat kind's shards were written in, as the manifest names it: a model's (its sha256 and
    options), or shardlm's own."""
    if "chat_template_sha256" not in manifest:
        return manifest.get("template", "none")
    return f"{manifest['chat_template_sha256'][:12]}… with {json.dumps(manifest['chat_template_kwargs'])}"


def check_saved_template(source: ShardDir) -> None:
    """The template and options the run will render prompts in (shardlm_chat_template.json, copied into the run with
    the tokenizer) must be the manifest's: a directory copied without it, or with another, is refused."""
    manifest = source.manifest
    if "chat_template_sha256" not in manifest:
        return
    path = os.path.join(source.path, SAVED)
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        same = (saved["sha256"], saved["kwargs"]) == (manifest["chat_template_sha256"], manifest["chat_template_kwargs"])
    except (OSError, ValueError, KeyError, TypeError):
        same = False
    if not same:
        raise UserError(f"{path}: missing or not the chat template its manifest names; copy the shard directory whole")


def pad_id(sources: list[ShardDir]) -> int:
    """The id that pads rows: the tokenizer's pad, else its eos (padding is never a target)."""
    special = sources[0].tokenizer["special_ids"]
    return special.get("pad", special["eos"])
