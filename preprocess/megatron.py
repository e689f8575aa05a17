"""Megatron-LM / Megatron-Core indexed datasets (PREFIX.bin + PREFIX.idx), read and written without megatron.

PREFIX.idx, little-endian:
    b"MMIDIDX\\x00\\x00"        9 bytes
    version                   uint64, 1
    dtype code                uint8: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16
    sequence count S          uint64
    document count D + 1      uint64 (the entries of the document index)
    sequence lengths          int32[S]   elements of each sequence
    sequence pointers         int64[S]   byte offset of each sequence in PREFIX.bin
    document index            int64[D+1] document d is sequences [index[d], index[d+1]); index[0] = 0, index[D] = S
    (sequence modes           int8[S], multimodal datasets only: refused here)
PREFIX.bin: the sequences' elements, back to back.

A document is usually one sequence (Megatron's preprocess_data without --split-sentences); with split sentences it
is several, read here as one document of their concatenation.
"""

from __future__ import annotations

import contextlib
import os
import struct
import tempfile
from dataclasses import dataclass

import numpy as np

from .errors import UserError
from .fileio import fsync_path

HEADER = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}
TOKEN_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int16): 3, np.dtype(np.int32): 4, np.dtype(np.int64): 5,
               np.dtype(np.uint16): 8}
FIXED = len(HEADER) + 8 + 1 + 8 + 8  # the bytes before the arrays
CHUNK = 1 << 24  # elements of the index's arrays handled at a time: constant memory whatever the corpus


@dataclass
class MegatronIndex:
    """What PREFIX.idx says: the dtype of PREFIX.bin, each sequence's length and byte offset, and the documents'
    sequence ranges. The arrays are memory-mapped views of the file."""
    prefix: str
    dtype: np.dtype
    lengths: np.ndarray    # int32[S]
    pointers: np.ndarray   # int64[S]
    documents: np.ndarray  # int64[D + 1]

    @property
    def bin_path(self) -> str:
        return self.prefix + ".bin"

    def tokens(self) -> np.ndarray:
        """PREFIX.bin as one memory-mapped array of its elements (sequences back to back, as written)."""
        return np.memmap(self.bin_path, dtype=self.dtype, mode="r")

    def document_ends(self):
        """The end (exclusive, in elements) of every document in PREFIX.bin, in order, as int64 arrays of at most
        about CHUNK entries each: the sequences lie back to back (read_index checked), so a document ends where its
        last sequence does, and a document of no sequence where the one before it did. Constant memory for any
        corpus: the lengths are summed a chunk at a time."""
        sequences, entries = len(self.lengths), len(self.documents)
        done, carry = 1, 0  # document index entries resolved (entry 0 is the start), elements before the chunk
        for at in range(0, sequences, CHUNK):
            ends = carry + np.cumsum(self.lengths[at:at + CHUNK], dtype=np.int64)  # of sequences at, at + 1, ...
            upto = int(np.searchsorted(self.documents, at + len(ends), side="right"))
            last = np.asarray(self.documents[done:upto]) - at - 1  # each document's last sequence, in this chunk
            yield np.where(last < 0, carry, ends[np.maximum(last, 0)])
            done, carry = upto, int(ends[-1])
        if done < entries:  # documents after the last sequence: of none
            yield np.full(entries - done, carry, np.int64)


