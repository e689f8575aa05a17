"""GPU tokens/s and MFU of the pretraining presets in bf16, our loop against a nanoGPT-style baseline of the
same shapes, with and without torch.compile, in one run.

    python bench/gpu.py [--presets 125m 350m 1b] [--steps 30] [--grad-accum 4] [--compile on off]

ours:     `python -m training.pretrain --config configs/pretrain/<preset>.yaml` on shards of real text (the
          vocabulary padded to 32,000 as the presets assume), rate and MFU as logged after the first interval.
baseline: a GPT in the style of nanoGPT (LayerNorm, learned positions, GELU MLP of 4 x dim, causal SDPA, tied
          embeddings, fused AdamW, bf16 autocast, compiled whole when compile is on) with the same dim, layers,
          heads, vocabulary, sequence length, micro-batch and accumulation, on random tokens already on the GPU.
MFU counts 6 FLOPs per matmul weight per token plus attention (12 * layers * dim * seq_len), for both models,
against the GPU's dense bf16 peak. Runs on CPU too (slowly, without MFU), so the code is checked without a GPU.
--attention: forward + backward of the 125M preset's model (bf16 autocast) on rows packed with documents of
          64-1,024 tokens, its three ways to attend: causal over the whole row (the cost without a mask, wrong for
          packing), SDPA with a boolean document mask, and FlexAttention with a block mask (CUDA only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train import REPO, make_shards  # noqa: E402
from train import ours as run_ours  # noqa: E402

VOCAB = 32000


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.up, self.down = nn.Linear(dim, 4 * dim, bias=False), nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).transpose(1, 3).unbind(2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, dim: int, layers: int, heads: int, seq_len: int):
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, dim), nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))

    def flops_per_token(self, seq_len: int) -> float:
        weights = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6 * weights + 12 * len(self.blocks) * self.tok.embedding_dim * seq_len


def baseline(preset: str, steps: int, grad_accum: int, compile_: bool, micro: int | None) -> dict:
    sys.path.insert(0, REPO)
    from training.config import load_config
    from training.run.metrics import gpu_peak_flops

    cfg = load_config(os.path.join(REPO, "configs", "pretrain", f"{preset}.yaml"), ["data.path=unused"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seq, micro = cfg.data.seq_len, micro or cfg.train.micro_batch_size
    torch.manual_seed(0)
    model = GPT(cfg.model.dim, cfg.model.n_layers, cfg.model.n_heads, seq).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=device.type == "cuda")
    step_model = torch.compile(model) if compile_ else model
    data = torch.randint(0, VOCAB, (grad_accum, micro, seq + 1), device=device)
    warmup, start = 3, None
    for step in range(steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        for m in range(grad_accum):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                logits = step_model(data[m, :, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), data[m, :, 1:].flatten()) / grad_accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    loss.item()
    rate = grad_accum * micro * seq * (steps - warmup) / (time.perf_counter() - start)
    peak = gpu_peak_flops(device)
    return {"rate": rate, "mfu": rate * model.flops_per_token(seq) / peak if peak else None}


def ours(preset: str, shards: str, out: str, steps: int, grad_accum: int, compile_: bool, micro: int | None) -> dict:
    overrides = [f"train.grad_accum={grad_accum}", f"train.compile={str(compile_).lower()}", f"model.vocab_size={VOCAB}",
                 "log.every=3", "train.sample_prompt=null", "train.warmup_steps=2",
                 *([f"train.micro_batch_size={micro}"] if micro else [])]
    return run_ours(os.path.join(REPO, "configs", "pretrain", f"{preset}.yaml"), shards, out, steps, overrides)


def attention_paths(steps: int) -> None:
    """Time per forward + backward of packed rows, each way our model can attend."""
    sys.path.insert(0, REPO)
    from training.config import load_config
    from training.models.transformer import Transformer

    cfg = load_config(os.path.join(REPO, "configs", "pretrain", "125m.yaml"), ["data.path=unused"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seq, micro = cfg.data.seq_len, cfg.train.micro_batch_size if device.type == "cuda" else 1
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(cfg.model, vocab_size=VOCAB)).to(device)
    tokens = torch.randint(0, VOCAB, (micro, seq), device=device)
    lengths = torch.randint(64, 1025, (micro, seq // 64 + 1))
    segments = torch.stack([torch.repeat_interleave(torch.arange(len(row)), row)[:seq] for row in lengths]).to(device)
    ways = {"causal, no mask": ("sdpa", None), "SDPA, boolean mask": ("sdpa", segments)}
    if device.type == "cuda":
        ways["FlexAttention, block mask"] = ("flex", segments)
    times = {}
    for name, (impl, segs) in ways.items():
        model.attention_impl = impl
        for step in range(steps + 3):
            if step == 3:
                torch.cuda.synchronize() if device.type == "cuda" else None
                start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(tokens, segments=segs).float().logsumexp(-1).mean()
            loss.backward()
            model.zero_grad(set_to_none=True)
        torch.cuda.synchronize() if device.type == "cuda" else None
        times[name] = (time.perf_counter() - start) / steps
    base = times["causal, no mask"]
    for name, t in times.items():
        print(f"{name}: {1e3 * t:.1f} ms per forward + backward of {micro} x {seq} tokens, x{t / base:.2f} causal")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["125m", "350m", "1b"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--micro-batch", type=int, help="override the presets' micro-batch (e.g. 1 for a CPU check)")
    ap.add_argument("--compile", nargs="+", choices=["on", "off"], default=["off", "on"])
    ap.add_argument("--baseline-worker", nargs=2, metavar=("PRESET", "COMPILE"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(REPO, "bench_out", "gpu"))
    ap.add_argument("--attention", action="store_true", help="only the packed-row attention paths (see above)")
    args = ap.parse_args()
    if args.attention:
        attention_paths(args.steps)
        return
    if args.baseline_worker:
        preset, on = args.baseline_worker
        print(json.dumps(baseline(preset, args.steps, args.grad_accum, on == "on", args.micro_batch)))
        return
    shards = make_shards(args.out)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"{name}, torch {torch.__version__}; {args.steps} steps x {args.grad_accum} micro-batches, bf16")
    print("| preset | compile | ours tokens/s | ours MFU | nanoGPT-style tokens/s | its MFU | ours / baseline |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for preset in args.presets:
        for on in args.compile:
            proc = subprocess.run([sys.executable, __file__, "--baseline-worker", preset, on, "--steps", str(args.steps),
                                   "--grad-accum", str(args.grad_accum),
                                   *(["--micro-batch", str(args.micro_batch)] if args.micro_batch else [])],
                                  check=True, cwd=REPO, capture_output=True, text=True)
            base = json.loads(proc.stdout.strip().splitlines()[-1])
            mine = ours(preset, shards, os.path.join(args.out, "run"), args.steps, args.grad_accum, on == "on",
                        args.micro_batch)

            def pct(x):
                return "–" if x is None else f"{100 * x:.1f}%"

            print(f"| {preset} | {on} | {mine['rate']:,.0f} | {pct(mine['mfu'])} | {base['rate']:,.0f} | "
                  f"{pct(base['mfu'])} | {mine['rate'] / base['rate']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
