"""Finding train.lr for a config: its own stage, data and model, trained from its starting weights at several
learning rates, writing a plot and a suggested train.lr. Two methods:

    python -m training.lr_find --config FILE [--method fixed] [--lrs A,B,...] [--steps 100] [--out DIR] [key.sub=value ...]
    python -m training.lr_find --config FILE --method sweep [--min-lr 1e-5] [--max-lr 1] [--steps 200] ...
    torchrun --nproc_per_node N -m training.lr_find --config FILE ...

fixed (the default): one short run per rate (--lrs; default train.lr × 1/4, 1/2, 1, 2, 4), each --steps steps
with the config's own schedule shrunk to that length (its warmup in proportion: on a long run's config, a few
steps, which favours lower rates — raise --steps for a reading nearer the run's own), scored by the validation
loss at its end (the mean training loss over its last 10% where the config has no validation data). The
suggestion is the lowest point of a parabola in log(rate) through the best run and its two neighbours: a reading
between the grid's rates, from three runs rather than one. While the best run is at an edge of the grid, the grid
grows by a step beyond it (at most 3 times; then the edge rate is the suggestion, said to be one).

sweep: one run whose rate grows exponentially from --min-lr to --max-lr; the loss is smoothed by a centred moving
average over 5% of the sweep up to its first loss that is not finite, and the suggestion is the knee: the smallest
rate at which the smoothed loss has made 95% of its fall from its first step to its lowest point. Quick (one run),
but each rate's loss is read after a few steps at it, from weights trained at the lower rates before it.

Which is more reliable on the tiny preset, and by how much: docs/benchmarks.md (bench/lr_find.py).

The stage is the one the data's shards are for (pretrain, sft, dpo, kto; not GRPO, whose loss is a surrogate that
says nothing about the rate). Everything else is the config's —
batch, accumulation, precision, clipping, backend, init_from, LoRA — except the rate, its schedule and the step
count; sampling is off, and evaluation (fixed: at the start and the end of each run; sweep: none). The runs go to DIR (default:
OUT_DIR/lr_find), run directories of their own where no checkpoint is written: out_dir's are never read or
written, and each call starts afresh. DIR gets lr_find.png, lr_find.json (the rates, the losses, the suggestion
and its rule) and, in DIR/lr-N/ (fixed) or DIR/sweep/, the runs' metrics.jsonl.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import re
import shutil
import sys

import torch

from preprocess.errors import UserError
from preprocess.ranks import ranks_from_env
from preprocess.shards import read_manifest

from .checkpoint.store import checkpoints_dir, latest
from .checkpoint.weights import resolve
from .cli import run_reporting
from .config import data_sources, load_config
from .parallel import env as D
from .parallel.backends import backend_class
from .run import rundir
from .run.build import check
from .run.loop import run
from .stages.registry import stage_for_kind

WINDOW = 0.05   # of the sweep's steps, for the moving average
FALL = 0.95     # of the smoothed loss's fall, at the sweep's suggested rate
GRID = (0.25, 0.5, 1, 2, 4)  # fixed: the default rates, times train.lr
EXTEND = 3      # fixed: at most this many rates added beyond the grid's edge while the best run is there
TAIL = 0.1      # fixed, without validation data: the share of a run's last steps whose mean training loss scores it


def smoothed(losses: list[float]) -> list[float]:
    """Centred moving average over WINDOW of the steps (fewer at the ends)."""
    half = max(2, round(WINDOW * len(losses) / 2))
    return [sum(losses[max(0, i - half):i + half + 1]) / len(losses[max(0, i - half):i + half + 1])
            for i in range(len(losses))]


def suggest(lrs: list[float], losses: list[float]) -> dict:
    """The suggested learning rate and what it was read from (see the module's docstring)."""
    finite = next((i for i, loss in enumerate(losses) if not math.isfinite(loss)), len(losses))
    if finite < 2:
        raise UserError(f"the loss was not finite from the start (learning rate {lrs[0]:.3g}); lower --min-lr")
    curve = smoothed(losses[:finite])
    lowest = min(range(finite), key=curve.__getitem__)
    target = curve[lowest] + (1 - FALL) * (curve[0] - curve[lowest])
    knee = next(i for i in range(lowest + 1) if curve[i] <= target)
    # divergence: back above the start after the lowest point, or not finite (scale-free: a DPO loss near 0 reads
    # as a language model's near 8)
    diverged = next((i for i in range(lowest, finite) if curve[i] > curve[0]), finite if finite < len(losses) else None)
    if lowest == 0:
        rule = "the loss never fell below its first value: no rate of the sweep helps; check the data, or lower --min-lr"
    elif lowest == len(losses) - 1:
        rule = "the loss was still falling at --max-lr: raise it for a reading"
    else:
        rule = f"{FALL:.0%} of the smoothed loss's fall, which is lowest at {lrs[lowest]:.3g}"
    return {"lr": lrs[knee], "lowest_at": lrs[lowest], "diverged_at": None if diverged is None else lrs[diverged],
            "rule": rule, "smoothed": curve + [math.nan] * (len(losses) - finite)}


def suggest_fixed(lrs: list[float], scores: list[float]) -> dict:
    """The suggested learning rate of the fixed-rate runs (see the module's docstring); lrs ascending."""
    finite = [i for i, score in enumerate(scores) if math.isfinite(score)]
    if not finite:
        raise UserError(f"no run had a finite loss (rates {lrs[0]:.3g} to {lrs[-1]:.3g}); lower --lrs")
    best = min(finite, key=scores.__getitem__)
    if best in (0, len(lrs) - 1):
        side = "lowest" if best == 0 else "highest"
        return {"lr": lrs[best], "best_at": lrs[best],
                "rule": f"the best run is the {side} rate tried, also after {EXTEND} more beyond the grid: the best may "
                        "lie further; widen --lrs"}
    (x0, x1, x2), (y0, y1, y2) = (math.log(lrs[i]) for i in (best - 1, best, best + 1)), \
        (scores[i] for i in (best - 1, best, best + 1))
    if not (math.isfinite(y0) and math.isfinite(y2)):  # a neighbour diverged: no curvature to read
        return {"lr": lrs[best], "best_at": lrs[best], "rule": "the best run (a neighbour's loss was not finite)"}
    # the vertex of the parabola through the three points; it lies between the neighbours, as y1 is the lowest
    num = (x1 - x0) ** 2 * (y1 - y2) - (x1 - x2) ** 2 * (y1 - y0)
    den = (x1 - x0) * (y1 - y2) - (x1 - x2) * (y1 - y0)
    vertex = x1 - 0.5 * num / den if den else x1
    return {"lr": math.exp(vertex), "best_at": lrs[best],
            "rule": f"the lowest point of a parabola in log(rate) through the best run ({lrs[best]:.3g}) and its "
                    "neighbours"}


def beyond_the_edge(lrs: list[float], scores: list[float]) -> list[float]:
    """The next rate to try when the best run is at an edge of the rates tried (one step of the grid further),
    else none."""
    finite = [i for i, score in enumerate(scores) if math.isfinite(score)]
    if not finite:
        return []
    best = min(finite, key=scores.__getitem__)
    if best == len(lrs) - 1 and len(lrs) > 1:
        return [lrs[-1] * lrs[-1] / lrs[-2]]
    if best == 0 and len(lrs) > 1:
        return [lrs[0] * lrs[0] / lrs[1]]
    return []


def finite_or_none(values: list[float]) -> list[float | None]:
    """JSON has no NaN or infinity."""
    return [v if math.isfinite(v) else None for v in values]


def figure():
    import matplotlib  # a start-up cost (docs/architecture.md), paid only where a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(7, 4.5))


def plot_sweep(path: str, lrs: list[float], losses: list[float], found: dict) -> None:
    plt, fig, ax = figure()
    ax.plot(lrs, losses, color="0.75", linewidth=0.8, label="loss")
    ax.plot(lrs, found["smoothed"], color="C0", label="smoothed")
    ax.axvline(found["lr"], color="C2", linestyle="--", label=f"suggested train.lr {found['lr']:.2g}")
    ax.axvline(found["lowest_at"], color="C1", linestyle=":", label=f"lowest {found['lowest_at']:.2g}")
    ax.set_xscale("log")
    finite = [v for v in found["smoothed"] if math.isfinite(v)]
    if finite:
        span = max(finite[0] - min(finite), 1e-6)
        ax.set_ylim(min(finite) - 0.1 * span, finite[0] + 0.5 * span)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    save(plt, fig, ax, path)


def plot_fixed(path: str, lrs: list[float], scores: list[float], found: dict, score: str, steps: int) -> None:
    plt, fig, ax = figure()
    ax.plot(lrs, scores, "o-", color="C0", label=f"{score} after {steps} steps")
    ax.axvline(found["lr"], color="C2", linestyle="--", label=f"suggested train.lr {found['lr']:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(score)
    save(plt, fig, ax, path)


def save(plt, fig, ax, path: str) -> None:
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def stage_of(cfg):
    """The stage class whose shards data.path holds (the first source's kind)."""
    path = data_sources(cfg.data)[0][1]
    stage = stage_for_kind(read_manifest(path)["kind"], f"data.path {path}")
    if not stage.loss_measures_fit:
        raise UserError(f"data.path {path}: {stage.name}'s loss does not measure how well a rate trains (it is a "
                        "surrogate whose value stays near 0); choose train.lr from short runs' rewards instead")
    return stage


def sweep_overrides(args, out: str) -> list[str]:
    return [f"out_dir={out}", "train.schedule=range_test", f"train.lr={args.max_lr}",
            f"train.min_lr_ratio={args.min_lr / args.max_lr}", "train.warmup_steps=0", f"train.max_steps={args.steps}",
            "train.eval_every=0", "log.every=1",
            f"train.max_nonfinite_steps={args.steps + 1}", "train.sample_prompt=null", "eval.tasks=[]"]


def fixed_overrides(args, cfg, out: str, lr: float) -> list[str]:
    """The config's schedule over --steps steps, its warmup in proportion; evaluated at the start and the end."""
    warmup = round(cfg.train.warmup_steps * args.steps / max(1, cfg.train.max_steps))
    return [f"out_dir={out}", f"train.lr={lr}", f"train.max_steps={args.steps}", f"train.warmup_steps={warmup}",
            f"train.eval_every={args.steps if cfg.data.val_fraction else 0}", "log.every=1",
            f"train.max_nonfinite_steps={args.steps + 1}", "train.sample_prompt=null", "eval.tasks=[]"]


def records(out: str, key: str) -> list[dict]:
    return [r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if key in r]


def run_score(out: str, steps: int) -> tuple[str, float]:
    """A fixed-rate run's score: its validation loss at the end, or its mean training loss over the last TAIL."""
    val = [r for r in records(out, "val_loss") if r["step"] == steps]
    if val:
        return "val_loss", val[-1]["val_loss"]
    tail = [r["loss"] for r in records(out, "loss")][-max(1, round(TAIL * steps)):]
    return "loss", sum(tail) / len(tail)


MARK = ".lr_find"  # in each run directory lr_find makes: what clear() may delete
RUN_DIR = re.compile(r"lr-[0-9]+|sweep")


def clear(out: str) -> None:
    """Rank 0: what an earlier call left, which would pass for this one's if this one fails. Only directories
    lr_find made (marked) are deleted; one of their names without the mark is another run's, and refused."""
    os.makedirs(out, exist_ok=True)
    runs = [os.path.join(out, name) for name in sorted(os.listdir(out))
            if RUN_DIR.fullmatch(name) and os.path.isdir(os.path.join(out, name))]
    for path in runs:  # all checked before any is deleted
        if os.path.exists(checkpoints_dir(path)):
            raise UserError(f"--out {out}: {path} holds checkpoints, which lr_find never writes: another run's; give "
                            "--out a directory of its own")
        if not os.path.exists(os.path.join(path, MARK)):
            raise UserError(f"--out {out}: {path}, where lr_find would write, has no {MARK} mark: if an earlier "
                            f"lr_find made it, delete it (rm -r {path}); else give --out a directory of its own")
    for path in runs:
        shutil.rmtree(path)
    for name in ("lr_find.json", "lr_find.png"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out, name))


def one_run(stage, run_cfg, env) -> None:
    """One run of the loop in lr_find's marked directory, its memory given back before the next (a compiled
    module holds itself in a reference cycle)."""
    def mark() -> None:
        os.makedirs(run_cfg.out_dir, exist_ok=True)
        open(os.path.join(run_cfg.out_dir, MARK), "w").close()

    D.from_rank0(env, mark)
    run(stage(run_cfg), run_cfg, saves=False)  # its weights are of no use after: none kept
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fixed(args, cfg, stage, out: str, env) -> tuple[dict, str]:
    rank = env.rank
    lrs = sorted(args.lrs or [cfg.train.lr * f for f in GRID])
    scores: dict[float, float] = {}
    score = None
    todo = list(lrs)
    while todo:
        lr = todo.pop(0)
        run_dir = os.path.join(out, f"lr-{len(scores)}")
        run_cfg = load_config(args.config, [*args.overrides, *fixed_overrides(args, cfg, run_dir, lr)])
        if rank == 0:
            print(f"lr_find: train.lr={lr:.3g} ({len(scores) + 1} of {len(scores) + 1 + len(todo)}), "
                  f"{args.steps} steps → {run_dir}", flush=True)
        one_run(stage, run_cfg, env)
        value = D.from_rank0(env, lambda d=run_dir: run_score(d, args.steps))  # every rank decides what next
        score, scores[lr] = value[0], value[1]
        if rank == 0:
            print(f"lr_find: train.lr={lr:.3g}: {score} {value[1]:.4f}", flush=True)
        if not todo and len(scores) < len(lrs) + EXTEND:
            todo = beyond_the_edge(sorted(scores), [scores[x] for x in sorted(scores)])
    lrs = sorted(scores)
    scores = [scores[x] for x in lrs]
    if rank != 0:
        return {}, ""
    found = suggest_fixed(lrs, scores)
    plot_fixed(os.path.join(out, "lr_find.png"), lrs, scores, found, score, args.steps)
    return {"method": "fixed", "suggested_lr": found["lr"], "rule": found["rule"], "best_at": found["best_at"],
            "steps": args.steps, "score": score, "lr": lrs, "scores": finite_or_none(scores)}, found["rule"]


def sweep(args, cfg, stage, out: str, env) -> tuple[dict, str]:
    swept = load_config(args.config, [*args.overrides, *sweep_overrides(args, os.path.join(out, "sweep"))])
    one_run(stage, swept, env)
    if env.rank != 0:
        return {}, ""
    steps = records(os.path.join(out, "sweep"), "loss")
    lrs, losses = [r["lr"] for r in steps], [r["loss"] for r in steps]
    found = suggest(lrs, losses)
    plot_sweep(os.path.join(out, "lr_find.png"), lrs, losses, found)
    diverged = f", diverged from {found['diverged_at']:.3g}" if found["diverged_at"] else ""
    return {"method": "sweep", "suggested_lr": found["lr"], "rule": found["rule"], "lowest_at": found["lowest_at"],
            "diverged_at": found["diverged_at"], "lr": lrs, "loss": finite_or_none(losses),
            "smoothed": finite_or_none(found["smoothed"])}, found["rule"] + diverged


def rates(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        values = []
    if len(values) < 3 or not all(math.isfinite(v) and v > 0 for v in values) or len(set(values)) < len(values):
        raise argparse.ArgumentTypeError("at least three different positive rates, comma-separated")
    return values


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.lr_find", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="FILE")
    p.add_argument("--method", choices=("fixed", "sweep"), default="fixed")
    p.add_argument("--steps", type=int, help="fixed: each run's steps (default 100); sweep: the sweep's (default 200)")
    p.add_argument("--lrs", type=rates, help="fixed: the rates (default: train.lr × 1/4, 1/2, 1, 2, 4)")
    p.add_argument("--min-lr", type=float, help="sweep: the first rate (default 1e-5)")
    p.add_argument("--max-lr", type=float, help="sweep: the last rate (default 1)")
    p.add_argument("--out", help="the runs' directory (default: OUT_DIR/lr_find)")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = p.parse_args(argv)
    if args.method == "fixed" and (args.min_lr is not None or args.max_lr is not None):
        p.error("--min-lr and --max-lr are the sweep's (--method sweep); the fixed runs' rates are --lrs")
    if args.method == "sweep" and args.lrs:
        p.error("--lrs is the fixed runs' (--method fixed); the sweep's rates are --min-lr to --max-lr")
    if args.steps is None:
        args.steps = 100 if args.method == "fixed" else 200
    args.min_lr = 1e-5 if args.min_lr is None else args.min_lr
    args.max_lr = 1.0 if args.max_lr is None else args.max_lr
    if not 0 < args.min_lr < args.max_lr < math.inf:
        p.error("need 0 < --min-lr < --max-lr, both finite")
    if args.steps < 10:
        p.error("--steps: at least 10")
    rank = ranks_from_env()[0]

    def find() -> None:
        cfg = load_config(args.config, args.overrides)
        out = args.out or os.path.join(cfg.out_dir, "lr_find")
        if os.path.realpath(out) == os.path.realpath(cfg.out_dir):
            raise UserError(f"--out {out}: is out_dir itself; lr_find needs a directory of its own")
        if latest(out) is not None:  # lr_find writes none: these are another run's
            raise UserError(f"--out {out}: holds a run's checkpoints; lr_find starts from the config's starting "
                            "weights in a directory of its own")
        stage = stage_of(cfg)
        check(stage(cfg), cfg)  # what the stage or backend refuses: before anything of an earlier call is cleared
        # one process group for all the runs; DIR locked from clearing it to writing the report, its runs in
        # directories below it, each locked by its own run
        with D.shared_process_group(cfg.dist.backend, cfg.train.device, cfg.dist.timeout_s,
                                    backend_class(cfg.dist.backend).group_always) as env:
            lock = rundir.lock(out, env)
            try:
                if cfg.init_from:  # one checkpoint for every run, though init_from's run may write a newer one
                    start = D.from_rank0(env, lambda: resolve(cfg.init_from))
                    args.overrides = [*args.overrides, f"init_from={start}"]
                D.from_rank0(env, lambda: clear(out))
                report, rule = (fixed if args.method == "fixed" else sweep)(args, cfg, stage, out, env)
                if rank != 0:
                    return
                with open(os.path.join(out, "lr_find.json"), "w") as f:
                    json.dump({**report, "stage": stage.name, "config_lr": cfg.train.lr},
                              f, indent=1)
                print(f"lr_find: suggested train.lr={report['suggested_lr']:.3g} ({args.method}: {rule}; the "
                      f"config has {cfg.train.lr:.3g}) → {out}/lr_find.png", flush=True)
            finally:
                lock.release()

    return D.run_command(lambda: run_reporting(find))


if __name__ == "__main__":
    sys.exit(main())
