"""dist.backend → its Backend class, and the backend that wrote a checkpoint (to consolidate its weights). The one
place that lists the backends: adding one is its module and a line here."""

from __future__ import annotations

import torch

from .base import Backend
from .ddp import DDP
from .deepspeed import DeepSpeed
from .fsdp2 import FSDP2

BACKENDS: dict[str, type[Backend]] = {"none": DDP, "ddp": DDP, "deepspeed": DeepSpeed, "fsdp2": FSDP2}


def backend_class(name: str) -> type[Backend]:
    return BACKENDS[name]


def consolidated_state_dict(directory: str) -> dict[str, torch.Tensor] | None:
    """A checkpoint in a backend's own layout as one plain fp32 state dict; None for one that is not (its model.pt
    is the plain state dict already)."""
    for backend in dict.fromkeys(BACKENDS.values()):
        if backend.owns(directory):
            return backend.consolidate(directory)
    return None
