"""Checkpoints: out_dir/checkpoints/step-N/ with the model, the optimizer, each rank's RNG states, the loop's
counters, the resolved config and the tokenizer; `checkpoints/latest` names the newest complete one.

A checkpoint is written into step-N.tmp/, fsynced, then renamed, and only then does `latest` move: a crash at
any moment leaves the previous checkpoint in charge. Everything is loaded with torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil

import numpy as np
import torch

from preprocess.errors import UserError
from preprocess.fileio import atomic_write, fsync_dir

from . import distributed as D

LATEST = "latest"
STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_dir(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoints")


def _save_file(obj, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(env: D.DistEnv, out_dir: str, step: int, model: torch.nn.Module, optimizer, counters: dict,
         config_yaml: str, tokenizer_path: str, keep: int, engine=None) -> str:
    """Every rank calls this; rank 0 writes the shared files, every rank its RNG state. With a DeepSpeed
    engine, the engine writes the model and optimizer (each rank its partitions)."""
    root = checkpoints_dir(out_dir)
    final = os.path.join(root, f"step-{step}")
    tmp = final + ".tmp"
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    D.barrier(env)
    _save_file(rng_state(), os.path.join(tmp, f"rng-rank{env.rank}.pt"))
    if engine is not None:
        from .deepspeed_backend import save as deepspeed_save

        deepspeed_save(engine, env, root, os.path.basename(tmp))
    D.barrier(env)
    if env.is_main:
        if engine is None:
            _save_file(model.state_dict(), os.path.join(tmp, "model.pt"))
            _save_file(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        shutil.copyfile(tokenizer_path, os.path.join(tmp, "tokenizer.model"))
        atomic_write(os.path.join(tmp, "config.yaml"), config_yaml.encode())
        atomic_write(os.path.join(tmp, "state.json"),
                     json.dumps({"step": step, "world_size": env.world_size, **counters}).encode())
        fsync_dir(tmp)
        if os.path.exists(final):  # this step was saved before, by a run that then lost its later steps
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write(os.path.join(root, LATEST), f"step-{step}\n".encode())
        fsync_dir(root)
        _prune(root, keep)
    D.barrier(env)
    return final


def _prune(root: str, keep: int) -> None:
    if keep <= 0:
        return
    steps = sorted((int(m.group(1)), name) for name in os.listdir(root) if (m := STEP_DIR.match(name)))
    for _, name in steps[:-keep]:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def latest(out_dir: str) -> str | None:
    """The checkpoint directory to resume from, or None for a fresh run."""
    root = checkpoints_dir(out_dir)
    try:
        with open(os.path.join(root, LATEST)) as f:
            name = f.read().strip()
    except FileNotFoundError:
        return None
    path = os.path.join(root, name)
    if not os.path.isfile(os.path.join(path, "state.json")):
        raise UserError(f"{root}/{LATEST} names {name}, which is missing or incomplete")
    return path


def saved_step(ckpt_dir: str | None) -> int:
    if ckpt_dir is None:
        return 0
    with open(os.path.join(ckpt_dir, "state.json")) as f:
        return json.load(f)["step"]


def resolve(path: str) -> str:
    """A run directory (its latest checkpoint) or a checkpoint directory → the checkpoint directory."""
    if os.path.isfile(os.path.join(path, "model.pt")) or os.path.isfile(os.path.join(path, "state.json")):
        return path
    found = latest(path) if os.path.isdir(path) else None
    if found is None:
        raise UserError(f"{path}: neither a checkpoint directory (with model.pt) nor a run directory with checkpoints")
    return found


def _load(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: missing") from None
    except Exception as e:
        raise UserError(f"{path}: unreadable checkpoint file ({str(e).splitlines()[0]})") from None


def load_weights(ckpt_dir: str, model: torch.nn.Module) -> None:
    """The weights of a checkpoint; those of a DeepSpeed one are consolidated into a plain fp32 model.pt first."""
    from .deepspeed_backend import consolidated_state_dict, is_deepspeed_checkpoint

    path = os.path.join(ckpt_dir, "model.pt")
    if not os.path.isfile(path) and is_deepspeed_checkpoint(ckpt_dir):
        _save_file(consolidated_state_dict(ckpt_dir), path + ".tmp")
        os.replace(path + ".tmp", path)
    state = _load(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{ckpt_dir}/model.pt does not fit this model (missing: {missing[:3]}, unexpected: {unexpected[:3]})")


def load(ckpt_dir: str, model: torch.nn.Module, optimizer, env: D.DistEnv, engine=None) -> dict:
    """Restore model, optimizer and this rank's RNG states; returns the saved counters (step, tokens, ...)."""
    if engine is not None:
        from .deepspeed_backend import load as deepspeed_load

        deepspeed_load(engine, ckpt_dir)
    else:
        load_weights(ckpt_dir, model)
        optimizer.load_state_dict(_load(os.path.join(ckpt_dir, "optimizer.pt")))
    with open(os.path.join(ckpt_dir, "state.json")) as f:
        counters = json.load(f)
    rng_path = os.path.join(ckpt_dir, f"rng-rank{env.rank}.pt")
    if os.path.isfile(rng_path):
        set_rng_state(_load(rng_path))
    return counters
