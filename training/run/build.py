"""Everything a run needs, fresh or resumed: its data, its starting point (the checkpoint it resumes, the weights it
starts from, the model's shape), the model, the backend that wraps it, the train state and the metrics log.

Read top to bottom: build() → open_data() → starting_point() → build_model() → backend.setup() → stage.make_data().
starting_point() is also what `describe` prints, without a process group.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch

from preprocess.errors import UserError
from preprocess.fileio import file_sha256
from preprocess.tokenizer import tokenizer_file

from ..checkpoint.rng import restore_rng, save_rng, seed_rng
from ..checkpoint.state import TrainState, check_identity, run_identity, saved_run
from ..checkpoint.store import Checkpoints, latest
from ..checkpoint.weights import model_config, resolve, starting_model, weights_fingerprint
from ..config import Config, data_schedule, data_sources
from ..data.order import BatchPlan, Mixture
from ..data.sources import ShardDir, open_sources
from ..models import float8, lora
from ..models.optim import make_optimizer
from ..models.transformer import ModelConfig, Transformer
from ..parallel import env as D
from ..parallel.backends import backend_class
from ..parallel.base import Backend
from ..stages.base import Stage
from . import rundir
from .evaluation import harness_tasks
from .hooks import Hooks
from .metrics import MetricsLog, require_wandb


@dataclass
class Run:
    """Everything one training run holds, built once by build()."""
    stage: Stage
    cfg: Config
    env: D.DistEnv
    plan: BatchPlan
    state: TrainState
    resumed: bool                         # from a checkpoint of out_dir
    sources: list[ShardDir]
    names: list[str]                      # of the sources, for val_loss/<name>
    mixture: Mixture                      # the sources' weights over the global order (data.schedule's stages)
    backend: Backend                      # owns the model, its wrapper and the optimizer
    autocast: Any
    config_yaml: str
    hooks: Hooks
    data: Any = None
    tasks: Any = None                     # eval.tasks found (run/harness.py's Tasks), or None
    checkpoints: Checkpoints | None = None
    log: MetricsLog | None = None

    @property
    def model(self) -> Transformer:
        """The bare module: evaluation, sampling, reference forwards (no wrapper's hooks)."""
        return self.backend.model

    @property
    def compute_precision(self) -> str:
        """How forwards compute (the backend's word: a precomputed reference is kept per precision)."""
        return self.backend.compute_precision


def check(stage: Stage, cfg: Config) -> None:
    """What the stage and the backend refuse of the config: before any process group or out_dir exists."""
    stage.check()
    backend = backend_class(cfg.dist.backend)
    problems = backend.check(cfg)
    if cfg.train.async_checkpoint and not backend.saves_in_background:
        problems.append(f"train.async_checkpoint=true: dist.backend={cfg.dist.backend} writes its checkpoints only "
                        f"between steps; use dist.backend=fsdp2 or train.async_checkpoint=false")
    if problems:
        raise UserError(problems[0])


def build(stage: Stage, cfg: Config, env: D.DistEnv, hooks: Hooks) -> Run:
    """Data, starting point, model, backend and train state of a fresh or resumed run."""
    sources, names, weights = open_data(stage, cfg, env)
    tasks = harness_tasks(cfg, env)  # before any work: lm-eval missing, an unknown task is one line
    start = starting_point(cfg, sources[0], env)
    cfg = dataclasses.replace(cfg, model=start.model_cfg)
    precision = resolve_precision(cfg.train.precision, env.device)
    if cfg.train.float8:
        float8.check(env.device)  # before any work: a one-line refusal where it cannot run
    if env.device.type == "cuda" and cfg.train.precision != "fp32":  # fp32 matmuls outside autocast run on TF32
        torch.backends.cuda.matmul.allow_tf32 = True  # tensor cores (10 mantissa bits in, fp32 sums);
        torch.backends.cudnn.allow_tf32 = True        # train.precision=fp32 asked by name keeps them exact
    plan = stage.batch_plan(env.world_size, env.rank)
    backend = backend_class(cfg.dist.backend)(cfg, env, plan, precision)
    mixture = data_mixture(cfg, weights, plan, stage, start.saved)
    identity = run_identity(stage.name, cfg, list(zip(sources, weights, strict=True)), mixture, start.model_cfg,
                            backend.identity(), stage.identity())
    if start.saved:
        check_identity(start.saved.identity, identity, start.checkpoint, cfg.out_dir, start.saved.init_from,
                       start.saved.consumed_samples)
        announce_resume(start.saved, plan, env)
    elif cfg.data.verify:
        verify_sources(sources, env)
    # the state this run will save: the saved one's counters with this run's plan (`saved` keeps what was)
    state = dataclasses.replace(start.saved or TrainState(), world_size=env.world_size, micro_batch=plan.micro_batch,
                                grad_accum=plan.grad_accum, identity=identity, init_from=start.init_from)

    pinned = stage.pin(start, env)  # before the model: a fresh run's policy starts from the pinned weights too
    model = build_model(cfg, start, backend, precision, pinned)
    D.from_rank0(env, lambda: rundir.prepare(cfg, os.path.join(sources[0].path, sources[0].tokenizer["file"]),
                                            state.step))
    if cfg.log.wandb:
        require_wandb()  # on every rank, before any work: all stop together when it is missing
    backend.setup(model, functools.partial(make_optimizer, cfg=cfg.train, device=env.device), start.checkpoint,
                  start.saved)
    if compile_scope(cfg, backend) == "model":
        backend.compile()
    if start.saved:
        backend.load(start.checkpoint, start.saved)
        restore_rng(start.checkpoint, env, start.saved.world_size, cfg.seed, start.saved.step)
    else:
        seed_rng(cfg.seed + 1 + env.rank)  # per-rank randomness (dropout) from here on
    autocast = torch.autocast(env.device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    config_yaml = open(os.path.join(cfg.out_dir, "config.yaml")).read()
    r = Run(stage, cfg, env, plan, state, start.saved is not None, sources, names, mixture, backend, autocast,
            config_yaml, hooks)
    r.data, r.tasks = stage.make_data(r), tasks
    if start.saved and start.saved.packing_cursor and r.data.packing is not None:
        r.data.packing.start_at(start.saved.packing_cursor)
    r.checkpoints = Checkpoints(env, cfg.out_dir, backend, config_yaml, tokenizer_file(cfg.out_dir),
                                cfg.train.keep_checkpoints, lambda tmp: [save_rng(tmp, env)],
                                cfg.train.async_checkpoint)
    # last: nothing after it can fail and leave it open
    r.log = MetricsLog(cfg, env, model, stage.name, state.step, stage.prepares, names)
    return r


def open_data(stage: Stage, cfg: Config, env: D.DistEnv, announce: bool = True) -> tuple[list[ShardDir], list[str],
                                                                                      list[float]]:
    """The run's shard directories (of the stage's kind), their names (val_loss/<name>) and weights; announce:
    rank 0 says how many examples do not fit data.seq_len."""
    names, paths, weights = zip(*data_sources(cfg.data), strict=True)
    room, said = stage.room()
    sources = open_sources(list(paths), room, cfg.data.val_fraction, stage.data_kind, stage.documents,
                           cfg.data.packing)
    for source in sources:
        if getattr(source, "too_long", 0) and env.is_main and announce:
            shared = " (a packed pair shares one row)" if cfg.data.packing and stage.documents > 1 else ""
            print(f"data: {source.too_long:,} examples of {source.path} do not fit {said}{shared} and are left out",
                  flush=True)
    return sources, list(names), list(weights)


def step_position(step: int, plan: BatchPlan, stage: Stage) -> int:
    """Where in the global order step `step` starts reading: ceil(step / steps_per_batch) x the global batch (a
    stage may train several steps on one batch)."""
    return -(-step // stage.steps_per_batch) * plan.global_batch


def data_mixture(cfg: Config, weights: list[float], plan: BatchPlan, stage: Stage, saved: TrainState | None = None
                 ) -> Mixture:
    """data.path's weights, or data.schedule's stages placed in the global order. A schedule places its stages by
    the global batch, so a resume keeps it; with packing the order's positions are examples while a step reads
    rows of several, so a schedule is refused there."""
    schedule = data_schedule(cfg.data)
    if schedule is None:
        return Mixture.constant(weights)
    if cfg.data.packing_window() and stage.packs and stage.packs_examples:
        raise UserError("data.schedule: not with data.packing (a step reads packed rows, the stages are placed in "
                        "the examples' order); pack without a schedule, or schedule without packing")
    if saved is not None and saved.plan().global_batch != plan.global_batch:
        raise UserError(f"data.schedule places its stages at step x the global batch: resume with the checkpoint's "
                        f"global batch of {saved.plan().global_batch:,} (this run's is {plan.global_batch:,})")
    return Mixture.scheduled(schedule, lambda step: step_position(step, plan, stage))


# ------------------------------------------------------------------------------------------- starting point

@dataclass
class StartingPoint:
    checkpoint: str | None      # the checkpoint of out_dir this run resumes from
    saved: TrainState | None    # its train state
    init_from: dict | None      # the resolved starting weights, {"path", "fingerprint"}, kept by every resume
    model_cfg: ModelConfig      # the model's shape: the resumed run's, the starting weights', or the config's


def starting_point(cfg: Config, source: ShardDir, env: D.DistEnv | None = None) -> StartingPoint:
    """Where a run starts and with which model. A training run passes env: rank 0 alone resolves init_from (its run
    may be writing a newer checkpoint right now) and fingerprints its weights, and damaged checkpoints of out_dir
    are moved aside. A reader (describe) passes none: nothing is moved, weights are not hashed, checkpoints are
    checked by their files' sizes."""
    reading = env is None
    checkpoint = latest(cfg.out_dir, env, sizes_only=reading)
    saved_cfg, saved = saved_run(checkpoint) if checkpoint else (None, None)
    # the starting point of fine-tuning is resolved once, and kept: a resume never re-resolves it
    init_from = saved.init_from if saved else None
    if cfg.init_from and not init_from:  # a fresh run (or a checkpoint from before starting points were recorded)
        init_from = D.from_rank0(env or D.DistEnv(), lambda: resolve_init_from(cfg.init_from, source, reading))
    if saved and cfg.init_from:  # the model's shape is the starting checkpoint's, as recorded
        model_cfg = saved_cfg.model
    elif cfg.init_from:
        model_cfg = model_config(init_from["path"])
        if env is not None and env.is_main:
            print(f"model: from {init_from['path']} (model.* of this config is not used, but for "
                  "model.moe.aux_loss_coef and z_loss_coef)", flush=True)
    else:
        model_cfg = resolve_vocab(cfg.model, source.tokenizer["vocab_size"], source.path)
    if cfg.data.seq_len > model_cfg.max_seq_len:
        where = f"the model of init_from {cfg.init_from}" if cfg.init_from else "model.max_seq_len"
        raise UserError(f"data.seq_len={cfg.data.seq_len} is longer than the context of {where} "
                        f"({model_cfg.max_seq_len} tokens); lower data.seq_len")
    if cfg.init_from:  # the router losses are this run's to weigh, not the starting model's
        model_cfg = dataclasses.replace(model_cfg, moe=dataclasses.replace(
            model_cfg.moe, aux_loss_coef=cfg.model.moe.aux_loss_coef, z_loss_coef=cfg.model.moe.z_loss_coef))
    return StartingPoint(checkpoint, saved, init_from, model_cfg)


def resolve_init_from(init_from: str, source: ShardDir, reading: bool = False) -> dict:
    """init_from resolved to one directory, its tokenizer checked against the shards'; the {"path",
    "fingerprint"} that the run records and keeps (fingerprinting consolidates a sharded checkpoint's weights;
    a reader leaves it None)."""
    path = resolve(init_from, sizes_only=reading)
    tokenizer = tokenizer_file(path)
    if tokenizer is None:
        raise UserError(f"init_from {path} has no tokenizer.model or tokenizer.json: fine-tuning needs the "
                        "tokenizer the shards were written with")
    sha = file_sha256(tokenizer)
    if sha != source.tokenizer["sha256"]:
        raise UserError(f"init_from {path} was trained with tokenizer {sha[:12]}…, but {source.path} was "
                        f"tokenized with {source.tokenizer['sha256'][:12]}…; write the shards with its "
                        f"{os.path.basename(tokenizer)}")
    return {"path": path, "fingerprint": None if reading else weights_fingerprint(path)}


def resolve_vocab(model_cfg: ModelConfig, tokenizer_vocab: int, where: str) -> ModelConfig:
    if model_cfg.vocab_size == 0:
        multiple = max(1, model_cfg.vocab_multiple)
        return dataclasses.replace(model_cfg, vocab_size=multiple * math.ceil(tokenizer_vocab / multiple))
    if model_cfg.vocab_size < tokenizer_vocab:
        raise UserError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the vocabulary of the tokenizer "
                        f"of {where} ({tokenizer_vocab})")
    return model_cfg


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


def verify_sources(sources: list[ShardDir], env: D.DistEnv) -> None:
    problems = [p for s in sources for p in s.verify(env.rank, env.world_size)]
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    if int(D.all_reduce_sum(env, torch.tensor(len(problems), device=env.device))):
        raise UserError("data.verify found damaged shards (see above); run `python -m preprocess verify DIR`")


# -------------------------------------------------------------------------------------------------- model

def build_model(cfg: Config, start: StartingPoint, backend, precision: str, pinned: str | None = None) -> Transformer:
    """The model on its device, held as the backend holds it: the same initial weights (and adapters) on every rank,
    the starting weights of a fresh fine-tuning run filled in (from the stage's pinned copy of them, if it keeps
    one), LoRA applied, activation checkpointing, the experts' matmul and compilation chosen. A resumed run's
    weights are the checkpoint's, loaded by the backend later: its random ones are drawn all the same."""
    device = backend.env.device
    weights = (pinned or start.init_from["path"]) if start.init_from and not start.saved else None

    def adapt(model: Transformer) -> None:
        model.attention_impl = resolve_attention(cfg.train.attention, device)
        if lora.enabled(cfg.lora):  # only the adapters train: the optimizer sees nothing else
            lora.apply(model, cfg.lora)

    model = starting_model(weights, cfg.model, backend, cfg.seed, adapt)
    if cfg.train.float8:
        float8.convert(model, device)
    model.checkpoint_activations(cfg.train.activation_checkpointing, cfg.train.activation_checkpointing_every)
    model.choose_expert_matmul(device.type, torch.bfloat16 if precision == "bf16" else torch.float32,
                               cfg.train.compile)
    if compile_scope(cfg, backend) == "blocks":
        model.compile_blocks()
    return model


def compile_scope(cfg: Config, backend) -> str | None:
    """What train.compile compiles (None: nothing): the whole training forward with its loss (the backend's
    wrapper, after setup) or each block in place (before)."""
    if not cfg.train.compile:
        return None
    return backend.compile_scope if cfg.train.compile_scope == "auto" else cfg.train.compile_scope


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":  # bf16 autocast pays off on GPUs; on CPUs it is slower than fp32
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def resolve_attention(attention: str, device: torch.device) -> str:
    """How packed rows and document masks attend. On CUDA auto is FlexAttention: its kernels skip the blocks a
    document mask leaves empty and take grouped key/value heads as they are, where SDPA with a boolean mask falls
    back to its memory-efficient kernel with copied heads. SDPA's boolean mask stays the CPU's way: FlexAttention
    has no backward on CPU (torch 2.13), and SDPA there was measured faster (docs/benchmarks.md)."""
    if attention == "flex" and device.type != "cuda":
        raise UserError("train.attention=flex: FlexAttention has no backward pass on CPU; use train.attention=sdpa")
    if attention == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    return attention
