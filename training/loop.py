"""The one training loop, shared by every stage. A stage supplies its data and a pure loss function; the loop
does the rest: process group, model, optimizer, accumulation, precision, evaluation, logging, checkpoints.

Read top to bottom: run() → set-up → the step loop → end.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from preprocess.errors import UserError

from . import checkpoint as ckpt
from . import deepspeed_backend, lora
from . import distributed as D
from .config import Config, data_sources, save_config
from .data import ShardSource, open_sources
from .generate import generate
from .model import ModelConfig, Transformer
from .optim import lr_at, make_optimizer

# bf16 dense peak FLOP/s per GPU, for MFU (matched against torch.cuda.get_device_name)
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


@dataclass
class Stage:
    """What differs between pretraining, SFT and DPO."""
    name: str
    data_kind: str                                   # the `kind` its shard directories must have
    make_data: Callable[..., Any]                    # (sources, weights, cfg, env, model) → data
    loss: Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]  # summed over units
    units: Callable[[Any], int]                      # loss units in a micro-batch: target tokens, or pairs
    tokens: Callable[[Any], int]                     # tokens processed in a micro-batch, for throughput
    chat: bool = False                               # samples are generated as assistant replies


def run(stage: Stage, cfg: Config) -> None:
    env = D.init(cfg.dist.backend, cfg.train.device, cfg.dist.timeout_s)
    if env.device.type == "cpu":
        keep_freed_memory()
    try:
        engine = train(stage, cfg, env)
        # Tear down in a fixed order while every rank is still here: the engine's hooks and buffers, then the
        # process group. Left to interpreter exit, a communication thread can outlive its owner and abort the
        # process after all the work is done ("terminate called without an active exception").
        D.barrier(env)
        if engine is not None:
            engine.destroy()
    finally:
        D.shutdown(env)


def train(stage: Stage, cfg: Config, env: D.DistEnv):
    """Returns the DeepSpeed engine when there is one, for run() to release."""
    # ---------------------------------------------------------------------------------------------- data
    paths, weights = zip(*data_sources(cfg.data), strict=True)
    sources = open_sources(list(paths), cfg.data.seq_len, cfg.data.val_fraction, stage.data_kind)
    tokenizer = sources[0].tokenizer
    init_dir = ckpt.resolve(cfg.init_from) if cfg.init_from else None
    if init_dir:  # fine-tuning: the model's shape and tokenizer are those of the starting checkpoint
        cfg = dataclasses.replace(cfg, model=starting_model(init_dir, sources[0], env))
    model_cfg = resolve_vocab(cfg.model, tokenizer["vocab_size"], sources[0].path)
    cfg = dataclasses.replace(cfg, model=model_cfg)
    resume_from = ckpt.latest(cfg.out_dir, env)
    if cfg.data.verify and not resume_from:
        verify_sources(sources, env)

    # -------------------------------------------------------------------------------- model, optimizer
    seed_everything(cfg.seed)  # the same initial weights (and adapters) on every rank
    model = Transformer(model_cfg)
    if resume_from:
        check_same_model(resume_from, model_cfg)
    elif init_dir:
        ckpt.load_weights(init_dir, model)
    if lora.enabled(cfg.lora):  # only the adapters train: the optimizer sees nothing else
        lora.apply(model, cfg.lora)
    model.to(env.device)
    optimizer = make_optimizer(model, cfg.train, env.device)
    counters = {"step": 0, "tokens": 0}
    precision = resolve_precision(cfg.train.precision, env.device)
    log = MetricsLog(cfg, env, model, stage.name, ckpt.saved_step(resume_from))  # FLOPs from the whole model
    if cfg.train.compile:
        for layer in model.layers:
            layer.compile()
    engine = None
    if cfg.dist.backend == "deepspeed":  # the engine steps, clips and accumulates; our loop keeps the rest
        engine = train_model = deepspeed_backend.initialize(model, optimizer, cfg, env, precision)
        optimizer = engine.optimizer
    else:
        train_model = D.wrap(model, env)
    if resume_from:
        counters = ckpt.load(resume_from, model, optimizer, env, engine)
    else:
        seed_everything(cfg.seed + 1 + env.rank)  # per-rank randomness (dropout, sampling) from here on
    if env.is_main:
        prepare_out_dir(cfg, sources[0], counters["step"])
    D.barrier(env)
    config_yaml = open(os.path.join(cfg.out_dir, "config.yaml")).read()
    data = stage.make_data(sources, list(weights), cfg, env, model)
    autocast = (torch.autocast(env.device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    start = counters["step"]
    if start >= cfg.train.max_steps and env.is_main:
        print(f"{cfg.out_dir}: already at step {start} of train.max_steps={cfg.train.max_steps}; nothing to do "
              f"(raise train.max_steps to train further)", flush=True)
    if start == 0 and cfg.train.eval_every:
        evaluate(stage, model, data, cfg, env, autocast, log, step=0)

    # ------------------------------------------------------------------------------------------- steps
    stop = StopSignal()
    for step in range(start, cfg.train.max_steps):
        lr = lr_at(step, cfg.train)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with log.data_wait():
            batches = [data.batch(step, m) for m in range(cfg.train.grad_accum)]
        loss_sum, metric_sums, units = accumulate_gradients(stage, train_model, batches, env, autocast)
        means = global_means(env, {"loss": loss_sum, **metric_sums}, units)  # all ranks agree on what counts
        if engine is not None:  # it stepped at the last micro-batch, after clipping; it skips non-finite gradients
            grad_norm = engine.get_global_grad_norm()
            grad_norm = float("inf") if grad_norm is None else float(grad_norm)
            applied = engine.was_step_applied()
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip or math.inf))
            applied = math.isfinite(means["loss"]) and math.isfinite(grad_norm)
            if applied:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        counters["step"] = done = step + 1
        counters["tokens"] += log.count_tokens(sum(stage.tokens(b) for b in batches))
        skipped = not (applied and math.isfinite(means["loss"]))
        if skipped:
            check_nonfinite(counters, done, means["loss"], grad_norm, cfg.train.max_nonfinite_steps, env)
        else:
            counters["nonfinite_in_a_row"] = 0

        if skipped or done % cfg.log.every == 0 or done == cfg.train.max_steps:
            log.train_step(done, means, lr, grad_norm, counters["tokens"], skipped)
        if cfg.train.eval_every and (done % cfg.train.eval_every == 0 or done == cfg.train.max_steps):
            evaluate(stage, model, data, cfg, env, autocast, log, step=done)
        signum = stop.agreed(env)  # every rank stops at the same step boundary
        if signum or done % cfg.train.ckpt_every == 0 or done == cfg.train.max_steps:
            with log.paused():
                ckpt.save(env, cfg.out_dir, done, model, optimizer, counters, config_yaml,
                          os.path.join(cfg.out_dir, "tokenizer.model"), cfg.train.keep_checkpoints, engine)
        if signum and done < cfg.train.max_steps:
            log.close()
            raise Stopped(signum, done)
    stop.restore()
    log.close()
    return engine


class Stopped(Exception):
    """A stop requested by a signal (preemption notice, scancel, kill): a checkpoint of `step` was written."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}: checkpoint saved; "
                         "run the same command again to resume")
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

