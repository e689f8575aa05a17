"""Typed configuration: a YAML file merged onto the dataclasses below, then dotted command-line overrides.

Each component receives only its own section (model, data, train, dist, log). OmegaConf does the merging and
the type checks; an unknown key or a wrong type becomes one line naming the key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from preprocess.errors import UserError
from preprocess.fileio import atomic_write

from .models.transformer import ModelConfig
from .stages.losses import GRPO_LOSSES, PREFERENCE_LOSSES


@dataclass
class DataConfig:
    path: Any = MISSING          # a shard directory, a list of them (equal weights), {directory: weight} or
                                 # {name: {path: directory, weight: w}}
    schedule: Any = None         # the mixture of data.path's sources changing over training: a list of stages,
                                 # {until_step: N, weights: {source: w}} (the last may leave until_step out), a
                                 # stage with anneal: true going linearly from the previous stage's weights to its
                                 # own (docs/training.md#mixtures-that-change-over-training)
    seq_len: int = 256           # positions per sample or row; a pretraining sample reads seq_len + 1 tokens
    val_fraction: float = 0.01   # the last share of every dataset's samples: evaluated, never trained on
    verify: bool = True          # before a fresh run's first step, re-hash the shards (each rank its share)
    packing: bool = False        # SFT, DPO: several examples per row of seq_len positions, each attending to itself;
                                 # the batch counts rows
    pack_window: int = 1024      # packing: examples of the global order packed together (best fit)
    document_mask: bool = False  # pretraining: attention (and positions) restart at every document of a sample
    read_ahead: bool | None = None  # a thread reads (and pins, for a GPU) step t+1's batches while step t computes:
                                    # the same batches in the same order (run/reader.py). null: on a GPU, whose host
                                    # waits anyway; not on a CPU, where the thread slows the compute it shares the
                                    # cores with (docs/benchmarks.md)

    def packing_window(self) -> int:
        """Examples packed together, or 0 without packing."""
        return self.pack_window if self.packing else 0


@dataclass
class TrainConfig:
    micro_batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 3e-4
    min_lr_ratio: float = 0.1    # the schedule decays to lr * min_lr_ratio
    schedule: str = "cosine"     # cosine | constant | wsd (warmup, stable, then linear decay) | range_test
                                 # (training.lr_find's sweep: from lr * min_lr_ratio up to lr)
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: share of max_steps spent decaying
    optimizer: str = "adamw"     # adamw | muon (the blocks' weight matrices; AdamW for embeddings, head and norms)
    muon_momentum: float = 0.95  # muon: Nesterov momentum of the orthogonalised update
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0       # 0 disables clipping
    max_nonfinite_steps: int = 5  # steps in a row with a NaN/inf loss or gradient (each skipped) before the run stops
    precision: str = "auto"      # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    compile: bool = False
    compile_scope: str = "auto"  # what train.compile compiles: auto (the backend's choice: ddp the whole model with
                                 # its loss, deepspeed and fsdp2 each block) | model | blocks (each block in place: evaluation's
                                 # and sampling's forwards too)
    activation_checkpointing: str = "none"  # none | full | every_n: blocks that recompute their activations in the
                                            # backward instead of keeping them (memory for time)
    activation_checkpointing_every: int = 2  # every_n: every n-th block, from the first
    device: str = "auto"         # auto | cpu | cuda
    ckpt_every: int = 500
    keep_checkpoints: int = 3    # newest checkpoints kept; 0 keeps all
    async_checkpoint: bool = False  # a checkpoint written while the next steps train (a copy of the state in host
                                    # memory until then); `latest` once it is complete. dist.backend=fsdp2
    eval_every: int = 200        # 0 disables evaluation
    eval_samples: int = 512      # validation samples per evaluation, split over the ranks (same set for any count)
    sample_prompt: str | None = None  # text continued at every evaluation (none: no sample)
    sample_tokens: int = 64
    float8: bool = False         # the blocks' linear layers in float8 (torchao; CUDA GPUs of compute capability 8.9+)
    attention: str = "auto"      # packed rows and document masks: auto (flex on CUDA, sdpa elsewhere) | sdpa (a
                                 # boolean mask) | flex (FlexAttention's block mask; CUDA)


@dataclass
class DistConfig:
    backend: str = "ddp"         # none | ddp | deepspeed | fsdp2 (parallel/backends.py)
    zero_stage: int = 0          # deepspeed: 0 (data parallel), 1 (optimizer states), 2 (+ gradients), 3 (+ weights)
    offload_optimizer: bool = False  # deepspeed: optimizer states and step on the CPU (ZeRO 1-3)
    offload_params: bool = False     # deepspeed: weights on the CPU between uses (ZeRO 3)
    deepspeed_config: str | None = None  # deepspeed: a JSON template (configs/deepspeed/); batch sizes come from here
    reshard_after_forward: bool = True  # fsdp2: release a block's gathered weights after its forward (gathered again
                                        # for its backward): memory of one block, not all, at one more gather each
    timeout_s: int = 600         # a collective waiting longer than this fails instead of hanging


@dataclass
class LogConfig:
    every: int = 1               # optimizer steps between metrics lines
    tensorboard: bool = True
    wandb: bool = False          # Weights & Biases (pip install wandb; WANDB_MODE=offline works without an account)
    wandb_project: str = "shardlm"
    progress: bool = True        # tqdm bar on rank 0


@dataclass
class LoraConfig:
    rank: int = 0                # 0: every weight trains; > 0: only low-rank adapters on `targets` train (peft)
    alpha: float = 16.0          # adapters are scaled by alpha / rank
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo", "w1", "w2", "w3"])


@dataclass
class DPOConfig:
    loss: str = "sigmoid"        # sigmoid | robust | hinge | ipo (with a reference) | simpo | orpo (without one)
    beta: float = 0.1            # strength of the pull towards the reference; ipo: its τ; orpo: its λ
    label_smoothing: float = 0.0  # sigmoid (cDPO), robust, simpo: the assumed share of flipped labels, in [0, 0.5)
    simpo_gamma: float = 0.5     # simpo: the target reward margin
    cpo_alpha: float = 0.0       # simpo: weight of the chosen completion's mean NLL (TRL's CPO default is 1.0)
    rpo_alpha: float = 0.0       # sigmoid, robust, hinge, ipo: weight of the chosen completion's mean NLL
    desirable_weight: float = 1.0    # kto: weight of a desirable completion's loss
    undesirable_weight: float = 1.0  # kto: weight of an undesirable completion's loss
    precompute_ref: bool = False  # compute the reference log-probs once, into an array next to the shards

    def options(self) -> dict:
        """The options (besides beta) that the chosen loss reads."""
        return {k: getattr(self, k) for k in PREFERENCE_LOSSES[self.loss].options}

    def validate(self) -> list[str]:
        if self.loss not in PREFERENCE_LOSSES:
            return [f"dpo.loss: {self.loss!r} is not one of {', '.join(PREFERENCE_LOSSES)}"]
        loss, problems = PREFERENCE_LOSSES[self.loss], []
        if self.beta <= 0:
            problems.append("dpo.beta: must be positive")
        for option in ("desirable_weight", "undesirable_weight"):
            if getattr(self, option) <= 0:
                problems.append(f"dpo.{option}: must be positive")
        for option, default in (("label_smoothing", 0.0), ("simpo_gamma", 0.5), ("cpo_alpha", 0.0),
                                ("rpo_alpha", 0.0)):
            if option not in loss.options and getattr(self, option) != default:
                users = [n for n, other in PREFERENCE_LOSSES.items() if option in other.options]
                problems.append(f"dpo.{option}: dpo.loss={self.loss} does not use it (it is for {', '.join(users)})")
        if not 0 <= self.label_smoothing < 0.5:
            problems.append("dpo.label_smoothing: must be in [0, 0.5)")
        if self.precompute_ref and not loss.reference:
            problems.append(f"dpo.precompute_ref: dpo.loss={self.loss} uses no reference model")
        return problems


@dataclass
class GRPOConfig:
    prompts_per_step: int = 0    # the global batch of prompts; 0: train.micro_batch_size x grad_accum x processes.
                                 # Set, the accumulation follows from it on any number of processes
    generations: int = 8         # completions sampled per prompt (a group); TRL's num_generations
    max_new_tokens: int = 256    # a completion's length limit; TRL's max_completion_length
    temperature: float = 1.0     # sampling temperature, also of the log-probs the loss compares (as TRL)
    top_p: float = 1.0
    top_k: int = 0               # 0: no top-k cut
    rewards: list[str] = field(default_factory=list)  # module:function or path/to/file.py:function, summed
    reward_weights: list[float] | None = None          # one per reward (default: 1 each)
    scale_rewards: str = "group"  # group (the group's std) | batch (the global batch's std) | none
    loss: str = "dapo"           # grpo (per-sequence token mean) | dapo (per token) | dr_grpo (completions x max_new_tokens)
    epsilon: float = 0.2         # the importance ratio is clipped to [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float | None = None  # default: epsilon (DAPO's clip-higher uses 0.28)
    beta: float = 0.0            # weight of the k3 KL estimate to the pinned starting weights; 0 builds no reference
    iterations: int = 1          # optimizer steps on each step's samples (TRL's num_iterations); ckpt_every and
                                 # max_steps must be multiples of it
    mask_truncated: bool = False  # completions that hit max_new_tokens are left out of the loss
    skip_bad_rewards: bool = False  # a reward that raises or returns a non-number counts as none, instead of stopping
    max_empty_steps: int = 20    # steps in a row where no completion had an advantage (each skipped) before the run stops

    def clip_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    def validate(self) -> list[str]:
        problems = []
        if self.loss not in GRPO_LOSSES:
            problems.append(f"grpo.loss: {self.loss!r} is not one of {', '.join(GRPO_LOSSES)}")
        if self.generations < 2:
            problems.append("grpo.generations: must be at least 2 (advantages compare the completions of a prompt)")
        if self.prompts_per_step < 0:
            problems.append("grpo.prompts_per_step: must be 0 (the batch plan's) or positive")
        for key in ("max_new_tokens", "iterations", "max_empty_steps"):
            if getattr(self, key) < 1:
                problems.append(f"grpo.{key}: must be at least 1")
        if self.temperature <= 0:
            problems.append("grpo.temperature: must be positive (the loss compares log-probs at this temperature)")
        if not 0 < self.top_p <= 1:
            problems.append("grpo.top_p: must be in (0, 1]")
        if self.top_k < 0:
            problems.append("grpo.top_k: must be 0 (off) or positive")
        if self.epsilon < 0 or self.clip_high() < 0:
            problems.append("grpo.epsilon, grpo.epsilon_high: must not be negative")
        if self.beta < 0:
            problems.append("grpo.beta: must not be negative")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            problems.append(f"grpo.reward_weights: {len(self.reward_weights)} weights for {len(self.rewards)} rewards")
        return problems


@dataclass
class EvalConfig:
    """lm-evaluation-harness inside a run (docs/training.md#evaluating-with-lm-evaluation-harness)."""
    tasks: list[str] = field(default_factory=list)    # the harness's task names, or those of include's YAML files
    every: int = 0                                     # steps between them (0: train.eval_every's), and at the end
    include: list[str] = field(default_factory=list)  # directories of task YAML files (local data: no network)
    limit: float | None = None                         # examples per task (below 1: that share of them)
    num_fewshot: int | None = None
    chat: bool = False                                 # each request a user turn in the model's chat template
    batch_size: int = 8                                # requests scored (or continued) together


@dataclass
class Config:
    out_dir: str = "runs/default"
    seed: int = 1337
    init_from: str | None = None  # a run or checkpoint directory whose weights (and model shape) start this run
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


CHOICES = {
    "train.schedule": ("cosine", "constant", "wsd", "range_test"),
    "train.precision": ("auto", "fp32", "bf16"),
    "train.device": ("auto", "cpu", "cuda"),
    "dist.backend": ("none", "ddp", "deepspeed", "fsdp2"),
    "train.attention": ("auto", "sdpa", "flex"),
    "train.compile_scope": ("auto", "model", "blocks"),
    "train.optimizer": ("adamw", "muon"),
    "train.activation_checkpointing": ("none", "full", "every_n"),
    "grpo.scale_rewards": ("group", "batch", "none"),
}
POSITIVE = ("train.micro_batch_size", "train.grad_accum", "train.max_steps", "train.ckpt_every", "data.seq_len",
            "data.pack_window", "log.every", "train.activation_checkpointing_every")


def load_config(path: str, overrides: list[str] = ()) -> Config:
    """YAML file + `key.sub=value` overrides → a validated Config."""
    schema = OmegaConf.structured(Config)
    try:
        file_cfg = OmegaConf.load(path)
    except FileNotFoundError:
        raise UserError(f"{path}: config file not found") from None
    except Exception as e:  # YAML syntax
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise UserError(f"override {bad[0]!r} is not of the form key.sub=value")
    try:
        merged = OmegaConf.merge(schema, file_cfg)
    except OmegaConfBaseException as e:
        raise UserError(f"{path}: {_describe(e)}") from None
    try:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise UserError(f"command line: {_describe(e)}") from None
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:  # e.g. a mandatory value given neither in the file nor on the command line
        raise UserError(f"{path}: {_describe(e)}") from None
    problems = validate(cfg)
    if problems:
        raise UserError(f"{path}{' with overrides' if overrides else ''}: {problems[0]}")
    return cfg


def validate(cfg: Config) -> list[str]:
    problems = []
    for key, choices in CHOICES.items():
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) not in choices:
            problems.append(f"{key}: {getattr(getattr(cfg, section), name)!r} is not one of {', '.join(choices)}")
    for key in POSITIVE:
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < 1:
            problems.append(f"{key}: must be at least 1")
    if cfg.eval.every < 0:
        problems.append("eval.every: must be 0 (train.eval_every's steps) or positive")
    if cfg.eval.batch_size < 1:
        problems.append("eval.batch_size: must be at least 1")
    if cfg.eval.limit is not None and not cfg.eval.limit > 0:
        problems.append("eval.limit: examples per task (at least 1), or a share of them (above 0 and below 1)")
    if not 0 <= cfg.data.val_fraction < 1:
        problems.append("data.val_fraction: must be in [0, 1)")
    if cfg.data.seq_len > cfg.model.max_seq_len and not cfg.init_from:  # init_from's context is checked when read
        problems.append(f"data.seq_len: {cfg.data.seq_len} is longer than model.max_seq_len={cfg.model.max_seq_len}")
    if cfg.lora.rank < 0:
        problems.append("lora.rank: must be 0 (off) or positive")
    if cfg.dist.zero_stage not in (0, 1, 2, 3):
        problems.append(f"dist.zero_stage: {cfg.dist.zero_stage} is not 0, 1, 2 or 3")
    if not 0 <= cfg.train.muon_momentum < 1:
        problems.append("train.muon_momentum: must be in [0, 1)")
    if cfg.train.optimizer == "muon" and cfg.lora.rank:
        problems.append("train.optimizer=muon: LoRA adapters train with train.optimizer=adamw")
    if cfg.train.float8 and cfg.lora.rank:
        problems.append("train.float8=true: LoRA's adapted layers are not converted to float8; use one or the other")
    problems.extend(cfg.model.validate())
    problems.extend(cfg.dpo.validate())
    problems.extend(cfg.grpo.validate())
    return problems


