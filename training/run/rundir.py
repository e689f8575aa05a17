"""The run directory: one training run at a time (an exclusive lock held by rank 0), its config and tokenizer.

Two jobs training into one out_dir (an sbatch submitted twice, a requeued job overlapping the old one's last
minutes) would interleave metrics and write checkpoints of two trajectories. The lock is an flock on
out_dir/.lock, which the kernel releases when its holder dies (kill -9 included), so a dead run never blocks
the next; the file names the holder's host and pid for the message of whoever is refused.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys

from preprocess.errors import UserError, naming
from preprocess.fileio import copy_durably
from preprocess.tokenizer import tokenizer_files

from ..config import Config, save_config
from ..parallel import env as D
from .metrics import MetricsLog

LOCK = ".lock"


class RunDirLock:
    def __init__(self, out_dir: str):
        self.path = os.path.join(out_dir, LOCK)
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock; on failure, a description of the holder (None: taken)."""
        with naming(self.path):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            return holder
        except OSError as e:  # a filesystem without locks (Lustre mounted without flock): say so, train anyway
            if e.errno not in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL):
                raise
            os.close(fd)
            print(f"warning: {self.path}: this filesystem cannot lock files ({e.strerror}); nothing stops a second "
                  "job from training into the same out_dir", file=sys.stderr, flush=True)
            return None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()}, pid {os.getpid()}\n".encode(), 0)
        self.fd = fd
        return None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


def lock(out_dir: str, env: D.DistEnv) -> RunDirLock:
    """Rank 0 takes the run directory's lock; every rank learns whether it got it and stops together if not."""
    held = RunDirLock(out_dir)

    def take() -> str | None:
        with naming(out_dir):
            os.makedirs(out_dir, exist_ok=True)
        return held.acquire()

    holder = D.from_rank0(env, take)
    if holder is not None:
        raise UserError(f"{out_dir} is in use by another training run ({holder}); wait for it to end, or give this "
                        "run another out_dir")
    return held


def prepare(cfg: Config, tokenizer_path: str, step: int) -> None:
    """Rank 0: the resolved config and the tokenizer next to the checkpoints; metrics after `step` forgotten
    (a resumed run logs them again)."""
    save_config(cfg, os.path.join(cfg.out_dir, "config.yaml"))
    for path in tokenizer_files(tokenizer_path):  # a tokenizer.json travels with its tokenizer_config.json
        copy_durably(path, os.path.join(cfg.out_dir, os.path.basename(path)))
    MetricsLog.truncate(os.path.join(cfg.out_dir, "metrics.jsonl"), step)
