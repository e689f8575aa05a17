"""Float8 linear layers for training (train.float8, through torchao): the blocks' projections run their matmuls
in float8 with a scale per tensor computed from the current values (dynamic scaling), the weights, gradients and
optimizer state staying as they were, so checkpoints keep their format. The output layer stays in the training
precision: its loss reads the weight a chunk at a time (models/output.py), and the vocabulary projection is the
most sensitive matmul; so do a mixture-of-experts block's router, its shared expert and its experts (grouped
matmuls), and the pinned reference of DPO, KTO and GRPO (whose log-probs therefore differ from the policy's by
float8's rounding from the first step). It pays off where the matmuls are large (the 1B preset and up) on GPUs
with float8 tensor cores."""

from __future__ import annotations

import importlib.util
import re

import torch
from torch import nn

from preprocess.errors import UserError

# the dense blocks' projections, by name: not a MoE block's router (its top-k choice would see rounded inputs) nor
# its shared expert, not the output layer
PROJECTIONS = re.compile(r"layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123])")


def float8_layer(module: nn.Module, fqn: str) -> bool:
    """The layers converted: the dense blocks' linear projections whose sizes float8 matmuls take (multiples of
    16)."""
    return (type(module) is nn.Linear and PROJECTIONS.fullmatch(fqn) is not None and module.in_features % 16 == 0
            and module.out_features % 16 == 0)


def check(device: torch.device) -> None:
    """One line where float8 training cannot run here."""
    if device.type != "cuda":
        raise UserError(f"train.float8=true: float8 matmuls need a CUDA GPU of compute capability 8.9 or newer "
                        f"(H100, H200, L40S, RTX 4090); this run is on {device.type}")
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        raise UserError(f"train.float8=true: {torch.cuda.get_device_name(device)} (compute capability "
                        f"{capability[0]}.{capability[1]}) has no float8 matmuls; they need 8.9 or newer")
    if importlib.util.find_spec("torchao") is None:
        raise UserError("train.float8=true needs torchao: pip install torchao")


def convert(model: nn.Module, device: torch.device) -> list[str]:
    """Swap float8_layer's layers for torchao's Float8Linear in place; their names."""
    check(device)
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training  # optional: where float8 is asked for

    names = [name for name, m in model.named_modules() if float8_layer(m, name)]
    # the weight gradient's matmul runs over the micro-batch's positions, which padded rows (to a multiple of 8) and
    # GRPO's filler row need not make a multiple of 16, as float8 matmuls require: padded there
    convert_to_float8_training(model, config=Float8LinearConfig(pad_inner_dim=True), module_filter_fn=float8_layer)
    return names
