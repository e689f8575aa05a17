import json
import random

import pytest
import sentencepiece as spm
from conftest import MIXED_TEXTS, run_cli, shakespeare_plays

from preprocess.encoders import Encoder, split_for_encoding
from preprocess.errors import UserError
from preprocess.tokenizer import (
    CONTROL_SYMBOLS,
    TRAIN_CHUNK_BYTES,
    load_tokenizer,
    train_tokenizer,
    training_chunks,
)


def test_round_trip_keeps_every_byte(tokenizer_model):
    sp = spm.SentencePieceProcessor(model_file=tokenizer_model)
    unseen = "Ελληνικά, עברית, 日本語のテキスト, 한국어, \x7f\x01 control chars and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢\n"
    for text in [*MIXED_TEXTS, unseen, "  \n\n\t\t  \n", "x" * 10000]:
        assert sp.decode(sp.encode(text)) == text


def test_special_tokens_are_reserved_and_cannot_be_injected(tokenizer_model):
    info = load_tokenizer(tokenizer_model)
    sp = spm.SentencePieceProcessor(model_file=tokenizer_model)
    assert [info.special_ids[k] for k in ("unk", "bos", "eos", "pad")] == [0, 1, 2, 3]
    reserved = {info.special_ids[s] for s in CONTROL_SYMBOLS} | {1, 2, 3}
    assert len(reserved) == len(CONTROL_SYMBOLS) + 3
    assert all(sp.is_control(i) for i in reserved)
    hostile = "<s></s><pad>" + "".join(CONTROL_SYMBOLS) + " <|user|>\n<|assistant|> hi <|end|>"
    ids = sp.encode(hostile)
    assert not reserved & set(ids)
    assert sp.decode(ids) == hostile


def test_training_chunks_are_bounded_and_lossless():
    rng = random.Random(0)
    lines = ["".join(rng.choice("ab 中\n") for _ in range(rng.randint(0, 300))) + "\n" for _ in range(200)]
    doc = "".join(lines) + "z" * 20000 + " y" * 5000 + "字" * 3000
    chunks = list(training_chunks(doc))
    assert "".join(chunks) == doc
    assert max(len(c.encode()) for c in chunks) <= TRAIN_CHUNK_BYTES


def test_long_documents_are_trained_on_not_dropped(tmp_path):
    # Whole documents far longer than sentencepiece's max_sentence_length: the rare word below occurs only
    # inside them, so it becomes one piece only if the trainer really saw that text.
    filler = "plain words on a line\n" * 400
    docs = [filler + "zqxjvk " * 300 + filler for _ in range(4)]
    report = train_tokenizer(docs, str(tmp_path), 400)
    assert report.bytes_trained == sum(len(d.encode()) for d in docs)
    assert report.skipped_by_trainer == 0
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert len(sp.encode(" zqxjvk")) == 1


def test_tiny_corpus_falls_back_to_the_largest_possible_vocabulary(tmp_path, capsys):
    report = train_tokenizer(["a tiny corpus, only a few words.\n"] * 3, str(tmp_path), 5000)
    assert report.requested_vocab_size == 5000 and 270 < report.vocab_size < 5000
    assert spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model")).vocab_size() == report.vocab_size
    assert f"at most {report.vocab_size} tokens" in capsys.readouterr().err


def test_vocabulary_below_the_byte_alphabet_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="too small for this corpus: it needs at least"):
        train_tokenizer(["some text here\n"] * 3, str(tmp_path), 100)


def test_cli_trains_quietly_and_reports_what_it_used(tmp_path):
    plays = shakespeare_plays()[:3]
    proc = run_cli("tokenizer", "--input", *plays, "--vocab-size", 800, "--out", tmp_path / "tok")
    assert "trainer_interface" not in proc.stderr + proc.stdout  # sentencepiece's log goes to tokenizer.log
    assert "trainer_interface" in (tmp_path / "tok" / "tokenizer.log").read_text()
    assert "100% of" in proc.stdout and "800 tokens" in proc.stdout
    small = run_cli("tokenizer", "--input", *plays, "--vocab-size", 800, "--out", tmp_path / "tok2",
                    "--sample-mb", 0.05)
    assert "(1 document in" in small.stdout  # whole plays: the budget is met by the first sampled one


def test_cli_errors_are_one_line(tmp_path):
    proc = run_cli("tokenizer", "--input", tmp_path / "missing.txt", "--vocab-size", 800, "--out", tmp_path, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: {tmp_path / 'missing.txt'}: no such file or directory"


def test_llama_style_dummy_prefix_tokenizer_splits_long_documents_exactly(tmp_path):
    # Llama's tokenizer.model adds a dummy "▁" prefix; a long document encoded in pieces must still decode exactly.
    spm.SentencePieceTrainer.train(sentence_iterator=iter(MIXED_TEXTS * 30), model_prefix=str(tmp_path / "llama"),
                                   vocab_size=400, model_type="bpe", byte_fallback=True, add_dummy_prefix=True,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2)
    info = load_tokenizer(str(tmp_path / "llama.model"))
    assert info.adds_dummy_prefix and info.special_ids["eos"] == 2 and "<|user|>" not in info.special_ids
    text = "".join(MIXED_TEXTS) * 40
    pieces = split_for_encoding(text, 500, adds_dummy_prefix=True)
    assert len(pieces) > 5
    encoder = Encoder(info)
    sp = encoder.backend.sp
    ids = [i for p in sp.encode(pieces) for i in p]
    assert sp.decode(ids) == text
    no_space = "床前明月光" * 300
    assert split_for_encoding(no_space, 500, adds_dummy_prefix=True) == [no_space]


def test_character_coverage_makes_a_small_chinese_vocabulary_possible(tmp_path):
    from conftest import shared_data, write_jsonl

    poems = []
    for i in range(6):
        poems += [p["title"] + "\n" + "\n".join(p["paragraphs"]) + "\n"
                  for p in json.load(open(shared_data("tang_poems", f"poet.tang.{i * 1000}.json"), encoding="utf-8"))]
    src = write_jsonl(tmp_path / "poems.jsonl", [{"text": p} for p in poems])
    proc = run_cli("tokenizer", "--input", src, "--vocab-size", 4000, "--out", tmp_path / "default", check=False)
    assert proc.returncode == 1 and "--character-coverage 0.9995; lower it" in proc.stderr
    run_cli("tokenizer", "--input", src, "--vocab-size", 4000, "--out", tmp_path / "tok", "--character-coverage", 0.98)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok" / "tokenizer.model"))
    assert sp.vocab_size() == 4000
    ids = [sp.encode(p) for p in poems[:2000]]
    assert all(sp.decode(i) == p for i, p in zip(ids, poems, strict=False))  # rare characters as bytes, exactly
    assert sum(sp.is_byte(t) for i in ids for t in i) > 1000
    proc = run_cli("tokenizer", "--input", src, "--vocab-size", 4000, "--out", tmp_path / "x", "--character-coverage",
                   0.5, check=False)
    assert proc.returncode == 1 and proc.stderr.strip() == "error: --character-coverage must be between 0.98 and 1, got 0.5"
