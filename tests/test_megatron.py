"""Megatron indexed datasets (preprocess/megatron.py) against megatron-core's own IndexedDataset and
IndexedDatasetBuilder (a test-only dependency, installed without its dependencies: its indexed_dataset needs only
numpy and torch)."""

import os
import struct

import numpy as np
import pytest

from preprocess import megatron
from preprocess.errors import UserError

REFERENCE = "megatron-core is the reference reader and writer (pip install --no-deps megatron-core)"


def reference():
    """megatron-core's indexed_dataset, or a skip of the test that needs it (the others run without it)."""
    return pytest.importorskip("megatron.core.datasets.indexed_dataset", reason=REFERENCE)


def write(prefix, docs, dtype):
    return megatron.write(str(prefix), [(np.concatenate(docs), [len(d) for d in docs])], dtype)


def documents(seed=0, count=50, vocab=60000):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, rng.integers(1, 200)).astype(np.uint16) for _ in range(count)] + \
        [np.zeros(0, np.uint16)]  # an empty document too


def test_megatron_core_reads_what_we_write(tmp_path):
    core = reference()
    docs = documents()
    write(tmp_path / "ours", docs, np.uint16)
    theirs = core.IndexedDataset(str(tmp_path / "ours"))
    assert len(theirs) == len(docs) and list(theirs.document_indices) == list(range(len(docs) + 1))
    for i, doc in enumerate(docs):
        assert np.array_equal(theirs[i], doc) and theirs[i].dtype == np.uint16


def test_we_read_what_megatron_cores_builder_writes_documents_of_several_sequences_too(tmp_path):
    """Documents of several sequences (split sentences), and of none (end_document twice)."""
    core = reference()
    docs = documents(1)
    builder = core.IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.int32)
    for i, doc in enumerate(docs):  # split into sentences as --split-sentences would: several sequences
        cut = len(doc) // 2
        builder.add_document(doc.astype(np.int32), [cut, len(doc) - cut] if cut else [len(doc)])
        if i == 2:
            builder.end_document()  # a document of no sequence
    docs = [*docs[:3], np.zeros(0, np.int32), *docs[3:]]
    builder.finalize(str(tmp_path / "theirs.idx"))
    index = megatron.read_index(str(tmp_path / "theirs"))
    assert index.dtype == np.int32 and len(index.documents) == len(docs) + 1
    tokens, ends = index.tokens(), index.document_ends()
    starts = np.concatenate([[0], ends[:-1]])
    for doc, start, end in zip(docs, starts, ends, strict=True):
        assert np.array_equal(tokens[start:end], doc)


def test_a_damaged_dataset_is_one_line_naming_the_file(tmp_path):
    write(tmp_path / "d", documents(2, 10), np.uint16)
    idx, bin_path = tmp_path / "d.idx", tmp_path / "d.bin"
    good_idx, good_bin = idx.read_bytes(), bin_path.read_bytes()

    def refusal():
        with pytest.raises(UserError) as e:
            megatron.read_index(str(tmp_path / "d"))
        assert "\n" not in str(e.value)
        return str(e.value)

    idx.write_bytes(good_idx[:-9])
    assert refusal().startswith(f"{idx}: cut short")
    idx.write_bytes(good_idx[:9] + struct.pack("<QB", 1, 9) + good_idx[18:])
    assert refusal() == f"{idx}: unknown dtype code 9 (known: 1, 2, 3, 4, 5, 6, 7, 8)"
    idx.write_bytes(b"NOTANIDX!" + good_idx[9:])
    assert refusal() == f"{idx}: not a Megatron index (no MMIDIDX header)"
    idx.write_bytes(good_idx)
    bin_path.write_bytes(good_bin[:-2])
    assert refusal().startswith(f"{bin_path}: {len(good_bin) - 2:,} bytes, its index says {len(good_bin):,}")
    bin_path.write_bytes(good_bin + b"\0\0")  # another dataset's .bin beside this index
    assert refusal().startswith(f"{bin_path}: {len(good_bin) + 2:,} bytes, its index says {len(good_bin):,}")
    bin_path.write_bytes(good_bin)
    pointer = megatron.FIXED + 4 * 11 + 8  # the second of the 11 sequences' pointers
    idx.write_bytes(good_idx[:pointer] + struct.pack("<q", 2) + good_idx[pointer + 8:])
    assert "sequence 1 starts at byte 2 " in refusal()
    idx.write_bytes(good_idx[:9] + struct.pack("<Q", 2) + good_idx[17:])
    assert refusal() == f"{idx}: index version 2, only version 1 is known"
    idx.write_bytes(good_idx + b"\1" * 10)
    assert "bytes past its arrays" in refusal()
    idx.write_bytes(good_idx)
    os.remove(bin_path)
    assert refusal() == f"{bin_path}: not found (a Megatron dataset is PREFIX.bin and PREFIX.idx)"


def test_our_shards_exported_are_read_by_megatron_core_document_for_document(pretrain_shards, chat_shards, tmp_path):
    """`preprocess export --format megatron`: megatron-core reads every document of our pretraining shards, eos
    included, in order; a kind with a loss mask, or a damaged shard, is one line and writes nothing."""
    import shutil

    from conftest import run_cli, shard_documents

    core = reference()
    proc = run_cli("export", pretrain_shards, "--format", "megatron", "--out", tmp_path / "out" / "corpus")
    assert "Megatron indexed dataset" in proc.stdout
    theirs = core.IndexedDataset(str(tmp_path / "out" / "corpus"))
    ours = shard_documents(pretrain_shards)
    assert len(theirs) == len(ours) > 1
    for i, doc in enumerate(ours):
        assert np.array_equal(theirs[i], doc)
    proc = run_cli("export", chat_shards["sft"], "--format", "megatron", "--out", tmp_path / "sft", check=False)
    assert proc.returncode == 1 and "holds sft shards; a Megatron dataset keeps no loss mask" in proc.stderr
    damaged = tmp_path / "damaged"
    shutil.copytree(pretrain_shards, damaged)
    tokens = sorted(damaged.glob("shard-*.tokens.npy"))[-1]
    data = bytearray(tokens.read_bytes())
    data[-1] ^= 1
    tokens.write_bytes(bytes(data))
    proc = run_cli("export", damaged, "--format", "megatron", "--out", tmp_path / "bad", check=False)
    assert proc.returncode == 1 and "sha256 differs from the manifest" in proc.stderr and proc.stderr.count("\n") == 1
    assert not list(tmp_path.glob("bad.*"))
