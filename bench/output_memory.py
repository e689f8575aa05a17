"""Peak memory of the loss at the output layer: the whole logits against models/output.py's chunks, in one run.

    python bench/output_memory.py [--rows 32768] [--dim 768] [--vocab 32000]

The 125M preset's shapes by default: a micro-batch of 16 x 2,048 positions, dim 768, a 32k vocabulary. Each way
runs in a fresh process: the final hidden states (fp32, requiring gradients) and the output weight are made, then
one forward and backward of the summed loss; the figure is the growth of the process's peak resident memory over
what it held before (the inputs), on CPU in fp32 (the GPU's bf16 logits are half the size, their fp32 copies the
same). Ways:
  whole logits     F.cross_entropy of the fp32 logits of every position (what the loss was before the chunks;
                   nanoGPT, and most loops, do this)
  chunked, summed  model(..., targets=, summed=True): pretraining and SFT
  chunked, per row model(..., targets=): DPO, KTO and GRPO's per-position log-probs (their backward recomputes a
                   chunk's logits)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from training.models.output import target_logp_sum, target_logps  # noqa: E402

WAYS = {
    "whole logits": lambda h, w, t: -F.cross_entropy(F.linear(h, w).float(), t, reduction="sum"),
    "chunked, summed": target_logp_sum,
    "chunked, per row": lambda h, w, t: target_logps(h, w, t).sum(),
}


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(way: str, rows: int, dim: int, vocab: int) -> dict:
    torch.manual_seed(0)
    hidden = torch.randn(rows, dim, requires_grad=True)
    weight = (0.02 * torch.randn(vocab, dim)).requires_grad_()
    targets = torch.randint(0, vocab, (rows,))
    before = peak_mib()
    start = time.perf_counter()
    loss = WAYS[way](hidden, weight, targets)
    loss.backward()
    seconds = time.perf_counter() - start
    return {"growth_mib": peak_mib() - before, "seconds": seconds, "loss": float(loss),
            "grad_norm": float(hidden.grad.norm() + weight.grad.norm())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16 * 2048)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker, args.rows, args.dim, args.vocab)))
        return
    logits_mib = args.rows * args.vocab * 4 / 2**20
    print(f"{args.rows} positions x dim {args.dim}, vocabulary {args.vocab}, fp32 on CPU, torch {torch.__version__}; "
          f"one fp32 logits tensor: {logits_mib:,.0f} MiB")
    print("| way | peak memory growth, MiB | x whole logits | seconds (forward + backward) | loss |")
    print("|---|---:|---:|---:|---:|")
    results = {}
    for way in WAYS:
        proc = subprocess.run([sys.executable, __file__, "--worker", way, "--rows", str(args.rows), "--dim",
                               str(args.dim), "--vocab", str(args.vocab)], check=True, capture_output=True, text=True)
        results[way] = r = json.loads(proc.stdout.strip().splitlines()[-1])
        base = results["whole logits"]["growth_mib"]
        print(f"| {way} | {r['growth_mib']:,.0f} | {r['growth_mib'] / base:.3f} | {r['seconds']:.1f} | "
              f"{r['loss']:.6g} |", flush=True)
    losses = [r["loss"] for r in results.values()]
    assert max(losses) - min(losses) <= 1e-4 * abs(losses[0]), losses  # the same loss, whichever way


if __name__ == "__main__":
    main()