def read_index(prefix: str) -> MegatronIndex:
    """PREFIX.idx checked against itself and against PREFIX.bin: a header, version and dtype code it knows, arrays
    as long as the counts say, sequences that lie back to back in PREFIX.bin and end within it, and a document
    index that starts at 0, never goes back and ends at the sequence count. Anything else is one line naming the
    file and what is wrong."""
    prefix = prefix[:-4] if prefix.endswith((".idx", ".bin")) else prefix
    idx, bin_path = prefix + ".idx", prefix + ".bin"
    for path in (idx, bin_path):
        if not os.path.isfile(path):
            raise UserError(f"{path}: not found (a Megatron dataset is PREFIX.bin and PREFIX.idx)")
    size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        head = f.read(FIXED)
    if len(head) < FIXED or head[:len(HEADER)] != HEADER:
        raise UserError(f"{idx}: not a Megatron index (no MMIDIDX header)" if head[:len(HEADER)] != HEADER
                        else f"{idx}: cut short ({size} bytes, the header alone is {FIXED})")
    version, code, sequences, entries = struct.unpack("<QBQQ", head[len(HEADER):])
    if version != VERSION:
        raise UserError(f"{idx}: index version {version}, only version {VERSION} is known")
    if code not in DTYPES:
        raise UserError(f"{idx}: unknown dtype code {code} (known: {', '.join(map(str, sorted(DTYPES)))})")
    dtype = np.dtype(DTYPES[code])
    if dtype not in TOKEN_CODES:
        raise UserError(f"{idx}: holds {dtype} elements, not token ids")
    need = FIXED + 4 * sequences + 8 * sequences + 8 * entries
    if size < need:
        raise UserError(f"{idx}: cut short: {size} bytes, its counts ({sequences:,} sequences, {entries:,} document "
                        f"index entries) need {need:,}")
    if size > need:
        raise UserError(f"{idx}: {size - need:,} bytes past its arrays (sequence modes of a multimodal dataset?), "
                        "which are not read here")
    lengths = np.memmap(idx, np.int32, "r", FIXED, (sequences,)) if sequences else np.zeros(0, np.int32)
    pointers = np.memmap(idx, np.int64, "r", FIXED + 4 * sequences, (sequences,)) if sequences else \
        np.zeros(0, np.int64)
    documents = np.memmap(idx, np.int64, "r", FIXED + 12 * sequences, (entries,)) if entries else \
        np.zeros(0, np.int64)
    if entries < 1 or documents[0] != 0 or documents[-1] != sequences:
        raise UserError(f"{idx}: its document index does not run from 0 to the {sequences:,} sequences")
    carry, last = 0, 0
    for at in range(0, max(sequences, entries), CHUNK):  # a chunk at a time: constant memory for any corpus
        block = np.asarray(documents[at:at + CHUNK])
        if len(block) and (block[0] < last or (np.diff(block) < 0).any()):
            raise UserError(f"{idx}: its document index goes back (near entry {at:,})")
        last = int(block[-1]) if len(block) else last
        sizes = np.asarray(lengths[at:at + CHUNK]).astype(np.int64)
        if (sizes < 0).any():
            raise UserError(f"{idx}: a negative sequence length (sequence {at + int(np.argmax(sizes < 0)):,})")
        ends = np.cumsum(sizes) * dtype.itemsize + carry
        expected = np.concatenate([[carry], ends[:-1]]) if len(sizes) else ends
        given = np.asarray(pointers[at:at + CHUNK])
        if not np.array_equal(given, expected):
            bad = at + int(np.argmax(given != expected))
            raise UserError(f"{idx}: sequence {bad:,} starts at byte {int(pointers[bad]):,} of {bin_path}, not right "
                            "after the one before; only back-to-back sequences are read")
        carry = int(ends[-1]) if len(sizes) else carry
    if os.path.getsize(bin_path) != carry:
        raise UserError(f"{bin_path}: {os.path.getsize(bin_path):,} bytes, its index says {carry:,}; the file is cut "
                        "short or does not belong to this index")
    return MegatronIndex(prefix, dtype, lengths, pointers, documents)


def write(prefix: str, pieces, dtype) -> tuple[str, str]:
    """PREFIX.bin and PREFIX.idx from `pieces`: (ids, document lengths) pairs, the ids of consecutive documents back
    to back (a shard's tokens and the differences of its offsets), one sequence per document, in `dtype`, as
    Megatron's IndexedDatasetBuilder writes them; (bin, idx). Memory stays bounded by a piece and CHUNK: lengths
    and pointers go through temporary files. Both files are written under temporary names; an old PREFIX.idx is
    removed before the new PREFIX.bin takes its name, so a reader never pairs a new .bin with an old .idx."""
    dtype = np.dtype(dtype)
    if dtype not in TOKEN_CODES:
        raise UserError(f"{prefix}: cannot write {dtype} ids in a Megatron dataset")
    folder = os.path.dirname(os.path.abspath(prefix))
    temporary = []

    def scratch(suffix: str):
        fd, path = tempfile.mkstemp(dir=folder, prefix=os.path.basename(prefix) + ".", suffix=suffix)
        temporary.append(path)
        return os.fdopen(fd, "w+b"), path

    try:
        data, data_path = scratch(".bin.tmp")
        lengths, _ = scratch(".lengths.tmp")
        count = 0
        with data, lengths:
            for ids, sizes in pieces:
                ids, sizes = np.asarray(ids), np.asarray(sizes, dtype=np.int64)
                if int(sizes.sum()) != len(ids) or (sizes < 0).any():
                    raise ValueError("document lengths that do not add up to the ids given")
                if len(ids) and (int(ids.min()) < 0 or int(ids.max()) > np.iinfo(dtype).max):
                    raise UserError(f"{prefix}.bin: an id out of {dtype}'s range")
                data.write(ids.astype(dtype, copy=False).tobytes())
                lengths.write(sizes.astype(np.int32).tobytes())
                count += len(sizes)
            data.flush()
            os.fsync(data.fileno())
            lengths.flush()
            index, index_path = scratch(".idx.tmp")
            with index:
                index.write(HEADER + struct.pack("<QBQQ", VERSION, TOKEN_CODES[dtype], count, count + 1))
                lengths.seek(0)
                for block in iter(lambda: lengths.read(4 * CHUNK), b""):  # sequence lengths
                    index.write(block)
                lengths.seek(0)
                carry = 0
                for block in iter(lambda: lengths.read(4 * CHUNK), b""):  # pointers: bytes before each sequence
                    ends = np.cumsum(np.frombuffer(block, np.int32), dtype=np.int64) * dtype.itemsize + carry
                    index.write(np.concatenate([[carry], ends[:-1]]).astype(np.int64).tobytes())
                    carry = int(ends[-1])
                for at in range(0, count + 1, CHUNK):  # document index: document d is sequence d
                    index.write(np.arange(at, min(count + 1, at + CHUNK), dtype=np.int64).tobytes())
                index.flush()
                os.fsync(index.fileno())
        with contextlib.suppress(FileNotFoundError):
            os.remove(prefix + ".idx")
        os.replace(data_path, prefix + ".bin")
        os.replace(index_path, prefix + ".idx")
        fsync_path(folder)
    finally:
        for path in temporary:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    return prefix + ".bin", prefix + ".idx"

