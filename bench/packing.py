"""Packing against padding on real instruction data, in one run: the share of computed positions that hold a
token, the useful tokens/s of SFT (conversation tokens per second: tokens_per_sec x (1 - padding_share)) padded
and packed, and the cost of the document mask itself.

    python bench/packing.py [--steps 40] [--repeat 3] [--out bench_out/packing]

Data: ../shared/data/llms_from_scratch/instruction-data.json (1,100 alpaca-style examples; the benchmark stops
with a message when it is absent), a 2,000-piece tokenizer trained on its text, SFT shards of it. The starting
model is the tiny preset after 3 pretraining steps on the same text (its speed, not its quality, matters here).
Padding share: one epoch of the training split through the data path, padded at micro-batch 16 and 64 and packed
into rows of 256 positions. Training: `python -m training.sft` as users run it, padded (micro-batch 16) against
packed (micro-batch 6 rows of 256: about as many positions per micro-step), each run's tokens_per_sec and
padding_share as logged after the first interval, alternating runs, medians.
Mask cost: forward + backward of the tiny model on the same packed rows with the document mask (boolean-mask
SDPA) against plain causal attention over the whole row (wrong for packing; it is what the mask costs), and
FlexAttention's forward (compiled; it has no backward on CPU) against the boolean mask's forward.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train import REPO, ours  # noqa: E402

sys.path.insert(0, REPO)
DATA = os.path.join(REPO, "..", "shared", "data", "llms_from_scratch", "instruction-data.json")
ROW = 256


def prepare(out: str) -> dict:
    py = [sys.executable, "-m", "preprocess"]
    records = json.load(open(DATA, encoding="utf-8"))
    text = os.path.join(out, "text.jsonl")
    with open(text, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({"text": "\n\n".join(r[k] for k in ("instruction", "input", "output") if r.get(k))}) + "\n")
    tok = os.path.join(out, "tok")
    subprocess.run([*py, "tokenizer", "--input", text, "--vocab-size", "2000", "--out", tok], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL)
    model = os.path.join(tok, "tokenizer.model")
    shards = {"sft": os.path.join(out, "shards", "sft"), "pretrain": os.path.join(out, "shards", "pretrain")}
    subprocess.run([*py, "shards", "--kind", "sft", "--input", DATA, "--tokenizer", model, "--out", shards["sft"]],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    subprocess.run([*py, "shards", "--input", text, "--tokenizer", model, "--out", shards["pretrain"]], check=True,
                   cwd=REPO, stdout=subprocess.DEVNULL)
    start = os.path.join(out, "start")
    subprocess.run([sys.executable, "-m", "training.pretrain", "--config", "configs/pretrain/tiny.yaml",
                    f"data.path={shards['pretrain']}", f"out_dir={start}", "train.max_steps=3", "log.progress=false",
                    "train.sample_prompt=null", "data.seq_len=64"], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return {"shards": shards, "start": start}


def epoch_padding(shards: str) -> dict[str, float]:
    """Share of the computed positions that are padding over one epoch of the training split."""
    from training.data.batch import ExampleBatches
    from training.data.order import BatchPlan
    from training.data.sources import ExampleSource

    shares = {}
    for name, micro, packed in (("padded, micro-batch 16", 16, False), ("padded, micro-batch 64", 64, False),
                                (f"packed, rows of {ROW}", 8, True)):
        src = ExampleSource(shards, ROW, 0.05, "sft", group=1, packed=packed)
        data = ExampleBatches([src], [1.0], 1337, BatchPlan(micro, 1, 1), 10**9, pad_id=0, seq_len=ROW,
                       pack_window=1024 if packed else 0)
        real = total = examples = 0
        position = 0
        while examples < src.n_train:
            picks, batch = data.micro_batch(position, 0)
            position += micro
            examples += len(picks)
            real, total = real + batch.real_tokens, total + batch.inputs.numel()
        shares[name] = 1 - real / total
    return shares


def train_rates(setup: dict, out: str, steps: int, repeat: int) -> dict[str, tuple[float, float]]:
    common = [f"init_from={setup['start']}", "train.sample_prompt=null", "log.tensorboard=false", f"data.seq_len={ROW}",
              "log.every=5"]
    variants = {"padded": ["train.micro_batch_size=16"], "packed": ["train.micro_batch_size=6", "data.packing=true"]}
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    for _ in range(repeat):
        for name, extra in variants.items():
            run = os.path.join(out, f"run-{name}")
            rate = ours("configs/sft/tiny.yaml", setup["shards"]["sft"], run, steps, [*common, *extra], stage="sft")["rate"]
            lines = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl")) if '"loss"' in line]
            results[name].append((rate, statistics.mean(r["padding_share"] for r in lines[1:])))
    return {k: (statistics.median(r for r, _ in v), statistics.median(p for _, p in v)) for k, v in results.items()}


def mask_cost(shards: str, repeat: int) -> dict[str, float]:
    from training.data.batch import ExampleBatches
    from training.data.order import BatchPlan
    from training.data.sources import ExampleSource
    from training.models.transformer import ModelConfig, Transformer

    src = ExampleSource(shards, ROW, 0.05, "sft", group=1, packed=True)
    data = ExampleBatches([src], [1.0], 1337, BatchPlan(8, 1, 1), 10**9, pad_id=0, seq_len=ROW, pack_window=1024)
    batch = data.micro_batch(0, 0)[1]
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=2048, dim=192, n_layers=4, n_heads=6, n_kv_heads=2, max_seq_len=ROW))

    def step(segments) -> float:
        start = time.perf_counter()
        model(batch.inputs, segments=segments).float().logsumexp(-1).mean().backward()
        return time.perf_counter() - start

    def forward(segments) -> float:
        with torch.no_grad():
            start = time.perf_counter()
            model(batch.inputs, segments=segments)
            return time.perf_counter() - start

    times = {"masked": [], "causal": [], "sdpa_forward": [], "flex_forward": []}
    for impl in ("sdpa", "flex"):  # warm-up (FlexAttention compiles on first use)
        model.attention_impl = impl
        forward(batch.segments)
    for _ in range(repeat * 5):
        model.attention_impl = "sdpa"
        times["masked"].append(step(batch.segments))
        times["causal"].append(step(None))
        times["sdpa_forward"].append(forward(batch.segments))
        model.attention_impl = "flex"
        times["flex_forward"].append(forward(batch.segments))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(REPO, "bench_out", "packing"))
    args = ap.parse_args()
    if not os.path.isfile(DATA):
        print(f"skipped: {os.path.normpath(DATA)} not found (the shared corpora sit beside the repository)")
        return
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    setup = prepare(args.out)
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    for name, share in epoch_padding(setup["shards"]["sft"]).items():
        print(f"padding, one epoch, {name}: {100 * share:.1f}% of the positions ({100 * (1 - share):.1f}% useful)")
    rates = train_rates(setup, args.out, args.steps, args.repeat)
    useful = {k: rate * (1 - share) for k, (rate, share) in rates.items()}
    for k, (rate, share) in rates.items():
        print(f"sft {k}: {rate:,.0f} tokens/s computed, padding {100 * share:.1f}%, {useful[k]:,.0f} useful tokens/s")
    print(f"useful tokens/s, packed / padded: x{useful['packed'] / useful['padded']:.2f}")
    t = mask_cost(setup["shards"]["sft"], args.repeat)
    print(f"document mask (boolean-mask SDPA) / causal, forward + backward on the same rows: "
          f"x{t['masked'] / t['causal']:.2f} ({1e3 * t['masked']:.1f} ms vs {1e3 * t['causal']:.1f} ms)")
    print(f"FlexAttention forward (compiled) / boolean-mask SDPA forward, CPU: x{t['flex_forward'] / t['sdpa_forward']:.2f}")


if __name__ == "__main__":
    main()
