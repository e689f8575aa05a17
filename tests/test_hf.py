"""Hugging Face transformers: export (model, tokenizer, chat template, generation) and import (init_from a
transformers Llama directory), checked against transformers itself."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import CHAT, DPO_CONFIG, MIXED_TEXTS, SFT_CONFIG, losses, run_command, run_training, shakespeare_plays

transformers = pytest.importorskip("transformers")


def export(checkpoint, out, *args) -> subprocess.CompletedProcess:
    return run_command("-m", "training.export_hf", "--checkpoint", checkpoint, "--out", out, *args, timeout=300)


@pytest.fixture(scope="module")
def exported(sft_run, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("hf") / "model"
    proc = export(sft_run, out)
    assert proc.returncode == 0, proc.stderr
    assert "transformers reproduces our logits" in proc.stdout
    return str(out)


def real_texts() -> list[str]:
    texts = list(MIXED_TEXTS)
    for path in shakespeare_plays()[:3]:
        texts += [t for t in open(path, encoding="utf-8").read().split("\n\n") if t.strip()]
    return texts


def test_transformers_gives_our_logits_token_ids_chat_prompt_and_greedy_text(sft_run, exported):
    from preprocess.chat import ChatTemplate, Turn
    from training.checkpoint.weights import load_for_inference
    from training.models.decoding import generate

    ours, sp = load_for_inference(sft_run, "cpu")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)

    # the tokenizer: the same ids for every paragraph of three plays and the mixed-script samples, and back
    texts = real_texts()
    assert len(texts) > 1000
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids == sp.encode(text), text
        assert tokenizer.decode(ids) == text

    # logits on real text, fp32
    ids = sp.encode("\n".join(texts[200:260]))
    batch = torch.tensor([ids[:64], ids[64:128]])
    with torch.no_grad():
        diff = (theirs(batch).logits - ours(batch)).abs().max().item()
    assert diff < 1e-4

    # the chat template renders the prompt our ChatTemplate builds
    request = "Write a line spoken by ROMEO."
    prompt = ChatTemplate(sp.info).prompt([Turn("user", request)], [np.array(sp.encode(request))])
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": request}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"]
    assert rendered == prompt

    # greedy generation: the same ids and text, for a plain prompt and for the chat prompt (stopping at <|end|>)
    end_id = sp.info.special_ids["<|end|>"]
    for prompt_ids, stop in ((sp.encode("ROMEO:"), sp.eos_id), (prompt, end_id)):
        mine = generate(ours, prompt_ids, 24, greedy=True, eos_id=stop, vocab_limit=sp.vocab_size)
        out = theirs.generate(torch.tensor([prompt_ids]), max_new_tokens=24, do_sample=False)[0, len(prompt_ids):]
        out = out.tolist()
        if out and out[-1] in (sp.eos_id, end_id):
            out = out[:-1]
        if stop == sp.eos_id and end_id in out:  # transformers also stops at <|end|>; ours only at eos here
            mine = mine[:len(out)]
        assert out == mine
        assert tokenizer.decode(out, skip_special_tokens=True) == sp.decode(mine)


def test_greedy_generation_agrees_token_for_token_on_a_model_that_varies_its_output(sft_run):
    """A 3-step model repeats one token; weights with added noise make every step's argmax a real choice."""
    from training.checkpoint.weights import load_for_inference
    from training.models import hf
    from training.models.decoding import generate

    ours, sp = load_for_inference(sft_run, "cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in ours.parameters():
            if p.dim() == 2:
                p.add_(torch.randn_like(p) * 0.15)
    info_ids = {key: sp.info.special_ids[key] for key in ("eos", "bos", "pad")}
    llama = hf.family_of(ours.cfg)
    assert llama.architecture == "LlamaForCausalLM"
    theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama.to_hf_config(ours.cfg, info_ids))).eval()
    theirs.load_state_dict(llama.to_hf_state_dict(ours.state_dict(), ours.cfg), strict=False)
    theirs.tie_weights()
    for prompt in ("ROMEO:", "To be, or not", "First Citizen:\n"):
        ids = sp.encode(prompt)
        mine = generate(ours, ids, 40, greedy=True, vocab_limit=ours.cfg.vocab_size)
        out = theirs.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False, eos_token_id=None,
                              pad_token_id=sp.info.special_ids["pad"])[0, len(ids):].tolist()
        assert out == mine
        assert len(set(mine)) > 10