def data_sources(cfg: DataConfig) -> list[tuple[str, str, float]]:
    """data.path as (name, directory, weight) with weights summing to 1. A source is named as given, or by the
    last components of its directory that tell it from the others (val_loss/<name>)."""
    path = cfg.path
    named = None
    if isinstance(path, str):
        pairs = [(path, 1.0)]
    elif isinstance(path, (list, tuple)) and path and all(isinstance(p, str) for p in path):
        pairs = [(p, 1.0) for p in path]
    elif isinstance(path, dict) and path and all(isinstance(w, (int, float)) and w > 0 for w in path.values()):
        pairs = [(str(p), float(w)) for p, w in path.items()]
    elif isinstance(path, dict) and path and all(isinstance(v, dict) for v in path.values()):
        named, pairs = [str(n) for n in path], []
        for name, entry in path.items():
            weight = entry.get("weight", 1.0)
            if not isinstance(entry.get("path"), str) or set(entry) - {"path", "weight"} or \
                    not isinstance(weight, (int, float)) or weight <= 0:
                raise UserError(f"data.path.{name}: expected {{path: DIRECTORY, weight: POSITIVE_NUMBER}}; got {entry!r}")
            pairs.append((entry["path"], float(weight)))
    else:
        raise UserError(f"data.path: expected a shard directory, a list of them, {{directory: weight}} or "
                        f"{{name: {{path: directory, weight: w}}}}; got {path!r}")
    total = sum(w for _, w in pairs)
    names = named or source_names([p for p, _ in pairs])
    return [(n, p, w / total) for n, (p, w) in zip(names, pairs, strict=True)]


