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


def replies_of(run: str, prompts: list[str], samples: int, temperature: float = 0.8, seed: int = 0,
               max_new_tokens: int = 60) -> list[str]:
    """`samples` replies of a run to each request (a user turn), in order, drawn as training.sample draws them:
    batched, sample k of request i seeded by (seed, i, k)."""
    from preprocess.chat import Turn
    from training.checkpoint.weights import load_for_inference
    from training.models.decoding import chat_prompt
    from training.sample import prompt_batches, sample_chunk

    model, sp = load_for_inference(run)
    encoded = [chat_prompt(sp, [Turn("user", p)]) for p in prompts]
    replies = []
    for chunk in prompt_batches(len(prompts), 64, samples):
        for texts, _ in sample_chunk(model, sp, encoded, chunk, samples, seed, max_new_tokens=max_new_tokens,
                                     temperature=temperature, top_k=50):
            replies += texts
    return replies


def report(label: str, replies: list[str], preferred: Callable[[str], bool], what: str) -> float:
    hits = sum(preferred(r) for r in replies)
    print(f"{label}: {hits}/{len(replies)} replies {what} ({100 * hits / len(replies):.0f}%)", flush=True)
    return hits / len(replies)


def compare(reference: str, aligned: str, prompts: list[str], preferred: Callable[[str], bool], what: str,
            samples: int = 2, temperature: float = 0.8, seed: int = 0, show: int = 8, max_new_tokens: int = 60) -> dict:
    """`samples` replies per prompt from both runs; some side by side, and the two shares."""
    replies = {label: replies_of(run, prompts, samples, temperature, seed, max_new_tokens)
               for label, run in (("reference (SFT)", reference), ("aligned (DPO)", aligned))}
    labels = list(replies)
    print(f"{'request':<30} | {labels[0]:<44} | {labels[1]}")
    for i, prompt in enumerate(prompts[:show]):
        a, b = (replies[label][i * samples].replace("\n", " / ")[:44] for label in labels)
        print(f"{prompt.replace(chr(10), ' ')[:30]:<30} | {a:<44} | {b}")
    print()
    return {label: report(label, replies[label], preferred, what) for label in labels}


def shares(runs: list[tuple[str, str]], prompts: list[str], preferred: Callable[[str], bool], what: str,
           samples: int = 1, temperature: float = 0.8, seed: int = 0, max_new_tokens: int = 60) -> dict:
    """The share of preferred replies of each (label, run) to the same requests: one line per run."""
    return {label: report(label, replies_of(run, prompts, samples, temperature, seed, max_new_tokens), preferred,
                          what) for label, run in runs}


def table(logs: list[str], what: str) -> None:
    """From the logs of several `make demo` runs (one per seed): each run's shares (its last `shares` block, or
    its `compare` lines), one row per log, and whether the last model beat the reference as the recipe means to."""
    import re

    rows = []
    for path in logs:
        text = open(path, encoding="utf-8").read()
        found = re.findall(rf"^(.+?): (\d+)/(\d+) replies {re.escape(what)} \((\d+)%\)$", text, re.M)
        shares = {}
        for label, hits, total, _ in found:  # later lines of the same label win: the final table
            shares[label] = int(hits) / int(total)
        if not shares:
            raise SystemExit(f"error: {path}: no share lines ('LABEL: H/N replies {what} (P%)')")
        rows.append((path, shares, dict(re.findall(r"^time: (.+): (\d+) s$", text, re.M))))
    labels = list(dict.fromkeys(label for _, shares, _ in rows for label in shares))
    timed = list(dict.fromkeys(label for _, _, times in rows for label in times))
    print(" | ".join(["run", *labels, *(f"{label} (s)" for label in timed)]))
    for path, shares, times in rows:
        print(" | ".join([path, *(f"{100 * shares[label]:.0f}%" if label in shares else "-" for label in labels),
                          *(times.get(label, "-") for label in timed)]))
    first, last = labels[0], labels[-1]
    good = [last in shares and first in shares and shares[last] >= 0.9 and shares[last] >= shares[first] + 0.1
            for _, shares, _ in rows]
    print(f"{last} ≥ 90% and ≥ {first} + 10 points: {sum(good)} of {len(rows)} runs")


def show_replies(run: str, prompts: list[str], n: int, max_new_tokens: int = 60) -> None:
    """A few requests and the replies of one run."""
    from training.checkpoint.weights import load_for_inference
    from training.models.decoding import chat_reply

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
    h = sub.add_parser("shares", help="share of preferred replies of several runs, one line each")
    h.add_argument("--run", action="append", required=True, metavar="LABEL=RUN")
    h.add_argument("--prompts", required=True)
    h.add_argument("--samples", type=int, default=samples, help="replies per request")
    h.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("table", help="the shares of several demo runs' logs (make tang-seeds)")
    t.add_argument("logs", nargs="+")
    args = ap.parse_args()
    try:
        if args.command == "data":
            make_data(args)
            return
        if args.command == "table":
            table(args.logs, what)
            return
        with open(args.prompts, encoding="utf-8") as f:
            prompts = json.load(f)
        if args.command == "samples":
            show_replies(args.run, prompts, args.n, max_new_tokens)
        elif args.command == "shares":
            runs = [tuple(r.split("=", 1)) for r in args.run]
            if any(len(r) != 2 for r in runs):
                raise UserError("--run: expected LABEL=RUN_DIR")
            shares(runs, prompts, preferred, what, args.samples, seed=args.seed, max_new_tokens=max_new_tokens)
        else:
            compare(args.reference, args.aligned, prompts, preferred, what, args.samples, args.temperature,
                    args.seed, args.show, max_new_tokens)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
