"""How often a process that used gloo aborts at its end ("terminate called without an active exception"), with
the interpreter's own teardown against parallel/env.py's exit_process, the training commands' ending. The figures of
docs/reliability.md come from here:

    python tests/teardown_stress.py [--jobs 30] [--ending interpreter|exit_process|both]

Each job is two spawned processes: a gloo process group, a small model under DDP, three accumulation steps
(the last backward's all-reduce is the last collective), destroy_process_group, then the ending. Whether it
aborts depends on the machine and its load (seen on an AMD EPYC VM); a run that finds no abort shows nothing.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from conftest import free_port  # noqa: E402  (tests/ is this script's directory)

from training.parallel import env as D  # noqa: E402
from training.parallel.ddp import DDP  # noqa: E402


def job(rank: int, world: int, port: int, ending: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    env = D.DistEnv(rank, world, 0, torch.device("cpu"), "stress")
    backend = DDP(None, env, None, "fp32")
    backend.setup(torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 50)), lambda m: None)
    for _ in range(3):
        for micro in range(2):
            with backend.micro_step(micro, 2):
                backend.backward(backend.train_model(torch.randn(8, 32)).sum())
    D.shutdown(env)
    if ending == "exit_process":
        D.exit_process(0)


def aborted(ending: str) -> bool:
    try:
        torch.multiprocessing.spawn(job, args=(2, free_port(), ending), nprocs=2, join=True)
    except torch.multiprocessing.ProcessExitedException:
        return True
    return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=30)
    p.add_argument("--ending", choices=("interpreter", "exit_process", "both"), default="both")
    args = p.parse_args()
    for ending in ("interpreter", "exit_process") if args.ending == "both" else (args.ending,):
        count = sum(aborted(ending) for _ in range(args.jobs))
        print(f"ending {ending}: {count} of {args.jobs} two-process jobs aborted", flush=True)


if __name__ == "__main__":
    main()