def check_nonfinite(counters: dict, step: int, loss: float, grad_norm: float, limit: int, env: D.DistEnv) -> None:
    """A step whose loss or gradient is not finite was not applied (the weights are those before it; its data
    is passed over). It is counted; `limit` of them in a row stop the run."""
    counters["nonfinite_steps"] = counters.get("nonfinite_steps", 0) + 1
    counters["nonfinite_in_a_row"] = in_a_row = counters.get("nonfinite_in_a_row", 0) + 1
    if env.is_main:
        print(f"warning: step {step}: loss {loss:.4g}, gradient norm {grad_norm:.4g}: update skipped "
              f"({in_a_row} in a row, {counters['nonfinite_steps']} in this run; train.max_nonfinite_steps={limit})",
              file=sys.stderr, flush=True)
    if in_a_row >= limit:
        raise UserError(f"step {step}: the loss or gradient was not finite for {in_a_row} steps in a row "
                        f"(train.max_nonfinite_steps={limit}); the weights are those of step {step - in_a_row}. "
                        "Lower train.lr or check the data, then resume from a checkpoint")


def accumulate_gradients(stage: Stage, model, batches: list, env: D.DistEnv, autocast=None):
    """Forward and backward over this rank's micro-batches of one optimizer step, leaving in .grad the gradient
    of (sum of the loss over every unit of the global batch) / (number of those units).

    The units are counted before any backward, so every target token (or pair) weighs the same however
    micro-batches and ranks split them. Returns (local loss sum, local metric sums, global unit count)."""
    units = D.all_reduce_sum(env, torch.tensor(float(sum(stage.units(b) for b in batches)), device=env.device))
    loss_sum = torch.zeros((), device=env.device)
    metric_sums: dict[str, torch.Tensor] = {}
    engine = deepspeed_backend.is_engine(model)
    for m, batch in enumerate(batches):
        batch = to_device(batch, env.device)
        skip_sync = m < len(batches) - 1 and not engine  # DeepSpeed knows its accumulation boundaries itself
        with D.no_sync(model, skip_sync), autocast or contextlib.nullcontext():
            loss, metrics = stage.loss(model, batch)
        # DDP and DeepSpeed average gradients over ranks: x world_size turns that average back into the global sum
        scaled = loss * (env.world_size / units)
        if engine:
            model.backward(scaled, scale_wrt_gas=False)  # our scaling already accounts for the micro-steps
            model.step()  # applies the update (and clipping) only at the last micro-step
        else:
            scaled.backward()
        loss_sum += loss.detach()
        for k, v in metrics.items():
            metric_sums[k] = metric_sums.get(k, 0) + v.detach()
    return loss_sum, metric_sums, units


