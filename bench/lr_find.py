"""Finding the learning rate, checked on the tiny preset: both methods of training.lr_find (fixed-rate runs and
the exponential sweep) for several seeds, each one's suggestion then trained 200 steps beside the shipped
train.lr, in one run.

    python bench/lr_find.py [--seeds 1337,1338] [--steps 200] [--grid 1e-3,2e-3,4e-3]

--grid: also train --steps steps at each of these rates per seed, the reference for what the right rate is.

Data: the demo's Shakespeare plays (bench/train.py). Validation loss: the preset's own (2% held out, 256
samples) after the last step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train import REPO, make_shards  # noqa: E402

CONFIG = os.path.join(REPO, "configs", "pretrain", "tiny.yaml")
QUIET = ["log.progress=false", "log.tensorboard=false", "train.sample_prompt=null"]


def run(module: str, args: list[str]) -> str:
    proc = subprocess.run([sys.executable, "-m", module, "--config", CONFIG, *args, *QUIET], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{module} {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def last(out: str, key: str) -> float:
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [r[key] for r in lines if key in r][-1]


def train(shards: str, out: str, seed: int, lr: float, steps: int, extra: list[str] = ()) -> float:
    shutil.rmtree(out, ignore_errors=True)
    run("training.pretrain", [f"data.path={shards}", f"out_dir={out}", f"seed={seed}", f"train.lr={lr}",
                              f"train.max_steps={steps}", f"train.eval_every={steps}", f"train.ckpt_every={steps}",
                              *extra])
    return last(out, "val_loss")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="1337,1338")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--grid", help="rates, comma-separated: also trained --steps steps each, per seed")
    ap.add_argument("--out", default=os.path.join(REPO, "bench_out", "lr_find"))
    args = ap.parse_args()
    shards = make_shards(os.path.join(REPO, "bench_out", "plays"))
    sys.path.insert(0, REPO)
    from training.config import load_config

    shipped = load_config(CONFIG, [f"data.path={shards}"]).train.lr
    methods = ("fixed", "sweep")
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        found = {}
        for method in methods:  # each with its defaults, as a user runs it
            out = os.path.join(args.out, f"{method}-{seed}")
            start = time.perf_counter()
            run("training.lr_find", ["--method", method, "--out", out, f"data.path={shards}",
                                     f"out_dir={args.out}/unused", f"seed={seed}"])
            found[method] = (json.load(open(os.path.join(out, "lr_find.json")))["suggested_lr"],
                             time.perf_counter() - start)
        results = {name: train(shards, os.path.join(args.out, f"train-{name}-{seed}"), seed, lr, args.steps)
                   for name, lr in (("shipped", shipped), *((m, found[m][0]) for m in methods))}
        grid = {lr: train(shards, os.path.join(args.out, f"grid-{lr:g}-{seed}"), seed, lr, args.steps)
                for lr in ([float(x) for x in args.grid.split(",")] if args.grid else [])}
        rows.append((seed, found, results, grid))
        print(f"seed {seed}: " + ", ".join(f"{m} suggests {found[m][0]:.3g} ({found[m][1]:.0f} s)" for m in methods)
              + f"; val_loss after {args.steps} steps: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()),
              flush=True)
    print(f"\n{platform.node()}, {os.cpu_count()} CPUs, torch {torch.__version__}; configs/pretrain/tiny.yaml, "
          f"{args.steps} steps; shipped train.lr={shipped:g}")
    print("| seed | fixed's suggestion (its time) | sweep's suggestion (its time) | val_loss: shipped | fixed's | sweep's |")
    print("|---|---|---|---:|---:|---:|")
    for seed, found, results, _ in rows:
        print(f"| {seed} | " + " | ".join(f"{found[m][0]:.3g} ({found[m][1]:.0f} s)" for m in methods) + " | "
              + " | ".join(f"{results[k]:.4f}" for k in ("shipped", *methods)) + " |")
    if args.grid:
        print("\n| train.lr | " + " | ".join(f"{lr:.3g}" for lr in rows[0][3]) + " |")
        print("|---|" + "---:|" * len(rows[0][3]))
        for seed, _, _, grid in rows:
            print(f"| seed {seed} | " + " | ".join(f"{v:.4f}" for v in grid.values()) + " |")


if __name__ == "__main__":
    main()
