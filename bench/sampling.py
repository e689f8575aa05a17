"""Batched sampling (training.sample's sample_batch) against the one-at-a-time loop of training.generate, on the
same prompts with the same per-sample generators, so that both produce exactly the same tokens (checked).

    python bench/sampling.py [--prompts 64] [--n 4] [--max-new-tokens 64] [--batch-size 64] [--repeat 3]

Model: the tiny preset's shape (dim 256, 4 layers, context 256) with a 4,000-token vocabulary, randomly
initialised (speed does not depend on what the weights say; no eos id is set, so every sample runs its full
length). Prompts: 64 random token strings of 8 to 40 tokens. Threads: torch's default for the machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from training.models.decoding import (
    generate,  # noqa: E402
    sample_batch,
)
from training.models.transformer import ModelConfig, Transformer  # noqa: E402
from training.sample import sample_seed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=4, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64, help="rows decoded together")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=4032, dim=256, n_layers=4, n_heads=4, max_seq_len=256)).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 4000, (int(torch.randint(8, 41, (1,), generator=g)),), generator=g).tolist()
               for _ in range(args.prompts)]
    rows = [(i, k) for i in range(args.prompts) for k in range(args.n)]
    options = {"temperature": 0.8, "top_k": 50, "vocab_limit": 4000}

    def one_at_a_time():
        return [generate(model, prompts[i], args.max_new_tokens, generator=torch.Generator().manual_seed(
            sample_seed(0, i, k)), **options) for i, k in rows]

    def batched():
        out = []
        for start in range(0, len(rows), args.batch_size):
            chunk = rows[start:start + args.batch_size]
            out += sample_batch(model, [prompts[i] for i, _ in chunk], [None] * len(chunk),
                                [sample_seed(0, i, k) for i, k in chunk], args.max_new_tokens, **options)[0]
        return out

    times: dict[str, list[float]] = {"one": [], "batched": []}
    outputs = {}
    for _ in range(args.repeat):  # alternating, so a noisy phase of the machine hits both
        for name, run in (("one", one_at_a_time), ("batched", batched)):
            t = time.perf_counter()
            outputs[name] = run()
            times[name].append(time.perf_counter() - t)
    if outputs["one"] != outputs["batched"]:
        raise SystemExit("batched sampling produced other tokens than one-at-a-time generation")
    tokens = sum(len(o) for o in outputs["one"])
    m = {k: statistics.median(v) for k, v in times.items()}
    print(f"{args.prompts} prompts x {args.n} samples, {tokens:,} new tokens, batches of {args.batch_size} rows, "
          f"{torch.get_num_threads()} threads (medians of {args.repeat}):")
    for name, label in (("one", "one at a time (training.generate)"), ("batched", "batched (training.sample)")):
        print(f"  {label}: {args.prompts / m[name]:,.2f} prompts/s, {tokens / m[name]:,.0f} tokens/s")
    print(f"batched / one at a time: x{m['one'] / m['batched']:.2f}")


if __name__ == "__main__":
    main()
