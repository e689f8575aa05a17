"""What the demo recipes share: writing jsonl, and comparing a reference and an aligned model on held-out
requests by the share of replies that have the preferred property."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def write_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def compare(reference: str, aligned: str, prompts: list[str], preferred: Callable[[str], bool], what: str,
            samples: int = 2, temperature: float = 0.8, seed: int = 0, show: int = 8, max_new_tokens: int = 60) -> dict:
    """Generate `samples` replies per prompt from both runs; print some side by side and the two shares."""
    from training.generate import chat_reply, load_for_inference

    replies = {}
    for label, run in (("reference (SFT)", reference), ("aligned (DPO)", aligned)):
        model, sp = load_for_inference(run)
        replies[label] = [chat_reply(model, sp, p, max_new_tokens=max_new_tokens, temperature=temperature, top_k=50,
                                     seed=seed + 1000 * i + k)
                          for i, p in enumerate(prompts) for k in range(samples)]
    labels = list(replies)
    print(f"{'request':<30} | {labels[0]:<44} | {labels[1]}")
    for i, prompt in enumerate(prompts[:show]):
        a, b = (replies[label][i * samples].replace("\n", " / ")[:44] for label in labels)
        print(f"{prompt.replace(chr(10), ' ')[:30]:<30} | {a:<44} | {b}")
    print()
    shares = {}
    for label in labels:
        hits = sum(preferred(r) for r in replies[label])
        shares[label] = hits / len(replies[label])
        print(f"{label}: {hits}/{len(replies[label])} replies {what} ({100 * shares[label]:.0f}%)")
    return shares


def show_replies(run: str, prompts: list[str], n: int, max_new_tokens: int = 60) -> None:
    """A few requests and the replies of one run."""
    from training.generate import chat_reply, load_for_inference

    model, sp = load_for_inference(run)
    for i, prompt in enumerate(prompts[:n]):
        reply = chat_reply(model, sp, prompt, max_new_tokens=max_new_tokens, seed=i)
        print(f"{prompt.replace(chr(10), ' ')}\n  → {reply.replace(chr(10), chr(10) + '    ')}")


def main(doc: str, add_data_arguments: Callable, make_data: Callable, preferred: Callable[[str], bool], what: str,
         max_new_tokens: int, samples: int) -> None:
    """The command line every recipe has: data, samples (one run's replies), compare (reference vs aligned)."""
    from preprocess.errors import UserError

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    add_data_arguments(sub.add_parser("data", help="write the recipe's jsonl files and held-out requests"))
    s = sub.add_parser("samples", help="replies of one run to the first held-out requests")
    s.add_argument("--run", required=True)
    s.add_argument("--prompts", required=True)
    s.add_argument("-n", type=int, default=4)
    c = sub.add_parser("compare", help="share of preferred replies: reference against aligned")
    c.add_argument("--reference", required=True)
    c.add_argument("--aligned", required=True)
    c.add_argument("--prompts", required=True)
    c.add_argument("--samples", type=int, default=samples, help="replies per request")
    c.add_argument("--temperature", type=float, default=0.8)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--show", type=int, default=8, help="requests printed side by side")
    args = ap.parse_args()
    try:
        if args.command == "data":
            make_data(args)
            return
        with open(args.prompts, encoding="utf-8") as f:
            prompts = json.load(f)
        if args.command == "samples":
            show_replies(args.run, prompts, args.n, max_new_tokens)
        else:
            compare(args.reference, args.aligned, prompts, preferred, what, args.samples, args.temperature,
                    args.seed, args.show, max_new_tokens)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
