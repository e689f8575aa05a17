"""EleutherAI's lm-evaluation-harness on a run, a checkpoint or a transformers directory, without exporting it.

    python -m training.evaluate --checkpoint RUN_OR_DIR --tasks T1,T2 [--include DIR] [--limit N]
                                [--num-fewshot K] [--apply-chat-template] [--batch-size B] [--seed S] [--out FILE]
    torchrun --nproc_per_node N -m training.evaluate ...

Tasks are the harness's (by name, or a group) and those of the YAML files under each --include directory: a task
whose `dataset_path: json` points at local files (`dataset_kwargs: {data_files: ...}`) needs no network
(recipes/eval_tasks.py writes two). Every process loads the whole model and scores its share of the requests;
rank 0 writes the harness's results with every example's scores to OUT (default: the run's
evaluations/evaluate-step-N.TASKS.json) and its table beside it (.md), and prints the table.
"""

from __future__ import annotations

import argparse
import os
import sys

from preprocess.errors import UserError, exit_code

from .checkpoint.weights import load_for_inference, resolve
from .parallel import env as D


def default_out(checkpoint: str, tasks: list[str]) -> str:
    """RUN/evaluations/step-N.TASKS.json for a run's checkpoint; elsewhere --out is needed."""
    checkpoint = os.path.abspath(checkpoint)
    parent = os.path.dirname(checkpoint)
    if os.path.basename(parent) != "checkpoints":
        raise UserError(f"{checkpoint}: not a checkpoint of a run; give --out FILE for its results")
    name = f"evaluate-{os.path.basename(checkpoint)}.{'+'.join(tasks)}.json"  # beside the run's own step-N.*
    return os.path.join(os.path.dirname(parent), "evaluations", name)


def run_evaluate(args) -> str | None:
    try:
        import training.run.harness as harness  # our model class, a subclass of lm-eval's: the optional extra "eval"
    except ImportError as e:
        raise UserError(f"lm-evaluation-harness is not installed ({e}); pip install -e '.[eval]'") from None

    tasks = [t for t in args.tasks.split(",") if t]
    env = D.init("ddp", args.device, 86_400)
    try:
        checkpoint = D.from_rank0(env, lambda: resolve(args.checkpoint))
        out = args.out or D.from_rank0(env, lambda: default_out(checkpoint, tasks))
        if not args.verbose:
            harness.quiet()
        found = problem = None
        try:  # on every rank, agreed: one that cannot load a task's data must not leave the others waiting
            found = harness.Tasks(tasks, args.include)
        except UserError as e:
            problem = str(e)
        D.raise_if_any(env, problem, "another rank could not load the tasks (its line is above)")
        model, tokenizer = load_for_inference(checkpoint, str(env.device))
        results = found.score(model, tokenizer, rank=env.rank, world=env.world_size, batch_size=args.batch_size,
                              limit=args.limit, num_fewshot=args.num_fewshot, seed=args.seed,
                              chat=args.apply_chat_template)
        if not env.is_main:
            return None
        results["shardlm"] = {"checkpoint": checkpoint, "processes": env.world_size}
        return f"{found.save(results, out)}\n{out}"
    finally:
        D.shutdown(env)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a run (its latest checkpoint), a checkpoint or a transformers "
                   "model directory")
    p.add_argument("--tasks", required=True, help="comma-separated task (or group) names")
    p.add_argument("--include", action="append", default=[], metavar="DIR",
                   help="a directory of task YAML files (repeatable)")
    p.add_argument("--limit", type=float, default=None,
                   help="examples per task (a fraction below 1: that share of them)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--apply-chat-template", action="store_true",
                   help="each request as a user turn in the model's chat template (few-shot examples as earlier turns)")
    p.add_argument("--batch-size", type=int, default=8, help="requests scored (or continued) together")
    p.add_argument("--seed", type=int, default=0, help="of the few-shot examples' choice and of sampled generations")
    p.add_argument("--out", default=None, help="the results' JSON file (default: RUN/evaluations/evaluate-step-N.TASKS.json)")
    p.add_argument("--device", default="auto")
    p.add_argument("--verbose", action="store_true", help="the harness's own log lines")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1")

    def run() -> None:
        line = run_evaluate(args)
        if line:
            print(line)

    return D.run_command(lambda: exit_code(run))


if __name__ == "__main__":
    sys.exit(main())
