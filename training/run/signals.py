"""Stopping at a step boundary: SIGTERM and SIGUSR1 (Slurm's notice before a time limit or preemption) only set a
flag; the loop acts on it once every rank has agreed, so no rank is left waiting in a collective. With several
processes the flags travel with the step's counts (one host-side collective a step: flags()/agree()), so a signal
that arrives while a step computes is acted on at the end of the next one."""

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

    def flags(self) -> list[int]:
        """This rank's received signals, one 0/1 per SIGNALS entry: summed over the ranks, read by agree()."""
        return [int(self.signum == s) for s in self.SIGNALS]

    def agree(self, sums: list[float]) -> int:
        """The signal some rank had received (0: none) when the sums of flags() were taken."""
        return next((int(s) for s, n in zip(self.SIGNALS, sums, strict=True) if n), 0)

    def agreed(self, env: D.DistEnv) -> int:
        """The signal any rank has received by now (0: none), on every rank: a collective of its own."""
        return self.agree(D.host_sums(env, self.flags()))

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
