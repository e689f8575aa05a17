"""The one training loop, shared by every stage. A stage supplies its data and a pure loss function; the loop
does the rest: process group, model, optimizer, accumulation, precision, evaluation, logging, checkpoints.

Read top to bottom: run() → build_run() (everything a run needs, fresh or resumed) → train() (the step loop).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import math
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from preprocess.errors import UserError
from preprocess.tokenizer import tokenizer_file

from . import checkpoint as ckpt
from . import deepspeed_backend, lora, rundir
from . import distributed as D
from .config import Config, data_sources
from .data import Batch, ShardSource, open_sources
from .evaluation import evaluate
from .losses import IGNORE
from .metrics import MetricsLog, require_wandb
from .model import ModelConfig, MoE, Transformer, forget_routing, grouped_mm_works, router_losses
from .optim import lr_at, make_optimizer
from .plan import BatchPlan
from .state import TrainState, check_identity, run_identity


@dataclass
class Stage:
    """What differs between pretraining, SFT, DPO and KTO."""
    name: str
    data_kind: str                                   # the `kind` its shard directories must have
    make_data: Callable[[Run], Any]                  # the run (sources, plan, model, ...) → its data
    loss: Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]  # summed over units
    units: Callable[[Batch], int]                    # loss units in a micro-batch: target tokens, or pairs
    chat: bool = False                               # samples are generated as assistant replies
    pins_reference: bool = False                     # keeps the init_from weights for the whole run (DPO)
    token_loss: bool = False                         # the loss is nats per target token (val_bpb is meaningful)
    packs: bool = False                              # examples that data.packing packs into rows (SFT, DPO)
    # before the losses of one optimizer step (or of one evaluation), with the batches of every micro-step:
    # (bare model, batches, env, autocast) → the batches with what their losses need from the whole global
    # batch (KTO's KL estimate). Every rank calls it at the same point, with the same number of batches.
    prepare: Callable[[torch.nn.Module, list, D.DistEnv, Any], list] | None = None
    summarise: Callable[[dict[str, float]], dict[str, float]] | None = None  # metrics derived from the means

    def check(self, cfg: Config) -> None:
        """The data options that mean something for this stage."""
        if cfg.data.packing and not self.packs:
            if self.name != "pretrain":
                raise UserError(f"data.packing: {self.name} examples are padded, one per row (packing is for sft "
                                "and dpo)")
            raise UserError("data.packing: pretraining samples are already full rows of data.seq_len tokens; "
                            "data.document_mask=true keeps attention inside each document")
        if cfg.data.document_mask and self.name != "pretrain":
            raise UserError(f"data.document_mask is for pretraining; {self.name} examples attend only to themselves "
                            f"already{' (data.packing=true packs them)' if self.packs else ''}")


def target_tokens(batch: Batch) -> int:
    return int((batch.targets != IGNORE).sum())


class Hooks:
    """Where a test or a tool watches or changes a run without patching the loop (see tests/hooked_run.py)."""

    def on_picks(self, step: int, micro: int, picks: list[tuple[int, int]]) -> None:
        """The (source, sample) entries this rank reads for micro-step `micro` of step `step` (counted from 1)."""

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """A micro-batch's loss at step `step` (counted from 1), before the backward."""
        return loss


@dataclass
class Run:
    """Everything one training run holds, built once by build_run()."""
    stage: Stage
    cfg: Config
    env: D.DistEnv
    plan: BatchPlan
    state: TrainState
    sources: list[ShardSource]
    names: list[str]                      # of the sources, for val_loss/<name>
    weights: list[float]
    model: Transformer                    # the bare module: evaluation, sampling, checkpoints
    train_model: torch.nn.Module          # what the steps run through: the model, DDP or the DeepSpeed engine
    optimizer: Any
    engine: Any                           # the DeepSpeed engine, or None
    precision: str                        # fp32 | bf16
    autocast: Any
    log: MetricsLog | None
    config_yaml: str
    reference_dir: str | None             # the pinned init_from weights (DPO's reference)
    hooks: Hooks
    data: Any = None

    @property
    def compute_precision(self) -> str:
        """How forwards compute: fp32, bf16 under autocast (fp32 weights), or bf16 weights (DeepSpeed bf16)."""
        if self.precision != "bf16":
            return "fp32"
        return "bf16" if next(self.model.parameters()).dtype == torch.bfloat16 else "bf16-autocast"


