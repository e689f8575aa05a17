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
from dataclasses import dataclass

import numpy as np

from .errors import UserError

HEADER = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}
TOKEN_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int16): 3, np.dtype(np.int32): 4, np.dtype(np.int64): 5,
               np.dtype(np.uint16): 8}
FIXED = len(HEADER) + 8 + 1 + 8 + 8  # the bytes before the arrays


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

    def document_ends(self) -> np.ndarray:
        """The end (exclusive, in elements) of every document in PREFIX.bin, when the sequences lie back to back
        in order (as every writer lays them out); int64[D]."""
        ends = np.cumsum(self.lengths, dtype=np.int64)
        return ends[self.documents[1:] - 1] if len(self.documents) > 1 else np.zeros(0, np.int64)


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
    if entries < 1 or documents[0] != 0 or documents[-1] != sequences or np.any(np.diff(documents) < 0):
        raise UserError(f"{idx}: its document index does not run from 0 to the {sequences:,} sequences in order")
    if (lengths < 0).any():
        raise UserError(f"{idx}: a negative sequence length (sequence {int(np.argmax(lengths < 0))})")
    expected = np.concatenate([[0], np.cumsum(lengths.astype(np.int64) * dtype.itemsize)[:-1]]) if sequences else \
        np.zeros(0, np.int64)
    if not np.array_equal(pointers, expected):
        at = int(np.argmax(pointers != expected))
        raise UserError(f"{idx}: sequence {at} starts at byte {int(pointers[at]):,} of {bin_path}, not right after "
                        f"the one before ({int(expected[at]):,}); only back-to-back sequences are read")
    total = int(lengths.astype(np.int64).sum()) * dtype.itemsize
    if os.path.getsize(bin_path) < total:
        raise UserError(f"{bin_path}: {os.path.getsize(bin_path):,} bytes, shorter than the {total:,} its index "
                        "says; the file is cut short")
    return MegatronIndex(prefix, dtype, lengths, pointers, documents)


def write(prefix: str, documents, dtype) -> tuple[str, str]:
    """PREFIX.bin and PREFIX.idx from `documents` (1-D arrays of ids, one sequence per document) in `dtype`, as
    Megatron's IndexedDatasetBuilder writes them; (bin, idx). Each file is written under a temporary name and
    renamed into place."""
    dtype = np.dtype(dtype)
    if dtype not in TOKEN_CODES:
        raise UserError(f"{prefix}: cannot write {dtype} ids in a Megatron dataset")
    lengths = []
    try:
        with open(prefix + ".bin.tmp", "wb") as f:
            for doc in documents:
                doc = np.asarray(doc)
                if doc.size and (doc.min() < 0 or doc.max() > np.iinfo(dtype).max):
                    raise UserError(f"{prefix}.bin: an id out of {dtype}'s range")
                f.write(doc.astype(dtype, copy=False).tobytes())
                lengths.append(len(doc))
            f.flush()
            os.fsync(f.fileno())
    except BaseException:  # a damaged source, a full disk, an interrupt: no half file is left behind
        with contextlib.suppress(FileNotFoundError):
            os.remove(prefix + ".bin.tmp")
        raise
    count = len(lengths)
    lengths = np.array(lengths, dtype=np.int32)
    pointers = np.concatenate([[0], np.cumsum(lengths.astype(np.int64) * dtype.itemsize)[:-1]]).astype(np.int64) \
        if count else np.zeros(0, np.int64)
    with open(prefix + ".idx.tmp", "wb") as f:
        f.write(HEADER + struct.pack("<QBQQ", VERSION, TOKEN_CODES[dtype], count, count + 1))
        f.write(lengths.tobytes())
        f.write(pointers.tobytes())
        f.write(np.arange(count + 1, dtype=np.int64).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(prefix + ".bin.tmp", prefix + ".bin")
    os.replace(prefix + ".idx.tmp", prefix + ".idx")
    return prefix + ".bin", prefix + ".idx"
