"""Where a process holds a parameter's values: all of them, or its share under a backend that shards parameters, as
(the elements it holds, flat; the first one's index in the whole parameter, flattened; the whole parameter's shape).
Starting values are written through it, each process writing only the elements it holds: the random
initialisation and our checkpoints' weights (checkpoint.weights.fill), a transformers directory's (hf.load_into) and
LoRA's adapters (lora.init_adapters). A backend's `storage(param)` answers for a parameter it shards, None for one
held whole."""

from __future__ import annotations

import torch


def whole(param: torch.Tensor) -> tuple[torch.Tensor, int, tuple]:
    """All of a parameter's elements, held here."""
    return param.data.view(-1), 0, tuple(param.shape)


def held(param: torch.Tensor, storage=None) -> tuple[torch.Tensor, int, tuple]:
    """What this process holds of `param`, by the backend's storage (None: all of it)."""
    return (storage and storage(param)) or whole(param)


@torch.no_grad()
def write(store: tuple[torch.Tensor, int, tuple], values: torch.Tensor) -> None:
    """The whole parameter's `values` into what this process holds of it (cast to its dtype): from a memory-mapped
    file, only the pages of those elements are read."""
    flat, start, shape = store
    if tuple(values.shape) != shape:
        raise ValueError(f"values of shape {list(values.shape)} for a parameter of shape {list(shape)}")
    flat.copy_(values.reshape(-1)[start:start + flat.numel()])
