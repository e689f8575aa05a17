"""Pure loss functions. Each returns a *sum* over its units (target tokens, or pairs); the loop divides by the
number of units in the whole global batch, so every unit weighs the same however micro-batches and ranks split
them (a per-micro-batch mean would over-weight micro-batches with few targets)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..data.batch import IGNORE


def next_token_loss(model, batch) -> tuple[torch.Tensor, dict]:
    """Pretraining's and SFT's loss: the summed cross-entropy of every target of the batch (packed rows attend
    within their segments), no metrics; through the output layer a chunk at a time (models/output.py)."""
    return -model(batch.inputs, segments=batch.segments, targets=batch.targets, summed=True), {}


def sequence_logps(model, batch, sequences: int = 0) -> torch.Tensor:
    """Per sequence of the batch, the sum of log p(target) over its targets != IGNORE: one sequence per row, or
    with segments (packed rows) the `sequences` slots 0..sequences-1 that they name."""
    return sequence_sums(model(batch.inputs, segments=batch.segments, targets=batch.targets), batch.segments, sequences)


def sequence_sums(picked: torch.Tensor, segments: torch.Tensor | None = None, sequences: int = 0) -> torch.Tensor:
    """Per-position values (batch, seq) summed per sequence: per row, or per slot of `segments`."""
    if segments is None:
        return picked.sum(dim=-1)
    # summed in fp64: the order of additions then changes nothing an fp32 result can show
    sums = torch.zeros(sequences, dtype=torch.float64, device=picked.device)
    return sums.index_add_(0, segments.clamp(min=0).flatten(), picked.flatten().double()).float()


def filler_stand_in(real: torch.Tensor, value: float = -1.0):
    """x → x where `real` (1 per example) is 1, else `value`: a filler example's log-probs replaced by a finite
    stand-in, so that a loss computed on every example and weighed by `real` is the real examples' (a gradient
    through torch.where reaches only the real ones, and no NaN of a filler's can reach it)."""
    keep = real.bool()
    return lambda x: torch.where(keep, x, torch.full_like(x, value))


def sequence_tokens(targets: torch.Tensor, segments: torch.Tensor | None = None, sequences: int = 0) -> torch.Tensor:
    """Per sequence (as sequence_logps counts them), how many targets != IGNORE it has."""
    keep = (targets != IGNORE).long()
    if segments is None:
        return keep.sum(dim=-1)
    counts = torch.zeros(sequences, dtype=torch.long, device=targets.device)
    return counts.index_add_(0, segments.clamp(min=0).flatten(), keep.flatten())


# ------------------------------------------------------------------------------------------ preference losses
# Each takes the per-pair log-probs of a batch of pairs and returns the loss of every pair, as TRL 1.x defines it
# (DPOTrainer's loss types; CPOTrainer's simpo; ORPOTrainer), so that a value read in a paper or a TRL log means
# the same here. Summed log-probs for the reference-based losses, averages per completion token where TRL uses
# them (ipo's log-ratios, simpo, orpo).


