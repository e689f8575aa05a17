"""Other trainers' token files: Megatron indexed datasets (preprocess/megatron.py) against megatron-core's own
IndexedDataset and IndexedDatasetBuilder (a test-only dependency, installed without its dependencies: its
indexed_dataset needs only numpy and torch), nanoGPT's train.bin, and `preprocess import` of both."""

import json
import os
import re
import struct

import numpy as np
import pytest
from conftest import losses, run_cli, run_training, shakespeare_plays, shard_documents, shared_data

from preprocess import importing, megatron
from preprocess.errors import UserError
from preprocess.shards import verify
from preprocess.tokenizer import load_tokenizer

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


@pytest.mark.parametrize("chunk", [megatron.CHUNK, 7])
def test_we_read_what_megatron_cores_builder_writes_documents_of_several_sequences_too(tmp_path, monkeypatch, chunk):
    """Documents of several sequences (split sentences), and of none (end_document twice); read a whole index at
    a time and, as a corpus larger than memory is, 7 entries at a time."""
    core = reference()
    monkeypatch.setattr(megatron, "CHUNK", chunk)
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
    tokens, ends = index.tokens(), np.concatenate(list(index.document_ends()))
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


# ------------------------------------------------------------------------------------------- preprocess import

def test_our_export_imported_again_trains_exactly_as_the_shards_it_came_from(pretrain_shards, sft_run, tmp_path):
    """shards → Megatron dataset → `preprocess import`: the .bin is linked, not copied; verify and show read it; a
    run on it has the same losses, step for step, as sft_run's pretraining run on the shards themselves (the same
    token stream and documents); importing again is nothing to do, and after the .bin changed, refused."""

    run_cli("export", pretrain_shards, "--format", "megatron", "--out", tmp_path / "corpus")
    tokenizer = os.path.join(pretrain_shards, "tokenizer.model")
    proc = run_cli("import", tmp_path / "corpus", "--format", "megatron", "--tokenizer", tokenizer,
                   "--out", tmp_path / "imported")
    assert "hard link to" in proc.stdout and "not copied" in proc.stdout, proc.stdout
    assert os.path.samefile(tmp_path / "imported" / "corpus.bin", tmp_path / "corpus.bin")
    manifest = json.loads((tmp_path / "imported" / "manifest.json").read_text())
    assert manifest["imported"]["eos_ends_documents"] and manifest["dtype"] == "uint16"
    ours, imported = shard_documents(pretrain_shards), shard_documents(tmp_path / "imported")
    check = manifest["imported"]["tokenizer_round_trip"]
    assert check["given_back"] == check["ids"] > 4000
    assert len(ours) == len(imported) and all(np.array_equal(a, b) for a, b in zip(ours, imported, strict=True))
    assert "all sha256 match" in run_cli("verify", tmp_path / "imported").stdout
    shown = run_cli("show", tmp_path / "imported", "--doc", "3").stdout.split("\n", 1)  # the header names the shard
    assert shown[1] == run_cli("show", pretrain_shards, "--doc", "3").stdout.split("\n", 1)[1] and "52" in shown[0]

    run_training(f"data.path={tmp_path / 'imported'}", "train.max_steps=3", f"out_dir={tmp_path / 'run'}")
    mine = losses(tmp_path / "run")
    assert len(mine) == 3 and mine == losses(os.path.join(os.path.dirname(sft_run), "pretrain"))

    again = run_cli("import", tmp_path / "corpus", "--format", "megatron", "--tokenizer", tokenizer,
                    "--out", tmp_path / "imported")
    assert "nothing to do" in again.stdout
    with open(tmp_path / "corpus.bin", "r+b") as f:  # through the link too: the same file
        f.seek(10)
        f.write(b"\x07\x00")
    os.utime(tmp_path / "corpus.bin", ns=(1, 1))
    proc = run_cli("verify", tmp_path / "imported", check=False)
    assert proc.returncode == 1 and "corpus.bin: sha256 differs from the manifest" in proc.stderr
    proc = run_cli("import", tmp_path / "corpus", "--format", "megatron", "--tokenizer", tokenizer,
                   "--out", tmp_path / "imported", check=False)
    assert proc.returncode == 1 and proc.stderr.strip().endswith("corpus.bin was modified since; give a new --out")


