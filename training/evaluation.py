"""Evaluation inside a run: the validation loss over a fixed subset, and a sample of text.

Both are rank-symmetric: every rank runs the same number of forwards (ranks with fewer validation entries run
filler batches that count nothing), and every rank generates the sample, following rank 0's choice of each
token, which rank 0 alone prints. Under ZeRO-3 every forward gathers the sharded weights from all ranks, so a
forward on one rank alone would wait for the others until dist.timeout_s.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from . import distributed as D
from .data import to_device
from .generate import generate


@torch.no_grad()
def evaluate(run, step: int) -> None:
    """val_loss (and a sample) at `step`; `run.model` is the bare module (no DDP hooks)."""
    stage, cfg, env, model = run.stage, run.cfg, run.env, run.model
    with run.log.paused():
        model.eval()
        loss_sum = torch.zeros((), device=env.device)
        units = torch.zeros((), device=env.device)
        for batch in run.data.val_batches(cfg.train.eval_samples):
            units += stage.units(batch)
            with run.autocast:
                loss_sum += stage.loss(model, to_device(batch, env.device))[0].float()
        totals = D.all_reduce_sum(env, torch.stack([loss_sum, units]))
        sample = sample_text(run, step) if cfg.train.sample_prompt else None
        model.train()
        if totals[1] > 0:
            run.log.eval_step(step, float(totals[0] / totals[1]), sample)


def sample_text(run, step: int) -> str:
    import sentencepiece as spm

    from preprocess.chat import ChatTemplate, Turn
    from preprocess.tokenizer import load_tokenizer

    cfg, env = run.cfg, run.env
    path = os.path.join(cfg.out_dir, "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=path)
    prompt, stop = sp.encode(cfg.train.sample_prompt), sp.eos_id()
    if run.stage.chat:  # the prompt as a user turn; the reply ends at <|end|>
        template = ChatTemplate(load_tokenizer(path))
        prompt, stop = template.prompt([Turn("user", cfg.train.sample_prompt)], [np.array(prompt)]), template.end_id
    generator = torch.Generator(device=env.device).manual_seed(cfg.seed + step)
    follow = None
    if env.distributed:  # every rank feeds rank 0's token: the same forwards everywhere, the same stop
        def follow(token: int) -> int:
            t = torch.tensor([token], device=env.device)
            torch.distributed.broadcast(t, src=0)
            return int(t)
    with run.autocast:  # a private generator: sampling never disturbs the training RNG
        ids = generate(run.model, prompt, cfg.train.sample_tokens, temperature=0.8, top_k=50, eos_id=stop,
                       vocab_limit=sp.vocab_size(), generator=generator, follow=follow)
    return cfg.train.sample_prompt + (" → " if run.stage.chat else "") + sp.decode(ids)
