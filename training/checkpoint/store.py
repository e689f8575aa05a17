"""The checkpoint store: out_dir/checkpoints/step-N/ directories, written atomically, checksummed, with a `latest`
pointer and pruning; finding the newest intact one.

A checkpoint is written into step-N.tmp/: each rank its RNG state and what its backend writes (the model and
optimizer, whole or in shards), every file fsynced by the rank that wrote it; rank 0 the train state
(state.json), the resolved config and the tokenizer. Then a checksums.json (size and sha256 of every file, the
ranks hashing in parallel), the rename, and only then does `latest` move and are old checkpoints pruned: a crash
at any moment leaves the previous checkpoint in charge. Before a resume the checksums are checked; a damaged
checkpoint (a flipped byte, a file cut short or lost, no checksums.json) is moved aside to step-N.damaged with a
warning naming it, and the newest intact one is used. Everything is loaded with torch.load(weights_only=True).

The store never names a backend: it asks the run's backend to save into a directory and fsyncs what it wrote.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import shutil
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from preprocess.errors import UserError, naming
from preprocess.fileio import atomic_write, copy_durably, file_sha256, fsync_path
from preprocess.tokenizer import tokenizer_files

from ..parallel import env as D
from .state import STATE, TrainState

LATEST = "latest"
MODEL = "model.pt"  # plain fp32 weights: what a one-file checkpoint holds and what a sharded one consolidates to
CHECKSUMS = "checksums.json"
STEP_DIR = re.compile(r"^step-(\d+)$")
# step-N.<name>: what a backend derived from checkpoint step-N and keeps beside it (DeepSpeed's conversion for
# another number of processes); it goes when step-N is pruned or saved again. Not step-N.tmp or step-N.damaged
COMPANION = re.compile(r"^(step-\d+)\.(?!tmp$|damaged)[a-z]+$")


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


def save_file(obj, path: str) -> None:
    """torch.save to `path`, fsynced; a full disk is an OSError naming the file."""
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


def write_failure(e: BaseException, directory: str, needed: int) -> OSError | None:
    """What a library's failed checkpoint write stands for, as an OSError naming `directory`: its own OSError, or
    torch.save's RuntimeError for a failed write (its errno lost; a full disk among them), told by the space left:
    ENOSPC when under `needed` bytes are free there, else EIO. None: `e` is no failed write."""
    if isinstance(e, OSError):
        return OSError(e.errno, e.strerror, directory)
    if not isinstance(e, RuntimeError) or not any(m in str(e) for m in ("write", "unexpected pos", "cannot be opened")):
        return None
    if shutil.disk_usage(directory).free < needed:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), directory)
    return OSError(errno.EIO, f"the checkpoint could not be written ({str(e).splitlines()[0][:120]})", directory)


def fit(model: torch.nn.Module, state: dict, where: str) -> None:
    """Load a state dict that must fit the model exactly; one that does not is one line naming where it came from."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{where} does not fit this model (missing: {missing[:3]}, unexpected: {unexpected[:3]})")


