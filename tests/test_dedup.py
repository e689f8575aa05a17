"""--dedup exact|near: planted duplicates are dropped, counted and located; distinct texts are kept; the bytes do
not depend on workers, ranks or interruptions; the setting is part of the plan."""

import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, dir_digest, run_cli, shakespeare_plays, shared_data, write_jsonl
from test_shards import decoded_documents

from preprocess.shards import read_manifest

pytest.importorskip("datasketch")


def scenes() -> list[str]:
    """Distinct documents of real text: Shakespeare's scenes."""
    docs = []
    for path in shakespeare_plays():
        docs += [s for s in open(path, encoding="utf-8").read().split("\n### ") if len(s) > 3000]
    return docs


def nearly(text: str, rng: random.Random, changes: int = 3) -> str:
    words = text.split(" ")
    for _ in range(changes):
        words[rng.randrange(len(words))] = "altered"
    return " ".join(words)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Three files of distinct scenes, with exact and near copies planted across files and units; returns the
    input directory and what a correct deduplication keeps."""
    rng = random.Random(7)
    docs = scenes()
    assert len(docs) > 300
    files = [docs[:150], docs[150:300], []]
    expected = {"exact": [], "near": []}
    for k in range(12):  # each copy comes after its original in the job's order (file by file)
        src_file, src_line = rng.randrange(2), rng.randrange(150)
        original = files[src_file][src_line]
        near = k % 2 == 1
        copy = nearly(original, rng) if near else original
        target = rng.randrange(src_file + 1, 3)
        files[target].append(copy)
        expected["near" if near else "exact"].append(copy)
    files[2] += docs[300:360]
    out = tmp_path_factory.mktemp("planted")
    for i, f in enumerate(files):
        write_jsonl(out / f"{i}.jsonl", [{"text": t} for t in f])
    return str(out), files, expected


def run_dedup(tokenizer_model, src, out, mode, *extra, workers=2):
    return run_cli("shards", "--input", src, "--tokenizer", tokenizer_model, "--out", out, "--dedup", mode,
                   "--unit-mb", "0.15", "--workers", workers, *extra)


@pytest.mark.parametrize("mode", ["exact", "near"])
def test_planted_duplicates_are_dropped_counted_and_located(tokenizer_model, planted, tmp_path, mode):
    src, files, expected = planted
    proc = run_dedup(tokenizer_model, src, tmp_path / "o", mode)
    manifest = read_manifest(tmp_path / "o")
    assert manifest["totals"]["shards"] > 5  # duplicates and originals lie in different units
    dropped = expected["exact"] + (expected["near"] if mode == "near" else [])
    all_docs = [t for f in files for t in f]
    kept = list(all_docs)
    for t in dropped:  # the later copy goes, the first stays
        kept.reverse()
        kept.remove(t)
        kept.reverse()
    assert decoded_documents(tmp_path / "o") == kept
    counts = {"exact": len(expected["exact"]), **({"near": len(expected["near"])} if mode == "near" else {})}
    assert manifest["duplicates"] == counts and manifest["options"]["dedup"]["mode"] == mode
    assert f"duplicates dropped: exact {counts['exact']}" in proc.stdout
    example = manifest["duplicate_examples"]["exact"][0]  # "file:line: repeats file:line", both lines real
    (path, line), (path0, line0) = [w.rsplit(":", 1) for w in example.split(": repeats ")]
    lines = {p: open(p, encoding="utf-8").read().splitlines() for p in (path, path0)}
    assert lines[path][int(line) - 1] == lines[path0][int(line0) - 1]
    assert (path, int(line)) > (path0, int(line0))
    if mode == "near":
        assert "nearly repeats" in manifest["duplicate_examples"]["near"][0]


def test_distinct_texts_are_all_kept_at_the_default_threshold(tokenizer_model, tmp_path):
    docs = []
    for path in sorted(glob.glob(os.path.join(shared_data("gutenberg_nltk"), "*.txt"))):
        text = open(path, encoding="utf-8", errors="replace").read()
        buf = []
        for para in text.split("\n\n"):  # ~2,000-character passages of 14 different books
            buf.append(para)
            if sum(map(len, buf)) > 2000:
                docs.append("\n\n".join(buf))
                buf = []
    docs = [d for d in dict.fromkeys(docs) if d.strip()]
    src = write_jsonl(tmp_path / "g.jsonl", [{"text": d} for d in docs])
    run_dedup(tokenizer_model, src, tmp_path / "o", "near")
    manifest = read_manifest(tmp_path / "o")
    assert manifest["duplicates"] == {"exact": 0, "near": 0} and manifest["totals"]["documents"] == len(docs) > 2000


def test_character_shingles_find_near_copies_of_chinese_poems(tokenizer_model, tmp_path):
    poems = [p["title"] + "\n" + "\n".join(p["paragraphs"])
             for p in json.load(open(shared_data("tang_poems", "poet.tang.0.json"), encoding="utf-8"))]
    poems = [p for p in dict.fromkeys(poems) if len(p) > 120][:300]
    copy = poems[10][:40] + "月" + poems[10][41:]  # one character changed
    assert copy != poems[10]
    src = write_jsonl(tmp_path / "p.jsonl", [{"text": p} for p in [*poems, copy]])
    run_dedup(tokenizer_model, src, tmp_path / "chars", "near", "--dedup-shingles", "chars")
    assert read_manifest(tmp_path / "chars")["duplicates"]["near"] == 1
    assert decoded_documents(tmp_path / "chars") == poems


@pytest.mark.slow
def test_the_same_bytes_for_any_workers_ranks_and_interruptions(tokenizer_model, planted, tmp_path):
    import psutil

    src = planted[0]
    reference = run_dedup(tokenizer_model, src, tmp_path / "ref", "near", workers=1) and dir_digest(tmp_path / "ref")
    run_dedup(tokenizer_model, src, tmp_path / "two", "near", workers=2)
    assert dir_digest(tmp_path / "two") == reference
    # two ranks of a static split (srun's way), started together: each waits for the other's signatures
    def command(out, *extra):
        return [sys.executable, "-m", "preprocess", "shards", "--input", src, "--tokenizer", tokenizer_model, "--out",
                str(out), "--dedup", "near", "--unit-mb", "0.15", *extra]

    ranks = [subprocess.Popen(command(tmp_path / "ranks", "--workers", "1", "--world", "2", "--rank", str(r)),
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (1, 0)]
    for p in ranks:
        assert p.wait(timeout=300) == 0, p.stderr.read()
    assert dir_digest(tmp_path / "ranks") == reference
    # kill -9 in each of the three passes (signatures, resolution done, writing), then finish: the same bytes
    out = tmp_path / "killed"
    signatures, units = out / ".work" / "dedup", out / ".work" / "units"

    def count(directory, pattern):
        return len(glob.glob(str(directory / pattern)))

    moments = [lambda: count(signatures, "shard-*.npz") >= 2, lambda: count(signatures, "resolution.json") == 1,
               lambda: count(units, "*.json") >= 3, lambda: count(units, "*.json") >= 8]
    killed_mid_run = 0
    for moment in moments:
        proc = subprocess.Popen(command(out, "--workers", "2"), cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        while proc.poll() is None and not moment():
            time.sleep(0.002)
        children = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        killed_mid_run += proc.wait() == -signal.SIGKILL
        psutil.wait_procs(children, timeout=10)
    assert killed_mid_run >= 3
    subprocess.run(command(out, "--workers", "2"), cwd=REPO, check=True, capture_output=True)
    assert dir_digest(out) == reference


def test_another_dedup_setting_is_refused_on_resume_and_on_a_finished_output(tokenizer_model, planted, tmp_path):
    src = planted[0]
    run_dedup(tokenizer_model, src, tmp_path / "o", "exact")
    for mode in ("near", "none"):
        proc = run_cli("shards", "--input", src, "--tokenizer", tokenizer_model, "--out", tmp_path / "o", "--dedup",
                       mode, "--unit-mb", "0.15", check=False)
        assert proc.returncode == 1 and "already holds shards made from other inputs or options" in proc.stderr
    work = tmp_path / "partial" / ".work"
    work.mkdir(parents=True)  # an unfinished run with --dedup exact: its plan is there, no manifest
    run_dedup(tokenizer_model, src, tmp_path / "partial-ref", "exact")
    plan = json.loads(open(tmp_path / "o" / "manifest.json").read())
    (work / "plan.json").write_text(json.dumps({"plan_sha256": plan["plan_sha256"], "inputs": plan["inputs"]}))
    proc = run_cli("shards", "--input", src, "--tokenizer", tokenizer_model, "--out", tmp_path / "partial",
                   "--dedup", "near", "--unit-mb", "0.15", check=False)
    assert proc.returncode == 1 and "holds an unfinished run of other inputs or options" in proc.stderr
    run_dedup(tokenizer_model, src, tmp_path / "partial", "exact")  # the same setting resumes
    assert dir_digest(tmp_path / "partial") == dir_digest(tmp_path / "partial-ref")


def test_chat_records_are_compared_without_the_system_prompt_they_share(tokenizer_model, tmp_path):
    docs = scenes()
    system = " ".join(docs[0].split()[:1500])  # a long system prompt shared by every record
    answers = [" ".join(d.split()[:300]) for d in docs[1:121]]

    def record(i, answer):
        return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": f"Scene {i}?"},
                             {"role": "assistant", "content": answer}]}

    records = [record(i, a) for i, a in enumerate(answers)]
    records.append(records[40])  # an exact copy
    records.append(record(77, nearly(answers[77], random.Random(5), changes=2)))  # a near one
    src = write_jsonl(tmp_path / "chat.jsonl", records)
    proc = run_cli("shards", "--kind", "sft", "--input", src, "--tokenizer", tokenizer_model, "--out", tmp_path / "o",
                   "--dedup", "near", "--max-len", "100000")
    manifest = read_manifest(tmp_path / "o")
    assert manifest["duplicates"] == {"exact": 1, "near": 1}, proc.stdout
    assert manifest["totals"]["documents"] == len(answers)
    assert manifest["duplicate_examples"]["near"] == [f"{src}:{len(records)}: nearly repeats {src}:78"]
