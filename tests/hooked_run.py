"""Run a training stage with test hooks (training.run.hooks.Hooks), as a script of its own or torchrun's:

    python tests/hooked_run.py HOOKS pretrain --config ... [overrides]

HOOKS is a comma-separated list ('-' for none):
  nan@3+4      the loss is NaN at steps 3 and 4 (steps counted from 1, as in metrics.jsonl)
  stop@5       SIGTERM to this process while step 5 runs, as a preemption notice: the loop finishes the step,
               checkpoints and exits 143
  picks=FILE   each rank appends {"step", "rank", "micro", "picks"} lines to FILE.rank-R.jsonl
"""

import json
import os
import signal
import sys

from training.cli import stage_main
from training.parallel.env import ranks_from_env
from training.run.hooks import Hooks


class TestHooks(Hooks):
    def __init__(self, spec: str):
        self.nan, self.stop, self.picks_file = set(), None, None
        for item in filter(None, spec.split(",")):
            if item.startswith("nan@"):
                self.nan = {int(s) for s in item[4:].split("+")}
            elif item.startswith("stop@"):
                self.stop = int(item[5:])
            elif item.startswith("picks="):
                self.picks_file = f"{item[6:]}.rank-{ranks_from_env()[0]}.jsonl"
            elif item != "-":
                raise SystemExit(f"unknown hook {item!r}")

    def on_picks(self, step, micro, picks):
        if self.picks_file:
            with open(self.picks_file, "a") as f:
                f.write(json.dumps({"step": step, "rank": ranks_from_env()[0], "micro": micro, "picks": picks}) + "\n")
        if step == self.stop and micro == 0:
            os.kill(os.getpid(), signal.SIGTERM)

    def loss(self, step, loss):
        return loss * float("nan") if step in self.nan else loss


if __name__ == "__main__":
    sys.exit(stage_main(sys.argv[2], sys.argv[3:], hooks=TestHooks(sys.argv[1])))
