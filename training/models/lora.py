"""Low-rank adapters (LoRA), through peft, applied to a built model from outside (the model file knows nothing
of them). Only the adapters train; the base weights stay frozen, so DPO's reference is the same model with its
adapters switched off, and no second copy of the weights is needed.

Checkpoints hold the whole state (base weights and adapters), so a run resumes exactly; whoever loads one into a
plain model (generate, init_from, export_hf) gets the adapters merged into the weights.
"""

from __future__ import annotations

import contextlib
import math
import zlib

import torch

from preprocess.errors import UserError

from .storage import held, write
from .transformer import OutputLayer

ADAPTER_KEY = ".lora_A."  # in the state-dict names of adapted layers
BASE_LAYER = ".base_layer"  # what peft inserts in the names of an adapted layer's own weights


def enabled(cfg) -> bool:
    return cfg.rank > 0


def apply(model: torch.nn.Module, cfg) -> torch.nn.Module:
    """Wrap every nn.Linear whose name ends with one of cfg.targets in a LoRA layer; freeze everything else."""
    try:
        from peft import LoraConfig, inject_adapter_in_model  # optional: the lora extra
    except ImportError:
        raise UserError("lora.rank > 0 needs peft: pip install 'shardlm[lora]'") from None
    if "output" in cfg.targets:  # what peft would wrap: logits plus the adapter's, which the log-probs never see
        raise UserError("lora.targets: output takes no adapter: the loss computes the targets' log-probs from the "
                        "output layer's weight a chunk at a time (models/output.py); adapt the blocks' projections")
    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and not isinstance(m, OutputLayer)}
    unknown = sorted(set(cfg.targets) - names)
    if unknown or not cfg.targets:
        experts = " (the experts of MoE blocks take no adapters)" if any(t in ("w1", "w2", "w3") for t in unknown) and \
            any(type(m).__name__ == "MoE" for m in model.modules()) else ""
        raise UserError(f"lora.targets: {unknown or '[]'} names no linear layer{experts}; choose from {sorted(names)}")
    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.targets))
    inject_adapter_in_model(config, model)
    return model


def is_adapter(name: str) -> bool:
    return ADAPTER_KEY in name or ".lora_B." in name


def base_name(name: str) -> str:
    """A base weight's name as the plain model names it (peft's wrapper left out)."""
    return name.replace(BASE_LAYER, "")


@torch.no_grad()
def init_adapters(model: torch.nn.Module, seed: int, storage=None) -> None:
    """The adapters' starting values, the same however the model is held (whole or sharded) and whatever was drawn
    before: each A drawn as nn.Linear draws its weight (Kaiming-uniform, as peft does) from a generator of its own,
    seeded by the run's seed and its name; each B zero, so that the adapted model starts as the base. Written
    through the backend's storage: each process its own elements."""
    for name, p in model.named_parameters():
        if not is_adapter(name):
            continue
        store = held(p, storage)
        values = torch.zeros(store[2])
        if ADAPTER_KEY in name:
            generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
            torch.nn.init.kaiming_uniform_(values, a=math.sqrt(5), generator=generator)
        write(store, values)


def _adapted_layers(model: torch.nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer  # optional: only adapted models come here

    return [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def has_adapters(model: torch.nn.Module) -> bool:
    return any(ADAPTER_KEY in name for name, _ in model.named_parameters())


def is_adapted_state(state: dict) -> bool:
    return any(ADAPTER_KEY in key for key in state)


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module):
    """The base model: every adapter bypassed (DPO's reference forward)."""
    layers = [m for _, m in _adapted_layers(model)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m in layers:
            m.enable_adapters(True)


@torch.no_grad()
def merge(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every adapter into its base weight (W + scale·B·A, as peft computes it) and put the plain layer back."""
    for name, layer in _adapted_layers(model):
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.get_base_layer())
    return model


def load_merged(model: torch.nn.Module, state: dict, cfg, where: str) -> None:
    """Load an adapted state dict (a LoRA run's checkpoint) into a plain model, adapters merged."""
    apply(model, cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{where} does not fit this model (missing: {missing[:3]}, unexpected: {unexpected[:3]})")
    merge(model)
    model.requires_grad_(True)
