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
import time

import numpy as np
import torch

from preprocess.errors import UserError

from ..checkpoint.state import TrainState
from ..config import Config
from ..models.optim import lr_at
from ..parallel import env as D
from ..parallel.backends import backend_class
from ..parallel.base import Backend
from ..stages.base import Stage
from . import rundir
from .build import Run, build, check
from .evaluation import evaluate, harness_due, harness_evaluation
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
                try:
                    r.checkpoints.close()  # one still written in the background, before the lock is released
                finally:
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
    ahead = cfg.data.read_ahead if cfg.data.read_ahead is not None else env.device.type == "cuda"
    reader = StepReader(r.data, r.plan.grad_accum, env.device, ahead)
    try:
        steps(r, saves, stop, reader)
        r.checkpoints.wait()
    finally:
        reader.close()
    stop.restore()


def steps(r: Run, saves: bool, stop: StopSignal, reader: StepReader) -> None:
    """The step loop: batches → gradients → update → log, evaluate, checkpoint (unless saves=False).

    A step reads nothing back from the device: its losses, gradient norm and whether the update was applied stay
    there (StepResults) until a step that logs, evaluates, checkpoints or ends the run reads those of every step
    since in one transfer, and counts, warns about and logs what they hold, in step order. The step's counts
    (units, positions) are the host's, from the batches; with several processes they, and the stop-signal flags,
    are summed over the processes on the host, in collectives that wait for nothing on the device."""
    cfg, env, state, backend = r.cfg, r.env, r.state, r.backend
    reuse, batches = r.stage.steps_per_batch, None  # a stage may train several steps on one prepared batch (GRPO)
    results = StepResults(r)
    for step in range(state.step, cfg.train.max_steps):
        done = step + 1
        lr = lr_at(step, cfg.train)  # a function of the step alone, whatever the batch (docs/training.md: resuming)
        backend.set_lr(lr)
        fresh = batches is None or step % reuse == 0  # checkpoints fall between cycles: a resume starts one
        mixture = np.zeros(len(r.sources))  # samples of each source this step reads
        if fresh:
            with r.log.data_wait():
                batches = []
                for m, (picks, batch) in enumerate(reader.read(state.consumed_samples)):
                    r.hooks.on_picks(done, m, picks)
                    batches.append(batch)
                    mixture += np.bincount([s for s, _ in picks], minlength=len(mixture))
                if step + reuse < cfg.train.max_steps:  # the next cycle's, while this one computes
                    reader.read_ahead(state.consumed_samples + r.plan.global_batch)
            with r.log.preparing():
                batches = r.stage.prepare(r.model, batches, env, r.autocast)
        units, tokens, real, mixture = global_counts(r.stage, batches, env, mixture)
        r.log.count_mixture(mixture)
        loss_sum, metric_sums = accumulate(r.stage, backend, batches, env, units, real, r.autocast,
                                           functools.partial(r.hooks.loss, done))
        paired, totals = global_sums(env, {"loss": loss_sum, **metric_sums})  # all ranks agree; on the device
        # no unit in the whole global batch (GRPO: no group with an advantage): a NaN loss, which no backend applies
        loss = totals[0, 0] / units if units else totals[0, 0] * math.nan
        grad_norm, applied = backend.step(cfg.train.grad_clip, loss)
        state.step = done
        state.consumed_samples += r.plan.global_batch if fresh else 0
        state.tokens += r.log.count_tokens(tokens)
        results.add(done, lr, paired, totals, units, 1 - real / tokens, grad_norm, applied, state.tokens,
                    None if units else r.stage.empty_reason(batches))

        evaluates = cfg.train.eval_every and (done % cfg.train.eval_every == 0 or done == cfg.train.max_steps)
        cycle_ends = not done % reuse  # within a cycle on one batch: a stop or a checkpoint waits for its end
        saves_now = saves and cycle_ends and (done % cfg.train.ckpt_every == 0 or done == cfg.train.max_steps)
        if done % cfg.log.every == 0 or evaluates or saves_now or done == cfg.train.max_steps:
            results.settle()  # every rank at the same steps: the means were all-reduced already
        if evaluates:
            reader.settle()  # evaluation reads the data too
            evaluate(r, step=done)
        if not cycle_ends:
            continue
        # every rank stops at the same step boundary (several processes: a host-side exchange at each, which
        # waits for nothing on the device; a preemption's grace period does not wait for the next logged step)
        signum = stop.agreed(env)
        if saves and (saves_now or signum):
            results.settle()
            if r.data.packing is not None:
                reader.settle()  # the packing plan is the reader's while it reads
                state.packing_cursor = r.data.packing.cursor(state.consumed_samples)
            held = time.perf_counter()
            with r.log.paused():  # the run's last checkpoint is complete before it ends
                r.checkpoints.save(state, complete=done == cfg.train.max_steps or bool(signum))
            r.log.checkpoint(done, time.perf_counter() - held)
        if harness_due(cfg, done, reuse) and not signum:  # after the checkpoint: a long evaluation never delays a save
            reader.settle()
            harness_evaluation(r, done)
        if signum and (done < cfg.train.max_steps or not saves):  # saving nothing, the caller must hear of it
            results.settle()
            raise Stopped(signum, done, saves)