def global_means(env: D.DistEnv, sums: dict[str, torch.Tensor], units: torch.Tensor) -> dict[str, float]:
    totals = D.all_reduce_sum(env, torch.stack([v.float() for v in sums.values()])) / units
    return dict(zip(sums, totals.tolist(), strict=True))


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def starting_model(init_dir: str, source: ShardSource, env: D.DistEnv) -> ModelConfig:
    from preprocess.fileio import file_sha256

    tokenizer = os.path.join(init_dir, "tokenizer.model")
    if not os.path.isfile(tokenizer):
        raise UserError(f"init_from {init_dir} has no tokenizer.model: fine-tuning needs the sentencepiece model "
                        "the shards were written with")
    sha = file_sha256(tokenizer)
    if sha != source.tokenizer["sha256"]:
        raise UserError(f"init_from {init_dir} was trained with tokenizer {sha[:12]}…, but {source.path} was "
                        f"tokenized with {source.tokenizer['sha256'][:12]}…; write the shards with its tokenizer.model")
    model_cfg = ckpt.model_config(init_dir)
    if env.is_main:
        print(f"model: from {init_dir} (model.* of this config is not used)", flush=True)
    return model_cfg


def resolve_vocab(model_cfg: ModelConfig, tokenizer_vocab: int, where: str) -> ModelConfig:
    if model_cfg.vocab_size == 0:
        multiple = max(1, model_cfg.vocab_multiple)
        return dataclasses.replace(model_cfg, vocab_size=multiple * math.ceil(tokenizer_vocab / multiple))
    if model_cfg.vocab_size < tokenizer_vocab:
        raise UserError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the vocabulary of the tokenizer "
                        f"of {where} ({tokenizer_vocab})")
    return model_cfg


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":  # bf16 autocast pays off on GPUs; on CPUs it is slower than fp32
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def check_same_model(ckpt_dir: str, model_cfg: ModelConfig) -> None:
    from .config import config_from_yaml

    saved = config_from_yaml(os.path.join(ckpt_dir, "config.yaml")).model
    if saved != model_cfg:
        diff = [f"model.{f.name} {getattr(saved, f.name)} → {getattr(model_cfg, f.name)}"
                for f in dataclasses.fields(saved) if getattr(saved, f.name) != getattr(model_cfg, f.name)]
        raise UserError(f"{ckpt_dir} holds a different model ({', '.join(diff)}); use a new out_dir to start over")