def test_bfloat16_export_halves_the_weights_and_loads(sft_run, exported, tmp_path):
    proc = export(sft_run, tmp_path / "bf16", "--dtype", "bfloat16")
    assert proc.returncode == 0, proc.stderr
    fp32 = os.path.getsize(os.path.join(exported, "model.safetensors"))
    bf16 = os.path.getsize(tmp_path / "bf16" / "model.safetensors")
    assert 0.45 < bf16 / fp32 < 0.55
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert model.dtype == torch.bfloat16


def test_export_refuses_a_non_empty_directory_and_a_missing_checkpoint(sft_run, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep me")
    proc = export(sft_run, tmp_path / "taken")
    assert proc.returncode == 1 and "exists and is not empty" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "taken" / "notes.txt").read_text() == "keep me"
    proc = export(tmp_path / "nothing", tmp_path / "new")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and not (tmp_path / "new").exists()


def test_fine_tuning_from_the_export_equals_fine_tuning_from_the_run(sft_run, exported, chat_shards, tmp_path):
    for stage, config, data in (("sft", SFT_CONFIG, chat_shards["sft"]), ("dpo", DPO_CONFIG, chat_shards["dpo"])):
        runs = {}
        for name, start in (("run", sft_run), ("hf", exported)):
            out = tmp_path / f"{stage}-{name}"
            run_training(f"data.path={data}", f"init_from={start}", "train.max_steps=3", f"out_dir={out}", *CHAT,
                         stage=stage, config=config)
            runs[name] = losses(out)
        assert runs["hf"] == runs["run"]  # bit for bit: the layout change is a permutation
        if stage == "dpo":
            assert math.isclose(runs["hf"][1], math.log(2), rel_tol=1e-5)


def save_foreign_llama(path, tokenizer_model, vocab_size=1024, **config):
    """A transformers Llama with a shape of its own, saved by transformers (no part of our code involved)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
                                   rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                                   rms_norm_eps=1e-6, tie_word_embeddings=False, **config)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path)
    if tokenizer_model is not None:
        shutil.copyfile(tokenizer_model, os.path.join(path, "tokenizer.model"))
    return model


def test_a_transformers_llama_directory_loads_into_our_model(tokenizer_model, tmp_path):
    from training.checkpoint import weights as ckpt
    from training.models.transformer import Transformer

    theirs = save_foreign_llama(tmp_path / "llama", tokenizer_model)
    path = ckpt.resolve(str(tmp_path / "llama"))
    cfg = ckpt.model_config(path)
    assert (cfg.n_kv_heads, cfg.ffn_hidden, cfg.rope_theta, cfg.tie_embeddings) == (1, 96, 500000.0, False)
    ours = Transformer(cfg)
    ckpt.load_weights(path, ours)
    tokens = torch.randint(0, 1024, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(tokens) - theirs(tokens).logits).abs().max().item() < 1e-4


def test_unsupported_or_incomplete_transformers_directories_are_one_line_errors(tokenizer_model, chat_shards, tmp_path):
    save_foreign_llama(tmp_path / "biased", tokenizer_model, attention_bias=True)
    save_foreign_llama(tmp_path / "untokenized", tokenizer_model)
    os.remove(tmp_path / "untokenized" / "tokenizer.model")
    for name, message in (("biased", "config.json: attention_bias=True is not supported"),
                          ("untokenized", "has no tokenizer.model")):
        proc = run_training(f"data.path={chat_shards['sft']}", f"init_from={tmp_path / name}", "train.max_steps=1",
                            f"out_dir={tmp_path / ('out-' + name)}", *CHAT, stage="sft", config=SFT_CONFIG, check=False)
        assert proc.returncode == 1
        assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    with open(tmp_path / "biased" / "config.json") as f:
        assert json.load(f)["attention_bias"] is True


def test_the_exported_tokenizer_gives_our_ids_on_chinese_poetry_and_books(tmp_path):
    """A larger vocabulary trained on real CJK and English text (../shared/data), both tokenizers over all of it."""
    from conftest import shared_data

    from preprocess.tokenizer import train_tokenizer
    from training.models.tokenizer_export import hf_tokenizer

    poems = json.load(open(os.path.join(shared_data("tang_poems"), "poet.tang.0.json"), encoding="utf-8"))
    texts = [p["title"] + "\n" + "\n".join(p["paragraphs"]) + "\n" for p in poems]
    book = open(shared_data("war_and_peace", "warpeace_input.txt"), encoding="utf-8", errors="replace").read()
    texts += [t for t in book.split("\n\n") if t.strip()][:3000]
    train_tokenizer(texts, str(tmp_path), 6000)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    theirs = hf_tokenizer(str(tmp_path / "tokenizer.model"))
    assert len(texts) > 3000
    mismatched = [t for t in texts if theirs(t)["input_ids"] != sp.encode(t)]
    assert mismatched == []


@pytest.fixture(scope="module")
def llama_style_tokenizer(tmp_path_factory) -> str:
    """A sentencepiece model set up as Llama 2's: a dummy prefix, no whitespace-only pieces, no pad id."""
    import sentencepiece as spm

    out = tmp_path_factory.mktemp("llama-tokenizer")
    texts = [t for p in shakespeare_plays()[:6] for t in open(p, encoding="utf-8").read().split("\n\n") if t.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts + MIXED_TEXTS * 20), model_prefix=str(out / "tokenizer"),
                                   vocab_size=1500, model_type="bpe", byte_fallback=True, split_digits=True,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return str(out / "tokenizer.model")


