"""The README's tour runs as written: every sh and python block of it, in order, in a fresh directory holding
`data/`, `chats.jsonl` and `prefs.jsonl` made from a few plays; then every sh block of the guides the tour links
to, where it is not a command the tour already ran. Training commands get smaller models and fewer steps
appended; nothing else is changed."""

import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
from conftest import CHAT, FAST, REPO, forking_python, shakespeare_plays, write_jsonl

SHORT = {  # appended to the training commands: the tour's stages in seconds
    "pretrain": [*FAST, "train.max_steps=3"],
    "sft": [*FAST, *CHAT, "train.max_steps=2"],
    "dpo": [*FAST, *CHAT, "train.max_steps=2"],
    "kto": [*FAST, *CHAT, "train.max_steps=2"],
    "grpo": [*FAST, *CHAT, "train.max_steps=2", "grpo.max_new_tokens=16"],
}


GUIDES = ["preprocessing.md", "training.md", "alignment.md"]  # what the tour's steps link to, in its order


def tour_blocks() -> list[tuple[str, str]]:
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    tour = text[text.index("## Tour"):]
    tour = tour[:tour.index("\n## ", 1)]
    return re.findall(r"```(sh|python)\n(.*?)```", tour, flags=re.S)


def guide_blocks() -> list[str]:
    blocks = []
    for guide in GUIDES:
        text = open(os.path.join(REPO, "docs", guide), encoding="utf-8").read()
        blocks += re.findall(r"^ *```sh\n(.*?)```", text, flags=re.S | re.M)
    return blocks


def commands(block: str) -> list[str]:
    lines = block.replace("\\\n", " ").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def shortened(command: str) -> str:
    command = re.sub(r"\s+#\s.*$", "", command)  # a trailing comment
    stage = re.search(r"-m training\.(pretrain|sft|dpo|kto|grpo)\b", command)
    return command + (" " + " ".join(map(shlex.quote, SHORT[stage.group(1)])) if stage else "")


def make_inputs(root) -> None:
    sys.path.insert(0, os.path.join(REPO, "recipes"))
    from shakespeare import is_question, speeches

    plays = shakespeare_plays()
    os.makedirs(root / "data")
    write_jsonl(root / "data" / "plays.jsonl", [{"text": open(p, encoding="utf-8").read()} for p in plays[:4]])
    lines = speeches(os.path.dirname(os.path.dirname(plays[0])))[:2000]
    write_jsonl(root / "chats.jsonl", [{"messages": [{"role": "user", "content": f"Write a line spoken by {n}."},
                                                    {"role": "assistant", "content": t}]} for n, t in lines[:300]])
    questions = [(n, t) for n, t in lines if is_question(t)]
    others = [t for _, t in lines if not is_question(t)]
    write_jsonl(root / "prefs.jsonl", [{"prompt": f"Write a line spoken by {n}.", "chosen": q, "rejected": o}
                                       for (n, q), o in zip(questions, others, strict=False)][:200])
    write_jsonl(root / "prompts.jsonl", [{"prompt": [{"role": "user", "content": f"Speak as {n}."}], "speaker": n}
                                         for n, _ in lines[300:400]])


@pytest.mark.slow
@pytest.mark.long
def test_every_command_of_the_readme_tour_runs_as_written(tmp_path):
    blocks = tour_blocks()
    assert sum(kind == "python" for kind, _ in blocks) >= 1 and len(blocks) >= 6
    make_inputs(tmp_path)
    os.symlink(os.path.join(REPO, "configs"), tmp_path / "configs")
    os.symlink(os.path.join(REPO, "recipes"), tmp_path / "recipes")  # the recipes' reward functions
    # the tour's .venv/bin/python: this interpreter, its commands of our code forked from the fork server (conftest)
    os.makedirs(tmp_path / ".venv" / "bin")
    _, fork_env = forking_python(tmp_path / ".venv" / "bin")
    env = {**os.environ, "PYTHONPATH": REPO, **fork_env}

    ran = []
    tour = {c for kind, block in blocks if kind == "sh" for c in commands(block)}
    guides = [c for block in guide_blocks() for c in commands(block) if c not in tour]
    assert any("training.describe" in c for c in guides)  # the guides hold commands of their own
    for kind, block in [*blocks, *(("sh", c) for c in guides)]:
        steps = [shortened(c) for c in commands(block)] if kind == "sh" else [block]
        for step in steps:
            argv = ["bash", "-c", step] if kind == "sh" else [sys.executable, "-c", step]
            proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, f"{step}\nexit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
            ran.append((step, proc.stdout))

    assert len(ran) >= 15
    # what the tour promises is there at the end: shards, runs of every stage, a report, an export that loads
    for path in ("shards/pretrain/manifest.json", "runs/tiny/report.png", "runs/sft-lora/checkpoints/latest",
                 "runs/dpo-lora/checkpoints/latest", "runs/kto/checkpoints/latest", "runs/grpo/checkpoints/latest",
                 "hf/dpo/model.safetensors",
                 "hf/sft-lora-adapter/adapter_model.safetensors",
                 "runs/sft-from-hf/checkpoints/latest"):
        assert os.path.exists(tmp_path / path), path
    assert any("AutoModelForCausalLM.from_pretrained" in step for step, _ in ran)
    described = [out for step, out in ran if "training.describe" in step]  # a guide's: the tour's run, resumed
    assert described and "pretrain: resumes runs/tiny at step 3 (runs/tiny/checkpoints/step-3)" in described[0]

    # the shard format section describes the shards the tour wrote
    shards = tmp_path / "shards" / "pretrain"
    tokens = np.load(shards / "shard-00000.tokens.npy", mmap_mode="r")
    offsets = np.load(shards / "shard-00000.offsets.npy", mmap_mode="r")
    assert tokens.ndim == offsets.ndim == 1 and tokens.dtype == np.uint16 and offsets.dtype == np.int64
    assert offsets[-1] == len(tokens) and tokens[offsets[0] - 1] == 2  # documents end with </s>
    assert (shards / "tokenizer.model").is_file()


def test_the_launch_recipes_name_scripts_and_configs_that_exist():
    text = open(os.path.join(REPO, "docs", "multinode.md"), encoding="utf-8").read()
    section = text[text.index("## Launching"):]
    block = re.search(r"```sh\n(.*?)```", section, flags=re.S).group(1)
    named = re.findall(r"(?:launch|configs)/[\w./-]+", block)
    assert len(named) >= 8
    for path in named:
        assert os.path.exists(os.path.join(REPO, path)), path
    for script in {p for p in named if p.endswith((".sh", ".sbatch"))}:
        assert os.access(os.path.join(REPO, script), os.X_OK) or script.endswith(".sbatch"), script


def test_the_docs_name_tests_that_exist():
    """The guides cite the tests that back their claims (file::name); a renamed or removed test must not leave a
    citation behind."""
    import ast
    import glob

    defined = set()
    for path in glob.glob(os.path.join(REPO, "tests", "test_*.py")):
        names = {n.name for n in ast.walk(ast.parse(open(path).read())) if isinstance(n, ast.FunctionDef)}
        defined |= {f"{os.path.basename(path)}::{n}" for n in names if n.startswith("test_")}
    cited = set()
    for path in [os.path.join(REPO, "README.md"), *glob.glob(os.path.join(REPO, "docs", "*.md"))]:
        cited |= set(re.findall(r"test_\w+\.py::test_\w+…?", open(path, encoding="utf-8").read()))
    missing = [c for c in cited if not (any(d.startswith(c[:-1]) for d in defined) if c.endswith("…") else c in defined)]
    assert len(cited) > 20 and missing == []
