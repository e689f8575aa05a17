"""Stopping at a step boundary: SIGTERM and SIGUSR1 (Slurm's notice before a time limit or preemption) only set a
flag; the loop acts on it once every rank has agreed, so no rank is left waiting in a collective."""

from __future__ import annotations

import signal

import torch

from ..parallel.env import DistEnv


class Stopped(Exception):
    """A stop requested by a signal (preemption notice, scancel, kill): a checkpoint of `step` was written, unless
    the run saves none (saved=False)."""

    def __init__(self, signum: int, step: int, saved: bool = True):
        then = ("checkpoint saved; run the same command again to resume" if saved else
                "this run saves no checkpoint; the same command starts it again from the beginning")
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}: {then}")
        self.signum, self.step = signum, step


class StopSignal:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signum = 0
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def agreed(self, env: DistEnv) -> int:
        """The signal any rank received (0: none), on every rank."""
        if not env.distributed:
            return self.signum
        flag = torch.tensor(self.signum, device=env.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag)

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