def test_a_llama_style_tokenizer_exports_with_the_same_ids(llama_style_tokenizer, tmp_path):
    import sentencepiece as spm

    from preprocess.errors import UserError
    from training.models.tokenizer_export import hf_tokenizer

    sp = spm.SentencePieceProcessor(model_file=llama_style_tokenizer)
    theirs = hf_tokenizer(llama_style_tokenizer)
    texts = real_texts() + ["", " ", "  two leading spaces", "x  y", "\n\nnewlines first", "tail  "]
    for text in texts:
        ids = theirs(text)["input_ids"]
        assert ids == sp.encode(text), text
        assert theirs.decode(ids) == sp.decode(ids)
    assert sp.encode("  two")[:2] == [sp.piece_to_id("▁")] * 2  # the dummy prefix is really there

    texts = [t for t in real_texts() if len(t) < 2000]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(tmp_path / "unigram"),
                                   vocab_size=600, model_type="unigram", minloglevel=2)
    with pytest.raises(UserError, match="model_type='UNIGRAM' cannot be exported"):
        hf_tokenizer(str(tmp_path / "unigram.model"))


@pytest.mark.slow
def test_continued_pretraining_of_a_transformers_llama_exports_back(llama_style_tokenizer, tmp_path):
    """The import-train-export round trip of a model that is not ours: its own tokenizer, shape and rope theta."""
    from conftest import run_cli, write_jsonl

    save_foreign_llama(tmp_path / "llama", llama_style_tokenizer, vocab_size=1536)
    src = write_jsonl(tmp_path / "plays.jsonl", [{"text": open(p, encoding="utf-8").read()} for p in shakespeare_plays()[:2]])
    run_cli("shards", "--input", src, "--tokenizer", llama_style_tokenizer, "--out", tmp_path / "shards")
    run_training(f"data.path={tmp_path / 'shards'}", f"init_from={tmp_path / 'llama'}", "train.max_steps=2",
                 f"out_dir={tmp_path / 'run'}")
    proc = export(tmp_path / "run", tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr
    assert "transformers reproduces our logits" in proc.stdout
    config = json.load(open(tmp_path / "hf" / "config.json"))
    assert (config["tie_word_embeddings"], config["num_key_value_heads"], config["intermediate_size"],
            config["rope_parameters"]["rope_theta"]) == (False, 1, 96, 500000.0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer.decode(tokenizer("  Two households, both alike")["input_ids"]) == "  Two households, both alike"


GENERATE_TASK = """task: cloze_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs: {{until: ["\\n"], max_gen_toks: 6, do_sample: false}}
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true}}
"""


def same_examples(ours: dict, theirs: dict, names: list[str], count: int) -> None:
    """Every example's scores (1e-4) and generated text alike in two harness results."""
    for name in names:
        mine, hf = (sorted(r["samples"][name], key=lambda s: s["doc_id"]) for r in (ours, theirs))
        assert len(mine) == len(hf) == count
        for a, b in zip(mine, hf, strict=True):
            if "exact_match" in a["metrics"]:
                assert a["resps"] == b["resps"], (a["doc"], a["resps"], b["resps"])
                continue
            (score_a, *greedy_a), (score_b, *greedy_b) = (np.atleast_1d(s["resps"][0][0]).tolist() for s in (a, b))
            assert score_a == pytest.approx(score_b, abs=1e-4, rel=1e-5) and greedy_a == greedy_b, a["doc"]


@pytest.fixture(scope="module")
def eval_tasks(tmp_path_factory) -> str:
    """recipes/eval_tasks.py's tasks on two plays the runs never saw, and a greedy generation task on its cloze."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is the eval extra")
    tasks = tmp_path_factory.mktemp("eval_tasks")
    recipe = os.path.join(os.path.dirname(os.path.dirname(__file__)), "recipes", "eval_tasks.py")
    subprocess.run([sys.executable, recipe, "--out", tasks, "--plays", *shakespeare_plays()[8:10]], check=True)
    data = json.dumps(str(tasks / "shakespeare_cloze.jsonl"))
    (tasks / "cloze_generate.yaml").write_text(GENERATE_TASK.format(data=data))
    sampled = GENERATE_TASK.format(data=data).replace("cloze_generate", SAMPLED).replace(
        "max_gen_toks: 6, do_sample: false", "max_gen_toks: 4, do_sample: true, temperature: 1.0")
    (tasks / f"{SAMPLED}.yaml").write_text(sampled)
    return str(tasks)


EVAL_TASKS = ["shakespeare_cloze", "shakespeare_perplexity", "cloze_generate"]
SAMPLED = "cloze_sample"  # generations drawn at temperature 1: the same on any number of processes


def test_the_harness_scores_our_checkpoint_as_it_scores_the_export(sft_run, exported, eval_tasks, tmp_path):
    """lm-evaluation-harness on the checkpoint (training.evaluate's model class) and on its transformers export
    (`--model hf`, fp32): the shipped example tasks (recipes/eval_tasks.py, on two plays the run never saw: a
    cloze's log-likelihoods, rolling perplexities in windows of the model's context) and a greedy generation task
    give every example the same scores (1e-4) and the same text. training.evaluate on 2 processes (torchrun)
    gives the 1-process results."""
    import lm_eval
    from conftest import python, run_process
    from lm_eval.tasks import TaskManager

    from training.checkpoint.weights import load_for_inference
    from training.report import summary
    from training.run.harness import ShardlmLM, Tasks

    names, tasks = EVAL_TASKS, eval_tasks
    model, tokenizer = load_for_inference(sft_run, "cpu")
    # with a sampled task beside the greedy one: each request decoded by its own settings
    ours = Tasks([*names, SAMPLED], [tasks]).run(ShardlmLM(model, tokenizer, batch_size=8), limit=24, num_fewshot=None)
    assert ours["samples"][SAMPLED][0]["resps"] != ours["samples"]["cloze_generate"][0]["resps"]
    manager = TaskManager(include_path=tasks, include_defaults=False)
    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={exported},dtype=float32", tasks=names,
                                     task_manager=manager, limit=24, log_samples=True, bootstrap_iters=0, batch_size=8,
                                     device="cpu")
    same_examples(ours, theirs, names, 24)
    # in the model's chat template (shardlm's own, exported as a jinja template): the same again
    chat = ["shakespeare_cloze", "cloze_generate"]
    ours_chat = Tasks(chat, [tasks]).score(model, tokenizer, rank=0, world=1, batch_size=8, limit=8, num_fewshot=None,
                                           chat=True)
    theirs_chat = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={exported},dtype=float32", tasks=chat,
                                          task_manager=manager, limit=8, log_samples=True, bootstrap_iters=0,
                                          batch_size=8, device="cpu", apply_chat_template=True)
    assert ours_chat["samples"]["shakespeare_cloze"][0]["arguments"][0][0].startswith("<|user|>")
    same_examples(ours_chat, theirs_chat, chat, 8)
    assert ours["results"]["shakespeare_perplexity"]["bits_per_byte,none"] == pytest.approx(
        theirs["results"]["shakespeare_perplexity"]["bits_per_byte,none"], rel=1e-5)

    out = tmp_path / "two.json"
    proc = run_process([*python(2), "-m", "training.evaluate", "--checkpoint", sft_run, "--include", tasks,
                        "--tasks", ",".join([*names, SAMPLED]), "--limit", "24", "--out", str(out)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "|shakespeare_perplexity|" in proc.stdout and os.path.isfile(tmp_path / "two.md")
    two = json.loads(out.read_text())
    assert [s["resps"] for s in sorted(two["samples"][SAMPLED], key=lambda s: s["doc_id"])] == \
        [s["resps"] for s in sorted(ours["samples"][SAMPLED], key=lambda s: s["doc_id"])]
    for name in [*names, SAMPLED]:
        for metric, value in ours["results"][name].items():
            if isinstance(value, float):
                assert two["results"][name][metric] == pytest.approx(value, rel=1e-6), (name, metric)
    (tmp_path / "run" / "evaluations").mkdir(parents=True)  # where training.evaluate writes for a run's checkpoint
    for step in (3, 12):  # the run's evaluations at two steps: the report shows the latest
        shutil.copy(tmp_path / "two.md", tmp_path / "run" / "evaluations" / f"step-{step}.cloze.md")
    report = "\n".join(summary(str(tmp_path / "run"), {}))
    assert "### lm-evaluation-harness: step-12.cloze" in report and "|shakespeare_perplexity|" in report
    assert "step-3.cloze" not in report


def test_the_harness_inside_a_sharded_run_scores_as_training_evaluate_on_its_checkpoint(pretrain_shards, eval_tasks,
                                                                                          tmp_path):
    """eval.tasks in a 2-process FSDP2 run (every forward gathers the sharded weights: both ranks score their
    shares in lockstep — 5 examples a task, so one rank has fewer and runs fillers; generation tasks of 6 and 4
    new tokens — and generate until both are done) logs eval/<task>/<metric> at eval.every and at the end, with the
    shipped evaluation and sample on; its scores at the end are training.evaluate's on the run's last checkpoint
    (one process, the whole model), and its losses are a run's without eval.tasks: the evaluation disturbs
    nothing the training draws."""
    from training.checkpoint.weights import load_for_inference
    from training.run.harness import Tasks

    names = [*EVAL_TASKS, SAMPLED]
    common = [f"data.path={pretrain_shards}", "train.max_steps=4", "train.eval_every=4", "dist.backend=fsdp2"]
    run_training(*common, f"eval.tasks=[{','.join(names)}]", f"eval.include=[{eval_tasks}]", "eval.every=2",
                 "eval.limit=5", f"out_dir={tmp_path / 'run'}", nproc=2)
    run_training(*common, f"out_dir={tmp_path / 'plain'}", nproc=2)
    out = tmp_path / "run"
    assert losses(out) == losses(tmp_path / "plain") and len(losses(out)) == 4
    logged = [json.loads(line) for line in open(out / "metrics.jsonl") if "eval/shakespeare_cloze/acc" in line]
    assert [r["step"] for r in logged] == [2, 4]
    assert {"eval/shakespeare_perplexity/bits_per_byte", f"eval/{SAMPLED}/exact_match"} <= set(logged[-1])
    assert os.path.isfile(out / "evaluations" / f"step-4.{'+'.join(names)}.json")
    model, tokenizer = load_for_inference(str(out), "cpu")
    alone = Tasks.metrics(Tasks(names, [eval_tasks]).score(model, tokenizer, rank=0, world=1, batch_size=8, limit=5,
                                                           num_fewshot=None, seed=1337))
    assert len(alone) >= 7
    for key, value in alone.items():
        assert logged[-1][key] == pytest.approx(value, rel=1e-4), key
