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


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor, segments: torch.Tensor | None = None,
                   sequences: int = 0) -> torch.Tensor:
    """Per sequence, the sum of log p(target) over its targets != IGNORE, from an fp32 log-softmax: one sequence
    per row, or with `segments` (packed rows) the `sequences` slots 0..sequences-1 that segments name."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    keep = targets != IGNORE
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
    if segments is None:
        return picked.sum(dim=-1)
    # summed in fp64: the order of additions then changes nothing an fp32 result can show
    sums = torch.zeros(sequences, dtype=torch.float64, device=logits.device)
    return sums.index_add_(0, segments.clamp(min=0).flatten(), picked.flatten().double()).float()


def dpo_losses(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
               ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
               beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per pair: −log σ(β·[(π_c − r_c) − (π_r − r_r)]) and the metrics TRL logs, all of shape (pairs,)."""
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    metrics = {
        "rewards/chosen": chosen_rewards.detach(),
        "rewards/rejected": rejected_rewards.detach(),
        "rewards/margins": (chosen_rewards - rejected_rewards).detach(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "logps/chosen": policy_chosen_logps.detach(),
        "logps/rejected": policy_rejected_logps.detach(),
    }
    return losses, metrics


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
             beta: float = 0.1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DPO loss averaged over pairs, and the averaged metrics."""
    losses, metrics = dpo_losses(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    return losses.mean(), {k: v.mean() for k, v in metrics.items()}
