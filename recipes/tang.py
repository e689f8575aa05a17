"""The Tang-poem recipe (`make demo DEMO=tang TANG_DIR=.../全唐诗`), after the TutorialLLM tutorial.

    python recipes/tang.py data --poems DIR --out DIR [--limit N] [--round-prompts N]
    python recipes/tang.py samples --run RUN --prompts FILE
    python recipes/tang.py compare --reference RUN --aligned RUN --prompts FILE
    python recipes/tang.py shares --run LABEL=RUN [--run ...] --prompts FILE
    python recipes/tang.py table LOG [LOG ...]          (make tang-seeds)

From chinese-poetry's poet.tang.*.json: keep the poems TutorialLLM keeps (no '□', no parentheses, at least two
couplets, couplets of one length), shuffle them with seed 2024 and split them 5:3:2 into
- pretraining text (title, then the couplets, one per line),
- instructions: "請用以下題目寫一首詩" + a title → that poem,
- preferences: for a five-character poem's title, that poem (every line five characters, a comma or another
  mid-line mark, five characters and a stop) is chosen over a random poem that is not five-character,
- the iterative rounds' requests: the first --round-prompts titles of the preference split, for which the model
  writes poems itself, scored by five_character_reward (training.pairs),
- GRPO's prompts: every title of the preference split as a user turn, for which the model writes poems as it
  learns, scored by the same reward (training.grpo).
Measured: the share of five-character poems among replies for 50 held-out titles, from the SFT model (the
reference), the offline DPO model, each iterative round and GRPO.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re

from common import main, write_jsonl

INSTRUCTION = "請用以下題目寫一首詩"
HELD_OUT = 50


def load_poems(poems_dir: str, limit: int | None) -> list[dict]:
    paths = sorted(glob.glob(os.path.join(poems_dir, "poet.tang.*.json")),
                   key=lambda p: int(re.search(r"poet\.tang\.(\d+)\.json$", p).group(1)))
    if not paths:
        raise SystemExit(f"error: {poems_dir}: no poet.tang.*.json files")
    poems = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            poems.extend(json.load(f))
        if limit and len(poems) >= limit:
            break
    return poems[:limit] if limit else poems


def keep(poem: dict) -> bool:
    """TutorialLLM's filters."""
    title, paragraphs = poem.get("title", ""), poem.get("paragraphs") or []
    text = title + "".join(paragraphs)
    return (len(paragraphs) >= 2 and len({len(p) for p in paragraphs}) == 1
            and not any(c in text for c in "□(（"))


HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff"  # CJK ideographs, extensions included
MID, STOP = "，,？！；：、?!;:", "。？！；.?!;"  # what ends the first half of a line, and the line
FIVE_CHARACTER_LINE = re.compile(f"[{HAN}]{{5}}[{MID}][{HAN}]{{5}}[{STOP}]")
SLOTS = [re.compile(f"[{HAN}]")] * 5 + [re.compile(f"[{MID}]")] + [re.compile(f"[{HAN}]")] * 5 + [re.compile(f"[{STOP}]")]


def poem_lines(text: str) -> list[str]:
    return [line.strip() for line in text.split("\n") if line.strip()]


def is_five_character(poem_text: str) -> bool:
    """At least two couplets, every line five characters, a comma (or another mid-line mark), five characters
    and a stop: what the recipe counts."""
    lines = poem_lines(poem_text)
    return len(lines) >= 2 and all(FIVE_CHARACTER_LINE.fullmatch(line) for line in lines)


def line_score(line: str) -> float:
    """The share of a five-character line's 12 slots (5 characters, mark, 5 characters, stop) this line fills
    rightly, over its length when longer: 1 for a five-character line."""
    hits = sum(bool(slot.fullmatch(ch)) for slot, ch in zip(SLOTS, line, strict=False))
    return hits / max(len(SLOTS), len(line))


def five_character_reward(poem_text: str) -> float:
    """The mean line score of a reply, halved below two lines: 1 exactly for a five-character poem, and graded
    below, so that of two imperfect replies the closer one is preferred (and few replies tie) — the iterative
    rounds' reward (training.pairs --reward recipes/tang.py:five_character_reward)."""
    lines = poem_lines(poem_text)
    if not lines:
        return 0.0
    score = sum(map(line_score, lines)) / len(lines)
    return score if len(lines) >= 2 else score / 2


def cmd_data(args) -> None:
    poems = [p for p in load_poems(args.poems, args.limit) if keep(p)]
    random.Random(2024).shuffle(poems)
    a, b = len(poems) * 5 // 10, len(poems) * 8 // 10
    pretrain, instruct, prefer = poems[:a], poems[a:b], poems[b:]
    body = lambda p: "\n".join(p["paragraphs"])  # noqa: E731
    os.makedirs(args.out, exist_ok=True)

    write_jsonl(os.path.join(args.out, "pretrain.jsonl"), [{"text": p["title"] + "\n" + body(p) + "\n"} for p in pretrain])
    write_jsonl(os.path.join(args.out, "sft.jsonl"),
                [{"instruction": INSTRUCTION, "input": p["title"], "output": body(p)} for p in instruct])
    held_out, prefer = prefer[:HELD_OUT], prefer[HELD_OUT:]
    five = [p for p in prefer if is_five_character(body(p))]
    others = [p for p in prefer if not is_five_character(body(p))]
    rng = random.Random(2024)
    pairs = [{"instruction": INSTRUCTION, "input": p["title"], "chosen": body(p), "rejected": body(rng.choice(others))}
             for p in five] if others else []
    write_jsonl(os.path.join(args.out, "dpo.jsonl"), pairs)
    with open(os.path.join(args.out, "eval_prompts.json"), "w", encoding="utf-8") as f:
        json.dump([INSTRUCTION + "\n\n" + p["title"] for p in held_out], f, ensure_ascii=False, indent=1)
    # the iterative rounds' requests: titles of the preference split, which the model then answers itself
    write_jsonl(os.path.join(args.out, "sample_prompts.jsonl"),
                [{"prompt": INSTRUCTION + "\n\n" + p["title"]} for p in prefer[:args.round_prompts]])
    write_jsonl(os.path.join(args.out, "grpo_prompts.jsonl"),
                [{"prompt": [{"role": "user", "content": INSTRUCTION + "\n\n" + p["title"]}], "title": p["title"]}
                 for p in prefer])
    share = sum(is_five_character(body(p)) for p in instruct) / max(1, len(instruct))
    print(f"recipe: {len(poems):,} poems kept; {len(pretrain):,} for pretraining, {len(instruct):,} instructions "
          f"({100 * share:.0f}% five-character), {len(pairs):,} preference pairs, {len(held_out)} held-out titles")


def add_data_arguments(parser) -> None:
    parser.add_argument("--poems", required=True, help="the folder holding poet.tang.*.json")
    parser.add_argument("--out", required=True)
    parser.add_argument("--limit", type=int, default=None, help="read only the first N poems (for quick runs)")
    parser.add_argument("--round-prompts", type=int, default=600,
                        help="titles each iterative DPO round writes poems for (4 each; default 600)")


if __name__ == "__main__":
    main(__doc__, add_data_arguments, cmd_data, is_five_character, "are five-character poems", max_new_tokens=120,
         samples=4)
