"""Peak memory of importing a transformers checkpoint (init_from), per process, on a model of Llama 3.2 1B's shape
(dim 2048, 16 blocks, 32 heads, 8 key/value heads, feed-forward 8192, vocabulary 128,256, tied embeddings, llama3
rope scaling) with random weights saved as bf16 shards.

    python bench/import_memory.py [--processes 2] [--shard-size 1GB] [--out bench_out/import]

Each process does what every rank of a run does before its first step: the model's config from config.json,
then the weights into fp32 parameters. `streamed` is a DDP rank (checkpoint.weights.starting_model through the DDP
backend, as a run calls it: the model built on the meta device and filled tensor by tensor, large ones in row
blocks); `zero3` a ZeRO-3 rank (the model built partitioned inside deepspeed.zero.Init, each rank filling only its
share of every tensor); `whole` is the way before both, the baseline: a randomly initialised model, then every
file read whole, converted to fp32 and loaded.
The processes of one way run at once, as a node's ranks do (they share the page cache). Peak RSS is each process's
ru_maxrss; the goals are set in peak RSS / the model's size in fp32 (its training dtype) for DDP, and / (the model
/ processes + the largest file) for ZeRO-3.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

LLAMA_3_2_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                    rms_norm_eps=1e-5, tie_word_embeddings=True,
                    rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                                         high_freq_factor=4.0, original_max_position_embeddings=8192))


def save_model(path: str, shard_size: str) -> None:
    import torch
    import transformers

    if os.path.isfile(os.path.join(path, "config.json")):
        return
    config = transformers.LlamaConfig(**LLAMA_3_2_1B)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():  # random, in bf16 from the start: the saving process never holds fp32
            p.data = torch.randn(p.shape, dtype=torch.bfloat16) * 0.02
    model.tie_weights()
    model.to(torch.bfloat16).save_pretrained(path + ".tmp", max_shard_size=shard_size)
    os.replace(path + ".tmp", path)


def import_once(path: str, way: str) -> dict:
    """One process's import; its peak RSS and time."""
    import torch
    from safetensors.torch import load_file

    from training.checkpoint.weights import model_config
    from training.models import hf
    from training.models.transformer import Transformer

    start = time.perf_counter()
    if way in ("zero3", "streamed"):
        model = rank_model(path, way)
    else:
        model = Transformer(model_config(path))
        stored = {}
        for file in hf.weight_files(path):
            stored.update(load_file(file))
        ours = {}
        names = hf.tensor_names(model.cfg)
        for name, (theirs, heads) in names.items():
            ours[name] = hf.rope_layout(stored[theirs], heads, to_hf=False).float()
        del stored
        model.load_state_dict(ours, strict=False)
    seconds = time.perf_counter() - start
    params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    return {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "seconds": seconds,
            "params": params}


def rank_model(path: str, way: str):
    """What a rank of a run does (checkpoint.weights.starting_model): the DDP backend builds the model on the meta
    device and fills it whole; the DeepSpeed backend under ZeRO-3 builds it partitioned, each rank filling its
    share."""
    import dataclasses

    from training.checkpoint.weights import model_config, starting_model
    from training.config import Config
    from training.data.order import BatchPlan
    from training.parallel import env as D
    from training.parallel.ddp import DDP

    cfg = Config()
    if way == "streamed":  # one process's build: a DDP rank builds alone, before any collective
        env = D.init("ddp", "cpu", 600)
        backend = DDP(cfg, env, BatchPlan.of(cfg.train, env.world_size, env.rank), "fp32")
        return starting_model(path, model_config(path), backend)
    from training.parallel.deepspeed import DeepSpeed  # an optional dependency

    cfg = dataclasses.replace(cfg, dist=dataclasses.replace(cfg.dist, backend="deepspeed", zero_stage=3))
    env = D.init("deepspeed", "cpu", 600, group_always=True)
    backend = DeepSpeed(cfg, env, BatchPlan.of(cfg.train, env.world_size, env.rank), "fp32")
    model = starting_model(path, model_config(path), backend)
    assert all(hasattr(p, "ds_tensor") for p in model.parameters())  # partitioned as built
    return model


def run_way(path: str, way: str, processes: int) -> list[dict]:
    ranks = lambda r: {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(processes),  # noqa: E731
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29731"} if way == "zero3" else {}
    procs = [subprocess.Popen([sys.executable, __file__, "--child", way, "--model", path], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", **ranks(r)})
             for r in range(processes)]
    results = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"{way}: a process failed ({proc.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--baseline-processes", type=int, default=1,
                    help="processes of the whole-file baseline (it needs about 2.5 times the memory per process)")
    ap.add_argument("--shard-size", default="1GB", help="max_shard_size of the saved checkpoint")
    ap.add_argument("--out", default=os.path.join(REPO, "bench_out", "import"))
    ap.add_argument("--child", choices=["streamed", "zero3", "whole"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(import_once(args.model, args.child)))
        return
    path = os.path.join(args.out, "llama-3.2-1b-shape")
    save_model(path, args.shard_size)
    files = [os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors")]
    largest = max(os.path.getsize(f) for f in files)
    rows = []
    for way, n in (("streamed", args.processes), ("zero3", args.processes), ("whole", args.baseline_processes)):
        results = run_way(path, way, n)
        fp32 = results[0]["params"] * 4
        peak = max(r["peak_rss"] for r in results)
        goal = fp32 / n + largest if way == "zero3" else fp32  # what the goal's 1.3x is of
        rows.append((way, n, peak, peak / goal, max(r["seconds"] for r in results)))
    print(f"model: {results[0]['params'] / 1e9:.3f} B parameters, {fp32 / 1e9:.2f} GB in fp32; {len(files)} bf16 "
          f"files, the largest {largest / 1e9:.2f} GB; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores")
    print("| import | processes at once | peak RSS per process | / its goal's base | seconds |")
    print("|---|---|---|---|---|")
    for way, n, peak, ratio, seconds in rows:
        print(f"| {way} | {n} | {peak / 1e9:.2f} GB | {ratio:.2f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
