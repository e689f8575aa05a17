"""Learning-rate range test: the config's own stage, data and model, trained from its starting weights while the
learning rate grows exponentially from --min-lr to --max-lr over --steps steps; the loss against the learning
rate as a plot, and a suggested train.lr.

    python -m training.lr_find --config FILE [--min-lr 1e-5] [--max-lr 1] [--steps 200] [--out DIR] [key.sub=value ...]
    torchrun --nproc_per_node N -m training.lr_find --config FILE ...

The stage is the one the data's shards are for (pretrain, sft, dpo, kto). Everything else is the config's —
batch, accumulation, precision, clipping, backend, init_from, LoRA — except the schedule, the step count, and
evaluation and sampling, which are off. The sweep runs in DIR (default: OUT_DIR/lr_find), a run directory of its
own, where it writes no checkpoint: out_dir's are never read or written, and each sweep starts afresh. DIR gets lr_find.png,
lr_find.json (every step's lr and loss, the smoothed loss, the suggestion) and the sweep's metrics.jsonl.

The suggestion: the loss is smoothed by a centred moving average over 5% of the sweep (centred: an exponential
average lags the rate it reports, by a quarter of a 200-step sweep at the usual 0.98) up to its first loss that
is not finite; the suggested rate is the smallest at which the smoothed loss has made 95% of its fall from the
first step to its lowest point — the knee, past which a higher rate no longer lowers the loss. (The rate at the lowest point is
not: the loss often lies flat over a decade or more of rates, and its lowest point there is noise — on the tiny
preset it moved from 0.005 to 0.09 with the seed; docs/benchmarks.md.)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import sys

from preprocess.errors import UserError

WINDOW = 0.05   # of the sweep's steps, for the moving average
FALL = 0.95     # of the smoothed loss's fall, at the suggested rate


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


def finite_or_none(values: list[float]) -> list[float | None]:
    """JSON has no NaN or infinity."""
    return [v if math.isfinite(v) else None for v in values]


def plot(path: str, lrs: list[float], losses: list[float], found: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
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
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def stage_of(cfg):
    """The stage module whose shards data.path holds (the first source's kind)."""
    from preprocess.shards import read_manifest

    from .config import data_sources

    path = data_sources(cfg.data)[0][1]
    kind = read_manifest(path)["kind"]
    return importlib.import_module(f".{kind}", __package__)


def sweep_overrides(args, out: str) -> list[str]:
    return [f"out_dir={out}", "train.schedule=range_test", f"train.lr={args.max_lr}",
            f"train.min_lr_ratio={args.min_lr / args.max_lr}", "train.warmup_steps=0", f"train.max_steps={args.steps}",
            "train.eval_every=0", "log.every=1",
            f"train.max_nonfinite_steps={args.steps + 1}", "train.sample_prompt=null"]


def main(argv=None) -> int:
    from .cli import run_reporting
    from .distributed import ranks_from_env, run_command

    p = argparse.ArgumentParser(prog="python -m training.lr_find", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="FILE")
    p.add_argument("--min-lr", type=float, default=1e-5)
    p.add_argument("--max-lr", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", help="the sweep's directory (default: OUT_DIR/lr_find)")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = p.parse_args(argv)
    if not 0 < args.min_lr < args.max_lr:
        p.error("need 0 < --min-lr < --max-lr")
    if args.steps < 10:
        p.error("--steps: at least 10")
    rank = ranks_from_env()[0]

    def find() -> None:

        from . import checkpoint as ckpt
        from .config import load_config
        from .loop import run

        cfg = load_config(args.config, args.overrides)
        out = args.out or os.path.join(cfg.out_dir, "lr_find")
        if os.path.realpath(out) == os.path.realpath(cfg.out_dir):
            raise UserError(f"--out {out}: is out_dir itself; the sweep needs a directory of its own")
        if ckpt.latest(out) is not None:  # a sweep writes none: these are another run's
            raise UserError(f"--out {out}: holds a run's checkpoints; a sweep starts from the config's starting weights "
                            "in a directory of its own")
        module = stage_of(cfg)
        sweep = load_config(args.config, [*args.overrides, *sweep_overrides(args, out)])
        if rank == 0:  # what an earlier sweep left would pass for this one's if this one fails
            os.makedirs(out, exist_ok=True)
            for name in ("lr_find.json", "lr_find.png"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(out, name))
        run(module.make_stage(sweep), sweep, saves=False)  # weights trained at absurd rates: of no use
        if rank != 0:
            return
        lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
        steps = [r for r in lines if "loss" in r]
        lrs, losses = [r["lr"] for r in steps], [r["loss"] for r in steps]
        found = suggest(lrs, losses)
        plot(os.path.join(out, "lr_find.png"), lrs, losses, found)
        with open(os.path.join(out, "lr_find.json"), "w") as f:
            json.dump({"suggested_lr": found["lr"], "rule": found["rule"], "lowest_at": found["lowest_at"],
                       "diverged_at": found["diverged_at"], "lr": lrs, "loss": finite_or_none(losses),
                       "smoothed": finite_or_none(found["smoothed"]),
                       "stage": module.__name__.rsplit(".", 1)[-1], "config_lr": cfg.train.lr}, f, indent=1)
        diverged = f", diverged from {found['diverged_at']:.3g}" if found["diverged_at"] else ""
        print(f"lr_find: suggested train.lr={found['lr']:.3g} ({found['rule']}{diverged}; the config has "
              f"{cfg.train.lr:.3g}) → {out}/lr_find.png", flush=True)

    return run_command(lambda: run_reporting(find))


if __name__ == "__main__":
    sys.exit(main())
