"""Run a training stage with test hooks (training.run.hooks.Hooks), as a script of its own or torchrun's:

    python tests/hooked_run.py HOOKS pretrain --config ... [overrides]

HOOKS is a comma-separated list ('-' for none):
  nan@3+4      the loss is NaN at steps 3 and 4 (steps counted from 1, as in metrics.jsonl)
  stop@5       SIGTERM to this process while step 5 runs, as a preemption notice: the loop finishes the step,
               checkpoints and exits 143
  picks=FILE   each rank appends {"step", "rank", "micro", "picks"} lines to FILE.rank-R.jsonl
  die-in-save@4  kill -9 of every rank while it writes the checkpoint of step 4: after its backend wrote the
               model and optimizer into step-4.tmp, before the checkpoint is complete (train.async_checkpoint: in
               the thread that writes it, while the loop trains the next steps)
  compiled=FILE  train.compile's blocks traced by aot_eager (forward and backward as inductor traces them, without
               its code generation); each rank writes to FILE.rank-R.json how many compiled block forwards each
               step ran (evaluation and sampling count to the step they follow)
  reads=FILE   each rank writes to FILE.rank-R.json what it read back from the device at each step (HostReads),
               with fused AdamW as on a GPU (its update skips a non-finite step on the device by itself)
"""

import atexit
import json
import os
import signal
import sys

import torch

from training.cli import stage_main
from training.models.transformer import Transformer
from training.parallel.backends import BACKENDS
from training.parallel.env import ranks_from_env
from training.run.hooks import Hooks
from training.stages.registry import STAGES


class HostReads(torch.overrides.TorchFunctionMode):
    """Counts, per step of a run, what would make the host wait for a GPU: a tensor's value read into Python
    (item, float, int, bool, tolist) and the operations whose result's size depends on values (nonzero,
    indexing by a boolean mask). A CPU run has no GPU to wait for; the same calls are what would. A stage's
    units() are left out: counted from the batch before it moves to the device."""
    READS = {"item", "__float__", "__int__", "__bool__", "__index__", "__format__", "__array__", "tolist", "numpy",
             "cpu", "nonzero"}

    def __init__(self):
        super().__init__()
        self.step, self.paused, self.reads = 0, False, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        masked = name == "__getitem__" and any(isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in args[1:])
        if not self.paused and (name in self.READS or masked):
            self.reads.setdefault(self.step, []).append(name)
        return func(*args, **(kwargs or {}))

    def host_units(self, units):
        def counted_on_the_host(stage, batch):
            self.paused = True
            try:
                return units(stage, batch)
            finally:
                self.paused = False
        return counted_on_the_host


class FusedAdamW(torch.optim.AdamW):
    """AdamW as a GPU run makes it, whatever the device: fused (one kernel, which skips a non-finite update
    itself). Set in place of torch.optim.AdamW, so that older training code (bench/host_reads.py --tree) takes it
    too."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "fused": True})


def die_if_writing(directory: str, step: int) -> None:
    if os.path.basename(directory.rstrip("/")) == f"step-{step}.tmp":
        os.kill(os.getpid(), signal.SIGKILL)


def dying_in_save(save, step: int):
    def save_then_die(self, directory):
        written = save(self, directory)
        die_if_writing(directory, step)
        return written
    return save_then_die


def dying_in_background_save(start_save, step: int):
    def start_save_then_die(self, directory, group):
        wait = start_save(self, directory, group)

        def wait_then_die():
            written = wait()
            die_if_writing(directory, step)
            return written
        return wait_then_die
    return start_save_then_die


class CompiledCalls:
    """train.compile's blocks through aot_eager, each call of a compiled graph counted to the step running."""

    def __init__(self, file: str):
        self.file, self.step, self.calls = file, 0, {}

    def backend(self, graph, inputs):
        compiled = torch._dynamo.lookup_backend("aot_eager")(graph, inputs)

        def counted(*args):
            self.calls[self.step] = self.calls.get(self.step, 0) + 1
            return compiled(*args)
        return counted

    def install(self) -> None:
        compile_blocks = Transformer.compile_blocks
        Transformer.compile_blocks = lambda model: compile_blocks(model, backend=self.backend)
        atexit.register(self.write)

    def write(self) -> None:
        with open(self.file, "w") as f:
            json.dump(self.calls, f)


class TestHooks(Hooks):
    def __init__(self, spec: str):
        self.nan, self.stop, self.picks_file, self.reads_file, self.reads = set(), None, None, None, None
        self.die_in_save = self.compiled = None
        for item in filter(None, spec.split(",")):
            if item.startswith("nan@"):
                self.nan = {int(s) for s in item[4:].split("+")}
            elif item.startswith("stop@"):
                self.stop = int(item[5:])
            elif item.startswith("picks="):
                self.picks_file = f"{item[6:]}.rank-{ranks_from_env()[0]}.jsonl"
            elif item.startswith("die-in-save@"):
                self.die_in_save = int(item[len("die-in-save@"):])
            elif item.startswith("compiled="):
                self.compiled = CompiledCalls(f"{item[9:]}.rank-{ranks_from_env()[0]}.json")
            elif item.startswith("reads="):
                self.reads_file, self.reads = f"{item[6:]}.rank-{ranks_from_env()[0]}.json", HostReads()
            elif item != "-":
                raise SystemExit(f"unknown hook {item!r}")

    def on_picks(self, step, micro, picks):
        if self.reads:
            self.reads.step = step
        if self.compiled:
            self.compiled.step = step
        if self.picks_file:
            with open(self.picks_file, "a") as f:
                f.write(json.dumps({"step": step, "rank": ranks_from_env()[0], "micro": micro, "picks": picks}) + "\n")
        if step == self.stop and micro == 0:
            os.kill(os.getpid(), signal.SIGTERM)

    def loss(self, step, loss):
        return loss * float("nan") if step in self.nan else loss


    def run(self, stage: str, argv: list[str]) -> int:
        if self.die_in_save:
            for backend in set(BACKENDS.values()):
                backend.save = dying_in_save(backend.save, self.die_in_save)
                backend.start_save = dying_in_background_save(backend.start_save, self.die_in_save)
        if self.compiled:
            self.compiled.install()
        if not self.reads:
            return stage_main(stage, argv, hooks=self)
        torch.optim.AdamW = FusedAdamW
        for cls in {c for stage in STAGES.values() for c in stage.__mro__ if "units" in vars(c)}:
            cls.units = self.reads.host_units(cls.units)
        atexit.register(self.write_reads)  # a run on several processes ends in exit_process, which runs atexit's
        with self.reads:
            return stage_main(stage, argv, hooks=self)

    def write_reads(self) -> None:
        with open(self.reads_file, "w") as f:
            json.dump(self.reads.reads, f)


if __name__ == "__main__":
    sys.exit(TestHooks(sys.argv[1]).run(sys.argv[2], sys.argv[3:]))
