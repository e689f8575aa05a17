"""Print what a config resolves to: where the run starts, the model's shape and size, the batch, the schedule.

    python -m training.describe --config FILE [--processes N] [key.sub=value ...]

The starting point (a checkpoint of out_dir to resume, init_from, or the config's model) is resolved as the run
resolves it (run/build.py), without a process group: nothing is moved, no weights are hashed.
"""

from __future__ import annotations

import argparse
import sys

import torch

from preprocess.errors import exit_code
from preprocess.ranks import ranks_from_env
from preprocess.shards import read_manifest

from .config import Config, MixStage, data_schedule, data_sources, load_config
from .data.order import BatchPlan, Mixture, SampleOrder
from .data.packing import PackingPlan
from .models import lora
from .models.optim import optimizer_state_bytes
from .models.transformer import Transformer
from .parallel.backends import BACKENDS
from .parallel.env import DistEnv
from .run.build import check, data_mixture, open_data, resolve_precision, starting_point, step_position
from .stages.registry import stage_for_kind


def describe(cfg: Config, processes: int = 1) -> str:
    path = data_sources(cfg.data)[0][1]
    kind = read_manifest(path)["kind"]
    stage = stage_for_kind(kind, f"data.path {path}")(cfg)
    check(stage, cfg)
    sources, names, weights = open_data(stage, cfg, DistEnv(), announce=False)  # the packing line counts them
    start = starting_point(cfg, sources[0])
    m, t = start.model_cfg, cfg.train
    with torch.device("meta"):
        model = Transformer(m)
    plan = stage.batch_plan(processes)
    unit = stage.unit
    mixture = data_mixture(cfg, weights, plan, stage, start.saved)  # what a resume would refuse, refused here too
    packing = []
    if cfg.data.packing and stage.packs and stage.packs_examples:
        packing, unit = [packing_line(cfg, sources, mixture, plan, unit)], "rows"
    vocab = sources[0].tokenizer["vocab_size"]
    return "\n".join([
        f"{stage.name}: {start_line(cfg, start)}",
        f"model: {model.num_params() / 1e6:.2f} M parameters ({model.num_params(exclude_embeddings=True) / 1e6:.2f} M "
        f"without the embedding); dim {m.dim}, {m.n_layers} layers, {m.n_heads} heads ({m.kv_heads} key/value), "
        f"feed-forward {m.hidden}, vocabulary {m.vocab_size} (tokenizer: {vocab}), context {m.max_seq_len}, "
        f"{'tied' if m.tie_embeddings else 'separate'} embeddings" + (f"; transformers {m.family}" if m.family else ""),
        f"compute: {model.flops_per_token(cfg.data.seq_len) / 1e6:.1f} MFLOP per trained token",
        plan.describe(cfg.data.seq_len, unit),
        *packing,
        *mixture_lines(cfg, stage, plan, sources, names, mixture, stage.unit),
        *stage.describe_batch(plan),
        f"schedule: {t.max_steps:,} steps, lr {t.lr:g} ({t.schedule}, {t.warmup_steps} warmup), "
        f"precision {t.precision}, checkpoints every {t.ckpt_every}",
        *([lora_line(model, cfg.lora)] if lora.enabled(cfg.lora) else []),
        state_line(cfg, model, processes),
    ])


def state_sizes(cfg: Config, model: Transformer, processes: int, precision: str) -> dict:
    """{backend class: per-rank bytes of (parameters, gradients, optimizer state)}, by each backend's own rules
    (Backend.state_bytes), for `model` (a meta one will do) as the config trains it."""
    if lora.enabled(cfg.lora):
        with torch.device("meta"):
            model = lora.apply(Transformer(model.cfg), cfg.lora)
    weights = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = optimizer_state_bytes(model, cfg.train)
    return {backend: backend.state_bytes(cfg, weights, trained, optimizer, processes, precision)
            for backend in dict.fromkeys(BACKENDS.values())}