def run(stage: Stage, cfg: Config, hooks: Hooks | None = None, saves: bool = True) -> None:
    """saves=False: no checkpoint is written, not even at the end or on a stop signal (training.lr_find's runs,
    whose weights are of no use); a stop signal still stops it, also at its last step."""
    stage.check(cfg)  # before any process group or out_dir exists
    env = D.init(cfg.dist.backend, cfg.train.device, cfg.dist.timeout_s)
    if env.device.type == "cpu":
        keep_freed_memory()
    lock = r = None
    exit_code = 1  # what W&B is told if the run ends any other way than these
    try:
        lock = rundir.lock(cfg.out_dir, env)  # before anything in out_dir is read or written
        r = build_run(stage, cfg, env, hooks or Hooks())
        train(r, saves)
        # Tear down in a fixed order while every rank is still here: the engine's hooks and buffers, then the
        # process group (and cli.main ends the process without the interpreter's teardown: D.exit_process).
        D.barrier(env)
        if r.engine is not None:
            r.engine.destroy()
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


def build_run(stage: Stage, cfg: Config, env: D.DistEnv, hooks: Hooks) -> Run:
    """Data, starting point, model, optimizer, engine and train state of a fresh or resumed run."""
    names, paths, weights = zip(*data_sources(cfg.data), strict=True)
    sources = open_sources(list(paths), cfg.data.seq_len, cfg.data.val_fraction, stage.data_kind, cfg.data.packing)
    for source in sources:
        if getattr(source, "too_long", 0) and env.is_main:
            print(f"data: {source.too_long:,} examples of {source.path} do not fit data.seq_len={cfg.data.seq_len} "
                  f"positions{' (a packed pair shares one row)' if cfg.data.packing and stage.data_kind == 'dpo' else ''}"
                  " and are left out", flush=True)
    resume_from = ckpt.latest(cfg.out_dir, env)
    saved_cfg, saved = ckpt.saved_run(resume_from) if resume_from else (None, None)

    # the starting point of fine-tuning is resolved once, by rank 0, and kept: a resume never re-resolves it
    init_from = saved.init_from if saved else None
    if cfg.init_from and not init_from:  # a fresh run (or a checkpoint from before starting points were recorded)
        init_from = starting_point(cfg.init_from, sources[0], env)
    if saved and cfg.init_from:  # the model's shape is the starting checkpoint's, as recorded
        model_cfg = saved_cfg.model
    elif cfg.init_from:
        model_cfg = ckpt.model_config(init_from["path"])
        if env.is_main:
            print(f"model: from {init_from['path']} (model.* of this config is not used, but for "
                  "model.moe.aux_loss_coef and z_loss_coef)", flush=True)
    else:
        model_cfg = resolve_vocab(cfg.model, sources[0].tokenizer["vocab_size"], sources[0].path)
    if cfg.data.seq_len > model_cfg.max_seq_len:
        where = f"the model of init_from {cfg.init_from}" if cfg.init_from else "model.max_seq_len"
        raise UserError(f"data.seq_len={cfg.data.seq_len} is longer than the context of {where} "
                        f"({model_cfg.max_seq_len} tokens); lower data.seq_len")
    if cfg.init_from:  # the router losses are this run's to weigh, not the starting model's
        model_cfg = dataclasses.replace(model_cfg, moe=dataclasses.replace(
            model_cfg.moe, aux_loss_coef=cfg.model.moe.aux_loss_coef, z_loss_coef=cfg.model.moe.z_loss_coef))
    cfg = dataclasses.replace(cfg, model=model_cfg)
    identity = run_identity(stage.name, cfg, list(zip(sources, weights, strict=True)), model_cfg)
    plan = BatchPlan.of(cfg.train, env.world_size, env.rank)
    if saved:
        check_identity(saved.identity, identity, resume_from, cfg.out_dir, saved.init_from)
        announce_resume(saved, plan, env)
    elif cfg.data.verify:
        verify_sources(sources, env)
    # the state this run will save: the saved one's counters with this run's plan (`saved` keeps what was)
    state = dataclasses.replace(saved or TrainState(), world_size=env.world_size, micro_batch=plan.micro_batch,
                                grad_accum=plan.grad_accum, identity=identity, init_from=init_from)
    reference_dir = pinned_reference(cfg.out_dir, init_from, env, fresh=not saved) if stage.pins_reference else None

    # ----------------------------------------------------------------------------------- model, optimizer
    ckpt.seed_rng(cfg.seed)  # the same initial weights (and adapters) on every rank
    model = Transformer(model_cfg)
    model.attention_impl = resolve_attention(cfg.train.attention, env.device)
    if init_from and not saved:
        ckpt.load_weights(init_from["path"], model)
    if lora.enabled(cfg.lora):  # only the adapters train: the optimizer sees nothing else
        lora.apply(model, cfg.lora)
    model.to(env.device)
    checkpoint_activations(model, cfg.train)
    optimizer = make_optimizer(model, cfg.train, env.device)
    precision = resolve_precision(cfg.train.precision, env.device)
    choose_expert_matmul(model, env.device, precision, cfg.train.compile)
    D.from_rank0(env, lambda: rundir.prepare(cfg, os.path.join(sources[0].path, sources[0].tokenizer["file"]),
                                            state.step))
    if cfg.log.wandb:
        require_wandb()  # on every rank, before any work: all stop together when it is missing
    if cfg.train.compile:
        for layer in model.layers:
            layer.compile()
    engine, engine_dir = None, None
    if cfg.dist.backend == "deepspeed":  # the engine steps, clips and accumulates; our loop keeps the rest
        if saved and saved.world_size != env.world_size and deepspeed_backend.is_partitioned(resume_from):
            engine_dir = deepspeed_backend.universal_checkpoint(resume_from, env)
        engine = train_model = deepspeed_backend.initialize(model, optimizer, cfg, env, plan, precision,
                                                            load_universal=engine_dir is not None)
        optimizer = engine.optimizer
    else:
        train_model = D.wrap(model, env)
    if saved:
        ckpt.load(resume_from, model, optimizer, env, saved, cfg.seed, engine, engine_dir)
    else:
        ckpt.seed_rng(cfg.seed + 1 + env.rank)  # per-rank randomness (dropout) from here on
    autocast = (torch.autocast(env.device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    config_yaml = open(os.path.join(cfg.out_dir, "config.yaml")).read()
    r = Run(stage, cfg, env, plan, state, sources, list(names), list(weights), model, train_model, optimizer, engine,
            precision, autocast, None, config_yaml, reference_dir, hooks)
    r.data = stage.make_data(r)
    if saved and saved.packing_cursor and r.data.packing is not None:
        r.data.packing.start_at(saved.packing_cursor)
    r.log = MetricsLog(cfg, env, model, stage.name, state.step)  # last: nothing after it can fail and leave it open
    return r


def train(r: Run, saves: bool = True) -> None:
    """The step loop: batches → gradients → update → log, evaluate, checkpoint (unless saves=False)."""
    cfg, env, state = r.cfg, r.env, r.state
    if state.step >= cfg.train.max_steps and env.is_main:
        print(f"{cfg.out_dir}: already at step {state.step} of train.max_steps={cfg.train.max_steps}; nothing to do "
              f"(raise train.max_steps to train further)", flush=True)
    if state.step == 0 and cfg.train.eval_every:
        evaluate(r, step=0)
    stop = StopSignal()
    for step in range(state.step, cfg.train.max_steps):
        done = step + 1
        lr = lr_at(step, cfg.train)  # a function of the step alone, whatever the batch (see README: resuming)
        for group in r.optimizer.param_groups:
            group["lr"] = lr
        with r.log.data_wait():
            batches = []
            for m in range(cfg.train.grad_accum):
                picks, batch = r.data.micro_batch(state.consumed_samples, m)
                r.hooks.on_picks(done, m, picks)
                batches.append(batch)
        if r.stage.prepare is not None:
            batches = r.stage.prepare(r.model, batches, env, r.autocast)
        loss_sum, metric_sums, units, tokens, real = accumulate_gradients(r.stage, r.train_model, batches, env,
                                                                          r.autocast, functools.partial(r.hooks.loss, done))
        means = global_means(env, {"loss": loss_sum, **metric_sums}, units)  # all ranks agree on what counts
        if r.stage.summarise is not None:
            means = r.stage.summarise(means)
        means["padding_share"] = 1 - real / tokens
        grad_norm, applied = optimizer_step(r, means["loss"])
        state.step, state.consumed_samples = done, state.consumed_samples + r.plan.global_batch
        state.tokens += r.log.count_tokens(tokens)
        skipped = not (applied and math.isfinite(means["loss"]))
        if skipped:
            count_nonfinite(state, means["loss"], grad_norm, cfg.train.max_nonfinite_steps, env)
        else:
            state.nonfinite_in_a_row = 0

        if skipped or done % cfg.log.every == 0 or done == cfg.train.max_steps:
            r.log.train_step(done, means, lr, grad_norm, state.tokens, skipped)
        if cfg.train.eval_every and (done % cfg.train.eval_every == 0 or done == cfg.train.max_steps):
            evaluate(r, step=done)
        signum = stop.agreed(env)  # every rank stops at the same step boundary
        if saves and (signum or done % cfg.train.ckpt_every == 0 or done == cfg.train.max_steps):
            if r.data.packing is not None:
                state.packing_cursor = r.data.packing.cursor(state.consumed_samples)
            with r.log.paused():
                ckpt.save(env, cfg.out_dir, state, r.model, r.optimizer, r.config_yaml,
                          tokenizer_file(cfg.out_dir), cfg.train.keep_checkpoints, r.engine)
        if signum and (done < cfg.train.max_steps or not saves):  # saving nothing, the caller must hear of it
            raise Stopped(signum, done, saves)
    stop.restore()


def optimizer_step(r: Run, loss: float) -> tuple[float, bool]:
    """Clip and apply the accumulated gradients unless they (or the loss) are not finite; (norm, applied)."""
    if r.engine is not None:  # it stepped at the last micro-batch, after clipping; it skips non-finite gradients
        grad_norm = r.engine.get_global_grad_norm()
        return (float("inf") if grad_norm is None else float(grad_norm)), r.engine.was_step_applied()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(r.model.parameters(), r.cfg.train.grad_clip or math.inf))
    applied = math.isfinite(loss) and math.isfinite(grad_norm)
    if applied:
        r.optimizer.step()
    r.optimizer.zero_grad(set_to_none=True)
    return grad_norm, applied


class Stopped(Exception):
    """A stop requested by a signal (preemption notice, scancel, kill): a checkpoint of `step` was written, unless
    the run saves none (saved=False)."""

    def __init__(self, signum: int, step: int, saved: bool = True):
        then = ("checkpoint saved; run the same command again to resume" if saved else
                "this run saves no checkpoint; the same command starts it again from the beginning")
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}: {then}")
        self.signum, self.step = signum, step


