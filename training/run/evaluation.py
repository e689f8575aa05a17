"""Evaluation inside a run: the validation loss over a fixed subset (pooled, and per source when there are
several), bits per UTF-8 byte of the validation text (comparable across tokenizers), and a sample of text.

Both are rank-symmetric: every rank runs the same number of forwards (ranks with fewer validation entries run
filler batches that count nothing), and every rank generates the sample, following rank 0's choice of each
token, which rank 0 alone prints. Under ZeRO-3 every forward gathers the sharded weights from all ranks, so a
forward on one rank alone would wait for the others until dist.timeout_s.
"""

from __future__ import annotations

import functools
import math
import os
import sys

import numpy as np
import torch

from preprocess.chat import Turn
from preprocess.errors import UserError, environment_error
from preprocess.tokenizer import TextTokenizer, token_bytes, tokenizer_file

from ..data.batch import IGNORE
from ..models.decoding import chat_prompt, generate
from ..parallel import env as D


@torch.no_grad()
def evaluate(run, step: int) -> None:
    """val_loss, val_loss/<source>, val_bpb (and a sample) at `step`; `run.model` is the bare module (no DDP
    hooks)."""
    stage, cfg, env, model = run.stage, run.cfg, run.env, run.model
    with run.log.paused():
        model.eval()
        sizes = text_bytes(tokenizer_file(cfg.out_dir))
        sizes = torch.from_numpy(np.pad(sizes, (0, max(0, model.cfg.vocab_size - len(sizes)))))  # ids of no text
        counts = torch.zeros(len(run.sources), 2, dtype=torch.float64)  # per source: units, bytes of the targets
        loss_sums = torch.zeros(len(run.sources), dtype=torch.float64, device=env.device)
        val = run.data.val_batches(cfg.train.eval_samples)  # one batch at a time, unless a stage prepares them
        if stage.prepares:  # over the whole validation subset, as a training step over its global batch
            val = list(val)
            val = list(zip([s for s, _ in val], stage.prepare(model, [b for _, b in val], env, run.autocast),
                           strict=True))
        for s, batch in val:
            counts[s, 0] += stage.units(batch)
            if stage.token_loss:
                counts[s, 1] += int(sizes[batch.targets[batch.targets != IGNORE]].sum())
            with run.autocast:
                loss_sums[s] += stage.loss(model, batch.to(env.device))[0].double()
        sums = D.all_reduce_sum(env, torch.cat([loss_sums.unsqueeze(1), counts.to(env.device)], dim=1)).cpu()
        if stage.own_sample:  # decided by the stage, alike on every rank: sample_text is collective
            sample = stage.evaluation_sample()
        else:
            sample = sample_text(run, step) if cfg.train.sample_prompt else None
        model.train()
        values = validation_metrics(sums, run.names, stage.token_loss)
        values.update({f"val_{k}": v for k, v in stage.evaluation_metrics().items()})
        if values:
            run.log.eval_step(step, values, sample)


def harness_tasks(cfg, env):
    """eval.tasks, found and their data loaded on every rank before the first step: lm-eval missing, an unknown
    task or data that cannot be read is one line, on every rank if on any. None without tasks."""
    if not cfg.eval.tasks:
        return None
    tasks, problem = None, None
    try:
        try:
            import training.run.harness as harness  # lm-eval is the optional extra "eval"
        except ImportError as e:
            raise UserError(f"eval.tasks: lm-evaluation-harness is not installed ({e}); pip install -e '.[eval]'") \
                from None
        harness.quiet()
        tasks = harness.Tasks(cfg.eval.tasks, cfg.eval.include, ("eval.tasks", "eval.include"))
    except UserError as e:
        problem = str(e)
    D.raise_if_any(env, problem, "eval.tasks: another rank could not load the tasks (its line is above)")
    return tasks


def harness_due(cfg, step: int, steps: int = 1) -> bool:
    """Whether eval.tasks are due at one of the `steps` steps ending at `step` (a GRPO cycle, which the loop
    evaluates at its end)."""
    every = cfg.eval.every or cfg.train.eval_every
    return bool(cfg.eval.tasks) and (step == cfg.train.max_steps or bool(every) and any(
        s % every == 0 for s in range(step - steps + 1, step + 1)))


