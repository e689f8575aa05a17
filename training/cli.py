"""The command line shared by the stage entry points: --config FILE [key.sub=value ...]."""

from __future__ import annotations

import argparse
import sys

from preprocess.errors import UserError

from .config import load_config
from .distributed import ranks_from_env


def main(name: str, make_stage, argv=None) -> int:
    """make_stage(config) → the Stage to run (a stage's loss may depend on its config section)."""
    from .loop import run

    p = argparse.ArgumentParser(prog=f"python -m training.{name}",
                                description=f"{name}: --config FILE, then dotted overrides such as "
                                            "train.max_steps=20 out_dir=runs/debug")
    p.add_argument("--config", required=True, metavar="FILE")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # added by some launchers
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        run(make_stage(cfg), cfg)
    except (UserError, OSError) as e:  # OSError: disk full, permissions — the environment, not a bug
        rank, world, _, _ = ranks_from_env()
        print(f"error: {e}" if world == 1 else f"error (rank {rank}): {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume from the latest checkpoint", file=sys.stderr)
        return 130
    return 0
