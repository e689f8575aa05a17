"""Print what a config resolves to: the model's shape and size, the batch, the schedule.

    python -m training.describe --config FILE [--processes N] [key.sub=value ...]
"""

from __future__ import annotations

import argparse
import sys

import torch

from preprocess.errors import exit_code
from preprocess.ranks import ranks_from_env
from preprocess.shards import read_manifest

from . import checkpoint as ckpt
from . import lora
from .config import data_sources, load_config
from .data import PackingPlan, SampleOrder, open_sources
from .loop import resolve_vocab
from .model import Transformer
from .plan import BatchPlan

UNITS = {"pretrain": "samples", "sft": "conversations", "dpo": "pairs", "kto": "labelled completions"}


def describe(cfg, processes: int = 1) -> str:
    path = data_sources(cfg.data)[0][1]
    manifest = read_manifest(path)
    vocab = manifest["tokenizer"]["vocab_size"]
    model_cfg = cfg.model
    if cfg.init_from:  # fine-tuning: the shape is the starting checkpoint's
        model_cfg = ckpt.model_config(ckpt.resolve(cfg.init_from))
    model_cfg = resolve_vocab(model_cfg, vocab, path)
    with torch.device("meta"):
        model = Transformer(model_cfg)
    m, t = model_cfg, cfg.train
    plan = BatchPlan.of(t, processes)
    unit = UNITS.get(manifest["kind"], "samples")
    packing = []
    if cfg.data.packing and manifest["kind"] != "pretrain":
        packing, unit = [packing_line(cfg, plan, unit)], "rows"
    return "\n".join([
        f"model: {model.num_params() / 1e6:.2f} M parameters ({model.num_params(exclude_embeddings=True) / 1e6:.2f} M "
        f"without the embedding); dim {m.dim}, {m.n_layers} layers, {m.n_heads} heads ({m.kv_heads} key/value), "
        f"feed-forward {m.hidden}, vocabulary {m.vocab_size} (tokenizer: {vocab}), context {m.max_seq_len}, "
        f"{'tied' if m.tie_embeddings else 'separate'} embeddings",
        f"compute: {model.flops_per_token(cfg.data.seq_len) / 1e6:.1f} MFLOP per trained token",
        plan.describe(cfg.data.seq_len, unit),
        *packing,
        f"schedule: {t.max_steps:,} steps, lr {t.lr:g} ({t.schedule}, {t.warmup_steps} warmup), "
        f"precision {t.precision}, checkpoints every {t.ckpt_every}",
        *([lora_line(model, cfg.lora)] if lora.enabled(cfg.lora) else []),
    ])


def packing_line(cfg, plan: BatchPlan, unit: str) -> str:
    """How many examples a packed row holds, measured on the run's own first windows."""
    _, paths, weights = zip(*data_sources(cfg.data), strict=True)
    kind = read_manifest(paths[0])["kind"]
    sources = open_sources(list(paths), cfg.data.seq_len, cfg.data.val_fraction, kind, packed=True)
    order = SampleOrder([s.n_train for s in sources], list(weights), cfg.seed)  # the training order's picks
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
