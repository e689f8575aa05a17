"""This rank's micro-batches of a step, read one step ahead: while step t computes, a thread assembles step t+1's
batches (memory-mapped reads, collation) and, for a GPU, copies them into pinned memory, whose copies to the
device then overlap with compute (Batch.to copies with non_blocking).

The batches are the same, in the same order, as reading them at the step: the data of a step is a function of
the samples consumed before it (data/order.py), the thread reads the one step the loop will ask for next, and a
step asked for that it did not read (the run's first, a resume's) is read then. One thread, one step ahead: the
packing plan (data/packing.py), whose windows are packed as rows are first asked for, is only ever called by one
thread at a time; `settle()` waits for the thread before anything else reads the data (evaluation, a checkpoint's
packing cursor)."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..data.batch import pinned


class StepReader:
    def __init__(self, data, grad_accum: int, device: torch.device, ahead: bool):
        self.data, self.grad_accum, self.pin = data, grad_accum, device.type == "cuda"
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="shardlm-data") if ahead else None
        self.pending: tuple[int, Future] | None = None

    def read(self, consumed: int) -> list[tuple[list, object]]:
        """(picks, batch) of every micro-step of the step that starts after `consumed` samples."""
        if self.pending is not None and self.pending[0] == consumed:
            steps = self.pending[1].result()
            self.pending = None
            return steps
        self.settle()
        return self._read(consumed)

    def read_ahead(self, consumed: int) -> None:
        """Start reading the step that starts after `consumed` samples (the next one the loop will ask for)."""
        if self.pool is not None:
            self.settle()
            self.pending = (consumed, self.pool.submit(self._read, consumed))

    def settle(self) -> None:
        """Wait for a read in progress (its result is kept for the step that asks for it)."""
        if self.pending is not None:
            self.pending[1].exception()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = self.pending = None

    def _read(self, consumed: int) -> list[tuple[list, object]]:
        steps = [self.data.micro_batch(consumed, m) for m in range(self.grad_accum)]
        return [(picks, pinned(batch)) for picks, batch in steps] if self.pin else steps