def verify_sources(sources: list[ShardSource], env: D.DistEnv) -> None:
    problems = [p for s in sources for p in s.verify(env.rank, env.world_size)]
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if int(D.all_reduce_sum(env, torch.tensor(len(problems), device=env.device))):
        raise UserError("data.verify found damaged shards (see above); run `python -m preprocess verify DIR`")


def prepare_out_dir(cfg: Config, source: ShardSource, resume_step: int) -> None:
    os.makedirs(cfg.out_dir, exist_ok=True)
    save_config(cfg, os.path.join(cfg.out_dir, "config.yaml"))
    shutil.copyfile(os.path.join(source.path, source.tokenizer["file"]), os.path.join(cfg.out_dir, "tokenizer.model"))
    MetricsLog.truncate(os.path.join(cfg.out_dir, "metrics.jsonl"), resume_step)


def to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    return type(batch)(to_device(b, device) for b in batch)


@torch.no_grad()
def evaluate(stage: Stage, model, data, cfg: Config, env: D.DistEnv, autocast, log: MetricsLog, step: int) -> None:
    """Validation loss over a fixed subset, each rank its share; `model` is the bare module (no DDP hooks)."""
    with log.paused():
        model.eval()
        loss_sum = torch.zeros((), device=env.device)
        units = torch.zeros((), device=env.device)
        for batch in data.val_batches(cfg.train.eval_samples):
            units += stage.units(batch)
            with autocast:
                loss_sum += stage.loss(model, to_device(batch, env.device))[0].float()
        totals = D.all_reduce_sum(env, torch.stack([loss_sum, units]))
        sample = None
        if cfg.train.sample_prompt and env.is_main:
            sample = sample_text(model, cfg, step, autocast, stage.chat)
        model.train()
        if totals[1] > 0:
            log.eval_step(step, float(totals[0] / totals[1]), sample)


def sample_text(model: Transformer, cfg: Config, step: int, autocast, chat: bool) -> str:
    import sentencepiece as spm

    from preprocess.chat import ChatTemplate, Turn
    from preprocess.tokenizer import load_tokenizer

    path = os.path.join(cfg.out_dir, "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=path)
    prompt, stop = sp.encode(cfg.train.sample_prompt), sp.eos_id()
    if chat:  # the prompt as a user turn; the reply ends at <|end|>
        template = ChatTemplate(load_tokenizer(path))
        prompt, stop = template.prompt([Turn("user", cfg.train.sample_prompt)], [np.array(prompt)]), template.end_id
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.seed + step)
    with autocast:  # a private generator: sampling never disturbs the training RNG
        ids = generate(model, prompt, cfg.train.sample_tokens, temperature=0.8, top_k=50, eos_id=stop,
                       vocab_limit=sp.vocab_size(), generator=generator)
    return cfg.train.sample_prompt + (" → " if chat else "") + sp.decode(ids)


