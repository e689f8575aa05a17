"""Reads back from the device per training step: the calls that make a GPU's host wait for the work it queued
(a tensor's value into Python, an operation whose result's size depends on values), counted by
tests/hooked_run.py's HostReads in runs of the tiny pretraining preset, as shipped (evaluation with its sample,
TensorBoard, progress lines), logging every 4 steps, on one process and on two (DDP, gloo).

    python bench/host_reads.py [--tree DIR] [--steps 8] [--every 4]

--tree DIR runs another checkout's training code (e.g. a `git worktree` of an older commit) under the same
counter: the figure before a change, beside the figure after it. A CPU has no GPU to wait for; the same calls
are what would wait on one.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile

from train import REPO, make_shards


def reads_per_step(tree: str, shards: str, out: str, nproc: int, steps: int, every: int) -> dict:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    subprocess.run([sys.executable, *launcher, os.path.join(REPO, "tests", "hooked_run.py"),
                    f"reads={os.path.join(out, 'reads')}", "pretrain", "--config",
                    os.path.join(tree, "configs", "pretrain", "tiny.yaml"), f"data.path={shards}",
                    f"out_dir={os.path.join(out, 'run')}", f"train.max_steps={steps}", f"log.every={every}",
                    f"train.eval_every={every}", "train.grad_accum=2"],
                   check=True, cwd=tree, env={**os.environ, "PYTHONPATH": tree}, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    reads = {int(k): v for k, v in json.load(open(os.path.join(out, "reads.rank-0.json"))).items()}
    quiet = [s for s in range(1, steps + 1) if s % every]
    logged = [s for s in range(1, steps + 1) if not s % every]
    return {"quiet": sum(len(reads.get(s, [])) for s in quiet) / len(quiet),
            "logged": sum(len(reads.get(s, [])) for s in logged) / len(logged),
            "quiet_calls": collections.Counter(name for s in quiet for name in reads.get(s, [])).most_common(4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tree", default=REPO, help="the checkout whose training code runs (default: this one)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--every", type=int, default=4)
    args = ap.parse_args()
    tree = os.path.abspath(args.tree)
    with tempfile.TemporaryDirectory() as scratch:
        shards = make_shards(os.path.join(scratch, "data"))
        commit = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or "?"
        print(f"reads back from the device per step, rank 0, the training code of commit {commit}: "
              f"log.every={args.every}, {args.steps} steps (2 micro-batches each)")
        print("| processes | a step that does not log | a step that logs (evaluation, sample) | what the quiet steps read |")
        print("|---:|---:|---:|---|")
        for nproc in (1, 2):
            r = reads_per_step(tree, shards, os.path.join(scratch, f"n{nproc}"), nproc, args.steps, args.every)
            calls = ", ".join(f"{name} {n}" for name, n in r["quiet_calls"]) or "—"
            print(f"| {nproc} | {r['quiet']:.1f} | {r['logged']:.1f} | {calls} |")


if __name__ == "__main__":
    main()
