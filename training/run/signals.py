"""Stopping at a step boundary: SIGTERM and SIGUSR1 (Slurm's notice before a time limit or preemption) only set a
flag; the loop acts on it once every rank has agreed, so no rank is left waiting in a collective."""

from __future__ import annotations

import signal

from ..parallel import env as D


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

    def agreed(self, env: D.DistEnv) -> int:
        """The signal any rank has received by now (0: none), on every rank: each rank's flags (one 0/1 per
        signal) summed over the ranks on the host."""
        sums = D.host_sums(env, [int(self.signum == s) for s in self.SIGNALS])
        return next((int(s) for s, n in zip(self.SIGNALS, sums, strict=True) if n), 0)

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
