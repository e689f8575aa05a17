"""What preference training did to a model, beside its reference: per-token log-probs of the chosen and rejected
completions and P(<|end|>) after each chosen one (over the validation pairs of a DPO shard directory), and the
share of five-character poems and lines per reply in a training.sample output of the Tang recipe.

    python bench/dpo_drift.py --pairs SHARDS/dpo --runs RUN [RUN ...] [--samples SAMPLES.jsonl ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "recipes")]
from tang import is_five_character  # noqa: E402

from training.checkpoint.weights import load_for_inference  # noqa: E402
from training.data.sources import ExampleSource  # noqa: E402


@torch.no_grad()
def drift(pairs: str, run: str, n: int = 200) -> str:
    source = ExampleSource(pairs, 256, 0.05, "dpo", group=2)
    model, _ = load_for_inference(run, "cpu")  # its inputs are built on the CPU
    ends, chosen, rejected = [], [], []
    for j in range(source.n_train, min(source.n_train + source.n_val, source.n_train + n)):
        for (tokens, mask), out in zip(source.example(j), (chosen, rejected), strict=True):
            logp = torch.log_softmax(model(torch.tensor(tokens[:-1]).unsqueeze(0))[0].float(), -1)
            picked = logp.gather(-1, torch.tensor(tokens[1:]).unsqueeze(-1)).squeeze(-1)
            learned = torch.from_numpy(mask[1:] == 1)
            out.append(float(picked[learned].mean()))
            if out is chosen:  # the last learned target of a completion is its <|end|>
                ends.append(float(picked[int(np.flatnonzero(mask[1:] == 1)[-1])].exp()))
    return (f"{run}: log-prob per token chosen {np.mean(chosen):.2f}, rejected {np.mean(rejected):.2f}; "
            f"P(<|end|>) after the chosen poem {np.mean(ends):.3f} ({len(ends)} validation pairs)")


def replies(path: str) -> str:
    samples = [s for line in open(path, encoding="utf-8") for s in json.loads(line)["samples"]]
    lines = np.mean([len([x for x in s.split("\n") if x.strip()]) for s in samples])
    five = sum(map(is_five_character, samples))
    return f"{path}: {five}/{len(samples)} five-character ({100 * five / len(samples):.0f}%), {lines:.1f} lines a reply"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", required=True, help="a DPO shard directory (its validation pairs are read)")
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--samples", nargs="*", default=[], help="training.sample outputs of held-out titles")
    args = ap.parse_args()
    for run in args.runs:
        print(drift(args.pairs, run), flush=True)
    for path in args.samples:
        print(replies(path))


if __name__ == "__main__":
    main()