class StopSignal:
    """SIGTERM and SIGUSR1 (Slurm's notice before a time limit or preemption) only set a flag; the loop acts on
    it at the next step boundary, once every rank has agreed, so no rank is left waiting in a collective."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signum = 0
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def agreed(self, env: D.DistEnv) -> int:
        if not env.distributed:
            return self.signum
        flag = torch.tensor(self.signum, device=env.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag)

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# ------------------------------------------------------------------------------------------------ helpers

def count_nonfinite(state: TrainState, loss: float, grad_norm: float, limit: int, env: D.DistEnv) -> None:
    """A step whose loss or gradient is not finite was not applied (the weights are those before it; its data
    is passed over). It is counted; `limit` of them in a row stop the run."""
    state.nonfinite_steps += 1
    state.nonfinite_in_a_row += 1
    if env.is_main:
        print(f"warning: step {state.step}: loss {loss:.4g}, gradient norm {grad_norm:.4g}: update skipped "
              f"({state.nonfinite_in_a_row} in a row, {state.nonfinite_steps} in this run; "
              f"train.max_nonfinite_steps={limit})", file=sys.stderr, flush=True)
    if state.nonfinite_in_a_row >= limit:
        raise UserError(f"step {state.step}: the loss or gradient was not finite for {state.nonfinite_in_a_row} "
                        f"steps in a row (train.max_nonfinite_steps={limit}); the weights are those of step "
                        f"{state.step - state.nonfinite_in_a_row}. Lower train.lr or check the data, then resume "
                        "from a checkpoint")


def accumulate_gradients(stage: Stage, model, batches: list, env: D.DistEnv, autocast=None, loss_hook=None):
    """Forward and backward over this rank's micro-batches of one optimizer step, leaving in .grad the gradient
    of (sum of the loss over every unit of the global batch) / (number of those units).

    The units are counted before any backward, so every target token (or pair) weighs the same however
    micro-batches and ranks split them. A mixture-of-experts model's router losses are sums over positions,
    divided by the positions of the global batch. Returns (local loss sum, local metric sums, global unit count, global
    count of positions computed, global count of those that held a token rather than padding)."""
    counts = torch.tensor([[stage.units(b), b.inputs.numel(), b.real_tokens] for b in batches], dtype=torch.float64,
                          device=env.device).sum(dim=0)
    units, tokens, real = D.all_reduce_sum(env, counts)
    units = units.float()  # the scale of the backward stays in the loss's dtype
    loss_sum = torch.zeros((), device=env.device)
    metric_sums: dict[str, torch.Tensor] = {}
    engine = deepspeed_backend.is_engine(model)
    bare = getattr(model, "module", model)  # DDP's and DeepSpeed's module
    loads: dict[int, torch.Tensor] = {}
    for m, batch in enumerate(batches):
        batch = batch.to(env.device)
        skip_sync = m < len(batches) - 1 and not engine  # DeepSpeed knows its accumulation boundaries itself
        with D.no_sync(model, skip_sync), autocast or contextlib.nullcontext():
            loss, metrics = stage.loss(model, batch)
        if loss_hook is not None:
            loss = loss_hook(loss)
        # DDP and DeepSpeed average gradients over ranks: x world_size turns that average back into the global sum
        scaled = loss * (env.world_size / units)
        routed = router_losses(bare, batch.token_positions(), bare.cfg.moe) if isinstance(bare, Transformer) else None
        if routed is not None:
            router_loss, router_metrics, layer_loads = routed
            scaled = scaled + router_loss * (env.world_size / real.float())
            positions = torch.tensor(float(batch.real_tokens), device=env.device)
            for k, v in router_metrics.items():  # means per position: (sum, count) pairs
                metric_sums[k] = metric_sums.get(k, 0) + torch.stack([v, positions])
            for layer, load in layer_loads.items():
                loads[layer] = loads.get(layer, 0) + load
        if engine:
            model.backward(scaled, scale_wrt_gas=False)  # our scaling already accounts for the micro-steps
            model.step()  # applies the update (and clipping) only at the last micro-step
        else:
            scaled.backward()
        if routed is not None:
            forget_routing(bare)
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


def starting_point(init_from: str, source: ShardSource, env: D.DistEnv) -> dict:
    """init_from resolved to one checkpoint by rank 0 (its run may be writing a newer one right now), its
    tokenizer checked against the shards', a DeepSpeed checkpoint consolidated (by rank 0 alone); the
    {"path", "fingerprint"} that the run records and keeps."""
    from preprocess.fileio import file_sha256

    def resolve() -> dict:
        path = ckpt.resolve(init_from)
        tokenizer = tokenizer_file(path)
        if tokenizer is None:
            raise UserError(f"init_from {path} has no tokenizer.model or tokenizer.json: fine-tuning needs the "
                            "tokenizer the shards were written with")
        sha = file_sha256(tokenizer)
        if sha != source.tokenizer["sha256"]:
            raise UserError(f"init_from {path} was trained with tokenizer {sha[:12]}…, but {source.path} was "
                            f"tokenized with {source.tokenizer['sha256'][:12]}…; write the shards with its "
                            f"{os.path.basename(tokenizer)}")
        return {"path": path, "fingerprint": ckpt.weights_fingerprint(path)}  # consolidates DeepSpeed weights

    return D.from_rank0(env, resolve)


def pinned_reference(out_dir: str, init_from: dict, env: D.DistEnv, fresh: bool) -> str:
    """out_dir/reference: the starting weights, pinned by rank 0 when the run starts; on a resume, checked
    against the fingerprint recorded then."""
    dest = os.path.join(out_dir, "reference")

    def pin_or_check() -> None:
        if fresh:
            ckpt.pin(init_from["path"], dest)
            return
        try:
            found = ckpt.weights_fingerprint(dest)
        except (OSError, UserError):
            found = None
        if found != init_from["fingerprint"]:
            raise UserError(f"{dest}: the reference this run started from ({init_from['path']}, weights "
                            f"{init_from['fingerprint']}) is {'changed' if found else 'missing'}; resuming would "
                            "optimise against another reference — start a new out_dir")

    D.from_rank0(env, pin_or_check)
    return dest


def announce_resume(saved: TrainState, plan: BatchPlan, env: D.DistEnv) -> None:
    """One line when the batch split changed: what changed, and that the data continues where it stopped."""
    old = saved.plan()
    if not env.is_main or old == dataclasses.replace(plan, rank=0):
        return
    split = (f"{old.micro_batch} x {old.grad_accum} x {old.world} processes → "
             f"{plan.micro_batch} x {plan.grad_accum} x {plan.world} (micro-batch x accumulation x processes)")
    if old.global_batch == plan.global_batch:
        print(f"resuming at step {saved.step}: {split}, the same global batch of {plan.global_batch}", flush=True)
    else:
        print(f"resuming at step {saved.step} with another global batch, {old.global_batch} → {plan.global_batch} "
              f"({split}): the data continues at position {saved.consumed_samples:,} of the global order, none "
              f"skipped or repeated; the "
              f"learning rate stays a function of the step", flush=True)


def resolve_vocab(model_cfg: ModelConfig, tokenizer_vocab: int, where: str) -> ModelConfig:
    if model_cfg.vocab_size == 0:
        multiple = max(1, model_cfg.vocab_multiple)
        return dataclasses.replace(model_cfg, vocab_size=multiple * math.ceil(tokenizer_vocab / multiple))
    if model_cfg.vocab_size < tokenizer_vocab:
        raise UserError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the vocabulary of the tokenizer "
                        f"of {where} ({tokenizer_vocab})")
    return model_cfg


def checkpoint_activations(model: Transformer, cfg) -> None:
    """train.activation_checkpointing: the blocks whose activations the backward recomputes (torch.utils.checkpoint,
    non-reentrant) — none, every one (full) or every activation_checkpointing_every-th (every_n, from the first)."""
    every = {"none": 0, "full": 1, "every_n": cfg.activation_checkpointing_every}[cfg.activation_checkpointing]
    for i, block in enumerate(model.layers):
        block.checkpointed = bool(every) and i % every == 0


def choose_expert_matmul(model: Transformer, device: torch.device, precision: str, compiled: bool) -> None:
    """Whether MoE blocks use torch's grouped matmul or one matmul per expert: decided once, outside any compiled
    code (finding out runs a small matmul)."""
    works = grouped_mm_works(device.type, torch.bfloat16 if precision == "bf16" else torch.float32, compiled)
    for m in model.modules():
        if isinstance(m, MoE):
            m.grouped = works


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":  # bf16 autocast pays off on GPUs; on CPUs it is slower than fp32
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def resolve_attention(attention: str, device: torch.device) -> str:
    """How packed rows and document masks attend. SDPA with a boolean mask runs everywhere; FlexAttention has no
    backward on CPU (torch 2.13), and auto keeps SDPA until FlexAttention is measured faster (docs/benchmarks.md)."""
    if attention == "flex" and device.type != "cuda":
        raise UserError("train.attention=flex: FlexAttention has no backward pass on CPU; use train.attention=sdpa")
    return "sdpa" if attention == "auto" else attention


def verify_sources(sources: list[ShardSource], env: D.DistEnv) -> None:
    problems = [p for s in sources for p in s.verify(env.rank, env.world_size)]
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if int(D.all_reduce_sum(env, torch.tensor(len(problems), device=env.device))):
        raise UserError("data.verify found damaged shards (see above); run `python -m preprocess verify DIR`")
