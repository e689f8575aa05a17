"""Checkpoints: out_dir/checkpoints/step-N/ with the model, the optimizer, each rank's RNG states, the train
state (state.json), the resolved config and the tokenizer; `checkpoints/latest` names the newest complete one.

A checkpoint is written into step-N.tmp/, every file fsynced (DeepSpeed's too, each rank its share), given a
checksums.json (size and sha256 of every file, the ranks hashing in parallel), then renamed, and only then does
`latest` move and are old checkpoints pruned: a crash at any moment leaves the previous checkpoint in charge.
Before a resume the checksums are checked; a damaged checkpoint (a flipped byte, a file cut short or lost, no
checksums.json) is moved aside to step-N.damaged with a warning naming it, and the newest intact one is used.
Everything is loaded with torch.load(weights_only=True).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import random
import re
import shutil
import sys
import time

import numpy as np
import torch

from preprocess.errors import UserError, naming
from preprocess.fileio import atomic_write, copy_durably, file_sha256, fsync_path, write_then_rename
from preprocess.tokenizer import tokenizer_files

from . import distributed as D
from . import lora
from .state import STATE, TrainState

LATEST = "latest"
CHECKSUMS = "checksums.json"
UNIVERSAL = ".universal"  # step-N.universal/: DeepSpeed's world-size-free conversion of step-N, made on demand
STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_dir(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoints")


class _Writes:
    """A file's write() for torch.save, keeping the OSError that torch then reports only as an opaque
    RuntimeError (a full disk reads "unexpected pos 704 vs 598")."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _save_file(obj, path: str) -> None:
    with naming(path), open(path, "wb") as f:
        writes = _Writes(f)
        try:
            torch.save(obj, writes)
        except RuntimeError:
            if writes.error is not None:
                raise writes.error from None
            raise
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


