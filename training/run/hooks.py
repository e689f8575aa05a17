"""Where a test or a tool watches or changes a run without patching the loop (see tests/hooked_run.py)."""

from __future__ import annotations

import torch


class Hooks:
    def on_picks(self, step: int, micro: int, picks: list[tuple[int, int]]) -> None:
        """The (source, sample) entries this rank reads for micro-step `micro` of step `step` (counted from 1)."""

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """A micro-batch's loss at step `step` (counted from 1), before the backward."""
        return loss
