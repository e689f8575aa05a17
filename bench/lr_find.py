"""The learning-rate range test checked on the tiny preset: its suggestion against the shipped train.lr, each
trained 200 steps, for several seeds; and the sweep against the other way of finding a rate — several short
runs at fixed rates, the best final loss winning — in one run.

    python bench/lr_find.py [--seeds 1337,1338] [--steps 200] [--fixed 1e-3,3e-3,1e-2,3e-2] [--fixed-steps 50]

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
    ap.add_argument("--sweep-steps", type=int, default=200)
    ap.add_argument("--fixed", default="1e-3,3e-3,1e-2,3e-2")
    ap.add_argument("--fixed-steps", type=int, default=50)
    ap.add_argument("--out", default=os.path.join(REPO, "bench_out", "lr_find"))
    args = ap.parse_args()
    shards = make_shards(os.path.join(REPO, "bench_out", "plays"))
    sys.path.insert(0, REPO)
    from training.config import load_config

    shipped = load_config(CONFIG, [f"data.path={shards}"]).train.lr
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        sweep_dir = os.path.join(args.out, f"sweep-{seed}")
        start = time.perf_counter()
        run("training.lr_find", ["--steps", str(args.sweep_steps), "--out", sweep_dir, f"data.path={shards}",
                                 f"out_dir={args.out}/unused", f"seed={seed}"])
        sweep_seconds = time.perf_counter() - start
        suggested = json.load(open(os.path.join(sweep_dir, "lr_find.json")))["suggested_lr"]
        # the other way: short runs at fixed rates (after the preset's warmup), the lowest final training loss
        start = time.perf_counter()
        fixed = {}
        for lr in [float(x) for x in args.fixed.split(",")]:
            out = os.path.join(args.out, f"fixed-{seed}-{lr:g}")
            shutil.rmtree(out, ignore_errors=True)
            run("training.pretrain", [f"data.path={shards}", f"out_dir={out}", f"seed={seed}", f"train.lr={lr}",
                                      f"train.max_steps={args.fixed_steps}", "train.schedule=constant",
                                      "train.eval_every=0", f"train.ckpt_every={args.fixed_steps}", "log.every=1"])
            lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in line]
            fixed[lr] = sum(r["loss"] for r in lines[-10:]) / len(lines[-10:])  # the last 10 steps
        fixed_seconds = time.perf_counter() - start
        best_fixed = min(fixed, key=fixed.get)
        results = {name: train(shards, os.path.join(args.out, f"{name}-{seed}"), seed, lr, args.steps)
                   for name, lr in (("shipped", shipped), ("suggested", suggested), ("fixed", best_fixed))}
        rows.append((seed, suggested, best_fixed, results, sweep_seconds, fixed_seconds))
        print(f"seed {seed}: suggested {suggested:.3g} ({sweep_seconds:.0f} s), best fixed {best_fixed:g} "
              f"({fixed_seconds:.0f} s); val_loss after {args.steps} steps: shipped {shipped:g} {results['shipped']:.4f}, "
              f"suggested {results['suggested']:.4f}, fixed {results['fixed']:.4f}", flush=True)
    print(f"\n{platform.node()}, {os.cpu_count()} CPUs, torch {torch.__version__}; configs/pretrain/tiny.yaml, "
          f"{args.steps} steps; shipped train.lr={shipped:g}")
    print("| seed | sweep's suggestion | best of fixed-rate runs | val_loss: shipped | suggested | fixed |")
    print("|---|---|---|---|---|---|")
    for seed, suggested, best_fixed, results, sweep_s, fixed_s in rows:
        print(f"| {seed} | {suggested:.3g} ({sweep_s:.0f} s) | {best_fixed:g} ({fixed_s:.0f} s) | "
              f"{results['shipped']:.4f} | {results['suggested']:.4f} | {results['fixed']:.4f} |")


if __name__ == "__main__":
    main()
