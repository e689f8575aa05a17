"""The fast encoder (gigatoken) against the reference (sentencepiece): the same ids on real corpora and on hostile
text, the same shard bytes, and a start-up check that refuses it where it would differ."""

import glob
import json
import os
import random

import numpy as np
import pytest
import sentencepiece as spm
from conftest import MIXED_TEXTS, dir_digest, run_cli, shared_data, write_jsonl

import preprocess.encoders as encoders
from preprocess.__main__ import main
from preprocess.encoders import Encoder
from preprocess.tokenizer import CONTROL_SYMBOLS, load_tokenizer, train_tokenizer

pytest.importorskip("gigatoken")  # in the dev extra, so CI always has it


def assert_same_ids(info, texts: list[str]) -> None:
    fast_ids, fast_lengths = Encoder(info, "gigatoken").encode(texts)
    ids, lengths = Encoder(info, "sentencepiece").encode(texts)
    for i in np.flatnonzero(fast_lengths != lengths)[:1]:
        raise AssertionError(f"text {i} ({texts[i][:60]!r}): {fast_lengths[i]} ids, sentencepiece {lengths[i]}")
    if not np.array_equal(fast_ids, ids):
        k = int(np.flatnonzero(fast_ids != ids)[0])
        doc = int(np.searchsorted(np.cumsum(lengths), k, side="right"))
        raise AssertionError(f"text {doc} ({texts[doc][:60]!r}): id {fast_ids[k]}, sentencepiece {ids[k]}")


def hostile_texts(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    controls = ["<s>", "</s>", "<pad>", "<unk>", *CONTROL_SYMBOLS]
    texts = [*MIXED_TEXTS, "".join(controls), " ".join(controls), "<<s>>", "<|user", "|>", "<|end|><|end|>x",
             "▁<s>", "\\ud800 \\udfff \\u0000", "\ufffd\ufffd", "\ufeffBOM first", "\r", "\r\r\n\n", " " * 1000,
             "\t" * 50, "1234567890" * 100, "a" * 5000, "字" * 5000]
    # NUL-free binary-looking text: what a Latin-1 or a lossy UTF-8 read of random bytes gives
    for _ in range(20):
        raw = bytes(rng.randrange(1, 256) for _ in range(rng.randrange(1, 3000)))
        texts += [raw.decode("latin-1"), raw.decode("utf-8", "replace")]
    # every Unicode plane, assigned or not, private use and noncharacters included (no surrogates: the readers
    # reject those)
    for plane in range(17):
        points = [rng.randrange(plane << 16, (plane + 1) << 16) for _ in range(400)]
        points += [(plane << 16) | 0xFFFE, (plane << 16) | 0xFFFF]
        texts.append("".join(chr(c) for c in points if not 0xD800 <= c < 0xE000))
    texts.append("e\u0301 \U0001F469\u200D\U0001F4BB \u0627\u0644\u0639\u0631\u0628\u064A\u0629 \u202Eabc")
    return texts


def shared_corpus_texts() -> list[str]:
    """Every text of every corpus in ../shared/data: plain files whole, and each string of the JSON ones."""
    root = os.path.dirname(shared_data("tinyshakespeare"))
    texts = []

    def strings(value):
        if isinstance(value, str):
            if value.strip():
                texts.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                strings(v)
        elif isinstance(value, list):
            for v in value:
                strings(v)

    for path in sorted(glob.glob(os.path.join(root, "**", "*"), recursive=True)):
        if path.endswith((".txt", ".md", "README")) and os.path.isfile(path):
            texts.append(open(path, "rb").read().decode("utf-8", "replace"))
        elif path.endswith(".jsonl"):
            for line in open(path, encoding="utf-8"):
                strings(json.loads(line))
        elif path.endswith(".json"):
            strings(json.load(open(path, encoding="utf-8")))
    return texts


@pytest.fixture(scope="module")
def chinese_tokenizer(tmp_path_factory) -> str:
    """A 4,000-piece tokenizer on Tang poems: at coverage 0.98 most rare characters become byte pieces."""
    poems = []
    for path in sorted(glob.glob(os.path.join(shared_data("tang_poems"), "poet.tang.*.json")))[:8]:
        poems += [p["title"] + "\n" + "\n".join(p["paragraphs"]) + "\n" for p in json.load(open(path, encoding="utf-8"))]
    out = tmp_path_factory.mktemp("zh")
    train_tokenizer(poems, str(out), 4000, character_coverage=0.98)
    return str(out / "tokenizer.model")


@pytest.fixture(scope="module")
def dummy_prefix_tokenizer(tmp_path_factory) -> str:
    """Llama's kind of sentencepiece model: a "▁" in front of every encoded text."""
    out = tmp_path_factory.mktemp("llama")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(MIXED_TEXTS * 30), model_prefix=str(out / "llama"),
                                   vocab_size=400, model_type="bpe", byte_fallback=True, minloglevel=2,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False)
    return str(out / "llama.model")


def test_same_ids_on_hostile_text(tokenizer_model, dummy_prefix_tokenizer):
    for model in (tokenizer_model, dummy_prefix_tokenizer):
        texts = hostile_texts()
        assert_same_ids(load_tokenizer(model), texts)
    sp = spm.SentencePieceProcessor(model_file=tokenizer_model)
    ids, _ = Encoder(load_tokenizer(tokenizer_model), "gigatoken").encode(["".join(CONTROL_SYMBOLS) + "<s></s><pad>"])
    assert not any(sp.is_control(int(i)) for i in ids[:-1])  # the text of a control symbol is never one