class StepResults:
    """What the steps since the last read left on the device, read back in one transfer (settle) and then acted
    on in step order: a skipped update counted and warned about (a step with no unit, or a non-finite loss or
    gradient), `limit` of them in a row stopping the run, the logged steps and the skipped ones written to
    metrics.jsonl. With log.every=1 every step is read at its end."""

    def __init__(self, r: Run):
        self.r = r
        self.pending: list[dict] = []

    def add(self, step: int, lr: float, paired: dict[str, bool], totals, units: float, padding_share: float, grad_norm,
            applied, tokens: int, empty: str | None) -> None:
        self.pending.append({"step": step, "lr": lr, "paired": paired, "totals": totals, "units": units,
                             "padding_share": padding_share, "grad_norm": grad_norm, "applied": applied,
                             "tokens": tokens, "empty": empty})

    def settle(self) -> None:
        if not self.pending:
            return
        r, state = self.r, self.r.state
        pending, self.pending = self.pending, []
        values = read_back([[p["totals"], p["grad_norm"], p["applied"]] for p in pending])
        for p, (totals, grad_norm, applied) in zip(pending, values, strict=True):
            means = r.stage.summarise(means_of(p["paired"], totals, p["units"]))
            means["padding_share"] = p["padding_share"]
            skipped = not (applied and math.isfinite(means["loss"]))
            if p["empty"] is not None:
                count_empty(state, p["step"], p["empty"], r.stage.empty_limit(), r.env)
            elif skipped:
                count_nonfinite(state, p["step"], means["loss"], grad_norm, r.cfg.train.max_nonfinite_steps, r.env)
            else:
                state.nonfinite_in_a_row = state.empty_in_a_row = 0
            logs = p["step"] % r.cfg.log.every == 0 or p["step"] == r.cfg.train.max_steps
            if skipped or logs:
                r.log.train_step(p["step"], means, p["lr"], grad_norm, p["tokens"], skipped, interval=logs)


def read_back(rows: list[list]) -> list[list]:
    """Tensors (on the device) and numbers, as they are nested, with the tensors' values read in one transfer."""
    tensors = [x for row in rows for x in row if isinstance(x, torch.Tensor)]
    flat = torch.cat([t.detach().float().flatten() for t in tensors]).tolist() if tensors else []
    out, at = [], 0
    for row in rows:
        values = []
        for x in row:
            if isinstance(x, torch.Tensor):
                n = x.numel()
                values.append(flat[at] if x.dim() == 0 else torch.tensor(flat[at:at + n]).view(x.shape))
                at += n
            else:
                values.append(x)
        out.append(values)
    return out


def global_counts(stage: Stage, batches: list, env: D.DistEnv, mixture: np.ndarray) -> tuple[float, int, int,
                                                                                         np.ndarray]:
    """(units, positions computed, positions that held a token rather than padding, samples of each source) of
    the global batch: read from the batches and their picks before they move to the device, and added up over the
    processes on the host."""
    local = [sum(c) for c in zip(*[(stage.units(b), b.inputs.numel(), b.real_tokens) for b in batches], strict=True)]
    units, tokens, real, *picked = D.host_sums(env, local + list(mixture))
    return units, int(tokens), int(real), np.array(picked)


