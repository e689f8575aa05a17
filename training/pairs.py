"""Preference pairs from scored samples: for every prompt of a training.sample output (sampled with --chat), its
best reply (by the reward) that ended by itself is chosen over its worst reply (which may have been cut off at
--max-new-tokens: not stopping is a fault to learn against); a prompt whose best does not beat its worst gives
no pair (counted).

    python -m training.pairs --samples SAMPLES.jsonl --reward module:function --out PAIRS.jsonl [--min-margin M]
    python -m preprocess shards --kind dpo --input PAIRS.jsonl ...

The pairs are DPO records ({"prompt", "chosen", "rejected"}, the prompt as a string or a message list), in
prompt order; of equal scores the first sample counts as best and the last as worst, so the file depends only
on the samples and the reward. One summary line reports the pairs, the dropped prompts and the mean best and
worst rewards.
"""

from __future__ import annotations

import argparse
import json
import sys

from preprocess.errors import UserError, exit_code
from preprocess.fileio import atomic_write, numbered_lines

from .stages.rewards import load_reward, score


def pair_of(record: dict, reward, where: str, min_margin: float) -> tuple[dict | None, float, float]:
    samples, stopped = record.get("samples"), record.get("stopped")
    prompt = record.get("prompt")
    if not isinstance(samples, list) or not all(isinstance(s, str) for s in samples) or not samples or \
            not isinstance(stopped, list) or len(stopped) != len(samples) or \
            not (isinstance(prompt, str) or isinstance(prompt, dict)):
        raise UserError(f"{where}: expected a training.sample record ({{\"prompt\", \"samples\", \"stopped\", "
                        "\"chat\"}})")
    if record.get("chat") is not True:
        raise UserError(f"{where}: sampled without --chat; pairs are conversations, so sample the replies with "
                        "training.sample --chat")
    scores = [score(reward, s, f"{where}: sample {k + 1}") for k, s in enumerate(samples)]
    finished = [k for k in range(len(samples)) if stopped[k]]
    if not finished:  # no reply that ended by itself can be chosen
        return None, max(scores), min(scores)
    best = max(finished, key=lambda k: (scores[k], -k))
    worst = min(range(len(scores)), key=lambda k: (scores[k], -k))
    if scores[best] - scores[worst] <= min_margin or samples[best] == samples[worst]:
        return None, scores[best], scores[worst]
    if isinstance(prompt, dict):  # as the prompts file gave it: a string, or the conversation so far
        prompt = prompt["prompt"] if isinstance(prompt.get("prompt"), str) else prompt.get("messages")
    return {"prompt": prompt, "chosen": samples[best], "rejected": samples[worst]}, scores[best], scores[worst]


def make_pairs(samples_path: str, reward_spec: str, out: str, min_margin: float = 0.0) -> str:
    reward = load_reward(reward_spec)
    pairs, dropped, bests, worsts = [], 0, [], []
    for number, line in numbered_lines(samples_path):
        where = f"{samples_path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected a training.sample record")
        pair, best, worst = pair_of(record, reward, where, min_margin)
        bests.append(best)
        worsts.append(worst)
        if pair is None:
            dropped += 1
        else:
            pairs.append(pair)
    if not pairs:
        raise UserError(f"{samples_path}: no pairs: on none of its {len(bests):,} prompts did a finished reply score "
                        f"more than --min-margin {min_margin:g} above the worst; sample more replies per prompt "
                        "(--samples), or use a reward that tells them apart")
    atomic_write(out, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs).encode())
    n = max(1, len(bests))
    return (f"pairs: {len(pairs):,} of {len(bests):,} prompts → {out}; {dropped:,} dropped (no finished reply "
            f"more than --min-margin {min_margin:g} above the worst); mean reward of the best reply "
            f"{sum(bests) / n:.3f}, of the worst {sum(worsts) / n:.3f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.pairs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", required=True, help="the output of python -m training.sample")
    p.add_argument("--reward", required=True, help="module:function or path/to/file.py:function, text -> float")
    p.add_argument("--out", required=True)
    p.add_argument("--min-margin", type=float, default=0.0, help="drop a prompt unless best - worst exceeds this")
    args = p.parse_args(argv)
    return exit_code(lambda: print(make_pairs(args.samples, args.reward, args.out, args.min_margin)))


if __name__ == "__main__":
    sys.exit(main())
