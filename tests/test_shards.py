import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import sentencepiece as spm
from conftest import MIXED_TEXTS, REPO, dir_digest, run_cli, shakespeare_plays, shard_documents, shared_data, write_jsonl

from preprocess.__main__ import main
from preprocess.shards import read_manifest
from preprocess.tokenizer import train_tokenizer


def decoded_documents(out_dir) -> list[str]:
    sp = spm.SentencePieceProcessor(model_file=os.path.join(out_dir, "tokenizer.model"))
    eos = read_manifest(out_dir)["tokenizer"]["special_ids"]["eos"]
    docs = []
    for ids in shard_documents(out_dir):
        assert ids[-1] == eos
        docs.append(sp.decode(ids[:-1].tolist()))
    return docs


def shards(tokenizer, out, *inputs, workers=2, extra=()):
    code = main(["shards", "--input", *map(str, inputs), "--tokenizer", tokenizer, "--out", str(out),
                 "--workers", str(workers), *extra])
    assert code == 0
    return str(out)


def jsonl_texts(*paths) -> list[str]:
    return [json.loads(line)["text"] for p in paths for line in open(p, encoding="utf-8")]


def test_round_trip_on_real_text(tokenizer_model, corpus_dir, tmp_path):
    out = shards(tokenizer_model, tmp_path / "s", corpus_dir, extra=["--unit-mb", "0.1"])
    expected = jsonl_texts(os.path.join(corpus_dir, "a.jsonl"), os.path.join(corpus_dir, "b.jsonl"))
    assert decoded_documents(out) == expected
    manifest = read_manifest(out)
    assert manifest["totals"]["documents"] == len(expected) and manifest["totals"]["shards"] > 5
    assert manifest["dtype"] == "uint16" and manifest["skipped"] == {}


def test_round_trip_cjk_and_cr_line_endings_from_shared_corpora(tokenizer_model, tmp_path):
    poems = []
    for name in ("poet.tang.0.json", "poet.tang.1000.json"):
        for poem in json.load(open(shared_data("tang_poems", name), encoding="utf-8")):
            poems.append(poem["title"] + "\n" + "\n".join(poem["paragraphs"]) + "\n")
    src = write_jsonl(tmp_path / "poems.jsonl", [{"text": p} for p in poems])
    war_and_peace = shared_data("war_and_peace", "warpeace_input.txt")  # a BOM and CR-only line ends
    out = shards(tokenizer_model, tmp_path / "s", src, war_and_peace)
    raw = open(war_and_peace, "rb").read().decode("utf-8")
    assert decoded_documents(out) == poems + [raw.removeprefix("\ufeff")]