def load_file(path: str, mmap: bool = False):
    """torch.load(weights_only=True) of a checkpoint file; a missing or unreadable one is one line naming it. mmap:
    its tensors memory-mapped, each read from the file only where it is used."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise UserError(f"{path}: missing") from None
    except Exception as e:
        raise UserError(f"{path}: unreadable checkpoint file ({str(e).splitlines()[0]})") from None


def save(env: D.DistEnv, out_dir: str, state: TrainState, backend, config_yaml: str, tokenizer_path: str, keep: int,
         rank_files=None, background: Background | None = None) -> str | Future:
    """Every rank calls this. `backend.save(tmp)` writes the model and optimizer and returns the files this rank
    wrote, which it fsyncs (on its own machine: another's fsync would not flush this one's cache); rank_files(tmp)
    writes this rank's own files (its RNG state) and returns them. Rank 0 writes the shared files. Returns the
    checkpoint's directory once it is in charge.

    background (train.async_checkpoint): the backend only copies its state here (start_save); its writing and the
    rest (fsyncs, checksums, the rename, `latest`, pruning) go on in background's thread, their collectives on its
    group. Returns the Future of the directory."""
    root, name = checkpoints_dir(out_dir), f"step-{state.step}"  # the state moves on while a background write goes on
    final = os.path.join(root, name)
    tmp = final + ".tmp"
    group = background.group if background else None
    backend_files = []  # this rank's wait for what the backend wrote

    def make_tmp() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)

    def start_share() -> None:
        try:
            own, held = rank_files(tmp) if rank_files else [], None
        except OSError as e:  # raised once the backend's save started: its collectives run on every rank
            own, held = [], e
        if background is None:
            written = backend.save(tmp)
            backend_files.append(lambda: written)
        else:
            backend_files.append(backend.start_save(tmp, group))
        if held is not None:
            raise held
        for path in own:
            fsync_path(path)
        if env.is_main:
            for path in tokenizer_files(tokenizer_path):
                copy_durably(path, os.path.join(tmp, os.path.basename(path)))
            atomic_write(os.path.join(tmp, "config.yaml"), config_yaml.encode())
            atomic_write(os.path.join(tmp, STATE), state.save_json())

    def put_in_charge(checksums: dict) -> None:
        _write_checksums(tmp, checksums)
        if os.path.exists(final):  # this step was saved before, by a run that then lost its later steps
            shutil.rmtree(final)
        remove_companions(root, name)  # derived from that earlier save
        os.replace(tmp, final)
        atomic_write(os.path.join(root, LATEST), f"{name}\n".encode())
        fsync_path(root)
        _prune(root, keep)

    def finish() -> str:
        """Every rank's share written and fsynced, then the checksums and rank 0's rename: in charge."""
        try:
            D.on_every_rank(env, lambda: [fsync_path(path) for path in backend_files[0]()] and None, group)
            checksums = {k: v for part in D.on_every_rank(env, lambda: _hash_share(tmp, env), group)
                         for k, v in part.items()}
            if background is None:
                D.from_rank0(env, lambda: put_in_charge(checksums))
            else:  # from_rank0's calls are counted in the order the loop's thread makes them: not from this one
                D.on_every_rank(env, lambda: put_in_charge(checksums) if env.is_main else None, group)
        except Exception:  # the previous checkpoint stays in charge, and this one's space is given back
            if env.is_main:
                discard(tmp)
            raise
        D.barrier(env, group)
        return final

    D.from_rank0(env, make_tmp)
    try:  # a full disk on any rank stops every rank with its line, once all have stopped writing
        D.on_every_rank(env, start_share)
    except Exception:
        if backend_files and background is not None:  # what the backend still writes into tmp
            with contextlib.suppress(Exception):
                backend_files[0]()
        if env.is_main:
            discard(tmp)
        raise
    if background is None:
        return finish()
    return background.writer.submit(finish)


class Background:
    """The thread that writes checkpoints while training goes on (train.async_checkpoint), one at a time, and the
    gloo group of its collectives: its own, which the training's never meet. They wait up to PATIENCE, as the
    store's ranks wait for rank 0 in the loop's thread (from_rank0): rank 0 may take long to prune, and what waits
    is not the training."""

    def __init__(self):
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self.group = D.gloo_group("checkpoints written while training goes on", D.PATIENCE)

    def close(self) -> None:
        self.writer.shutdown()
        if self.group is not None:
            torch.distributed.destroy_process_group(self.group)


class Checkpoints:
    """Where a run's checkpoints go: out_dir/checkpoints. save() writes one in the loop's thread, in charge when it
    returns; in_background (train.async_checkpoint): it returns once the backend has copied its state, and the
    checkpoint is written while the next steps train — one at a time (the next save waits for the one in
    flight), `latest` only once it is complete. A failed write in the background stops the run at the next save
    or at its end (wait)."""

    def __init__(self, env: D.DistEnv, out_dir: str, backend, config_yaml: str, tokenizer_path: str, keep: int,
                 rank_files, in_background: bool):
        self.env, self.out_dir, self.backend, self.config_yaml = env, out_dir, backend, config_yaml
        self.tokenizer_path, self.keep, self.rank_files = tokenizer_path, keep, rank_files
        self.in_background, self.background = in_background, None
        self.pending: Future | None = None

    def save(self, state: TrainState, complete: bool = False) -> None:
        """complete: return only once the checkpoint is in charge (the run's last)."""
        self.wait()
        if self.in_background and self.background is None:  # at the first save, which every rank reaches
            self.background = Background()
        written = save(self.env, self.out_dir, state, self.backend, self.config_yaml, self.tokenizer_path, self.keep,
                       self.rank_files, self.background)
        self.pending = written if self.background else None
        if complete:
            self.wait()

    def wait(self) -> None:
        """Until the checkpoint in flight, if any, is in charge; its failure raised here."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """At the run's end however it ended, before out_dir's lock is released: the checkpoint in flight written
        (a failure only said: the run is ending with an error of its own), the thread ended."""
        try:
            self.wait()
        except Exception as e:
            if self.env.is_main:
                print(f"warning: the checkpoint written in the background was not completed ({D.first_line(e)}); "
                      f"the previous one stays in charge", file=sys.stderr, flush=True)
        finally:
            if self.background is not None:
                self.background.close()
                self.background = None


def discard(tmp: str, patience_s: float = 10.0) -> None:
    """Remove a half-written checkpoint directory (rank 0, once every rank has stopped writing into it); a file
    system that still lists a file another node just removed can make one pass leave the directory behind."""
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
    """{file: {size, sha256}} of this rank's share of the files in ckpt_dir (every world_size-th)."""
    mine = {}
    for f in _files(ckpt_dir)[env.rank::env.world_size]:
        path = os.path.join(ckpt_dir, f)
        mine[f] = {"size": os.path.getsize(path), "sha256": file_sha256(path)}
    return mine


def damage(ckpt_dir: str, rank: int = 0, world: int = 1, sizes_only: bool = False) -> list[str]:
    """What is wrong with this rank's share of a checkpoint's files, per its checksums.json (empty: intact).
    Every checkpoint is written with one, so one without it is not trusted. sizes_only: a cheap look (sizes,
    not sha256) for a reader that only describes."""
    if not os.path.isfile(os.path.join(ckpt_dir, STATE)):
        return [f"{STATE} is missing"]
    return checksum_problems(ckpt_dir, rank, world, sizes_only)


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
        remove_companions(root, name)


def remove_companions(root: str, name: str) -> None:
    for other in os.listdir(root):
        match = COMPANION.match(other)
        if match and match.group(1) == name:
            shutil.rmtree(os.path.join(root, other), ignore_errors=True)


def _step_dirs(root: str) -> list[str]:
    """Complete checkpoint directories, newest first."""
    names = [n for n in (os.listdir(root) if os.path.isdir(root) else []) if STEP_DIR.match(n)]
    return sorted(names, key=lambda n: int(STEP_DIR.match(n).group(1)), reverse=True)


def latest(out_dir: str, env: D.DistEnv | None = None, sizes_only: bool = False) -> str | None:
    """The checkpoint directory to resume from: the newest intact one, or None for a fresh run. The training run
    passes env: its ranks check the checksums in parallel, and damaged checkpoints are moved aside to
    step-N.damaged (kept for inspection, out of the way of the step that will be saved again). Readers of a run
    (generate, init_from) pass none and move nothing; sizes_only checks the files' sizes, not their sha256."""
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
        problems = damage(path, env.rank, env.world_size, sizes_only)
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
