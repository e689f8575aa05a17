"""The one training loop, shared by every stage. A stage supplies its data and a pure loss; a backend owns the
model, the backward and the update; the loop does the rest: accumulation over the global batch, precision,
evaluation, logging, checkpoints, stopping.

Read top to bottom: run() → build() (run/build.py: everything a run needs, fresh or resumed) → train() → steps()
(the step loop) → accumulate() (one step's micro-batches).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import sys

import torch

from preprocess.errors import UserError
from preprocess.tokenizer import tokenizer_file

from ..checkpoint import store
from ..checkpoint.rng import save_rng
from ..checkpoint.state import TrainState
from ..config import Config
from ..models.optim import lr_at
from ..parallel import env as D
from ..parallel.backends import backend_class
from ..parallel.base import Backend
from ..stages.base import Stage
from . import rundir
from .build import Run, build, check
from .evaluation import evaluate
from .hooks import Hooks
from .reader import StepReader
from .signals import Stopped, StopSignal


def run(stage: Stage, cfg: Config, hooks: Hooks | None = None, saves: bool = True) -> None:
    """saves=False: no checkpoint is written, not even at the end or on a stop signal (training.lr_find's runs,
    whose weights are of no use); a stop signal still stops it, also at its last step."""
    check(stage, cfg)  # before any process group or out_dir exists
    env = D.init(cfg.dist.backend, cfg.train.device, cfg.dist.timeout_s, backend_class(cfg.dist.backend).group_always)
    if env.device.type == "cpu":
        keep_freed_memory()
    lock = r = None
    exit_code = 1  # what W&B is told if the run ends any other way than these
    try:
        lock = rundir.lock(cfg.out_dir, env)  # before anything in out_dir is read or written
        r = build(stage, cfg, env, hooks or Hooks())
        train(r, saves)
        # Tear down in a fixed order while every rank is still here: the backend's hooks and buffers, then the
        # process group (and cli.main ends the process without the interpreter's teardown: D.exit_process).
        D.barrier(env)
        r.backend.close()
        exit_code = 0
    except Stopped as e:
        exit_code = 128 + e.signum
        raise
    except KeyboardInterrupt:
        exit_code = 130
        raise
    finally:
        try:
            if r is not None:
                r.log.close(exit_code)  # also after an error: TensorBoard's buffered events, W&B's run state
        finally:
            if lock is not None:
                lock.release()
            D.shutdown(env)


def train(r: Run, saves: bool = True) -> None:
    """The evaluation before the first step, then the steps, with their data read a step ahead."""
    cfg, env, state = r.cfg, r.env, r.state
    if state.step >= cfg.train.max_steps and env.is_main:
        print(f"{cfg.out_dir}: already at step {state.step} of train.max_steps={cfg.train.max_steps}; nothing to do "
              f"(raise train.max_steps to train further)", flush=True)
    if state.step == 0 and cfg.train.eval_every:
        evaluate(r, step=0)
    stop = StopSignal()
    reader = StepReader(r.data, r.plan.grad_accum, env.device, cfg.data.read_ahead)
    try:
        steps(r, saves, stop, reader)
    finally:
        reader.close()
    stop.restore()


def steps(r: Run, saves: bool, stop: StopSignal, reader: StepReader) -> None:
    """The step loop: batches → gradients → update → log, evaluate, checkpoint (unless saves=False)."""
    cfg, env, state, backend = r.cfg, r.env, r.state, r.backend
    reuse, batches = r.stage.steps_per_batch, None  # a stage may train several steps on one prepared batch (GRPO)
    for step in range(state.step, cfg.train.max_steps):
        done = step + 1
        lr = lr_at(step, cfg.train)  # a function of the step alone, whatever the batch (docs/training.md: resuming)
        backend.set_lr(lr)
        fresh = batches is None or step % reuse == 0  # checkpoints fall between cycles: a resume starts one
        if fresh:
            with r.log.data_wait():
                batches = []
                for m, (picks, batch) in enumerate(reader.read(state.consumed_samples)):
                    r.hooks.on_picks(done, m, picks)
                    batches.append(batch)
                if step + reuse < cfg.train.max_steps:  # the next cycle's, while this one computes
                    reader.read_ahead(state.consumed_samples + r.plan.global_batch)
            batches = r.stage.prepare(r.model, batches, env, r.autocast)
        loss_sum, metric_sums, units, tokens, real = accumulate(r.stage, backend, batches, env, r.autocast,
                                                                functools.partial(r.hooks.loss, done))
        means = r.stage.summarise(global_means(env, {"loss": loss_sum, **metric_sums}, units))  # all ranks agree
        means["padding_share"] = 1 - real / tokens
        empty = not units  # nothing to learn from in the whole global batch (GRPO: no group with an advantage)
        grad_norm, applied = backend.step(cfg.train.grad_clip, math.nan if empty else means["loss"])
        state.step = done
        state.consumed_samples += r.plan.global_batch if fresh else 0
        state.tokens += r.log.count_tokens(tokens)
        skipped = not (applied and math.isfinite(means["loss"]))
        if empty:
            count_empty(state, r.stage.empty_reason(batches), r.stage.empty_limit(), env)
        elif skipped:
            count_nonfinite(state, means["loss"], grad_norm, cfg.train.max_nonfinite_steps, env)
        else:
            state.nonfinite_in_a_row = state.empty_in_a_row = 0

        if skipped or done % cfg.log.every == 0 or done == cfg.train.max_steps:
            r.log.train_step(done, means, lr, grad_norm, state.tokens, skipped)
        if cfg.train.eval_every and (done % cfg.train.eval_every == 0 or done == cfg.train.max_steps):
            reader.settle()  # evaluation reads the data too
            evaluate(r, step=done)
        if done % reuse:  # within a cycle on one batch: a stop or a checkpoint waits for its end
            continue
        signum = stop.agreed(env)  # every rank stops at the same step boundary
        if saves and (signum or done % cfg.train.ckpt_every == 0 or done == cfg.train.max_steps):
            if r.data.packing is not None:
                reader.settle()  # the packing plan is the reader's while it reads
                state.packing_cursor = r.data.packing.cursor(state.consumed_samples)
            with r.log.paused():
                store.save(env, cfg.out_dir, state, backend, r.config_yaml, tokenizer_file(cfg.out_dir),
                           cfg.train.keep_checkpoints, rank_files=lambda tmp: [save_rng(tmp, env)])
        if signum and (done < cfg.train.max_steps or not saves):  # saving nothing, the caller must hear of it
            raise Stopped(signum, done, saves)


def accumulate(stage: Stage, backend: Backend, batches: list, env: D.DistEnv, autocast=None, loss_hook=None):
    """Forward and backward over this rank's micro-batches of one optimizer step, leaving in .grad the gradient
    of (sum of the loss over every unit of the global batch) / (number of those units).

    The units are counted before any backward, so every target token (or pair) weighs the same however
    micro-batches and ranks split them. The model's auxiliary losses (MoE routers) are sums over positions,
    divided by the positions of the global batch. Returns (local loss sum, local metric sums, global unit count,
    global count of positions computed, global count of those that held a token rather than padding)."""
    counts = torch.tensor([[stage.units(b), b.inputs.numel(), b.real_tokens] for b in batches], dtype=torch.float64,
                          device=env.device).sum(dim=0)
    units, tokens, real = D.all_reduce_sum(env, counts)
    units = units.float()  # the scale of the backward stays in the loss's dtype
    # no unit anywhere: NaN gradients, which every backend declines to apply, and a step the loop counts as skipped
    scale = units if units else torch.full_like(units, math.nan)
    loss_sum = torch.zeros((), device=env.device)
    metric_sums: dict[str, torch.Tensor] = {}
    model = backend.model
    loads: dict[int, torch.Tensor] = {}
    for m, batch in enumerate(batches):
        batch = batch.to(env.device)
        with backend.micro_step(m, len(batches)), autocast or contextlib.nullcontext():
            loss, metrics = stage.loss(backend.train_model, batch)
        if loss_hook is not None:
            loss = loss_hook(loss)
        # backends average gradients over ranks: x world_size turns that average back into the global sum
        scaled = loss * (env.world_size / scale)
        aux = model.auxiliary_losses(batch.token_positions())
        if aux is not None:
            scaled = scaled + aux.loss * (env.world_size / real.float())
            positions = torch.tensor(float(batch.real_tokens), device=env.device)
            for k, v in aux.metrics.items():  # means per position: (sum, count) pairs
                metric_sums[k] = metric_sums.get(k, 0) + torch.stack([v, positions])
            for layer, load in aux.loads.items():
                loads[layer] = loads.get(layer, 0) + load
        backend.backward(scaled)
        if aux is not None:
            model.forget_auxiliary()  # what a recomputation in the backward recorded
        loss_sum += loss.detach()
        for k, v in metrics.items():
            metric_sums[k] = metric_sums.get(k, 0) + v.detach()
    if loads:  # tokens per expert over the global batch: the busiest expert's against the mean, per MoE layer
        total = D.all_reduce_sum(env, torch.stack(list(loads.values())))
        one = torch.ones((), device=env.device)
        for layer, load in zip(loads, total, strict=True):  # (ratio, 1) on every rank: global_means keeps the ratio
            metric_sums[f"moe_load/{layer}"] = torch.stack([load.max() / load.mean().clamp(min=1e-9), one])
    return loss_sum, metric_sums, units, int(tokens), int(real)


def global_means(env: D.DistEnv, sums: dict[str, torch.Tensor], units: torch.Tensor) -> dict[str, float]:
    """Sums over this rank's units → means over the global batch's. A metric given as a (sum, count) pair is a
    mean over what it counted (KTO: the desirable completions), and is left out when nothing was."""
    rows = torch.stack([v.float() if v.dim() else torch.stack([v.float(), torch.zeros_like(v.float())])
                        for v in sums.values()])
    totals = D.all_reduce_sum(env, rows)
    means = {}
    for (key, value), (total, count) in zip(sums.items(), totals, strict=True):
        if value.dim() == 0:
            means[key] = float(total / units)
        elif count:
            means[key] = float(total / count)
    return means


def count_empty(state: TrainState, why: str, limit_key: tuple[int, str], env: D.DistEnv) -> None:
    """A step whose global batch held nothing to learn from (GRPO: no completion with an advantage) was not
    applied. It is counted; `limit` of them in a row (the stage's, named by `key`) stop the run."""
    state.empty_steps += 1
    state.empty_in_a_row += 1
    state.nonfinite_in_a_row = 0
    limit, key = limit_key
    if env.is_main:
        print(f"warning: step {state.step}: {why}: update skipped ({state.empty_in_a_row} in a row, "
              f"{state.empty_steps} in this run; {key}={limit})", file=sys.stderr, flush=True)
    if state.empty_in_a_row >= limit:
        raise UserError(f"step {state.step}: nothing to learn from for {state.empty_in_a_row} steps in a row ({key}="
                        f"{limit}; the last: {why}); the weights are those of step {state.step - state.empty_in_a_row}")


def count_nonfinite(state: TrainState, loss: float, grad_norm: float, limit: int, env: D.DistEnv) -> None:
    """A step whose loss or gradient is not finite was not applied (the weights are those before it; its data
    is passed over). It is counted; `limit` of them in a row stop the run."""
    state.nonfinite_steps += 1
    state.nonfinite_in_a_row += 1
    state.empty_in_a_row = 0
    if env.is_main:
        print(f"warning: step {state.step}: loss {loss:.4g}, gradient norm {grad_norm:.4g}: update skipped "
              f"({state.nonfinite_in_a_row} in a row, {state.nonfinite_steps} in this run; "
              f"train.max_nonfinite_steps={limit})", file=sys.stderr, flush=True)
    if state.nonfinite_in_a_row >= limit:
        raise UserError(f"step {state.step}: the loss or gradient was not finite for {state.nonfinite_in_a_row} "
                        f"steps in a row (train.max_nonfinite_steps={limit}); the weights are those of step "
                        f"{state.step - state.nonfinite_in_a_row}. Lower train.lr or check the data, then resume "
                        "from a checkpoint")


def keep_freed_memory() -> None:
    """On CPU every step allocates and frees the same large activation and logit buffers; glibc serves blocks
    above 32 MB with fresh mmaps and returns them at once, so each step page-faults them in again (measured:
    a third of the step time as system time with a 8k vocabulary). Raising the thresholds keeps them for reuse."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
