"""KTO: preference optimisation from completions labelled desirable or undesirable, no pairs needed. The policy
and a frozen reference start from an SFT checkpoint (init_from), as in DPO; each completion's loss is
1 − σ(β(r − z₀)) when desirable and 1 − σ(β(z₀ − r)) when not, r its log-ratio to the reference and z₀ the
reference point: the policy's mean log-ratio on mismatched sequences (each example's prompt with another
example's completion), over the whole global batch, so that 1 process x 4 micro-steps and 4 processes x 1 see
the same z₀ (TRL estimates it per device batch).

    python -m preprocess shards --kind kto --input FILE.jsonl ...   # {"prompt", "completion", "label"} or pairs
    python -m training.kto --config configs/kto/tiny.yaml init_from=SFT_RUN [dpo.beta=0.1]
                           [dpo.desirable_weight=1.0] [dpo.undesirable_weight=1.0] [dpo.precompute_ref=true]
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import torch

from preprocess.errors import UserError

from . import distributed as D
from . import lora
from .cli import main
from .data import KTOData
from .dpo import make_data
from .loop import Stage
from .losses import IGNORE, kl_estimate, kto_loss, kto_summary, sequence_logps


def prepare(model, batches: list, env: D.DistEnv, autocast) -> list:
    """z₀ of the global batch: every rank's KL sequences through the policy (no gradient), summed over ranks."""
    sums = torch.zeros(3, dtype=torch.float64, device=env.device)  # policy, reference, sequences
    with torch.no_grad(), autocast:
        for batch in batches:
            n = len(batch.pairs)
            kl = batch.kl_batch.to(env.device)
            logps = sequence_logps(model(kl.inputs), kl.targets)
            # a filler, or an example of a split too small to have partners, has no KL sequence to count
            real = batch.pairs.to(env.device).bool() & (kl.targets != IGNORE).any(dim=-1)
            reference = batch.reference[n:].to(logps)
            sums += torch.stack([logps[real].double().sum(), reference[real].double().sum(), real.sum().double()])
    policy, reference, count = D.all_reduce_sum(env, sums)
    z0 = kl_estimate(policy, reference, count).float()
    return [dataclasses.replace(batch, kl=z0) for batch in batches]


def make_stage(cfg) -> Stage:
    if not cfg.init_from:
        raise UserError("KTO starts from a fine-tuned model: set init_from=RUN_OR_CKPT_DIR (the SFT run)")
    if cfg.dpo.loss != "sigmoid" or cfg.dpo.options() != {"label_smoothing": 0.0, "rpo_alpha": 0.0}:
        raise UserError("dpo.loss and its options are for preference pairs (python -m training.dpo); KTO reads "
                        "dpo.beta, dpo.desirable_weight, dpo.undesirable_weight and dpo.precompute_ref")
    beta, weights = cfg.dpo.beta, {"desirable_weight": cfg.dpo.desirable_weight,
                                   "undesirable_weight": cfg.dpo.undesirable_weight}

    def loss(model, batch):
        n = len(batch.pairs)
        logps = sequence_logps(model(batch.inputs), batch.targets)
        real = batch.pairs.to(logps.device).bool()
        ref = batch.reference[:n].to(logps)
        losses, metrics = kto_loss(logps[real], ref[real], batch.labels.to(logps.device)[real], batch.kl.to(logps),
                                   beta=beta, **weights)
        return losses.sum(), metrics

    return Stage(name="kto", data_kind="kto", make_data=functools.partial(make_data, data_class=KTOData), loss=loss,
                 units=lambda batch: int(batch.pairs.sum()), chat=True, pins_reference=not lora.enabled(cfg.lora),
                 prepare=prepare, summarise=kto_summary)


if __name__ == "__main__":
    sys.exit(main("kto", make_stage))
