"""Random number generators of a rank: seeded at the start, saved in every checkpoint (rng-rank<R>.pt), and
restored on a resume — exactly when the run has as many processes as the one that saved them; otherwise each
rank's are derived from (seed, rank, step), never copied from another rank."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from ..parallel.env import DistEnv
from .store import load_file, save_file


def rng_file(ckpt_dir: str, rank: int) -> str:
    return os.path.join(ckpt_dir, f"rng-rank{rank}.pt")


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


def save_rng(ckpt_dir: str, env: DistEnv) -> str:
    path = rng_file(ckpt_dir, env.rank)
    save_file(rng_state(), path)
    return path


def restore_rng(ckpt_dir: str, env: DistEnv, saved_world_size: int, seed: int, step: int) -> None:
    """This rank's saved states when the run had as many processes as now; else states derived from (seed, rank,
    step)."""
    path = rng_file(ckpt_dir, env.rank)
    if saved_world_size == env.world_size and os.path.isfile(path):
        set_rng_state(load_file(path))
    else:
        seed_rng(derived_seed(seed, env.rank, step))


def derived_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0] >> 1)


def seed_rng(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
