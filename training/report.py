"""Plots and a short summary of runs, from their metrics.jsonl.

    python -m training.report RUN_DIR [RUN_DIR ...] [--out DIR]

Into each run directory: report.png (loss and val_loss, learning rate, gradient norm, tokens/s; for DPO also the
rewards, margins and accuracy) and report.md. Given several runs, also compare.png and compare.md in --out
(default: the first run directory), every run on the same axes.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import sys

from preprocess.errors import UserError, exit_code

PANELS = [  # (title, metric keys drawn in it; "key/" stands for every key it begins, e.g. each source's)
    ("loss", ["loss", "val_loss"]),
    ("validation loss per source", ["val_loss/"]),
    ("validation bits per byte", ["val_bpb", "val_bpb/"]),
    ("padding share", ["padding_share"]),
    ("learning rate", ["lr"]),
    ("gradient norm", ["grad_norm"]),
    ("tokens/s", ["tokens_per_sec"]),
    ("DPO rewards", ["rewards/chosen", "rewards/rejected", "rewards/margins"]),
    ("DPO accuracy", ["rewards/accuracies"]),
    ("GRPO reward", ["reward", "val_reward"]),
    ("GRPO completions", ["completions/mean_length", "completions/max_length"]),
    ("GRPO sampling and scoring per step (s)", ["time/sampling", "time/scoring"]),
    ("a step's host time (s): preparing (reference, sampling) and training", ["time/prepare", "time/training"]),
]


def read_metrics(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} of a run; a line that is not JSON is a one-line error naming it."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"{run_dir}: no metrics.jsonl (not a run directory?)")
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise UserError(f"{path}:{number}: not JSON ({e})") from None
            for key, value in record.items():
                if isinstance(value, bool):  # a flag ("skipped"): its steps
                    if value:
                        series.setdefault(key, []).append((record["step"], 1.0))
                elif key != "step" and isinstance(value, (int, float)):
                    series.setdefault(key, []).append((record["step"], float(value)))
    return series


def summary(run_dir: str, series: dict) -> list[str]:
    """Markdown lines: what the run reached."""
    def last(key):
        return series[key][-1][1] if key in series else None

    lines = [f"## {run_dir}", ""]
    steps = max((s for points in series.values() for s, _ in points), default=0)
    lines.append(f"- steps: {steps:,}; tokens: {int(last('tokens') or 0):,}")
    if "loss" in series:
        finite = [v for _, v in series["loss"] if math.isfinite(v)]
        lines.append(f"- loss: {series['loss'][0][1]:.4f} at step {series['loss'][0][0]} → {last('loss'):.4f}"
                     + (f" (lowest {min(finite):.4f})" if finite else ""))
    if "val_loss" in series:
        step, best = min(series["val_loss"], key=lambda p: p[1])
        lines.append(f"- val_loss: {series['val_loss'][0][1]:.4f} → {last('val_loss'):.4f} (best {best:.4f} at step {step})")
    for key in sorted(k for k in series if k.startswith(("val_loss/", "val_bpb"))):
        lines.append(f"- {key}: {series[key][0][1]:.4f} → {last(key):.4f}")
    if "padding_share" in series:
        shares = [v for _, v in series["padding_share"]]
        lines.append(f"- padding: {100 * sum(shares) / len(shares):.1f}% of the positions computed")
    if "tokens_per_sec" in series:
        rates = [v for _, v in series["tokens_per_sec"][1:]] or [series["tokens_per_sec"][0][1]]
        lines.append(f"- throughput: {sum(rates) / len(rates):,.0f} tokens/s on average after the first interval"
                     + (f", MFU {100 * last('mfu'):.1f}%" if "mfu" in series else ""))
    if "skipped" in series:
        lines.append(f"- steps skipped for a non-finite loss or gradient: {len(series['skipped'])}")
    if "rewards/margins" in series:
        lines.append(f"- DPO: reward margin {last('rewards/margins'):.3f}, accuracy {last('rewards/accuracies'):.2f} "
                     f"(chosen {last('rewards/chosen'):.3f}, rejected {last('rewards/rejected'):.3f})")
    if mixture := sorted(k for k in series if k.startswith("mixture/")):
        lines.append("- data mixture, the last logged interval: " + ", ".join(
            f"{k.removeprefix('mixture/')} {100 * last(k):.1f}%" for k in mixture))
    for table in latest_tables(os.path.join(run_dir, "evaluations")):
        lines += ["", f"### lm-evaluation-harness: {os.path.basename(table)[:-3]}", "", open(table).read().strip()]
    return lines + [""]


def latest_tables(folder: str) -> list[str]:
    """The harness's tables of a run (evaluations/: in-run step-N.TASKS.md, training.evaluate's
    evaluate-step-N.TASKS.md): the latest step's of each kind and task set."""
    latest: dict[tuple[str, str], tuple[int, str]] = {}
    for path in glob.glob(os.path.join(folder, "*.md")):
        m = re.match(r"(.*?)step-(\d+)\.(.*)\.md$", os.path.basename(path))
        kind = (m[1], m[3]) if m else (os.path.basename(path), "")
        step = int(m[2]) if m else 0
        if kind not in latest or step > latest[kind][0]:
            latest[kind] = (step, path)
    return [path for _, path in sorted(latest.values())]