@torch.no_grad()
def harness_evaluation(run, step: int) -> None:
    """eval.tasks at `step` on the model as it trains (the bare module, eval mode, under the run's autocast), every
    rank given every request and scoring its share in lockstep; eval/<task>/<metric> logged, and rank 0 writes the
    harness's results to evaluations/step-N.TASKS.json. The run's random generators are left alone. On one process
    a task that fails (its template refuses a chat, a full disk) is a warning and training goes on; on several it
    stops the run, since one rank may have failed alone."""
    cfg, env, model = run.cfg, run.env, run.model
    with run.log.paused():
        model.eval()
        try:
            with run.autocast:  # the tokenizer first: read on every rank before any collective of the harness
                tokenizer = text_tokenizer(tokenizer_file(cfg.out_dir))
                results = run.tasks.score(model, tokenizer, rank=env.rank,
                                          world=env.world_size, batch_size=cfg.eval.batch_size, limit=cfg.eval.limit,
                                          num_fewshot=cfg.eval.num_fewshot, seed=cfg.seed, reseed=False,
                                          chat=cfg.eval.chat)
            if env.is_main:
                run.log.eval_step(step, run.tasks.metrics(results), None)
                name = f"step-{step}.{'+'.join(cfg.eval.tasks)}.json"
                run.tasks.save(results, os.path.join(cfg.out_dir, "evaluations", name))
        except (UserError, OSError) as e:
            if env.distributed:  # this rank may have failed alone (a dataset read): going on would pair its next
                raise            # collectives with the others' evaluation; the run stops, with the line
            why = str(e) if isinstance(e, UserError) else environment_error(e)
            print(f"warning: eval.tasks at step {step}: {why}; training goes on", file=sys.stderr, flush=True)
        finally:
            model.train()


def validation_metrics(sums: torch.Tensor, names: list[str], token_loss: bool) -> dict[str, float]:
    """From per-source (loss sum, units, bytes): val_loss pooled over every unit, and with several sources
    val_loss/<name>; for a loss in nats per token also val_bpb (and val_bpb/<name>): bits per UTF-8 byte."""
    def of(rows: torch.Tensor, suffix: str) -> dict[str, float]:
        loss, units, size = rows.sum(dim=0).tolist()
        out = {f"val_loss{suffix}": loss / units} if units else {}
        if token_loss and size:
            out[f"val_bpb{suffix}"] = loss / math.log(2) / size
        return out

    values = of(sums, "")
    if len(names) > 1 and values:
        for s, name in enumerate(names):
            values.update(of(sums[s:s + 1], f"/{name}"))
    return values


def text_bytes(tokenizer_path: str) -> np.ndarray:
    return _text_bytes(tokenizer_path, *file_version(tokenizer_path))


def text_tokenizer(tokenizer_path: str) -> TextTokenizer:
    return _text_tokenizer(tokenizer_path, *file_version(tokenizer_path))


def file_version(path: str) -> tuple[int, int]:
    """What the caches below are keyed by besides the path: a long-lived process (training.lr_find, a notebook)
    may see another tokenizer written under the same name."""
    stat = os.stat(path)
    return stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=4)
def _text_bytes(tokenizer_path: str, *version) -> np.ndarray:
    return token_bytes(tokenizer_path)


@functools.lru_cache(maxsize=4)
def _text_tokenizer(tokenizer_path: str, *version) -> TextTokenizer:
    return TextTokenizer(tokenizer_path)


def sample_text(run, step: int) -> str:
    cfg, env = run.cfg, run.env
    sp = text_tokenizer(tokenizer_file(cfg.out_dir))
    prompt, stop = sp.encode(cfg.train.sample_prompt), sp.eos_id
    if run.stage.chat:  # the prompt as a user turn; the reply ends at the chat template's end of turn
        prompt, stop = chat_prompt(sp, [Turn("user", cfg.train.sample_prompt)])
    generator = torch.Generator().manual_seed(cfg.seed + step)
    follow = None
    if env.distributed:  # every rank feeds rank 0's token: the same forwards everywhere, the same stop
        def follow(token: int) -> int:
            t = torch.tensor([token], device=env.device)
            torch.distributed.broadcast(t, src=0)
            return int(t)
    with run.autocast:  # a private generator: sampling never disturbs the training RNG
        ids = generate(run.model, prompt, cfg.train.sample_tokens, temperature=0.8, top_k=50, eos_id=stop,
                       vocab_limit=sp.vocab_size, generator=generator, follow=follow)
    return cfg.train.sample_prompt + (" → " if run.stage.chat else "") + sp.decode(ids)
