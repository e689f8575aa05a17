"""A mixture-of-experts tiny model against the dense tiny preset with the same active parameters, in one run.

    python bench/moe.py [--steps 300] [--seeds 1337,1338] [--out bench_out/moe] [key.sub=value ...]

dense: configs/pretrain/tiny.yaml as shipped (SwiGLU hidden 512 in each of 4 blocks).
moe:   the same, each block's feed-forward 8 experts of hidden 256, top-2 (512 active, as dense), with the default
       load-balancing loss: 4x the feed-forward weights, about the same FLOPs per token (+ the router's).
Both train the same steps on the same batches (Shakespeare plays, as bench/train.py), so the same tokens and
about the same FLOPs; compared are tokens/s after the first logging interval, the final validation loss, and
that loss at equal training FLOPs. Each seed is a pair of runs; the table gives every seed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train import REPO, make_shards, ours  # noqa: E402

CONFIG = os.path.join(REPO, "configs", "pretrain", "tiny.yaml")
MOE = ["model.moe.experts=8", "model.moe.top_k=2", "model.moe.expert_hidden=256"]


def final_val_loss(out: str) -> float:
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [r["val_loss"] for r in lines if "val_loss" in r][-1]


def flops_per_token(overrides: list[str]) -> float:
    sys.path.insert(0, REPO)
    from training.config import load_config
    from training.models.transformer import Transformer

    cfg = load_config(CONFIG, ["model.vocab_size=4032", *overrides])  # the 4,000-token vocabulary, rounded up
    with torch.device("meta"):
        model = Transformer(cfg.model)
    return model.flops_per_token(cfg.data.seq_len), model.num_params()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", default="1337,1338")
    ap.add_argument("--out", default=os.path.join(REPO, "bench_out", "moe"))
    args, overrides = ap.parse_known_args()
    shards = make_shards(os.path.join(REPO, "bench_out", "plays"))
    settings = {"dense": [], "moe": MOE}
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name, extra in settings.items():
            out = os.path.join(args.out, f"{name}-{seed}")
            run = [f"seed={seed}", f"train.eval_every={args.steps}", "train.eval_samples=512", *extra, *overrides]
            rate = ours(CONFIG, shards, out, args.steps, run)["rate"]
            rows.append((seed, name, rate, final_val_loss(out)))
            print(f"seed {seed} {name}: {rate:,.0f} tokens/s, val_loss {rows[-1][3]:.4f}", flush=True)
    flops = {name: flops_per_token(extra) for name, extra in settings.items()}
    print(f"\n{platform.node()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.steps} steps")
    print(f"{'':6} {'params':>9} {'GFLOP/token':>12} {'tokens/s':>10} {'val_loss':>9}   (per seed)")
    for name in settings:
        mine = [r for r in rows if r[1] == name]
        params = flops[name][1]
        print(f"{name:6} {params / 1e6:8.2f}M {flops[name][0] / 1e9:12.4f} "
              f"{' / '.join(f'{r[2]:,.0f}' for r in mine):>10} {' / '.join(f'{r[3]:.4f}' for r in mine)}")
    for seed in sorted({r[0] for r in rows}):
        dense, moe = (next(r for r in rows if r[0] == seed and r[1] == n) for n in settings)
        print(f"seed {seed}: moe/dense tokens/s {moe[2] / dense[2]:.2f}x, val_loss {moe[3] - dense[3]:+.4f} nats at "
              f"{flops['moe'][0] / flops['dense'][0]:.3f}x the FLOPs")


if __name__ == "__main__":
    main()