@dataclass(frozen=True)
class Pairs:
    """What a preference loss sees of a batch: tensors of shape (pairs,)."""
    chosen: torch.Tensor                  # policy log-probs, summed over each completion's tokens
    rejected: torch.Tensor
    ref_chosen: torch.Tensor | None       # the reference's, for the losses that have one
    ref_rejected: torch.Tensor | None
    chosen_tokens: torch.Tensor           # completion tokens of each sequence
    rejected_tokens: torch.Tensor

    def logratios(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.chosen - self.ref_chosen, self.rejected - self.ref_rejected

    def averages(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs per completion token (a sequence without any counts as one token)."""
        return self.chosen / self.chosen_tokens.clamp(min=1), self.rejected / self.rejected_tokens.clamp(min=1)


def smoothed_sigmoid(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """−log σ(z), with a share ε of the labels taken as flipped (cDPO): −(1−ε) log σ(z) − ε log σ(−z)."""
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def sigmoid_loss(p: Pairs, beta: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    chosen, rejected = p.logratios()
    return smoothed_sigmoid(beta * (chosen - rejected), label_smoothing), {}


def robust_loss(p: Pairs, beta: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Robust DPO: unbiased under labels flipped with probability ε."""
    chosen, rejected = p.logratios()
    z = beta * (chosen - rejected)
    clean, flipped = -(1 - label_smoothing) * F.logsigmoid(z), -label_smoothing * F.logsigmoid(-z)
    return (clean - flipped) / (1 - 2 * label_smoothing), {}


def hinge_loss(p: Pairs, beta: float) -> tuple[torch.Tensor, dict]:
    chosen, rejected = p.logratios()
    return torch.relu(1 - beta * (chosen - rejected)), {}


def ipo_loss(p: Pairs, beta: float) -> tuple[torch.Tensor, dict]:
    """(Δ − 1/(2β))² on log-ratios averaged per completion token, as TRL normalises them."""
    chosen, rejected = p.logratios()
    delta = chosen / p.chosen_tokens.clamp(min=1) - rejected / p.rejected_tokens.clamp(min=1)
    return (delta - 1 / (2 * beta)) ** 2, {}


def simpo_loss(p: Pairs, beta: float, simpo_gamma: float = 0.5, label_smoothing: float = 0.0,
               cpo_alpha: float = 0.0) -> tuple[torch.Tensor, dict]:
    """SimPO (no reference): −log σ(β·(avg_c − avg_r) − γ), plus cpo_alpha × the chosen completion's mean NLL."""
    chosen, rejected = p.averages()
    losses = smoothed_sigmoid(beta * (chosen - rejected - simpo_gamma / beta), label_smoothing)
    if not cpo_alpha:
        return losses, {}
    return losses + cpo_alpha * -chosen, {"nll_loss": -chosen}


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, switching formulas at −ln 2 so that neither cancels."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(p: Pairs, beta: float) -> tuple[torch.Tensor, dict]:
    """ORPO (no reference): the chosen completion's mean NLL − β·log σ(log odds(chosen) − log odds(rejected))."""
    chosen, rejected = p.averages()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    # TRL's names: log_odds_ratio is log σ(log odds), log_odds_chosen the log odds itself
    return -chosen - beta * ratio, {"nll_loss": -chosen, "log_odds_ratio": ratio, "log_odds_chosen": log_odds}


@dataclass(frozen=True)
class PreferenceLoss:
    fn: Callable[..., tuple[torch.Tensor, dict]]
    reference: bool          # needs the reference model's log-probs
    options: tuple[str, ...] = ()  # the dpo.* options it reads, besides beta


PREFERENCE_LOSSES = {
    "sigmoid": PreferenceLoss(sigmoid_loss, True, ("label_smoothing", "rpo_alpha")),
    "robust": PreferenceLoss(robust_loss, True, ("label_smoothing", "rpo_alpha")),
    "hinge": PreferenceLoss(hinge_loss, True, ("rpo_alpha",)),
    "ipo": PreferenceLoss(ipo_loss, True, ("rpo_alpha",)),
    "simpo": PreferenceLoss(simpo_loss, False, ("simpo_gamma", "label_smoothing", "cpo_alpha")),
    "orpo": PreferenceLoss(orpo_loss, False),
}


def preference_loss(name: str, policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                    ref_chosen_logps: torch.Tensor | None, ref_rejected_logps: torch.Tensor | None, *, beta: float,
                    chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor,
                    **options) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss `name` of every pair, and TRL's metrics of every pair (all of shape (pairs,)); the caller sums
    them over the pairs of the global batch. rpo_alpha (the reference-based losses) adds the chosen completion's
    mean NLL, as TRL's rpo_alpha did; options that `name` does not read must not be given."""
    loss = PREFERENCE_LOSSES[name]
    rpo_alpha = options.pop("rpo_alpha", 0.0)
    p = Pairs(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps if loss.reference else None,
              ref_rejected_logps if loss.reference else None, chosen_tokens, rejected_tokens)
    losses, extra = loss.fn(p, beta, **options)
    if rpo_alpha:
        nll = -p.averages()[0]
        losses, extra = losses + rpo_alpha * nll, {**extra, "nll_loss": nll}
    if loss.reference:  # the implicit reward of each completion: β × its log-ratio to the reference
        chosen_rewards, rejected_rewards = (beta * x.detach() for x in p.logratios())
        chosen_logps, rejected_logps = p.chosen, p.rejected
    else:  # TRL's CPO and ORPO report β × the average log-prob, and the averages as logps
        chosen_logps, rejected_logps = p.averages()
        chosen_rewards, rejected_rewards = beta * chosen_logps.detach(), beta * rejected_logps.detach()
    metrics = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype),
        "logps/chosen": chosen_logps.detach(),
        "logps/rejected": rejected_logps.detach(),
        **{k: v.detach() for k, v in extra.items()},
    }
    return losses, metrics


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
             beta: float = 0.1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sigmoid DPO averaged over pairs, and the averaged metrics (a short form for scripts and notebooks)."""
    tokens = torch.ones_like(policy_chosen_logps, dtype=torch.long)
    losses, metrics = preference_loss("sigmoid", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                      ref_rejected_logps, beta=beta, chosen_tokens=tokens, rejected_tokens=tokens)
    return losses.mean(), {k: v.mean() for k, v in metrics.items()}


# ------------------------------------------------------------------------------------------------------- KTO

def kl_estimate(policy_kl_logps_sum: torch.Tensor, ref_kl_logps_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z₀: the mean log-ratio of the policy to the reference on mismatched (prompt,
    completion) sequences, clamped at 0 and never differentiated (from sums over a whole global batch)."""
    return ((policy_kl_logps_sum - ref_kl_logps_sum) / count.clamp(min=1)).clamp(min=0).detach()


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, *,
             beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             counted: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KTO (TRL's KTOTrainer, loss_type="kto") per completion: 1 − σ(β(r − z₀)) for a desirable one, 1 − σ(β(z₀ − r))
    for an undesirable one, times its weight; r is the log-ratio of its summed log-probs. Metrics are (sum, count)
    pairs: rewards and log-probs are means over the desirable (chosen) or undesirable (rejected) completions.
    counted (1 per completion, 0 for one the metrics leave out: a filler; None: all count)."""
    logratios = policy_logps - ref_logps
    desirable = desirable.bool()
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios))))
    rewards = beta * logratios.detach()
    counted = torch.ones_like(rewards) if counted is None else counted.to(rewards.dtype)
    chosen, rejected = desirable.to(rewards.dtype) * counted, (~desirable).to(rewards.dtype) * counted

    def share(values: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
        return torch.stack([(values * members).sum(), members.sum()])

    metrics = {
        "rewards/chosen": share(rewards, chosen),
        "rewards/rejected": share(rewards, rejected),
        "logps/chosen": share(policy_logps.detach(), chosen),
        "logps/rejected": share(policy_logps.detach(), rejected),
        "kl": share(kl.expand_as(rewards), counted),
    }
    return losses, metrics


def kto_summary(means: dict[str, float]) -> dict[str, float]:
    """TRL's margin: the mean reward of the desirable completions minus that of the undesirable ones."""
    if "rewards/chosen" in means and "rewards/rejected" in means:
        return {**means, "rewards/margins": means["rewards/chosen"] - means["rewards/rejected"]}
    return means


# ------------------------------------------------------------------------------------------------------ GRPO

def nan_mean_std(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's mean and unbiased std over its values that are not NaN (as TRL's nanmean and nanstd)."""
    present = ~groups.isnan()
    count = present.sum(dim=1)
    values = groups.nan_to_num()
    mean = values.sum(dim=1) / count.clamp(min=1)
    squares = ((values - mean.unsqueeze(1)) ** 2 * present).sum(dim=1)
    return mean, (squares / (count - 1).clamp(min=1)).sqrt()


def group_advantages(rewards: torch.Tensor, generations: int, scale_rewards: str,
                     batch_std: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(each completion's advantage, whether each group has zero spread) from the rewards of consecutive groups of
    `generations` completions (NaN: not scored, advantage 0): the reward minus its group's mean, divided by the
    group's std + 1e-4 (scale_rewards=group), by the global batch's (batch: batch_std) or by nothing (none), as
    TRL's GRPOTrainer computes them. A group has zero spread when its std is 0 (TRL's isclose) or it has fewer than
    two scored completions."""
    groups = rewards.view(-1, generations)
    mean, std = nan_mean_std(groups)
    zero = torch.isclose(std, torch.zeros_like(std)) | ((~groups.isnan()).sum(dim=1) < 2)
    advantages = groups - mean.unsqueeze(1)
    if scale_rewards == "group":
        advantages = advantages / (std.unsqueeze(1) + 1e-4)
    elif scale_rewards == "batch":
        advantages = advantages / (batch_std + 1e-4)
    return advantages.flatten().nan_to_num(0.0), zero


def clipped_token_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                       *, epsilon: float, epsilon_high: float, beta: float = 0.0,
                       ref_logps: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate per completion token (rows, width), plus β × the k3 estimate of KL(policy ‖ reference)
    when β > 0; zero where `mask` is 0. advantages: each position's (or (rows, 1): each row's). Metrics: (sum,
    count) pairs over the tokens — the share of tokens whose ratio was clipped below (with a negative advantage),
    above (positive), either, and the KL estimate."""
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    loss = -torch.min(ratio * advantages, clipped * advantages)
    mask = mask.to(loss.dtype)
    count = mask.sum()

    def share(flags: torch.Tensor) -> torch.Tensor:
        return torch.stack([(flags.to(loss.dtype) * mask).sum().detach(), count])

    low = (ratio < 1 - epsilon) & (advantages < 0)
    high = (ratio > 1 + epsilon_high) & (advantages > 0)
    metrics = {"clip_ratio/low": share(low), "clip_ratio/high": share(high), "clip_ratio/region": share(low | high)}
    if beta:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        loss = loss + beta * kl
        metrics["kl"] = torch.stack([(kl * mask).sum().detach(), count])
    return loss * mask, metrics


@dataclass(frozen=True)
class GRPOLoss:
    """How a loss normalises its token losses: each completion's sum is weighted by `weight(tokens)`, and the step's
    loss is the weighted sum over every completion of the global batch divided by the sum of `units(tokens,
    max_new_tokens)` over them."""
    weight: Callable[[torch.Tensor], torch.Tensor]
    units: Callable[[torch.Tensor, int], torch.Tensor]


GRPO_LOSSES = {
    # the mean over completions of each one's token mean (GRPO's paper; TRL's "grpo")
    "grpo": GRPOLoss(lambda tokens: 1 / tokens.clamp(min=1), lambda tokens, limit: torch.ones_like(tokens)),
    # every token of the global batch weighs the same (DAPO; TRL's "dapo")
    "dapo": GRPOLoss(torch.ones_like, lambda tokens, limit: tokens),
    # a constant normaliser, completions x max_new_tokens (Dr. GRPO; TRL's "dr_grpo")
    "dr_grpo": GRPOLoss(torch.ones_like, lambda tokens, limit: torch.full_like(tokens, limit)),
}


def grpo_loss(name: str, logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, *, segments: torch.Tensor | None = None, epsilon: float, epsilon_high: float,
              beta: float = 0.0, ref_logps: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(the loss summed over the completions of a batch as `name` weighs them, metrics as (sum, count) pairs): the
    loop divides the sum by grpo_units of the whole global batch. advantages: one per completion, each a row, or
    with `segments` (packed rows) the completions those slots name."""
    counted = mask.to(logps.dtype)  # each completion's tokens
    tokens = counted.sum(dim=-1) if segments is None else torch.zeros_like(advantages, dtype=logps.dtype).index_add_(
        0, segments.clamp(min=0).flatten(), counted.flatten())
    weights = GRPO_LOSSES[name].weight(tokens)
    if segments is None:
        advantages, weights = advantages.unsqueeze(-1), weights.unsqueeze(-1)
    else:  # each position its completion's
        advantages, weights = advantages[segments.clamp(min=0)], weights[segments.clamp(min=0)]
    losses, metrics = clipped_token_loss(logps, old_logps, advantages, mask, epsilon=epsilon,
                                         epsilon_high=epsilon_high, beta=beta, ref_logps=ref_logps)
    return (losses * weights).sum(), metrics


def grpo_units(name: str, tokens: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """What the loss `name` divides by, summed over completions with `tokens` completion tokens each."""
    return GRPO_LOSSES[name].units(tokens.double(), max_new_tokens).sum()
