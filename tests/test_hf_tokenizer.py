"""Hugging Face tokenizer.json (byte-level BPE, trained here with the `tokenizers` library): shards decode back
byte for byte, no text becomes a special token, and a transformers Llama with that tokenizer trains and exports
back."""

import json
import os
import shutil

import numpy as np
import pytest
from conftest import MIXED_TEXTS, dir_digest, run_cli, run_command, run_training, shakespeare_plays, shard_documents, write_jsonl
from test_encoders import hostile_texts

from preprocess.shards import read_manifest
from preprocess.tokenizer import TextTokenizer

tokenizers = pytest.importorskip("tokenizers")


def train_byte_level_bpe(out_dir, *, vocab_size=1500, llama3=False, extra_specials=0) -> str:
    """GPT-2's kind (<|endoftext|> ends documents), or Llama 3 Instruct's (<|begin_of_text|> put in front by the
    post-processor, eos named by tokenizer_config.json as <|eot_id|> although <|end_of_text|> is there too, and
    a non-special added token as Qwen has for fill-in-the-middle); extra_specials pads the ids past 65,535."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    os.makedirs(out_dir, exist_ok=True)
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"] if llama3 else ["<|endoftext|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [open(p, encoding="utf-8").read() for p in shakespeare_plays()[:4]] + MIXED_TEXTS * 20
    tok.train_from_iterator(texts, trainer)
    if llama3:
        tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[
            ("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump({"eos_token": "<|eot_id|>", "bos_token": "<|begin_of_text|>"}, f)
        tok.add_tokens([tokenizers.AddedToken("<|fim_prefix|>", special=False, normalized=False)])
    if extra_specials:
        tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(extra_specials)])
    path = os.path.join(out_dir, "tokenizer.json")
    tok.save(path)
    return path


@pytest.fixture(scope="module")
def gpt2_style(tmp_path_factory) -> str:
    return train_byte_level_bpe(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def llama3_style(tmp_path_factory) -> str:
    return train_byte_level_bpe(tmp_path_factory.mktemp("llama3"), llama3=True, extra_specials=66000)


def texts_to_shard() -> list[str]:
    texts = [*MIXED_TEXTS, "a literal <|endoftext|> and <|begin_of_text|><|end_of_text|> in the text", "x" * 3000,
             "<|eot_id|> and <|fim_prefix|>def f(): <|reserved_7|>"]
    texts += [t for t in hostile_texts() if t.strip() and "\x00" not in t]
    for path in shakespeare_plays()[4:6]:
        texts += [s for s in open(path, encoding="utf-8").read().split("\n\n") if s.strip()]
    return texts


@pytest.mark.parametrize("style", ["gpt2_style", "llama3_style"])
def test_shards_decode_back_byte_for_byte_and_text_never_becomes_a_special_token(style, request, tmp_path):
    path = request.getfixturevalue(style)
    texts = texts_to_shard()
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    given = os.path.dirname(path) if style == "llama3_style" else path  # a directory holding it, or the file
    outs = {}
    for encoder in ("tokenizers", "gigatoken"):
        proc = run_cli("shards", "--input", src, "--tokenizer", given, "--out", tmp_path / encoder, "--encoder",
                       encoder, "--unit-mb", "0.05")
        assert f"({encoder})" in proc.stdout
        outs[encoder] = dir_digest(tmp_path / encoder)
    assert outs["tokenizers"] == outs["gigatoken"]
    out = tmp_path / "tokenizers"
    manifest = read_manifest(out)
    tok = manifest["tokenizer"]
    assert (tok["kind"], tok["file"]) == ("hf", "tokenizer.json")
    assert open(out / "tokenizer.json", "rb").read() == open(path, "rb").read()
    assert manifest["dtype"] == ("uint32" if style == "llama3_style" else "uint16")
    text = TextTokenizer(str(out / "tokenizer.json"))
    specials = {i for i in range(text.vocab_size) if text.is_control(i)}
    eos = tok["special_ids"]["eos"]
    assert text.piece(eos) == ("<|eot_id|>" if style == "llama3_style" else "<|endoftext|>")  # the config's
    if style == "llama3_style":
        assert os.path.isfile(out / "tokenizer_config.json")  # travels with the copy, which keeps that eos
        assert any(text.piece(i) == "<|fim_prefix|>" for i in specials)
    docs = shard_documents(str(out))
    assert len(docs) == len(texts)
    for ids, original in zip(docs, texts, strict=True):
        assert ids[-1] == eos and not specials & set(ids[:-1].tolist())  # no BOS added, no special from text
        assert text.decode(ids[:-1]) == original
    run_cli("verify", out)
    shown = run_cli("show", out, "--doc", len(MIXED_TEXTS), "--max-tokens", 200)
    assert f"text:   {texts[len(MIXED_TEXTS)] + text.piece(eos)!r}" in shown.stdout  # the literal, then eos


def test_chat_shards_with_a_tokenizer_json_without_a_chat_template_are_refused_in_one_line(gpt2_style, tmp_path):
    src = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "hi", "response": "hello"}])
    proc = run_cli("shards", "--kind", "sft", "--input", src, "--tokenizer", gpt2_style, "--out", tmp_path / "o",
                   check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert "has no chat template" in proc.stderr and "--chat-template FILE" in proc.stderr
    not_bpe = tmp_path / "wordlevel.json"
    tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(not_bpe))
    proc = run_cli("shards", "--input", src, "--tokenizer", not_bpe, "--out", tmp_path / "w", check=False)
    assert proc.returncode == 1 and "only BPE tokenizer.json files are supported" in proc.stderr


@pytest.mark.slow
def test_continued_pretraining_of_a_transformers_llama_with_its_tokenizer_json_exports_back(llama3_style, tmp_path):
    transformers = pytest.importorskip("transformers")
    from test_hf import export, save_foreign_llama

    vocab = TextTokenizer(llama3_style).vocab_size
    save_foreign_llama(tmp_path / "llama", None, vocab_size=vocab)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(os.path.join(os.path.dirname(llama3_style), name), tmp_path / "llama" / name)
    src = write_jsonl(tmp_path / "plays.jsonl", [{"text": open(p, encoding="utf-8").read()} for p in shakespeare_plays()[:2]])
    run_cli("shards", "--input", src, "--tokenizer", tmp_path / "llama", "--out", tmp_path / "shards")
    # the shipped config's evaluation (bits per byte from this tokenizer) and sample stay on
    run_training(f"data.path={tmp_path / 'shards'}", f"init_from={tmp_path / 'llama'}", "train.max_steps=2",
                 "train.eval_every=2", "train.sample_prompt=Two households", f"out_dir={tmp_path / 'run'}")
    metrics = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    evals = [m for m in metrics if "val_bpb" in m]
    assert evals and all(np.isfinite(m["val_bpb"]) for m in evals)
    proc = export(tmp_path / "run", tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr
    assert "transformers reproduces our logits" in proc.stdout
    assert open(tmp_path / "hf" / "tokenizer.json", "rb").read() == open(llama3_style, "rb").read()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "  Two households, both alike in dignity"
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == TextTokenizer(llama3_style).encode(text)
    eos = TextTokenizer(llama3_style).eos_id
    assert TextTokenizer(str(tmp_path / "run" / "tokenizer.json")).eos_id == eos  # the run's copy has its config
    assert tokenizer.eos_token == "<|eot_id|>"
    generation = json.load(open(tmp_path / "hf" / "generation_config.json"))
    assert generation["eos_token_id"] in (eos, [eos])
    proc = run_command("-m", "training.generate", "--checkpoint", tmp_path / "run", "--prompt", "Two households",
                       "--max-new-tokens", "8")
    assert proc.returncode == 0 and proc.stdout.startswith("Two households"), proc.stderr
    # and the export is itself a starting point for the same shards (its tokenizer.json has their sha256)
    run_training(f"data.path={tmp_path / 'shards'}", f"init_from={tmp_path / 'hf'}", "train.max_steps=1",
                 f"out_dir={tmp_path / 'again'}")


def test_added_tokens_that_are_ordinary_text_are_produced_from_text_as_the_models_tokenizer_does(
        tokenizer_model, tmp_path):
    """Gemma's tokenizer.json adds runs of whitespace as non-special tokens, which its tokenizer produces from text:
    shards give exactly the `tokenizers` library's ids of the whole file on text holding them (a sentencepiece-style
    file here, ours with such tokens added), a <marker> or [INST] among the non-special added tokens still stays text, the
    bytes per token add up to the text's, and verify and show work on the result."""
    from tokenizers import Tokenizer

    from preprocess import hf_tokenizer
    from training.models.tokenizer_export import hf_tokenizer as exported

    folder = tmp_path / "tokenizer"
    exported(tokenizer_model).save_pretrained(folder)
    spec = json.load(open(folder / "tokenizer.json"))
    top = max(spec["model"]["vocab"].values()) + 1
    textual = ["\n\n\n", "\t\t", "    "]
    spec["added_tokens"] += [{"id": top + i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": False} for i, c in enumerate([*textual, "<marker>", "[INST]"])]
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    texts = ["def f():\n\t\treturn 1\n\n\n\nclass A:\n    x = 2", "a <marker> and [INST] stay text\n\n\n", *MIXED_TEXTS]
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    run_cli("shards", "--input", src, "--tokenizer", folder, "--out", tmp_path / "out")
    model = Tokenizer.from_file(str(folder / "tokenizer.json"))
    sizes = hf_tokenizer.token_bytes(str(folder / "tokenizer.json"))
    docs = shard_documents(str(tmp_path / "out"))
    for ids, text in zip(docs, texts, strict=True):
        theirs = model.encode(text, add_special_tokens=False).ids
        if "<marker>" in text:  # theirs makes the markers; ours keeps them text
            assert {top + 3, top + 4} <= set(theirs) and not {top + 3, top + 4} & set(ids[:-1].tolist())
        else:
            assert ids[:-1].tolist() == theirs
        assert int(sizes[ids[:-1]].sum()) == len(text.encode("utf-8"))
    assert {top, top + 1, top + 2} <= set(np.concatenate(docs).tolist())  # each run came out as its added token
    run_cli("verify", tmp_path / "out")
    assert "\\t\\treturn" in run_cli("show", tmp_path / "out", "--doc", 0).stdout
