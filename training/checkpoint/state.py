"""What a checkpoint records about the run besides weights and optimizer: the typed train state (counters, the
data position, the plan that wrote it, the pinned starting point) and the run's identity — the settings a
resumed run must share with the one that wrote the checkpoint.

Resuming changes nothing the user did not ask for: anything that would change the meaning of the run (stage,
seed, data, seq_len, val_fraction, LoRA, init_from, the model's shape) is refused with one line naming the old and
new values; the batch split (micro-batch, accumulation, processes) may change, and the run continues from the
consumed-sample position.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from preprocess.errors import UserError

from ..config import Config, config_from_yaml
from ..data.order import BatchPlan, Mixture
from ..models.transformer import ModelConfig, MoEConfig

STATE = "state.json"


@dataclass
class TrainState:
    step: int = 0                     # optimizer steps done
    consumed_samples: int = 0         # global order positions read (samples, examples, pairs, or packed rows)
    tokens: int = 0                   # tokens processed, padding included (as tokens_per_sec counts them)
    nonfinite_steps: int = 0          # steps skipped for a NaN/inf loss or gradient
    nonfinite_in_a_row: int = 0
    empty_steps: int = 0              # steps skipped with nothing to learn from (GRPO: no completion had an advantage)
    empty_in_a_row: int = 0
    world_size: int = 1               # the batch split of the run that wrote it: processes,
    micro_batch: int = 0              # samples per micro-step
    grad_accum: int = 0               # and micro-steps per optimizer step
    identity: dict = field(default_factory=dict)  # see run_identity()
    init_from: dict | None = None     # the resolved starting checkpoint: {"path", "fingerprint"}, pinned at the start
    packing_cursor: list | None = None  # data.packing: [window, its first row] holding the next row to read, so a
                                        # resume packs from there rather than from the first window

    def save_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), indent=1).encode()

    @classmethod
    def load(cls, ckpt_dir: str, saved_config) -> TrainState:
        """A checkpoint's state; one written before the data position was saved gets it derived from its step,
        world size and saved config (the rule those runs followed)."""
        with open(os.path.join(ckpt_dir, STATE)) as f:
            raw = json.load(f)
        known = {f.name for f in dataclasses.fields(cls)}
        state = cls(**{k: v for k, v in raw.items() if k in known})
        if "consumed_samples" not in raw:
            t = saved_config.train
            state.micro_batch, state.grad_accum = t.micro_batch_size, t.grad_accum
            state.consumed_samples = state.step * state.plan().global_batch
        return state

    def plan(self) -> BatchPlan:
        return BatchPlan(self.micro_batch, self.grad_accum, self.world_size)


def run_identity(stage: str, cfg: Config, sources, mixture: Mixture, model_cfg, backend: dict,
                 stage_settings: dict) -> dict:
    """The settings that give a run its meaning, as flat {key: value} (JSON types), compared on resume: the run's
    own, its backend's (how it saves) and its stage's (e.g. a loss and its options)."""
    identity = {
        "stage": stage,
        "seed": cfg.seed,
        "data": [{"path": os.path.abspath(s.path), "weight": round(w, 12), "content": s.fingerprint}
                 for s, w in sources],
        "data.mixture": mixture_json(mixture),  # compared only as far as the run has read (check_identity)
        "data.seq_len": cfg.data.seq_len,
        "data.val_fraction": cfg.data.val_fraction,
        "data.packing": cfg.data.packing_window(),  # what the position counts: rows of which packing, or examples
        "data.document_mask": cfg.data.document_mask,
        "init_from": os.path.realpath(cfg.init_from) if cfg.init_from else None,
        **backend,
        "train.optimizer": cfg.train.optimizer,  # a resume continues the same optimizer's state
        **stage_settings,
    }
    lora = dataclasses.asdict(cfg.lora) if cfg.lora.rank else {"rank": 0}  # the rest matters only with adapters
    identity.update({f"lora.{k}": v for k, v in lora.items()})
    for k, v in dataclasses.asdict(model_cfg).items():
        identity.update({f"model.{k}.{sub}": x for sub, x in v.items()} if isinstance(v, dict) else {f"model.{k}": v})
    return identity


# the model's switches for the open families, recorded since they exist (the others always were)
FAMILY_SWITCHES = {"head_size", "qkv_bias", "qk_norm", "attention_scale", "sliding_window", "sliding_layers",
                   "rope_scaling", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                   "rope_original_context", "rope_local_theta", "activation", "norm_plus_one", "sandwich_norm",
                   "embed_scale", "family"}


def default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


# settings recorded since a version that could only run them one way: a checkpoint without them ran that way
RECORDED_LATER = {"data.packing": 0, "data.document_mask": False, "dpo.loss": "sigmoid", "dpo.label_smoothing": 0.0,
                  "dpo.rpo_alpha": 0.0, "train.optimizer": "adamw",
                  **{f"model.moe.{f.name}": default(f) for f in dataclasses.fields(MoEConfig)},
                  **{f"model.{f.name}": default(f) for f in dataclasses.fields(ModelConfig) if f.name in FAMILY_SWITCHES}}


def mixture_json(mixture: Mixture) -> list:
    return [[start, [round(w, 12) for w in weights]] for start, weights in zip(mixture.starts, mixture.weights,
                                                                                strict=True)]


def check_identity(saved: dict, current: dict, ckpt_dir: str, out_dir: str, init_from: dict | None = None,
                   consumed: int = 0) -> None:
    """One line naming the first setting that differs from the checkpoint's, old → new, and the way out.
    init_from may name the starting run another way: its run directory or the checkpoint the run started from.
    The data mixture is compared over the `consumed` positions read: a schedule may change where it is ahead."""
    if "data.mixture" not in saved and "data" in saved:  # from before data.mixture: its weights, from the start
        saved = {**saved, "data.mixture": [[0, [round(d["weight"], 12) for d in saved["data"]]]]}
    saved = {**RECORDED_LATER, **saved}
    for key, new in current.items():
        if key not in saved:  # a checkpoint from before this setting was recorded
            continue
        old = saved[key]
        if key == "data.mixture":
            old, new = ([piece for piece in m if piece[0] < consumed] for m in (old, new))
            if old != new:
                raise UserError(f"{ckpt_dir} read {consumed:,} samples of its data mixed as {_describe_mixture(old)}; "
                                f"this run's data.path/data.schedule mixes them as {_describe_mixture(new)}; the "
                                f"schedule may change only after that point — put it back, or start a new run in "
                                f"another out_dir (not {out_dir})")
            continue
        if key == "init_from" and old and new and init_from:
            started = os.path.realpath(init_from["path"])
            if new in (old, started) or started.startswith(new.rstrip("/") + os.sep):
                continue
        if key == "data":  # their weights are data.mixture's to compare
            same = [d["content"] for d in old] == [d["content"] for d in new]
            if same:
                continue
            old, new = _describe_data(old), _describe_data(new)
        elif old == new or (isinstance(old, list) and isinstance(new, list) and sorted(old) == sorted(new)):
            continue
        name = "data.path (directories, weights or their contents)" if key == "data" else key
        raise UserError(f"{ckpt_dir} was trained with {name} {old}, this run has {new}; resuming would change "
                        f"what the run means — put it back, or start a new run in another out_dir (not {out_dir})")


def _describe_mixture(pieces: list) -> str:
    return "; ".join(f"from sample {start:,}: {', '.join(f'{w:g}' for w in weights)}" for start, weights in pieces[:4]) \
        + (f"; … ({len(pieces)} pieces)" if len(pieces) > 4 else "")


def _describe_data(data: list[dict]) -> str:
    return "[" + ", ".join(f"{d['path']} (weight {d['weight']:g}, content {d['content'][:8]})" for d in data) + "]"


def saved_run(ckpt_dir: str) -> tuple[Config, TrainState]:
    """(config, TrainState) of a checkpoint."""
    cfg = config_from_yaml(os.path.join(ckpt_dir, "config.yaml"))
    return cfg, TrainState.load(ckpt_dir, cfg)