def test_a_megatron_core_dataset_of_split_sentences_without_eod_imports_in_several_shards(
        pretrain_shards, tmp_path, monkeypatch):
    """megatron-core's builder, int32, documents of several sequences, of none, and without an end-of-document id
    (preprocess_data without --append-eod): the import gives the same non-empty documents, across shards cut at
    document ends, hashed by two processes; it says which documents lack eos, and verify accepts them as imported.
    Where no hard link can be made, a symbolic one."""

    core = reference()
    docs = [piece for doc in shard_documents(pretrain_shards) for piece in np.array_split(doc, 20)]  # 160
    eos = load_tokenizer(os.path.join(pretrain_shards, "tokenizer.model")).eos_id
    without_eos = sum(int(d[-1] != eos) for d in docs)
    builder = core.IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=np.int32)
    for i, doc in enumerate(docs):
        builder.add_document(doc.astype(np.int32), [len(doc) // 2, len(doc) - len(doc) // 2])
        if i == 5:
            builder.end_document()  # a document of no sequence: skipped, counted
    builder.finalize(str(tmp_path / "theirs.idx"))

    monkeypatch.setattr(importing, "SHARD_BYTES", 40000)  # several shards of a small corpus, read and summed
    monkeypatch.setattr(importing, "CHUNK", 999)          # a few elements at a time, as a corpus larger than
    monkeypatch.setattr(megatron, "CHUNK", 7)             # memory is
    monkeypatch.setattr(importing.os, "link", lambda *a: (_ for _ in ()).throw(OSError(18, "cross-device link")))
    manifest, done = importing.import_corpus("megatron", str(tmp_path / "theirs"),
                                             load_tokenizer(os.path.join(pretrain_shards, "tokenizer.model")),
                                             str(tmp_path / "imported"), workers=2)
    shards = manifest["shards"]
    assert not done and len(shards) > 10 and max(s["documents"] for s in shards) > 1 and manifest["dtype"] == "int32"
    assert os.path.islink(tmp_path / "imported" / "theirs.bin") and manifest["imported"]["link"] == "symbolic"
    assert manifest["skipped"] == {"empty": 1} and "document 6 is empty" in manifest["skipped_examples"]["empty"][0]
    assert manifest["imported"]["documents_without_eos"] == without_eos > 100 and not manifest["imported"]["eos_ends_documents"]
    imported = shard_documents(tmp_path / "imported")
    assert len(imported) == len(docs) and all(np.array_equal(a, b) for a, b in zip(docs, imported, strict=True))
    assert verify(str(tmp_path / "imported"), workers=2)[1] == []


def test_a_nanogpt_file_round_trips_and_bad_input_is_one_line(pretrain_shards, tokenizer_model, tmp_path):
    """nanoGPT's prepare.py writes each document's ids then the end-of-text id, as uint16, to train.bin: imported,
    training reads the same documents (the ids after the last end of text as one more, without it). Ids past the
    vocabulary, an odd-sized file and the wrong tokenizer are each one line naming the file."""

    docs = shard_documents(pretrain_shards)[:30]
    ids = np.concatenate(docs + [docs[0][:5]]).astype(np.uint16)  # a tail without eos
    ids.tofile(tmp_path / "train.bin")
    proc = run_cli("import", tmp_path / "train.bin", "--format", "nanogpt", "--tokenizer", tokenizer_model,
                   "--out", tmp_path / "imported")
    assert "1 documents do not end with eos" in proc.stdout
    assert [list(d) for d in shard_documents(tmp_path / "imported")] == [list(d) for d in docs] + [list(docs[0][:5])]
    assert "imported documents without eos" in run_cli("verify", tmp_path / "imported").stdout

    def refusal(path, *more):
        proc = run_cli("import", path, "--format", "nanogpt", "--out", tmp_path / "out", *more, check=False)
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
        return proc.stderr.strip()

    bad = ids.copy()
    bad[1234] = 1000  # the tokenizer has 1,000 ids
    bad.tofile(tmp_path / "bad.bin")
    assert refusal(tmp_path / "bad.bin", "--tokenizer", tokenizer_model) == (
        f"error: {tmp_path / 'bad.bin'}: id 1,000 at element 1,234 is past the vocabulary of {tokenizer_model} "
        "(1,000 ids): the ids were made with another tokenizer")
    (tmp_path / "odd.bin").write_bytes(ids.tobytes()[:-1])
    assert refusal(tmp_path / "odd.bin", "--tokenizer", tokenizer_model).endswith(
        f"odd.bin: {2 * len(ids) - 1:,} bytes, an odd number: not nanoGPT's uint16 ids")
    llama = shared_data("tokenizers", "llama3_1", "tokenizer.json")  # skips when ../shared is absent
    assert refusal(tmp_path / "train.bin", "--tokenizer", llama, "--eot", "128009").endswith(
        "--eot 128009: not an id below 65,536 (the tokenizer has 128,256 ids; nanoGPT's are uint16)")
    wrong = refusal(tmp_path / "train.bin", "--tokenizer", llama, "--eot", "2")  # ids < 1,000 are Llama's too
    back = re.search(f"{re.escape(llama)}: decoding [\\d,]+ ids of .* and encoding the text again gave back "
                     "[\\d,]+ \\((\\d+)%", wrong)
    assert back and int(back[1]) < 97, wrong  # refused: the check needs 97%
    assert not (tmp_path / "out").exists()  # a refused import leaves nothing


def test_the_tokenizer_check_tells_two_byte_level_tokenizers_of_one_lineage_apart(tmp_path):
    """Llama 3's ids read with Qwen3's tokenizer: both byte-level BPE grown from one vocabulary, so most English ids
    decode to the same text, and 92% of them come back, where the right tokenizer gives back every one: refused
    (the threshold is 97%). The same directory then takes the right import; a file of the user's in --out is
    never overwritten, and a negative id is one line."""
    llama, qwen = (shared_data("tokenizers", name, "tokenizer.json") for name in ("llama3_1", "qwen3"))
    encoder = load_tokenizer(llama)
    from preprocess.tokenizer import TextTokenizer

    text = TextTokenizer(llama)
    docs = [np.array([*text.encode(p), encoder.eos_id], np.int32) for play in shakespeare_texts(2)
            for p in play.split("\n\n") if p.strip()]
    megatron.write(str(tmp_path / "llama"), [(np.concatenate(docs), [len(d) for d in docs])], np.int32)
    proc = run_cli("import", tmp_path / "llama", "--format", "megatron", "--tokenizer", qwen, "--out", tmp_path / "a",
                   check=False)
    assert proc.returncode == 1 and re.search(r"gave back [\d,]+ \(9\d%; the tokenizer they were made with gives "
                                              r"back over 99%\)", proc.stderr), proc.stderr
    proc = run_cli("import", tmp_path / "llama", "--format", "megatron", "--tokenizer", llama, "--out", tmp_path / "a")
    assert "gave back 100.0% of" in proc.stdout, proc.stdout

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "llama.bin").write_bytes(b"the user's")
    proc = run_cli("import", tmp_path / "llama", "--format", "megatron", "--tokenizer", llama, "--out",
                   tmp_path / "mine", check=False)
    assert proc.returncode == 1 and "mine: not empty; an import writes a new or empty directory" in proc.stderr
    assert (tmp_path / "mine" / "llama.bin").read_bytes() == b"the user's"
    megatron.write(str(tmp_path / "negative"), [(np.array([5, 6, 7], np.int32), [3])], np.int32)
    with open(tmp_path / "negative.bin", "r+b") as f:  # our writer refuses one: another's may not
        f.seek(4)
        f.write(np.array([-1], np.int32).tobytes())
    proc = run_cli("import", tmp_path / "negative", "--format", "megatron", "--tokenizer", llama, "--out",
                   tmp_path / "b", "--trust-tokenizer", check=False)
    assert proc.returncode == 1 and proc.stderr.strip().endswith("negative.bin: id -1 at element 1 is negative")


def shakespeare_texts(count: int) -> list[str]:
    return [open(path, encoding="utf-8").read() for path in shakespeare_plays()[:count]]
