"""The batch plan: how one optimizer step's global batch is split into micro-batches and ranks, and where in
the global sample order a step starts. The one place that knows micro-batch x accumulation x processes.

The data position of a run is the number of samples consumed so far (not step x today's world size), so a
run resumed on another number of processes, or with another global batch, continues with the next unread
sample of the global order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BatchPlan:
    micro_batch: int
    grad_accum: int
    world: int
    rank: int = 0

    @classmethod
    def of(cls, train_cfg, world: int = 1, rank: int = 0) -> BatchPlan:
        return cls(train_cfg.micro_batch_size, train_cfg.grad_accum, world, rank)

    @property
    def global_batch(self) -> int:
        """Samples (or examples, or pairs) per optimizer step, over every rank and micro-step."""
        return self.micro_batch * self.grad_accum * self.world

    def micro_indices(self, consumed: int, micro: int) -> np.ndarray:
        """Global order positions of this rank's micro-step `micro` of the step that starts at `consumed`:
        every step reads the next global_batch positions; micro-step m of rank r takes a contiguous slice."""
        first = consumed + (micro * self.world + self.rank) * self.micro_batch
        return np.arange(first, first + self.micro_batch)

    def share(self, items: list) -> list[list]:
        """This rank's share of `items` (every world-th) as micro-batches, padded with empty micro-batches to
        the count of the rank with the most: every rank runs the same number of forwards (a sharded model
        gathers its weights in every forward, and waits for every rank to do the same)."""
        mine = items[self.rank::self.world]
        most = -(-len(items[0::self.world]) // self.micro_batch) if items else 0
        batches = [mine[i:i + self.micro_batch] for i in range(0, len(mine), self.micro_batch)]
        return batches + [[] for _ in range(most - len(batches))]

    def deepspeed_batch(self) -> dict:
        return {"train_micro_batch_size_per_gpu": self.micro_batch, "gradient_accumulation_steps": self.grad_accum,
                "train_batch_size": self.global_batch}

    def describe(self, seq_len: int, unit: str) -> str:
        return (f"batch: {self.micro_batch} {unit} (≤ {seq_len} tokens each) per micro-step x {self.grad_accum} "
                f"micro-steps x {self.world} process{'es' if self.world != 1 else ''} = {self.global_batch:,} {unit} "
                f"per optimizer step")