def short_names(paths: list[str]) -> dict[str, str]:
    """The fewest trailing path components that tell the runs apart (runs/a/pretrain, runs/b/pretrain → a/pretrain)."""
    parts = {p: os.path.normpath(os.path.abspath(p)).split(os.sep) for p in paths}
    for n in range(1, max(len(v) for v in parts.values()) + 1):
        names = {p: "/".join(v[-n:]) for p, v in parts.items()}
        if len(set(names.values())) == len(paths):
            return names
    return {p: p for p in paths}


def plot(runs: dict[str, dict], path: str) -> None:
    import matplotlib  # a start-up cost (docs/architecture.md), paid only where a plot is drawn

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    present = sorted({k for series in runs.values() for k in series})
    panels = [(t, [k for pattern in keys for k in present if k == pattern or (pattern[-1] == "/" and
                                                                             k.startswith(pattern))]) for t, keys in PANELS]
    panels = [(t, keys) for t, keys in panels if keys]
    cols = 2
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.2 * rows), squeeze=False)
    several = len(runs) > 1
    names = short_names(list(runs))
    for ax, (title, keys) in zip(axes.flat, panels, strict=False):
        for i, (run, series) in enumerate(runs.items()):
            for j, key in enumerate(keys):  # one colour per run (per metric for one run), one line style per metric
                if key in series:
                    steps, values = zip(*series[key], strict=True)
                    label = (f"{names[run]}: {key}" if len(keys) > 1 else names[run]) if several else key
                    ax.plot(steps, values, color=f"C{i if several else j}", linestyle=["-", "--", ":"][j % 3],
                            marker="o" if key.startswith("val_") else None, markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if several or len(keys) > 1:
            ax.legend(fontsize=7)
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", help="where compare.png and compare.md go when several runs are given")
    args = p.parse_args(argv)
    return exit_code(lambda: write_reports(args.runs, args.out))


def write_reports(run_dirs: list[str], out: str | None) -> None:
    runs = {run: read_metrics(run) for run in run_dirs}
    for run, series in runs.items():
        plot({run: series}, os.path.join(run, "report.png"))
        with open(os.path.join(run, "report.md"), "w") as f:
            f.write("\n".join(summary(run, series)))
        print(f"{run}/report.png, {run}/report.md")
    if len(runs) > 1:
        out = out or run_dirs[0]
        os.makedirs(out, exist_ok=True)
        plot(runs, os.path.join(out, "compare.png"))
        with open(os.path.join(out, "compare.md"), "w") as f:
            f.write("\n".join(line for run, series in runs.items() for line in summary(run, series)))
        print(f"{out}/compare.png, {out}/compare.md")

if __name__ == "__main__":
    sys.exit(main())