@pytest.mark.slow
def test_same_ids_on_every_shared_corpus(tokenizer_model, chinese_tokenizer):
    texts = shared_corpus_texts()
    assert len(texts) > 1000 and sum(map(len, texts)) > 10_000_000
    for model in (tokenizer_model, chinese_tokenizer):
        assert_same_ids(load_tokenizer(model), texts)
    sp = spm.SentencePieceProcessor(model_file=chinese_tokenizer)
    chinese = sp.encode("".join(t for t in texts if "。" in t)[:200_000])
    assert sum(map(sp.is_byte, chinese)) > 0.05 * len(chinese), "byte fallback should be common, or this checks little"


@pytest.mark.slow
def test_same_ids_on_a_50_mb_document(tokenizer_model, monkeypatch):
    rng = random.Random(1)
    parts = hostile_texts(1) * 3
    rng.shuffle(parts)
    block = "\n".join(parts)
    document = block * (50_000_000 // len(block.encode()) + 1)
    info = load_tokenizer(tokenizer_model)
    assert_same_ids(info, [document])  # cut into 1 MiB pieces, the same pieces for both
    monkeypatch.setattr(encoders, "ENCODE_PIECE_CHARS", 1 << 30)
    assert_same_ids(info, [document[:8_000_000]])  # and one 8 MB string uncut


@pytest.mark.parametrize("kind", ["pretrain", "sft"])
def test_shards_are_the_same_bytes_with_either_encoder(tokenizer_model, corpus_dir, tmp_path, kind):
    inputs = [corpus_dir]
    if kind == "sft":
        inputs = [write_jsonl(tmp_path / "sft.jsonl", [{"prompt": t[:40], "response": t} for t in hostile_texts()])]
    outs = {}
    for encoder in ("sentencepiece", "gigatoken"):
        proc = run_cli("shards", "--kind", kind, "--input", *inputs, "--tokenizer", tokenizer_model, "--out",
                       tmp_path / encoder, "--encoder", encoder, "--unit-mb", "0.2", "--max-len", "100000")
        assert f"({encoder})" in proc.stdout
        outs[encoder] = dir_digest(tmp_path / encoder)
    assert outs["sentencepiece"] == outs["gigatoken"] and len(outs["gigatoken"]) > 3


def break_gigatoken_on_marker(monkeypatch) -> None:
    """gigatoken, made to get the last id of any text holding "qzjx" wrong (in this process and its forks)."""
    real = encoders.GigatokenBackend.encode

    def wrong_on_marker(self, texts):
        ids, lengths = real(self, texts)
        ends = np.cumsum(lengths)
        for i, t in enumerate(texts):
            if "qzjx" in t:
                ids = ids.copy()
                ids[ends[i] - 1] += 1
        return ids, lengths

    monkeypatch.setattr(encoders.GigatokenBackend, "encode", wrong_on_marker)


def test_the_fast_encoder_is_refused_where_its_ids_differ(tokenizer_model, tmp_path, monkeypatch, capsys):
    records = [{"text": f"document {i} " + MIXED_TEXTS[i % 5]} for i in range(300)]
    records[237]["text"] = "a rare marker qzjx that this gigatoken gets wrong"
    src = write_jsonl(tmp_path / "d.jsonl", records)
    break_gigatoken_on_marker(monkeypatch)
    args = ["shards", "--input", src, "--tokenizer", tokenizer_model, "--workers", "2"]
    assert main([*args, "--out", str(tmp_path / "auto")]) == 0
    captured = capsys.readouterr()
    assert f"note: gigatoken gives other ids than sentencepiece ({src}:238: token" in captured.err
    assert "(sentencepiece)" in captured.out  # the job ran, with the reference
    assert main([*args, "--out", str(tmp_path / "forced"), "--encoder", "gigatoken"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --encoder gigatoken gives other ids than sentencepiece: ") and "\n" not in err
    assert not os.path.exists(tmp_path / "forced" / "manifest.json")


def test_every_unit_is_checked_again_where_the_start_up_sample_did_not_look(tokenizer_model, tmp_path, monkeypatch,
                                                                            capsys):
    src = tmp_path / "src"
    src.mkdir()
    for k in range(40):  # 40 files of two segments each (--unit-mb 0.001): the start-up sample reads 16 of the 80
        write_jsonl(src / f"{k:02d}.jsonl", [{"text": f"file {k} record {i} " + MIXED_TEXTS[i % 5]} for i in range(20)])
    picked = {i * 80 // 16 // 2 for i in range(16)}  # the files of the sampled segments
    unsampled = min(set(range(40)) - picked)
    marked = src / f"{unsampled:02d}.jsonl"
    lines = marked.read_text().splitlines()
    lines[0] = json.dumps({"text": "a rare marker qzjx that this gigatoken gets wrong"})
    marked.write_text("\n".join(lines) + "\n")
    args = ["shards", "--input", str(src), "--tokenizer", tokenizer_model, "--workers", "2", "--unit-mb", "0.001"]
    assert main([*args, "--out", str(tmp_path / "reference"), "--encoder", "sentencepiece"]) == 0
    break_gigatoken_on_marker(monkeypatch)
    assert main([*args, "--out", str(tmp_path / "fast")]) == 0
    captured = capsys.readouterr()
    assert "(gigatoken)" in captured.out  # the start-up check saw nothing wrong
    assert f"note: gigatoken's ids differed at the start of 1 units (first: {marked}:1: token" in captured.err
    assert dir_digest(tmp_path / "fast") == dir_digest(tmp_path / "reference")