def accumulate(stage: Stage, backend: Backend, batches: list, env: D.DistEnv, units: float, real: int,
               autocast=None, loss_hook=None):
    """Forward and backward over this rank's micro-batches of one optimizer step, leaving in .grad the gradient
    of (sum of the loss over every unit of the global batch) / (number of those units).

    The units (global_counts) are counted before any backward, so every target token (or pair) weighs the same
    however micro-batches and ranks split them. The model's auxiliary losses (MoE routers) are sums over
    positions, divided by the `real` token positions of the global batch. Returns (local loss sum, local metric
    sums), on the device."""
    # no unit anywhere: NaN gradients, which every backend declines to apply, and a step the loop counts as skipped
    scale = units or math.nan
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
            scaled = scaled + aux.loss * (env.world_size / (real or math.nan))
            positions = torch.full((), float(batch.real_tokens), device=env.device)  # a fill, not a copy to wait for
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
        for layer, load in zip(loads, total, strict=True):  # (ratio, 1) on every rank: global_sums keeps the ratio
            metric_sums[f"moe_load/{layer}"] = torch.stack([load.max() / load.mean().clamp(min=1e-9), one])
    return loss_sum, metric_sums


def global_sums(env: D.DistEnv, sums: dict[str, torch.Tensor]) -> tuple[dict[str, bool], torch.Tensor]:
    """Sums over this rank's units → ({key: whether it is a (sum, count) pair}, (keys, 2) sums over the global
    batch, on the device). A pair is a mean over what it counted (KTO: the desirable completions); a plain sum is
    a mean over the units (its second column unused)."""
    paired = {k: v.dim() > 0 for k, v in sums.items()}
    rows = torch.stack([v.float() if paired[k] else torch.stack([v.float(), torch.zeros_like(v.float())])
                        for k, v in sums.items()])
    return paired, D.all_reduce_sum(env, rows)


def means_of(paired: dict[str, bool], totals: torch.Tensor, units: float) -> dict[str, float]:
    """global_sums' values (read back) → means; a (sum, count) mean is left out when nothing was counted."""
    means = {}
    for (key, pair), (total, count) in zip(paired.items(), totals.tolist(), strict=True):
        if not pair:
            means[key] = total / units if units else math.nan
        elif count:
            means[key] = total / count
    return means


def count_empty(state: TrainState, step: int, why: str, limit_key: tuple[int, str], env: D.DistEnv) -> None:
    """A step whose global batch held nothing to learn from (GRPO: no completion with an advantage) was not
    applied. It is counted; `limit` of them in a row (the stage's, named by `key`) stop the run."""
    state.empty_steps += 1
    state.empty_in_a_row += 1
    state.nonfinite_in_a_row = 0
    limit, key = limit_key
    if env.is_main:
        print(f"warning: step {step}: {why}: update skipped ({state.empty_in_a_row} in a row, "
              f"{state.empty_steps} in this run; {key}={limit})", file=sys.stderr, flush=True)
    if state.empty_in_a_row >= limit:
        raise UserError(f"step {step}: nothing to learn from for {state.empty_in_a_row} steps in a row ({key}="
                        f"{limit}; the last: {why}); the weights are those of step {step - state.empty_in_a_row}")


def count_nonfinite(state: TrainState, step: int, loss: float, grad_norm: float, limit: int, env: D.DistEnv) -> None:
    """A step whose loss or gradient is not finite was not applied (the weights are those before it; its data
    is passed over). It is counted; `limit` of them in a row stop the run."""
    state.nonfinite_steps += 1
    state.nonfinite_in_a_row += 1
    state.empty_in_a_row = 0
    if env.is_main:
        print(f"warning: step {step}: loss {loss:.4g}, gradient norm {grad_norm:.4g}: update skipped "
              f"({state.nonfinite_in_a_row} in a row, {state.nonfinite_steps} in this run; "
              f"train.max_nonfinite_steps={limit})", file=sys.stderr, flush=True)
    if state.nonfinite_in_a_row >= limit:
        raise UserError(f"step {step}: the loss or gradient was not finite for {state.nonfinite_in_a_row} "
                        f"steps in a row (train.max_nonfinite_steps={limit}); the weights are those of step "
                        f"{step - state.nonfinite_in_a_row}. Lower train.lr or check the data, then resume "
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