def state_line(cfg: Config, model: Transformer, processes: int) -> str:
    """Per rank, the bytes of parameters, gradients and optimizer state under each backend; activations and a
    sharded backend's gathered weights come on top."""
    precision = resolve_precision(cfg.train.precision, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    parts = []
    for backend, sizes in state_sizes(cfg, model, processes, precision).items():
        parts.append(f"{backend.label(cfg)} {' + '.join(gib(b) for b in sizes)} = {gib(sum(sizes))}"
                     + (" (this run)" if BACKENDS[cfg.dist.backend] is backend else ""))
    return (f"state per rank on {processes} process{'es' if processes != 1 else ''} (parameters + gradients + "
            f"optimizer, {precision}): " + "; ".join(parts))


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def start_line(cfg: Config, start) -> str:
    if start.saved is not None:
        return f"resumes {cfg.out_dir} at step {start.saved.step:,} ({start.checkpoint})"
    if start.init_from is not None:
        return f"starts from the weights of {start.init_from['path']}"
    return f"a fresh model of the config's shape, into {cfg.out_dir}"


def mixture_lines(cfg: Config, stage, plan: BatchPlan, sources, names: list[str], mixture: Mixture,
                  unit: str) -> list[str]:
    """With several sources, or a schedule: per stage of the run (one without data.schedule), each source's weight,
    the samples and tokens it contributes and how many times the run will then have read it (epochs). Counted on
    the training order itself, in its units (with packing: the rows' positions hold several examples)."""
    schedule = data_schedule(cfg.data) or [MixStage(None, mixture.weights[0])]
    if len(sources) < 2 and len(schedule) < 2:
        return []
    order = SampleOrder([s.n_train for s in sources], mixture, cfg.seed)
    spans, begin = [], 0  # (first step, end step, stage) of the run, the last stage's weights held to the end
    for i, mix in enumerate(schedule):
        end = cfg.train.max_steps if i == len(schedule) - 1 and mix.until_step is None else mix.until_step
        spans.append((begin, min(end, cfg.train.max_steps), i))
        begin = end
    if begin < cfg.train.max_steps:
        spans.append((begin, cfg.train.max_steps, None))
    lines = [f"data mixture{' (data.schedule)' if len(schedule) > 1 else ''}: {unit} and tokens each source "
             "contributes, and the epochs of it read by the end of each stage"]
    for first, end, i in spans:
        if end <= first:
            break
        before, upto = (order.counts(step_position(x, plan, stage)) for x in (first, end))
        held = schedule[-1] if i is None else schedule[i]
        anneal = i is not None and held.anneal
        parts = []
        for k, (name, source) in enumerate(zip(names, sources, strict=True)):
            start = f"{100 * schedule[i - 1].weights[k]:.0f}% → " if anneal else ""
            n = int(upto[k] - before[k])
            parts.append(f"{name} {start}{100 * held.weights[k]:.0f}%: {n:,} {unit}, "
                         f"{amount(n * source.positions_per_sample)} tokens, {upto[k] / source.n_train:.2f} epochs")
        what = " (linear anneal)" if anneal else " (the last stage's weights)" if i is None else ""
        lines.append(f"  steps {first:,}–{end:,}{what}: " + "; ".join(parts))
    return lines


def amount(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n:,.0f}"


def packing_line(cfg: Config, sources, mixture: Mixture, plan: BatchPlan, unit: str) -> str:
    """How many examples a packed row holds, measured on the run's own first windows (sources opened packed)."""
    order = SampleOrder([s.n_train for s in sources], mixture, cfg.seed)  # the training order's picks
    windows = 4
    per_row, filled = PackingPlan(order.picks, [s.lengths for s in sources], cfg.data.seq_len,
                                  cfg.data.pack_window, cfg.seed).stats(windows)
    left_out = sum(s.too_long for s in sources)
    return (f"packing: {per_row:.2f} {unit} per row on average ({100 * filled:.1f}% of the positions filled; first "
            f"{windows} windows of {cfg.data.pack_window}), {plan.global_batch * per_row:,.0f} {unit} per optimizer "
            f"step; {left_out:,} longer than data.seq_len={cfg.data.seq_len} left out")


def lora_line(model: Transformer, cfg) -> str:
    """The adapters as peft builds them (on a meta copy of the model: no memory), counted."""
    base = model.num_params()
    with torch.device("meta"):
        adapted = lora.apply(Transformer(model.cfg), cfg)
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    layers = sum(1 for name, _ in adapted.named_modules() if name.endswith(".lora_A"))
    return (f"lora: rank {cfg.rank} (alpha {cfg.alpha:g}) on {layers} layers ({', '.join(cfg.targets)}): "
            f"{trainable / 1e6:.3f} M trainable parameters, {100 * trainable / base:.2f}% of the model")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.describe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--processes", type=int, default=ranks_from_env()[1],
                   help="data-parallel processes of the run (default: this launcher's world size, or 1)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    return exit_code(lambda: print(describe(load_config(args.config, args.overrides), args.processes)))


if __name__ == "__main__":
    sys.exit(main())
