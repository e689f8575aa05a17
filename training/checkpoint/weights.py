"""Weights to start from or to read: a run directory (its newest intact checkpoint), a checkpoint directory or a
transformers directory, resolved to the directory to load from; its model config, a fingerprint of its weights,
the weights themselves as plain fp32 tensors (a sharded checkpoint consolidated by the backend that wrote it, once,
into model.pt), and a pinned copy that no later change of its run can touch (the preference stages' reference).

Readers (generate, sample, export, init_from) never move or write anything but the consolidated model.pt.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil

import torch

from preprocess.errors import UserError
from preprocess.fileio import copy_durably, file_sha256, fsync_path, write_then_rename
from preprocess.tokenizer import TextTokenizer, tokenizer_file

from ..config import config_from_yaml
from ..models import hf, lora
from ..models.storage import held, write
from ..models.transformer import ModelConfig, Transformer
from ..parallel.backends import consolidated_state_dict
from .rng import seed_rng
from .state import STATE
from .store import MODEL, damage, fit, latest, load_file, save_file


def files_stamp(path: str) -> tuple:
    """Every file below `path` (through linked directories: checkpoints/ on a scratch disk) by name, inode, size,
    modification and change time: what an answer about the directory depends on (a newer checkpoint, a pruned,
    re-saved, rewritten or restored one all change it)."""
    found = []
    for parent, _, names in os.walk(path, followlinks=True):
        for name in names:
            with contextlib.suppress(FileNotFoundError):  # a file a running job just replaced
                st = os.stat(os.path.join(parent, name))
                found.append((os.path.relpath(os.path.join(parent, name), path), st.st_ino, st.st_size,
                              st.st_mtime_ns, st.st_ctime_ns))
    return tuple(sorted(found))


def unchanged_since(function):
    """function(path, ...) answered again only when a file below `path` changed since it last answered: a
    long-lived process (training.lr_find's runs, training.sample's ranks) hashes a checkpoint once, and sees a
    newer one as soon as its run writes it."""
    answers: dict = {}

    @functools.wraps(function)
    def cached(path: str, *args, **kwargs):
        key, stamp = (os.path.abspath(path), args, tuple(sorted(kwargs.items()))), files_stamp(path)
        if key in answers and answers[key][0] == stamp:
            return answers[key][1]
        answer = function(path, *args, **kwargs)
        answers[key] = (stamp, answer)  # the stamp from before: a change while it answered is seen next time
        return answer

    return cached


@unchanged_since
def resolve(path: str, sizes_only: bool = False) -> str:
    """A run directory (its newest intact checkpoint), a checkpoint directory, or a transformers directory
    (config.json + safetensors, e.g. one written by training.export_hf) → the directory to load from.
    sizes_only: checked by its files' sizes, not sha256."""
    if hf.is_hf_dir(path):
        return path
    if os.path.isfile(os.path.join(path, MODEL)) or os.path.isfile(os.path.join(path, STATE)):
        problems = damage(path, sizes_only=sizes_only)
        if problems:
            raise UserError(f"{path}: damaged checkpoint ({'; '.join(problems[:3])})")
        return path
    found = latest(path, sizes_only=sizes_only) if os.path.isdir(path) else None
    if found is None:
        raise UserError(f"{path}: neither a run directory with checkpoints, a checkpoint directory (with model.pt), "
                        "nor a transformers model directory (with config.json)")
    return found


def model_config(ckpt_dir: str) -> ModelConfig:
    """The ModelConfig of a resolved checkpoint or transformers directory."""
    if hf.is_hf_dir(ckpt_dir):
        return hf.model_config(ckpt_dir)
    return config_from_yaml(os.path.join(ckpt_dir, "config.yaml")).model


@unchanged_since
def weights_fingerprint(ckpt_dir: str) -> str:
    """A short hash that changes whenever the weights of a resolved directory do (names cached results)."""
    files = hf.weight_files(ckpt_dir) if hf.is_hf_dir(ckpt_dir) else [model_file(ckpt_dir)]
    digests = "".join(file_sha256(f) for f in files)
    return hashlib.sha256(digests.encode()).hexdigest()[:16] if len(files) > 1 else digests[:16]


def model_file(ckpt_dir: str) -> str:
    """ckpt_dir/model.pt; a sharded checkpoint's is consolidated into a plain fp32 state dict on first use, by the
    backend that wrote it. The conversion is written under a name of this process's own and renamed: several
    processes (the ranks of a job, two jobs) converting at once each produce the same file, and none ever sees a
    half-written one."""
    path = os.path.join(ckpt_dir, MODEL)
    if not os.path.isfile(path):
        state = consolidated_state_dict(ckpt_dir)
        if state is not None:
            write_then_rename(path, lambda tmp: save_file(state, tmp))
    return path


