"""Pure loss functions. Each returns a *sum* over its units (target tokens, or pairs); the loop divides by the
number of units in the whole global batch, so every unit weighs the same however micro-batches and ranks split
them (a per-micro-batch mean would over-weight micro-batches with few targets)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # target id excluded from the loss (padding, prompt tokens)


def lm_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy (in fp32) over targets != IGNORE, and how many targets there were."""
    loss = F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, (targets != IGNORE).sum()
