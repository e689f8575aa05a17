"""dist.backend=ddp (and none): every rank holds the whole model and optimizer; with several processes the model is
wrapped in DistributedDataParallel, which averages the gradients over the ranks once per optimizer step. Rank 0
writes the checkpoint's model.pt and optimizer.pt (every rank holds the same)."""

from __future__ import annotations

import inspect
import math
import os

import torch
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint.store import MODEL, fit, load_file, save_file
from .base import Backend

OPTIMIZER = "optimizer.pt"


def skips_on_device(optimizer) -> bool:
    """Whether the optimizer leaves out an update when its found_inf is 1: torch's fused Adam and AdamW (their
    kernels then change neither the weights nor the moments, and take the step count back)."""
    return isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and bool(optimizer.defaults.get("fused"))


def clip_and_apply(model, optimizer, max_norm: float, loss: torch.Tensor):
    """Backend.step for an optimizer the backend drives itself (DDP, FSDP2). Clipped and applied on the device,
    nothing read back, when the optimizer skips non-finite updates itself (fused AdamW: its found_inf, as a
    GradScaler sets it); else the decision reads the norm and the loss. Over sharded gradients (DTensors)
    clip_grad_norm_ gives the norm of the whole gradient, made a plain tensor here."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or math.inf)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    finite = torch.isfinite(grad_norm) & torch.isfinite(loss)
    if skips_on_device(optimizer):
        optimizer.found_inf = (~finite).float()
        optimizer.step()
        applied = finite
    else:
        applied = bool(finite)
        if applied:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, applied


# DDP's broadcast_buffers (torch 2.11) became forward_sync_buffers, the old name deprecated with a warning by 2.13;
# the new one still syncs the buffers once at construction, which for our identical rotary tables changes nothing
NO_FORWARD_BUFFER_SYNC = ({"forward_sync_buffers": False}
                          if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                          else {"broadcast_buffers": False})


class DDP(Backend):
    name = "ddp"

    def setup(self, model, make_optimizer, resume_from=None, saved=None) -> None:
        self.model = model
        self.optimizer = make_optimizer(model)
        self.ddp = None  # the DistributedDataParallel wrapper (train_model, or what a compiled train_model wraps)
        if not self.env.distributed:
            self.train_model = model
            return
        # The model's only buffers are rotary tables, identical everywhere: syncing them before every forward would
        # cost a collective per micro-step (and deadlock ranks that run different numbers of forwards).
        device_ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        self.train_model = self.ddp = DistributedDataParallel(model, device_ids=device_ids, **NO_FORWARD_BUFFER_SYNC)

    def micro_step(self, index: int, count: int):
        """DDP's no_sync on every micro-step but the last: gradients are all-reduced once per optimizer step."""
        if index < count - 1 and self.ddp is not None:
            return self.ddp.no_sync()
        return super().micro_step(index, count)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, max_norm: float, loss: torch.Tensor):
        return clip_and_apply(self.model, self.optimizer, max_norm, loss)

    def save(self, directory: str) -> list[str]:
        if not self.env.is_main:
            return []
        files = [os.path.join(directory, MODEL), os.path.join(directory, OPTIMIZER)]
        save_file(self.model.state_dict(), files[0])
        save_file(self.optimizer.state_dict(), files[1])
        return files

    def load(self, directory: str, saved) -> None:
        fit(self.model, load_file(os.path.join(directory, MODEL)), os.path.join(directory, MODEL))
        self.optimizer.load_state_dict(load_file(os.path.join(directory, OPTIMIZER)))