class MetricsLog:
    """metrics.jsonl, TensorBoard, Weights & Biases (optional) and the progress bar, all on rank 0; throughput
    timed without the pauses."""

    def __init__(self, cfg: Config, env: D.DistEnv, model: Transformer, stage: str, start_step: int):
        self.cfg, self.env = cfg, env
        self.path = os.path.join(cfg.out_dir, "metrics.jsonl")
        self.flops_per_token = model.flops_per_token(cfg.data.seq_len)
        self.peak = gpu_peak_flops(env.device)
        self.tb = self.bar = self.wandb = None
        self.interval_tokens, self.interval_start, self.paused_time, self.data_time = 0, time.perf_counter(), 0.0, 0.0
        wandb = require_wandb() if cfg.log.wandb else None  # every rank: all stop together when it is missing
        if env.is_main:
            if wandb is not None:
                self.wandb = start_wandb(wandb, cfg, stage)
            if cfg.log.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(cfg.out_dir, "tensorboard"), purge_step=start_step + 1)
            if cfg.log.progress:
                from tqdm import tqdm

                self.bar = tqdm(total=cfg.train.max_steps, initial=start_step, desc=stage, unit="step", disable=None)

    @staticmethod
    def truncate(path: str, step: int) -> None:
        """Forget lines after `step`: a resumed run logs those steps again."""
        if not os.path.isfile(path):
            return
        from preprocess.fileio import atomic_write

        with open(path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        atomic_write(path, "".join(kept).encode())

    def count_tokens(self, local_tokens: int) -> int:
        """Tokens of this step over all ranks (every rank processes the same shapes)."""
        tokens = local_tokens * self.env.world_size
        self.interval_tokens += tokens
        return tokens

    def data_wait(self):
        """Time the loop waits for its batches (reading and assembling samples): its share of the step time."""
        return self._timed("data_time")

    def paused(self):
        """Time spent inside (evaluation, checkpoints) does not count against throughput."""
        return self._timed("paused_time")

    @contextlib.contextmanager
    def _timed(self, counter: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            setattr(self, counter, getattr(self, counter) + time.perf_counter() - t)

    def train_step(self, step: int, means: dict, lr: float, grad_norm: float, tokens: int, skipped: bool) -> None:
        elapsed = max(time.perf_counter() - self.interval_start - self.paused_time, 1e-9)
        rate, data_share = self.interval_tokens / elapsed, self.data_time / elapsed
        self.interval_tokens, self.interval_start, self.paused_time, self.data_time = 0, time.perf_counter(), 0.0, 0.0
        if not self.env.is_main:
            return
        record = {"step": step, **means, "lr": lr, "grad_norm": grad_norm, "tokens": tokens, "tokens_per_sec": rate,
                  "data_wait_share": data_share}
        if skipped:
            record["skipped"] = True
        if self.peak:
            record["mfu"] = rate * self.flops_per_token / (self.peak * self.env.world_size)
        self._write(record)
        if self.bar is not None and not self.bar.disable:
            self.bar.set_postfix_str(f"loss {means['loss']:.4f}, {rate:,.0f} tok/s", refresh=False)
            self.bar.update(step - self.bar.n)
        elif self.cfg.log.progress:  # no terminal (a log file, CI): one line per logged step instead of a bar
            extra = "".join(f", {k} {v:.3f}" for k, v in means.items() if "rewards" in k)
            print(f"step {step}: loss {means['loss']:.4f}{extra}, lr {lr:.2e}, {rate:,.0f} tokens/s", flush=True)

    def eval_step(self, step: int, val_loss: float, sample: str | None) -> None:
        if not self.env.is_main:
            return
        record = {"step": step, "val_loss": val_loss}
        if sample is not None:
            record["sample"] = sample
        self._write(record)
        message = f"step {step}: val_loss {val_loss:.4f}" + (f"\n{sample}" if sample else "")
        if self.bar is not None and not self.bar.disable:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def _write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def require_wandb():
    try:
        import wandb
    except ImportError:
        raise UserError("log.wandb=true needs the wandb package: pip install wandb (or set log.wandb=false)") from None
    return wandb


def start_wandb(wandb, cfg: Config, stage: str):
    """One W&B run per out_dir: its id is kept there, so a resumed run continues the same W&B run."""
    from omegaconf import OmegaConf

    from preprocess.fileio import atomic_write

    os.makedirs(cfg.out_dir, exist_ok=True)
    id_file = os.path.join(cfg.out_dir, "wandb_id")
    if os.path.isfile(id_file):
        run_id = open(id_file).read().strip()
    else:
        run_id = wandb.util.generate_id()
        atomic_write(id_file, (run_id + "\n").encode())
    return wandb.init(project=cfg.log.wandb_project, id=run_id, resume="allow", dir=cfg.out_dir,
                      name=os.path.basename(os.path.abspath(cfg.out_dir)), job_type=stage,
                      config=OmegaConf.to_container(OmegaConf.structured(cfg)))


def gpu_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in GPU_PEAK_FLOPS.items() if key in name), None)