def test_every_input_format_yields_the_same_documents(tokenizer_model, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    one_line = [t.replace("\n", " ").replace("\r", "") for t in MIXED_TEXTS] * 3
    src = tmp_path / "src"
    (src / "txtdir").mkdir(parents=True)
    write_jsonl(src / "d.jsonl", [{"text": t} for t in one_line])
    with gzip.open(src / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in one_line)
    (src / "d.json").write_text(json.dumps([{"text": t} for t in one_line]), encoding="utf-8")
    (src / "d.txt").write_text("\n\n".join(one_line) + "\n", encoding="utf-8")  # blank lines are not documents
    pq.write_table(pa.table({"text": one_line, "n": list(range(len(one_line)))}), src / "d.parquet", row_group_size=4)
    for i, t in enumerate(MIXED_TEXTS):
        (src / "txtdir" / f"{i}.txt").write_text(t, encoding="utf-8", newline="")
    cases = {"d.jsonl": one_line, "d.jsonl.gz": one_line, "d.json": one_line, "d.txt": one_line,
             "d.parquet": one_line, "txtdir": MIXED_TEXTS}
    for name, expected in cases.items():
        extra = ["--txt-doc", "line"] if name == "d.txt" else []
        out = shards(tokenizer_model, tmp_path / f"out-{name}", src / name, extra=["--unit-mb", "0.0002", *extra])
        assert decoded_documents(out) == expected, name
    assert len(read_manifest(tmp_path / "out-d.parquet")["shards"]) == 4  # one row group per unit here
    # a directory input finds every supported file, recursively and in sorted order; d.txt is one document here
    out = shards(tokenizer_model, tmp_path / "out-all", src)
    assert len(decoded_documents(out)) == 4 * len(one_line) + 1 + len(MIXED_TEXTS)


def test_output_bytes_do_not_depend_on_worker_count(tokenizer_model, corpus_dir, tmp_path):
    digests = []
    for workers in (1, 2, 3):
        out = shards(tokenizer_model, tmp_path / f"w{workers}", corpus_dir, workers=workers, extra=["--unit-mb", "0.05"])
        digests.append(dir_digest(out))
    assert len(digests[0]) > 20  # many shards, so the workers really shared the work
    assert digests[0] == digests[1] == digests[2]


@pytest.mark.slow
def test_kill_9_of_the_job_or_a_worker_then_rerun_gives_identical_bytes(tokenizer_model, tmp_path):
    import psutil

    plays = shakespeare_plays()
    src = tmp_path / "src"
    src.mkdir()
    for i, p in enumerate(plays):  # ~10 MB: long enough to be killed mid-way
        text = open(p, encoding="utf-8").read()
        write_jsonl(src / f"{i:02d}.jsonl", [{"text": s} for s in text.split("\n\n") if s.strip()] * 2)
    args = ["shards", "--input", src, "--tokenizer", tokenizer_model, "--workers", 2, "--unit-mb", 0.1]
    reference = dir_digest(run_cli(*args, "--out", tmp_path / "ref") and tmp_path / "ref")
    n_units = len(read_manifest(tmp_path / "ref")["shards"])
    assert n_units > 50

    rng = random.Random(1234)
    moments = [0] + sorted(rng.sample(range(1, n_units - 2), 4)) + [n_units]  # units done when killed
    out = tmp_path / "killed"
    units_dir = out / ".work" / "units"
    # a worker killed under a live parent: the run fails at once with a clear message instead of hanging
    proc = subprocess.Popen([sys.executable, "-m", "preprocess", *map(str, args), "--out", str(out)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and (not units_dir.is_dir() or len(os.listdir(units_dir)) < 3):
        time.sleep(0.005)
    workers = psutil.Process(proc.pid).children()
    assert len(workers) == 2
    workers[0].kill()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert stderr == "error: a worker process died (killed, or out of memory?); re-run the same command to resume\n"
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive

    killed_mid_run = 0
    for moment in moments:
        proc = subprocess.Popen([sys.executable, "-m", "preprocess", *map(str, args), "--out", str(out)],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            done = len(os.listdir(units_dir)) if units_dir.is_dir() else 0
            if done >= moment and (moment > 0 or rng.random() < 0.5):
                break
            time.sleep(0.005)
        children = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
        os.kill(proc.pid, signal.SIGKILL)  # the parent only: its workers must not outlive it
        killed_mid_run += proc.wait() == -signal.SIGKILL and not (out / "manifest.json").exists()
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, "worker processes outlived the killed parent"
    assert killed_mid_run >= 4

    run_cli(*args, "--out", out)
    assert dir_digest(out) == reference


def test_bad_records_are_skipped_counted_and_located(tokenizer_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\n".join([
        b'{"text": "good one"}',
        b'{"text": "broken',                    # 2 invalid JSON
        b'{"text": "caf\xe9 latin-1"}',         # 3 invalid UTF-8
        b'{"content": "wrong key"}',            # 4 missing key
        b'{"text": ""}',                        # 5 empty
        b'{"text": 5}',                         # 6 not a string
        b'[1, 2]',                              # 7 not an object
        b'{"text": "nul\\u0000inside"}',        # 8 binary
        b'',                                    # 9 blank line: not a record
        b'{"text": "lone \\ud800 surrogate"}',  # 10 invalid UTF-8 once encoded
        b'{"text": "good two"}',
    ]) + b"\n")
    garbage = tmp_path / "garbage.txt"
    garbage.write_bytes(b"some text\nthen\n" + bytes(random.Random(0).randbytes(3000)))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1" + b"\x00" * 100)
    good_gz = gzip.compress(b'{"text": "gz one"}\n{"text": "gz two"}\n' * 2000)
    (tmp_path / "cut.jsonl.gz").write_bytes(good_gz[: len(good_gz) // 2])

    out = tmp_path / "out"
    proc = run_cli("shards", "--input", bad, garbage, tmp_path / "broken.parquet", tmp_path / "cut.jsonl.gz",
                   "--tokenizer", tokenizer_model, "--out", out, "--workers", 2)
    manifest = read_manifest(out)
    assert manifest["skipped"] == {"binary": 1, "empty": 1, "invalid_json": 1, "invalid_utf8": 3, "missing_key": 1,
                                   "not_a_string": 1, "not_an_object": 1, "unreadable": 2}
    examples = manifest["skipped_examples"]
    assert examples["invalid_json"] == [f"{bad}:2: invalid JSON (Unterminated string starting at)"]
    assert examples["invalid_utf8"] == [f"{bad}:3: invalid UTF-8 (byte 0xe9 at column 14)",
                                        f"{bad}:10: invalid UTF-8 (lone surrogate at character 5)",
                                        f"{garbage}:3: invalid UTF-8 (byte 0xcd)"]
    assert examples["missing_key"] == [f"{bad}:4: missing key ('text')"]
    assert examples["empty"] == [f"{bad}:5: empty document"]
    assert examples["not_a_string"] == [f"{bad}:6: not a string ('text' is int)"]
    assert examples["not_an_object"] == [f"{bad}:7: not a JSON object (list)"]
    assert examples["binary"] == [f"{bad}:8: binary data (NUL bytes)"]
    parquet, gz = examples["unreadable"]
    assert parquet.startswith(f"{tmp_path / 'broken.parquet'}: unreadable file (not a readable parquet file")
    assert gz.startswith(f"{tmp_path / 'cut.jsonl.gz'}:") and "corrupt gzip" in gz
    docs = decoded_documents(out)
    assert docs[:2] == ["good one", "good two"] and set(docs[2:]) == {"gz one", "gz two"}
    assert "skipped 11 (invalid UTF-8: 3" in proc.stdout and f"{bad}:2: invalid JSON" in proc.stdout


def test_strict_stops_at_the_first_bad_record(tokenizer_model, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}, {"text": "b"}, {"text": "c"}])
    with open(bad, "a") as f:
        f.write('{"text": oops}\n{"text": "d"}\n')
    proc = run_cli("shards", "--input", bad, "--tokenizer", tokenizer_model, "--out", tmp_path / "o", "--strict", check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"error: {bad}:4: invalid JSON") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "o" / "manifest.json").exists()
    # records skipped by an earlier run without --strict are not forgotten when --strict is added later
    run_cli("shards", "--input", bad, "--tokenizer", tokenizer_model, "--out", tmp_path / "lax")
    proc = run_cli("shards", "--input", bad, "--tokenizer", tokenizer_model, "--out", tmp_path / "lax", "--strict", check=False)
    assert proc.returncode == 1 and proc.stderr.startswith(f"error: {bad}:4: invalid JSON")


def test_line_numbers_are_exact_deep_inside_a_large_file(tokenizer_model, tmp_path):
    records = [{"text": f"document number {i}"} for i in range(20000)]
    path = write_jsonl(tmp_path / "big.jsonl", records)
    lines = open(path, "rb").read().split(b"\n")
    lines[15000] = b'{"text": nope}'
    open(path, "wb").write(b"\n".join(lines))
    proc = run_cli("shards", "--input", path, "--tokenizer", tokenizer_model, "--out", tmp_path / "o",
                   "--unit-mb", 0.02, "--workers", 2)
    assert f"{path}:15001: invalid JSON" in proc.stdout
    assert len(read_manifest(tmp_path / "o")["shards"]) > 10


def test_missing_input_or_bad_tokenizer_fail_before_any_work(tokenizer_model, tmp_path):
    out = tmp_path / "never"
    proc = run_cli("shards", "--input", tmp_path / "nope.jsonl", "--tokenizer", tokenizer_model, "--out", out, check=False)
    assert proc.returncode == 1 and proc.stderr == f"error: {tmp_path / 'nope.jsonl'}: no such file or directory\n"
    fake = tmp_path / "fake.model"
    fake.write_bytes(b"not a model")
    src = write_jsonl(tmp_path / "ok.jsonl", [{"text": "fine"}])
    proc = run_cli("shards", "--input", src, "--tokenizer", fake, "--out", out, check=False)
    assert proc.returncode == 1 and proc.stderr.startswith(f"error: {fake}: not a sentencepiece model")
    assert proc.stderr.count("\n") == 1
    assert not out.exists()


def test_all_records_skipped_is_an_error(tokenizer_model, tmp_path):
    src = write_jsonl(tmp_path / "x.jsonl", [{"body": "a"}, {"body": "b"}])
    proc = run_cli("shards", "--input", src, "--tokenizer", tokenizer_model, "--out", tmp_path / "o", check=False)
    assert proc.returncode == 1
    assert proc.stderr.endswith(f"error: no documents were written: all 2 records were skipped, "
                                f"e.g. {src}:1: missing key ('text')\n")


def test_rerun_reuses_a_complete_output_and_refuses_other_inputs(tokenizer_model, corpus_dir, tmp_path):
    out = shards(tokenizer_model, tmp_path / "o", corpus_dir)
    before = dir_digest(out)
    proc = run_cli("shards", "--input", corpus_dir, "--tokenizer", tokenizer_model, "--out", out)
    assert "already complete" in proc.stdout and dir_digest(out) == before
    other = write_jsonl(tmp_path / "other.jsonl", [{"text": "different"}])
    proc = run_cli("shards", "--input", other, "--tokenizer", tokenizer_model, "--out", out, check=False)
    assert proc.returncode == 1 and "already holds shards made from other inputs" in proc.stderr
    assert dir_digest(out) == before
    train_tokenizer(["another small corpus of words\n"] * 20, str(tmp_path / "tok2"), 300)
    proc = run_cli("shards", "--input", corpus_dir, "--tokenizer", tmp_path / "tok2" / "tokenizer.model", "--out", out,
                   check=False)
    assert proc.returncode == 1 and "already holds shards made from other inputs" in proc.stderr
    assert dir_digest(out) == before  # its tokenizer.model too: nothing is copied into a refused directory


def test_output_inside_an_input_directory_is_not_read_back(tokenizer_model, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "a.jsonl", [{"text": "one"}, {"text": "two"}])
    for _ in range(2):  # the second run must see the same inputs, not the manifest.json written by the first
        proc = run_cli("shards", "--input", data, "--tokenizer", tokenizer_model, "--out", data / "shards")
    assert "already complete" in proc.stdout
    assert [i["path"] for i in read_manifest(data / "shards")["inputs"]] == [str(data / "a.jsonl")]


def test_empty_inputs_are_an_error_not_an_empty_dataset(tokenizer_model, tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "blank.jsonl").write_bytes(b"\n\n  \n")
    proc = run_cli("shards", "--input", tmp_path / "empty.jsonl", tmp_path / "blank.jsonl", "--tokenizer",
                   tokenizer_model, "--out", tmp_path / "o", check=False)
    assert proc.returncode == 1 and proc.stderr == "error: no documents were written: the inputs hold no records\n"


def test_verify_catches_a_flipped_byte_and_a_truncation(tokenizer_model, corpus_dir, tmp_path):
    out = shards(tokenizer_model, tmp_path / "o", corpus_dir, extra=["--unit-mb", "0.2"])
    assert "all sha256 match" in run_cli("verify", out).stdout
    victim = os.path.join(out, "shard-00001.tokens.npy")
    original = open(victim, "rb").read()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x01
    open(victim, "wb").write(bytes(flipped))
    proc = run_cli("verify", out, check=False)
    assert proc.returncode == 1 and "shard-00001.tokens.npy: sha256 differs" in proc.stderr
    open(victim, "wb").write(original)
    offsets = os.path.join(out, "shard-00002.offsets.npy")
    os.truncate(offsets, os.path.getsize(offsets) - 8)
    proc = run_cli("verify", out, check=False)
    assert proc.returncode == 1 and "shard-00002.offsets.npy" in proc.stderr and "truncated" in proc.stderr
    assert "shard-00001" not in proc.stderr


def test_verify_catches_ids_outside_the_vocabulary(tokenizer_model, corpus_dir, tmp_path):
    # A shard rewritten consistently (its sha256 updated too) but holding an id the tokenizer does not have.
    from preprocess.fileio import file_sha256

    out = shards(tokenizer_model, tmp_path / "o", corpus_dir, extra=["--unit-mb", "0.5"])
    manifest = read_manifest(out)
    path = os.path.join(out, "shard-00000.tokens.npy")
    tokens = np.load(path)
    tokens[5] = manifest["tokenizer"]["vocab_size"] + 3
    np.save(path, tokens)
    manifest["shards"][0]["files"]["tokens"]["sha256"] = file_sha256(path)
    open(os.path.join(out, "manifest.json"), "w").write(json.dumps(manifest))
    proc = run_cli("verify", out, check=False)
    assert proc.returncode == 1 and "shard-00000: token id 1003 is outside the vocabulary" in proc.stderr


@pytest.mark.parametrize("vocab_size,dtype", [(65536, "uint16"), (65537, "uint32")])
def test_token_dtype_at_the_uint16_boundary(tmp_path, vocab_size, dtype):
    text = "the quick brown fox jumps over the lazy dog while other words keep coming along\n" * 50
    padding = [f"<pad{i}>" for i in range(vocab_size - 8 - 256 - len(set(text)) - 40)]
    report = train_tokenizer([text], str(tmp_path / "tok"), vocab_size, extra_control_symbols=padding)
    assert report.vocab_size == vocab_size
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": text}, {"text": "fox and dog"}])
    out = shards(str(tmp_path / "tok" / "tokenizer.model"), tmp_path / "o", src)
    tokens = np.load(os.path.join(out, "shard-00000.tokens.npy"), mmap_mode="r")
    assert tokens.dtype == np.dtype(dtype) and read_manifest(out)["dtype"] == dtype
    assert int(tokens.max()) == vocab_size - 1 or int(tokens.max()) > 65000  # the merged pieces sit at the top
    assert decoded_documents(out) == [text, "fox and dog"]
    run_cli("verify", out)


@pytest.mark.parametrize("dummy_prefix", [False, True])
def test_long_documents_are_encoded_in_pieces_exactly(tokenizer_model, tmp_path, monkeypatch, dummy_prefix):
    import preprocess.encoders as tok

    if dummy_prefix:  # a Llama-style model: sentencepiece adds "▁" in front of every encoded string
        spm.SentencePieceTrainer.train(sentence_iterator=iter(MIXED_TEXTS * 30), model_prefix=str(tmp_path / "llama"),
                                       vocab_size=400, model_type="bpe", byte_fallback=True, minloglevel=2,
                                       normalization_rule_name="identity", remove_extra_whitespaces=False)
        tokenizer_model = str(tmp_path / "llama.model")
    monkeypatch.setattr(tok, "ENCODE_PIECE_CHARS", 2000)
    docs = ["".join(MIXED_TEXTS) * 60, " short one", "".join(reversed(MIXED_TEXTS)) * 45]
    src = write_jsonl(tmp_path / "long.jsonl", [{"text": d} for d in docs])
    out = shards(tokenizer_model, tmp_path / "o", src, workers=2)
    assert read_manifest(out)["tokenizer"]["adds_dummy_prefix"] is dummy_prefix
    assert decoded_documents(out) == docs


def test_the_shards_job_never_imports_torch(tokenizer_model, corpus_dir, tmp_path):
    code = ("import sys, preprocess.__main__ as m\n"
            f"rc = m.main(['shards', '--input', {corpus_dir!r}, '--tokenizer', {tokenizer_model!r}, "
            f"'--out', {str(tmp_path / 'o')!r}, '--workers', '2'])\n"
            "assert rc == 0\n"
            "print('torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("False")


def test_show_prints_ids_and_text(tokenizer_model, tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": "alpha beta"}, {"text": "gamma\ndelta"}])
    out = shards(tokenizer_model, tmp_path / "o", src)
    proc = run_cli("show", out, "--doc", 1)
    assert "ids:" in proc.stdout and "'gamma\\ndelta</s>'" in proc.stdout  # control symbols written out
    assert run_cli("show", out, "--doc", 2, check=False).returncode == 1
    shutil.rmtree(out)


@pytest.mark.parametrize("strict", [False, True])
def test_an_input_edited_in_place_is_not_taken_for_the_finished_output(tokenizer_model, tmp_path, strict):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": "the first document"}, {"text": "the second one"}])
    extra = ["--strict"] if strict else []
    out = shards(tokenizer_model, tmp_path / "o", src, extra=extra)
    assert ("sha256" in read_manifest(out)["inputs"][0]) is strict
    stat = os.stat(src)
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same content
    proc = run_cli("shards", "--input", src, "--tokenizer", tokenizer_model, "--out", out, *extra, check=False)
    if strict:  # contents are compared, and they are the same
        assert proc.returncode == 0 and "already complete" in proc.stdout
    else:
        assert proc.returncode == 1 and f"{src} was modified since" in proc.stderr
    with open(src, "r+b") as f:  # the same length, other text, the old time: only a content hash sees it
        f.seek(10)
        f.write(b"X")
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    proc = run_cli("shards", "--input", src, "--tokenizer", tokenizer_model, "--out", out, "--strict", check=False)
    if strict:
        assert proc.returncode == 1 and f"{src} has other content since" in proc.stderr
    else:  # the manifest holds no content hash to compare with: such an edit is seen only by a --strict output
        assert proc.returncode == 0 and "already complete" in proc.stdout
    assert decoded_documents(out) == ["the first document", "the second one"]  # nothing was overwritten


def test_a_finishing_rank_spares_temporary_files_still_being_written(tmp_path):
    import socket

    from preprocess.fileio import remove_stale_tmp

    host = socket.gethostname()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    try:
        names = {
            "live": f"manifest.json.tmp-{host}-{sleeper.pid}",           # another rank writing the manifest now
            "dead": f"manifest.json.tmp-{host}-{dead.stdout.strip()}",  # left by a killed run here
            "young": "manifest.json.tmp-other-node-12-4242",             # another host, just written
            "old": "manifest.json.tmp-other-node-12-4343",               # another host, long untouched
            "shard": f"shard-00003.tokens.npy.tmp-other-node-12-{sleeper.pid}",  # a finished unit's leftover
        }
        for name in names.values():
            (tmp_path / name).write_bytes(b"partial")
        os.utime(tmp_path / names["old"], (time.time() - 7200, time.time() - 7200))
        removed = remove_stale_tmp(str(tmp_path), finished=lambda final: os.path.basename(final).startswith("shard-"))
        assert removed == 3
        assert sorted(os.listdir(tmp_path)) == sorted([names["live"], names["young"]])
    finally:
        sleeper.kill()
        sleeper.wait()
