"""The command line of the stages (python -m training.<stage> --config FILE [key.sub=value ...]) and the rules every
training command ends by: a user mistake or the environment is one line, a stop signal exits 128 + its number, a
lost peer is one line instead of a C++ trace, and a process that used a process group ends without the
interpreter's teardown (parallel/env.py: exit_process)."""

from __future__ import annotations

import argparse
import sys

import torch.distributed as dist

from preprocess.errors import exit_code, held
from preprocess.ranks import ranks_from_env

from .config import load_config
from .parallel.env import run_command
from .run.loop import run
from .run.signals import Stopped
from .stages.registry import STAGES

# what gloo and NCCL say when a peer process is gone or a collective timed out
COMMUNICATION_ERRORS = ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out", "NCCL",
                        "gloo")


def stage_main(name: str, argv=None, hooks=None) -> int:
    """python -m training.<name>: the stage `name` on a config and its overrides."""
    p = argparse.ArgumentParser(prog=f"python -m training.{name}",
                                description=f"{name}: --config FILE, then dotted overrides such as "
                                            "train.max_steps=20 out_dir=runs/debug")
    p.add_argument("--config", required=True, metavar="FILE")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # added by some launchers
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = p.parse_args(argv)

    def load_and_run():
        cfg = load_config(args.config, args.overrides)
        run(STAGES[name](cfg), cfg, hooks)

    return run_command(lambda: run_reporting(load_and_run))


def run_reporting(action) -> int:
    """action() under the command line's rules: a user mistake or the environment is one line (naming the rank
    when there are several), a stop signal exits 128 + its number after its checkpoint, a lost peer or a timed-out
    collective is one line instead of a C++ trace, ^C says how to resume."""
    rank, world, _, _ = ranks_from_env()
    who = "" if world == 1 else f" (rank {rank})"
    try:
        return exit_code(action, who)
    except Stopped as e:
        if rank == 0:
            print(held(e), file=sys.stderr)
        return 128 + e.signum
    except RuntimeError as e:  # a peer died or a collective timed out: say so instead of a C++ trace
        if not (isinstance(e, dist.DistError) or any(m in str(e) for m in COMMUNICATION_ERRORS)):
            raise
        first = str(held(e)).strip().splitlines()[0]
        print(f"error{who}: lost contact with another process: it died, or a collective waited longer than "
              f"dist.timeout_s ({first[:160]})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume from the latest checkpoint", file=sys.stderr)
        return 130
