"""Peak memory and step time with activation checkpointing off, on every block, and on every other block, in one
run, on a model of the 125M preset's shape (dim 768, 12 blocks) on CPU.

    python bench/activation_checkpointing.py [--steps 4] [--seq-len 512] [--micro-batch 4] [--out bench_out/ac]

Each setting is a `python -m training.pretrain` process on the demo's Shakespeare shards (bench/train.py), fp32;
memory is its peak RSS (weights, gradients and AdamW states are the same in all three: the difference is the
activations kept for the backward); step time is the median over the steps after the first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dpo import peak_rss  # noqa: E402
from train import REPO, make_shards  # noqa: E402

SETTINGS = {"none": [], "every 2nd block": ["train.activation_checkpointing=every_n"],
            "every block": ["train.activation_checkpointing=full"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--out", default=os.path.join(REPO, "bench_out", "ac"))
    args = ap.parse_args()
    shards = make_shards(os.path.join(REPO, "bench_out", "plays"))
    shape = ["model.dim=768", "model.n_layers=12", "model.n_heads=12", f"model.max_seq_len={args.seq_len}",
             f"data.seq_len={args.seq_len}", f"train.micro_batch_size={args.micro_batch}", "train.grad_accum=1",
             "train.precision=fp32", "train.compile=false", "train.eval_every=0", f"train.ckpt_every={10 * args.steps}", "log.every=1",
             "log.progress=false", "log.tensorboard=false", "data.verify=false"]
    rows = {}
    for name, extra in SETTINGS.items():
        out = os.path.join(args.out, name.replace(" ", "-"))
        shutil.rmtree(out, ignore_errors=True)
        command = [sys.executable, "-m", "training.pretrain", "--config",
                   os.path.join(REPO, "configs", "pretrain", "125m.yaml"), f"data.path={shards}", f"out_dir={out}",
                   f"train.max_steps={args.steps}", *shape, *extra]
        peak = peak_rss(command)
        lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in line]
        seconds = statistics.median((b["tokens"] - a["tokens"]) / b["tokens_per_sec"] for a, b in zip(lines, lines[1:], strict=False))
        rows[name] = (peak, seconds, lines[-1]["loss"])
        print(f"{name}: peak RSS {peak / 2**30:.2f} GiB, {seconds:.2f} s/step, last loss {lines[-1]['loss']:.6f}",
              flush=True)
        shutil.rmtree(out, ignore_errors=True)
    base = rows["none"]
    print(f"\n{platform.node()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{args.micro_batch} x {args.seq_len} tokens per step")
    for name, (peak, seconds, loss) in rows.items():
        print(f"{name:16} {peak / 2**30:6.2f} GiB ({peak / base[0]:.2f}x)  {seconds:6.2f} s/step ({seconds / base[1]:.2f}x)"
              f"  losses {'equal' if loss == base[2] else f'differ: {loss} vs {base[2]}'}")


if __name__ == "__main__":
    main()
