"""Arithmetic prompts with an exact-answer reward, for GRPO (python -m training.grpo).

    python recipes/arithmetic.py data --out DIR [--digits N] [--seed S] [--documents N]

writes DIR/sums.jsonl (pretraining text: one sum "a+b=c" per document) and DIR/prompts.jsonl (a prompt "a+b=" and
its "answer" per record, every pair of N-digit numbers once); then

    python -m training.grpo ... "grpo.rewards=[recipes/arithmetic.py:exact_answer]"

scores each completion 1 when the number it starts with is the record's answer, else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re

NUMBER = re.compile(r"\s*(-?\d+)(?!\d|[.eE]\d)")  # not the start of 421, 42.5 or 42e3


def exact_answer(completion: str, answer) -> float:
    """1.0 when the completion begins (after spaces) with exactly the answer's number — "42", "42." and " 42, done"
    for 42, not "421", "42.5" or "4" — else 0.0. `answer` is the prompt record's field, a number or its digits."""
    found = NUMBER.match(completion)
    return float(found is not None and int(found.group(1)) == int(str(answer).strip()))


def problems(digits: int = 1) -> list[tuple[int, int]]:
    """Every pair (a, b) of numbers below 10**digits whose sum has as many digits."""
    top = 10 ** digits
    return [(a, b) for a in range(top) for b in range(top) if a + b < top]


def write(out: str, digits: int = 1, seed: int = 0, documents: int = 20000) -> tuple[str, str]:
    """(sums.jsonl, prompts.jsonl) in `out`: `documents` sums drawn with `seed`, and every problem once."""
    os.makedirs(out, exist_ok=True)
    pairs, rng = problems(digits), random.Random(seed)
    sums, prompts = os.path.join(out, "sums.jsonl"), os.path.join(out, "prompts.jsonl")
    with open(sums, "w", encoding="utf-8") as f:
        for a, b in (rng.choice(pairs) for _ in range(documents)):
            f.write(json.dumps({"text": f"{a}+{b}={a + b}"}) + "\n")
    with open(prompts, "w", encoding="utf-8") as f:
        for a, b in pairs:
            f.write(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n")
    return sums, prompts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python recipes/arithmetic.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="write sums.jsonl and prompts.jsonl")
    data.add_argument("--out", required=True)
    data.add_argument("--digits", type=int, default=1)
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--documents", type=int, default=20000)
    args = parser.parse_args(argv)
    for path in write(args.out, args.digits, args.seed, args.documents):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