def save(env: D.DistEnv, out_dir: str, state: TrainState, model: torch.nn.Module, optimizer, config_yaml: str,
         tokenizer_path: str, keep: int, engine=None) -> str:
    """Every rank calls this; rank 0 writes the shared files, every rank its RNG state. With a DeepSpeed
    engine, the engine writes the model and optimizer (each rank its partitions)."""
    root = checkpoints_dir(out_dir)
    final = os.path.join(root, f"step-{state.step}")
    tmp = final + ".tmp"
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    try:
        D.barrier(env)
        _save_file(rng_state(), os.path.join(tmp, f"rng-rank{env.rank}.pt"))
        if engine is not None:  # DeepSpeed never fsyncs: each rank flushes what it wrote (on its own machine)
            from .deepspeed_backend import files_written_by
            from .deepspeed_backend import save as deepspeed_save

            deepspeed_save(engine, env, root, os.path.basename(tmp))
            for path in files_written_by(tmp, env.rank):
                fsync_path(path)
        if env.is_main:
            if engine is None:
                _save_file(model.state_dict(), os.path.join(tmp, "model.pt"))
                _save_file(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
            for path in tokenizer_files(tokenizer_path):
                copy_durably(path, os.path.join(tmp, os.path.basename(path)))
            atomic_write(os.path.join(tmp, "config.yaml"), config_yaml.encode())
            atomic_write(os.path.join(tmp, STATE), state.save_json())
        D.barrier(env)
        checksums = _hash_share(tmp, env)  # each rank hashes its share of the files
        if env.is_main:
            _write_checksums(tmp, checksums)
            if os.path.exists(final):  # this step was saved before, by a run that then lost its later steps
                shutil.rmtree(final)
            shutil.rmtree(final + UNIVERSAL, ignore_errors=True)  # a conversion of that earlier save
            os.replace(tmp, final)
            atomic_write(os.path.join(root, LATEST), f"step-{state.step}\n".encode())
            fsync_path(root)
            _prune(root, keep)
    except OSError:  # a full disk: the previous checkpoint stays in charge, and this one's space is given back
        discard(tmp)
        raise
    D.barrier(env)
    return final


def discard(tmp: str, patience_s: float = 10.0) -> None:
    """Remove a half-written checkpoint directory. Every rank does, after its own write failed: while another rank
    is still failing to write into it, or removing it too, one pass can leave the directory behind."""
    deadline = time.monotonic() + patience_s
    shutil.rmtree(tmp, ignore_errors=True)
    while os.path.exists(tmp) and time.monotonic() < deadline:
        time.sleep(0.1)
        shutil.rmtree(tmp, ignore_errors=True)


def _files(ckpt_dir: str) -> list[str]:
    found = []
    for parent, _, names in os.walk(ckpt_dir):
        found += [os.path.relpath(os.path.join(parent, n), ckpt_dir) for n in names]
    return sorted(f for f in found if f != CHECKSUMS)


def _hash_share(ckpt_dir: str, env: D.DistEnv) -> dict:
    """{file: {size, sha256}} of every file in ckpt_dir, each rank hashing every world_size-th; on rank 0."""
    mine = {}
    for f in _files(ckpt_dir)[env.rank::env.world_size]:
        path = os.path.join(ckpt_dir, f)
        mine[f] = {"size": os.path.getsize(path), "sha256": file_sha256(path)}
    if not env.distributed:
        return mine
    gathered = [None] * env.world_size
    torch.distributed.all_gather_object(gathered, mine)
    return {k: v for part in gathered for k, v in part.items()}


def damage(ckpt_dir: str, rank: int = 0, world: int = 1) -> list[str]:
    """What is wrong with this rank's share of a checkpoint's files, per its checksums.json (empty: intact).
    Every checkpoint is written with one, so one without it is not trusted."""
    if not os.path.isfile(os.path.join(ckpt_dir, STATE)):
        return [f"{STATE} is missing"]
    return checksum_problems(ckpt_dir, rank, world)


def seal(directory: str) -> None:
    """One process's finished tree (DeepSpeed's universal conversion): every file and directory fsynced, then a
    checksums.json, as for a checkpoint."""
    for f in _files(directory):
        fsync_path(os.path.join(directory, f))
    _write_checksums(directory, _hash_share(directory, D.DistEnv()))


def _write_checksums(directory: str, checksums: dict) -> None:
    """checksums.json, then every directory of the tree fsynced (the names in them): ready to be renamed."""
    atomic_write(os.path.join(directory, CHECKSUMS), json.dumps(checksums, indent=1, sort_keys=True).encode())
    for parent, _, _ in os.walk(directory):
        fsync_path(parent)


def checksum_problems(ckpt_dir: str, rank: int = 0, world: int = 1, sizes_only: bool = False) -> list[str]:
    try:
        with open(os.path.join(ckpt_dir, CHECKSUMS)) as f:
            checksums = json.load(f)
    except FileNotFoundError:
        return [f"{CHECKSUMS} is missing"]
    except (OSError, ValueError) as e:
        return [f"{CHECKSUMS} is unreadable ({e})"]
    problems = []
    for name in sorted(checksums)[rank::world]:
        path, want = os.path.join(ckpt_dir, name), checksums[name]
        if not os.path.isfile(path):
            problems.append(f"{name} is missing")
        elif os.path.getsize(path) != want["size"]:
            problems.append(f"{name} has {os.path.getsize(path):,} bytes instead of {want['size']:,}")
        elif not sizes_only and file_sha256(path) != want["sha256"]:
            problems.append(f"{name} does not match its sha256")
    return problems


def _prune(root: str, keep: int) -> None:
    if keep <= 0:
        return
    for name in _step_dirs(root)[keep:]:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        shutil.rmtree(os.path.join(root, name + UNIVERSAL), ignore_errors=True)


def _step_dirs(root: str) -> list[str]:
    """Complete checkpoint directories, newest first."""
    names = [n for n in (os.listdir(root) if os.path.isdir(root) else []) if STEP_DIR.match(n)]
    return sorted(names, key=lambda n: int(STEP_DIR.match(n).group(1)), reverse=True)


def latest(out_dir: str, env: D.DistEnv | None = None) -> str | None:
    """The checkpoint directory to resume from: the newest intact one, or None for a fresh run. The training run
    passes env: its ranks check the checksums in parallel, and damaged checkpoints are moved aside to
    step-N.damaged (kept for inspection, out of the way of the step that will be saved again). Readers of a run
    (generate, init_from) pass none and move nothing."""
    training = env is not None
    env = env or D.DistEnv()
    root = checkpoints_dir(out_dir)
    names = _step_dirs(root)
    if not names:
        if os.path.isfile(os.path.join(root, LATEST)):
            raise UserError(f"{root}/{LATEST} exists but no step-N checkpoint directory does")
        return None
    if training and env.is_main:  # left by a run killed while saving
        for stale in glob.glob(os.path.join(glob.escape(root), "step-*.tmp")):
            shutil.rmtree(stale, ignore_errors=True)
    damaged = []
    for name in names:
        path = os.path.join(root, name)
        problems = damage(path, env.rank, env.world_size)
        if env.distributed:
            gathered = [None] * env.world_size
            torch.distributed.all_gather_object(gathered, problems)
            problems = [p for part in gathered for p in part]
        if not problems:
            break
        damaged.append((path, problems))
    else:
        raise UserError(f"{root}: every checkpoint is damaged ({damaged[0][0]}: {damaged[0][1][0]}); "
                        f"nothing to resume from")
    if env.is_main:
        for bad, problems in damaged:
            moved = ""
            if training:
                aside, n = bad + ".damaged", 1
                while os.path.exists(aside):
                    aside, n = f"{bad}.damaged{n}", n + 1
                os.replace(bad, aside)
                moved = f"; moved to {os.path.basename(aside)}"
            print(f"warning: checkpoint {bad} is damaged ({'; '.join(problems[:3])}){moved}; using {path}",
                  file=sys.stderr, flush=True)
    D.barrier(env)
    return path


def saved_run(ckpt_dir: str):
    """(config, TrainState) of a checkpoint."""
    from .config import config_from_yaml

    cfg = config_from_yaml(os.path.join(ckpt_dir, "config.yaml"))
    return cfg, TrainState.load(ckpt_dir, cfg)


@functools.cache
def resolve(path: str) -> str:
    """A run directory (its newest intact checkpoint), a checkpoint directory, or a transformers Llama directory
    (config.json + safetensors, e.g. one written by training.export_hf) → the directory to load from."""
    from . import hf

    if hf.is_hf_dir(path):
        return path
    if os.path.isfile(os.path.join(path, "model.pt")) or os.path.isfile(os.path.join(path, STATE)):
        problems = damage(path)
        if problems:
            raise UserError(f"{path}: damaged checkpoint ({'; '.join(problems[:3])})")
        return path
    found = latest(path) if os.path.isdir(path) else None
    if found is None:
        raise UserError(f"{path}: neither a run directory with checkpoints, a checkpoint directory (with model.pt), "
                        "nor a transformers model directory (with config.json)")
    return found


def model_config(ckpt_dir: str):
    """The ModelConfig of a resolved checkpoint or transformers directory."""
    from . import hf
    from .config import config_from_yaml

    if hf.is_hf_dir(ckpt_dir):
        return hf.model_config(ckpt_dir)
    return config_from_yaml(os.path.join(ckpt_dir, "config.yaml")).model


def weights_fingerprint(ckpt_dir: str) -> str:
    """A short hash that changes whenever the weights of a resolved directory do (names cached results)."""
    from . import hf

    files = hf.weight_files(ckpt_dir) if hf.is_hf_dir(ckpt_dir) else [model_file(ckpt_dir)]
    digests = "".join(file_sha256(f) for f in files)
    return hashlib.sha256(digests.encode()).hexdigest()[:16] if len(files) > 1 else digests[:16]


def _load(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: missing") from None
    except Exception as e:
        raise UserError(f"{path}: unreadable checkpoint file ({str(e).splitlines()[0]})") from None


def model_file(ckpt_dir: str) -> str:
    """ckpt_dir/model.pt; a DeepSpeed checkpoint's is consolidated into a plain fp32 state dict on first use.
    The conversion is written under a name of this process's own and renamed: several processes (the ranks of
    a job, two jobs) converting at once each produce the same file, and none ever sees a half-written one."""
    from .deepspeed_backend import consolidated_state_dict, is_deepspeed_checkpoint

    path = os.path.join(ckpt_dir, "model.pt")
    if not os.path.isfile(path) and is_deepspeed_checkpoint(ckpt_dir):
        state = consolidated_state_dict(ckpt_dir)
        write_then_rename(path, lambda tmp: _save_file(state, tmp))
    return path


def load_weights(ckpt_dir: str, model: torch.nn.Module) -> None:
    """The weights of a checkpoint (DeepSpeed's consolidated) or of a transformers directory."""
    from . import hf

    if hf.is_hf_dir(ckpt_dir):
        model.load_state_dict(hf.load_state_dict(ckpt_dir, model.cfg))
        return
    path = model_file(ckpt_dir)
    state = _load(path)
    if lora.is_adapted_state(state) and not lora.has_adapters(model):  # a LoRA run's checkpoint into a plain model
        from .config import config_from_yaml

        lora.load_merged(model, state, config_from_yaml(os.path.join(ckpt_dir, "config.yaml")).lora, path)
        return
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{ckpt_dir}/model.pt does not fit this model (missing: {missing[:3]}, unexpected: {unexpected[:3]})")


def load(ckpt_dir: str, model: torch.nn.Module, optimizer, env: D.DistEnv, state: TrainState, seed: int,
         engine=None, engine_dir: str | None = None) -> None:
    """Restore model and optimizer, and this rank's RNG states: those it saved when the run had as many
    processes as now; otherwise every rank's are derived from (seed, rank, step), never copied from another
    rank. engine_dir: where the DeepSpeed engine loads from (its universal conversion, on another world size)."""
    if engine is not None:
        from .deepspeed_backend import load as deepspeed_load

        deepspeed_load(engine, engine_dir or ckpt_dir, universal=engine_dir is not None)
    else:
        load_weights(ckpt_dir, model)
        optimizer.load_state_dict(_load(os.path.join(ckpt_dir, "optimizer.pt")))
    rng_path = os.path.join(ckpt_dir, f"rng-rank{env.rank}.pt")
    if state.world_size == env.world_size and os.path.isfile(rng_path):
        set_rng_state(_load(rng_path))
    else:
        seed_rng(derived_seed(seed, env.rank, state.step))


def derived_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0] >> 1)


def seed_rng(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pin(init_dir: str, dest: str) -> str:
    """A copy of a starting checkpoint's weights that no later change of its run can touch (a newer checkpoint,
    pruning): hard links where the filesystem allows (no space used; the SFT run only ever adds and deletes
    whole files), else copies. Holds what load_weights and weights_fingerprint read. Returns dest."""
    from . import hf

    if hf.is_hf_dir(init_dir):
        names = [hf.CONFIG, *(os.path.basename(f) for f in hf.weight_files(init_dir))]
        names += [n for n in os.listdir(init_dir) if n.endswith(".index.json")]
    else:
        model_file(init_dir)
        names = ["model.pt", "config.yaml"]
    tmp = dest + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name in names:
        src, dst = os.path.join(init_dir, name), os.path.join(tmp, name)
        try:
            os.link(src, dst)
        except OSError:
            copy_durably(src, dst)
    fsync_path(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    fsync_path(os.path.dirname(os.path.abspath(dest)))
    return dest