def load_weights(ckpt_dir: str, model: torch.nn.Module) -> None:
    """The weights of a checkpoint (consolidated) or of a transformers directory (tensor by tensor)."""
    if hf.is_hf_dir(ckpt_dir):
        hf.load_into(ckpt_dir, model)
        return
    path = model_file(ckpt_dir)
    state = load_file(path)
    if lora.is_adapted_state(state) and not lora.has_adapters(model):  # a LoRA run's checkpoint into a plain model
        lora.load_merged(model, state, config_from_yaml(os.path.join(ckpt_dir, "config.yaml")).lora, path)
        return
    fit(model, state, path)


def loaded_model(ckpt_dir: str, cfg: ModelConfig | None = None, device="cpu", dtype=None) -> Transformer:
    """A model holding the weights of a resolved directory, built on the meta device and filled on `device` (its
    parameters in `dtype`, default fp32): no random initialisation, and from a transformers directory no second
    copy of the weights (our own checkpoints are read whole, then copied in). cfg: the model's config (default: the
    directory's)."""
    with torch.device("meta"):
        model = Transformer(cfg or model_config(ckpt_dir))
    model.materialize(device, dtype)
    load_weights(ckpt_dir, model)
    return model


@torch.no_grad()
def fill(model: Transformer, weights: str | None, seed: int, storage=None) -> None:
    """The starting values of a model built on the meta device and given storage as its backend holds it (whole,
    sharded or partitioned), each process writing only the elements it holds (storage: the backend's, see
    models/storage.py). The base weights come from `weights` (a transformers directory read in row blocks; a
    checkpoint of ours memory-mapped, so that only the pages of the rows held are read) or, without, are the random
    initialisation a whole model built after seed_rng(seed) gets, drawn again one parameter at a time; LoRA's
    adapters get lora.init_adapters'. Beside its own share a process holds at most one whole parameter; only a LoRA
    run's checkpoint, whose adapters are merged into the weights, is read whole."""
    base = {lora.base_name(name): p for name, p in model.named_parameters() if not lora.is_adapter(name)}
    stores = {name: held(p, storage) for name, p in base.items()}  # each with the whole parameter's shape
    if weights is None:
        seed_rng(seed)
        for name, store in stores.items():
            values = torch.empty(store[2])
            model.init_parameter(name, values)
            write(store, values)
    elif hf.is_hf_dir(weights):
        hf.load_into(weights, model, storage, base)
    else:
        path = model_file(weights)
        state = load_file(path, mmap=True)
        if lora.is_adapted_state(state):
            state = loaded_model(weights, model.cfg).state_dict()
        tied = {"output.weight"} if model.cfg.tie_embeddings else set()
        missing, unexpected = sorted(set(base) - set(state)), sorted(set(state) - set(base) - tied)
        if missing or unexpected:
            raise UserError(f"{path} does not fit this model (missing: {missing[:3]}, unexpected: {unexpected[:3]})")
        for name, store in stores.items():
            if tuple(state[name].shape) != store[2]:
                raise UserError(f"{path}: tensor {name!r} has shape {list(state[name].shape)}, this model's is "
                                f"{list(store[2])}")
            write(store, state[name])
    lora.init_adapters(model, seed, storage)


def starting_model(weights: str | None, cfg: ModelConfig, backend, seed: int = 0, adapt=None) -> Transformer:
    """The model a fresh run starts from, held as `backend` holds it (built on the meta device; ZeRO-3: partitioned as
    it is made; FSDP2: sharded), each process filling in only what it holds (fill): the weights of `weights`, or
    without them the random initialisation of `seed`. adapt(model): what changes the model's modules before it is
    filled (LoRA's adapters)."""
    return backend.initial_model(lambda: Transformer(cfg), adapt or (lambda model: None),
                                 lambda model, storage: fill(model, weights, seed, storage))


def load_for_inference(checkpoint: str, device: str = "auto") -> tuple[Transformer, TextTokenizer]:
    """(model in eval mode, its tokenizer) from a run, a checkpoint or a transformers directory."""
    ckpt_dir = resolve(checkpoint)
    model = loaded_model(ckpt_dir)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device)
    path = tokenizer_file(ckpt_dir)
    if path is None:
        raise UserError(f"{ckpt_dir}: has no tokenizer.model or tokenizer.json")
    return model.to(dev).eval(), TextTokenizer(path)


def pin(init_dir: str, dest: str) -> str:
    """A copy of a starting checkpoint's weights that no later change of its run can touch (a newer checkpoint,
    pruning): hard links where the filesystem allows (no space used; the SFT run only ever adds and deletes
    whole files), else copies. Holds what load_weights and weights_fingerprint read. Returns dest."""
    if hf.is_hf_dir(init_dir):
        names = [hf.CONFIG, *(os.path.basename(f) for f in hf.weight_files(init_dir))]
        names += [n for n in os.listdir(init_dir) if n.endswith(".index.json")]
    else:
        model_file(init_dir)
        names = [MODEL, "config.yaml"]
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