@dataclass(frozen=True)
class MixStage:
    """A stage of data.schedule: the sources' weights (summing to 1, in data.path's order) until a step (None: to
    the end), reached by a linear anneal from the previous stage's weights when `anneal`."""
    until_step: int | None
    weights: tuple[float, ...]
    anneal: bool = False


def data_schedule(cfg: DataConfig) -> list[MixStage] | None:
    """data.schedule checked against data.path's sources (named as val_loss/<name> names them, or by their path):
    None without one. Each problem is one line naming the stage and the key."""
    if cfg.schedule is None:
        return None
    sources = data_sources(cfg)
    if len({w for _, _, w in sources}) > 1:
        raise UserError("data.schedule: data.path gives the sources weights too; give them once, in the schedule")
    index = {**{path: i for i, (_, path, _) in enumerate(sources)}, **{n: i for i, (n, _, _) in enumerate(sources)}}
    stages = cfg.schedule
    if not isinstance(stages, (list, tuple)) or not stages:
        raise UserError(f"data.schedule: expected a list of {{until_step: N, weights: {{source: w}}}}; got {stages!r}")
    out, last = [], 0
    for i, stage in enumerate(stages):
        where = f"data.schedule[{i}]"
        if not isinstance(stage, dict) or set(stage) - {"until_step", "weights", "anneal"} or "weights" not in stage:
            raise UserError(f"{where}: expected {{until_step: N, weights: {{source: w}}, anneal: false}}; got {stage!r}")
        until, anneal, weights = stage.get("until_step"), stage.get("anneal", False), stage["weights"]
        if until is None and i < len(stages) - 1:
            raise UserError(f"{where}: until_step is missing (only the last stage may run to the end)")
        if until is not None and (not isinstance(until, int) or isinstance(until, bool) or until <= last):
            raise UserError(f"{where}.until_step: {until!r} is not a step after {last} (the stage before's end)")
        if not isinstance(anneal, bool) or (anneal and (i == 0 or until is None)):
            raise UserError(f"{where}.anneal: {anneal!r}: an anneal is true or false, and needs a stage before it "
                            "and an until_step")
        if not isinstance(weights, dict) or not weights or \
                not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in weights.values()):
            raise UserError(f"{where}.weights: expected {{source: weight >= 0}}; got {weights!r}")
        if unknown := [str(k) for k in weights if str(k) not in index]:
            raise UserError(f"{where}.weights: {unknown[0]} is not a source of data.path (they are: "
                            f"{', '.join(n for n, _, _ in sources)})")
        vector = [0.0] * len(sources)
        for key, w in weights.items():
            vector[index[str(key)]] += float(w)
        if not sum(vector) > 0:
            raise UserError(f"{where}.weights: every weight is 0")
        out.append(MixStage(until, tuple(w / sum(vector) for w in vector), anneal))
        last = until if until is not None else last
    return out


def source_names(paths: list[str]) -> list[str]:
    """Each directory's shortest trailing part that no other one ends with (data/a/shards → a/shards)."""
    parts = [os.path.normpath(p).split(os.sep) for p in paths]
    names = []
    for i, mine in enumerate(parts):
        others = [p for k, p in enumerate(parts) if k != i]
        depth = next((d for d in range(1, len(mine) + 1) if all(o[-d:] != mine[-d:] for o in others)), None)
        names.append("/".join(mine[-depth:]) if depth else f"{i}:{paths[i]}")  # None: the same directory twice
    return names


def save_config(cfg: Config, path: str) -> None:
    atomic_write(path, OmegaConf.to_yaml(OmegaConf.structured(cfg)).encode())


def config_from_yaml(path: str) -> Config:
    """A saved, fully resolved config (e.g. out_dir/config.yaml), without overrides."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: not found")
    return load_config(path)


def _describe(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    msg = str(getattr(e, "msg", None) or e).splitlines()[0]
    if "not in" in msg and key:
        return f"unknown key {key!r}"
    if "missing mandatory value" in msg.lower():
        return f"{key or 'a key'}: no value given (set it in the file or as {key or 'key'}=... on the command line)"
    return f"{key}: {msg}" if key else msg
