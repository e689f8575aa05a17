import json
import os
import sys

import pytest
from conftest import REPO
from conftest import write_jsonl as write

from preprocess.errors import UserError
from training.pairs import make_pairs
from training.stages.rewards import load_reward

sys.path.insert(0, os.path.join(REPO, "recipes"))


def record(index, prompt, samples, stopped=None):
    return {"index": index, "prompt": prompt, "samples": samples, "stopped": stopped or [True] * len(samples),
            "chat": True}


QUESTION = os.path.join(REPO, "recipes", "shakespeare.py") + ":question_reward"


def test_best_finished_reply_against_worst_ties_dropped_and_counted(tmp_path):
    samples = write(tmp_path / "s.jsonl", [
        record(0, "Speak as LEAR.", ["Why?", "No.", "What?", "Never."]),
        record(1, {"prompt": "Speak as PUCK."}, ["Go.", "Stay."]),  # all 0: a tie
        record(2, {"messages": [{"role": "user", "content": "Speak as KENT."}]}, ["Sir?", "Sir."]),
        record(3, "Speak as IAGO.", ["What say you, what say", "Speak?", "Well."], [False, True, True]),
        record(4, "Speak as LEAR.", ["Who is it that can tell me who I am", "Ay."], [False, True]),
        record(5, "Speak as KENT.", ["Who goes there, and what", "Who comes?"], [False, True]),
    ])
    out = tmp_path / "pairs.jsonl"
    line = make_pairs(samples, QUESTION, str(out))
    pairs = [json.loads(x) for x in out.read_text().splitlines()]
    # of equal scores the first is the best and the last the worst; a reply cut off by --max-new-tokens is never
    # chosen, but may be the rejected one
    assert pairs == [{"prompt": "Speak as LEAR.", "chosen": "Why?", "rejected": "Never."},
                     {"prompt": [{"role": "user", "content": "Speak as KENT."}], "chosen": "Sir?", "rejected": "Sir."},
                     {"prompt": "Speak as IAGO.", "chosen": "Speak?", "rejected": "Well."},
                     {"prompt": "Speak as KENT.", "chosen": "Who comes?", "rejected": "Who goes there, and what"}]
    assert line.startswith("pairs: 4 of 6 prompts") and "2 dropped" in line


def test_the_pairs_are_dpo_records_the_shards_accept(tmp_path, tokenizer_model):
    from preprocess.__main__ import main as preprocess_main
    from preprocess.shards import read_manifest

    samples = write(tmp_path / "s.jsonl", [record(i, f"Speak as N{i}.", ["Why?", "No."]) for i in range(5)])
    out = tmp_path / "pairs.jsonl"
    make_pairs(samples, QUESTION, str(out))
    assert preprocess_main(["shards", "--kind", "dpo", "--input", str(out), "--tokenizer", tokenizer_model,
                            "--out", str(tmp_path / "shards")]) == 0
    assert read_manifest(str(tmp_path / "shards"))["totals"]["documents"] == 10


def test_the_tang_reward_checks_each_line_for_five_characters_a_comma_five_and_a_stop():
    from tang import five_character_reward, is_five_character

    poem = "白日依山盡，黃河入海流。\n欲窮千里目，更上一層樓。"
    assert is_five_character(poem) and five_character_reward(poem) == 1.0
    goose = "鵝，鵝，鵝，曲項向天歌。\n白毛浮綠水，紅掌撥清波。"  # 12 characters a line, not 5 + 5
    assert not is_five_character(goose)
    assert five_character_reward(goose) == pytest.approx((10 / 12 + 1) / 2)  # slots 1 and 3 hold commas
    assert five_character_reward(poem + "\n又一行") == pytest.approx((1 + 1 + 3 / 12) / 3)  # it does not stop
    assert five_character_reward("白日依山盡，黃河入海流。") == 0.5  # one line is half a poem at best
    assert five_character_reward("白日依山盡，黃河入海流。更上一層樓。") == pytest.approx((12 / 18) / 2)
    assert not is_five_character("床前明月光，疑是地上霜，\n舉頭望明月，低頭思故鄉。")  # a line must end with a stop
    assert five_character_reward("") == 0.0


def test_a_bad_reward_or_sample_file_is_one_line(tmp_path):
    samples = write(tmp_path / "s.jsonl", [record(0, "p", ["a", "b"])])
    for spec, message in (("nocolon", "expected module:function"), ("json:nothing", "has no function 'nothing'"),
                          ("no_such_module_here:f", "cannot import no_such_module_here"),
                          (str(tmp_path / "missing.py") + ":f", "missing.py not found")):
        with pytest.raises(UserError, match=message):
            make_pairs(samples, spec, str(tmp_path / "o.jsonl"))
    (tmp_path / "r.py").write_text("import numpy\n\ndef text_length(t):\n    return 'long'\n\ndef boom(t):\n"
                                   "    raise ValueError('x')\n\ndef endless(t):\n    return float('inf')\n\n"
                                   "def numpy_length(t):\n    return numpy.float32(len(t))\n\n"
                                   "def numpy_verdict(t):\n    return numpy.float32(len(t)) > 1\n")
    with pytest.raises(UserError, match=r"s.jsonl:1: sample 1: the reward returned 'long', not a finite number"):
        make_pairs(samples, str(tmp_path / "r.py") + ":text_length", str(tmp_path / "o.jsonl"))
    with pytest.raises(UserError, match=r"s.jsonl:1: sample 1: the reward returned inf, not a finite number"):
        make_pairs(samples, str(tmp_path / "r.py") + ":endless", str(tmp_path / "o.jsonl"))
    with pytest.raises(UserError, match=r"s.jsonl:1: sample 1: the reward returned .*False_?, not a finite number"):
        make_pairs(samples, str(tmp_path / "r.py") + ":numpy_verdict", str(tmp_path / "o.jsonl"))  # a numpy bool
    longer = write(tmp_path / "l.jsonl", [record(0, "p", ["a", "bb\u2028b"])])  # a numpy float is a number
    make_pairs(longer, str(tmp_path / "r.py") + ":numpy_length", str(tmp_path / "n.jsonl"))
    # U+2028 inside a sample (written raw, as training.sample writes it) is text, not a line break
    assert [json.loads(line)["chosen"] for line in open(tmp_path / "n.jsonl", newline="\n")] == ["bb\u2028b"]
    with pytest.raises(UserError, match=r"s.jsonl:1: sample 1: the reward raised ValueError: x"):
        make_pairs(samples, str(tmp_path / "r.py") + ":boom", str(tmp_path / "o.jsonl"))
    (tmp_path / "broken.py").write_text("def f(t:\n")
    with pytest.raises(UserError, match=r"cannot import .*broken.py \(SyntaxError"):
        make_pairs(samples, str(tmp_path / "broken.py") + ":f", str(tmp_path / "o.jsonl"))
    bad = write(tmp_path / "b.jsonl", [{"prompt": "p"}])
    with pytest.raises(UserError, match="b.jsonl:1: expected a training.sample record"):
        make_pairs(bad, "json:dumps", str(tmp_path / "o.jsonl"))
    plain = write(tmp_path / "p.jsonl", [{**record(0, "p", ["a?", "b"]), "chat": False}])
    with pytest.raises(UserError, match="p.jsonl:1: sampled without --chat"):
        make_pairs(plain, QUESTION, str(tmp_path / "o.jsonl"))
    ties = write(tmp_path / "t.jsonl", [record(0, "p", ["a", "b"]), record(1, "q", ["c?", "d"], [False, True])])
    with pytest.raises(UserError, match="t.jsonl: no pairs: on none of its 2 prompts"):
        make_pairs(ties, QUESTION, str(tmp_path / "o.jsonl"))
    assert not os.path.exists(tmp_path / "o.jsonl")
    assert load_reward("os.path:basename")("a/b.txt") == "b.txt"  # an importable module:function, as named


@pytest.mark.slow
def test_an_iterative_round_samples_scores_pairs_and_trains(sft_run, chat_shards, tokenizer_model, tmp_path):
    """The iterative chain of docs/alignment.md, with a reward that gives pairs whatever the barely trained test model says
    (longer replies are better: its replies rarely end with a question, so question_reward would tie them all)
    and fewer tokens and steps."""
    import subprocess

    from conftest import CHAT, DPO_CONFIG, SFT_CONFIG, losses, run_command, run_training

    # the session's SFT model is 3 steps old and never ends a reply: a few more steps teach it <|end|>, without
    # which no reply could be chosen
    sft = tmp_path / "sft"
    run_training(f"data.path={chat_shards['sft']}", f"init_from={sft_run}", "train.max_steps=40", "train.lr=3e-3",
                 "train.warmup_steps=2", f"out_dir={sft}", *CHAT, stage="sft", config=SFT_CONFIG)
    prompts = write(tmp_path / "prompts.jsonl", [{"prompt": f"Write a line spoken by {n}."}
                                                 for n in ("HAMLET", "LEAR", "PUCK", "IAGO", "KENT", "VIOLA")])
    (tmp_path / "reward.py").write_text("def longer(text):\n    return len(text)\n")
    samples, pairs = tmp_path / "samples.jsonl", tmp_path / "pairs.jsonl"
    for command in (
        ["-m", "training.sample", "--checkpoint", sft, "--prompts", prompts, "--samples", "4", "--chat",
         "--max-new-tokens", "40", "--out", samples],
        ["-m", "training.pairs", "--samples", samples, "--reward", f"{tmp_path / 'reward.py'}:longer", "--out", pairs],
        ["-m", "preprocess", "shards", "--kind", "dpo", "--input", pairs, "--tokenizer", tokenizer_model,
         "--out", tmp_path / "round1"],
    ):
        if command[1] == "preprocess":  # the data job never imports torch: a process of its own
            proc = subprocess.run([sys.executable, *map(str, command)], cwd=REPO, capture_output=True, text=True,
                                  timeout=300)
        else:
            proc = run_command(*command, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert records and all(len(r["chosen"]) > len(r["rejected"]) for r in records)
    run_training(f"data.path={tmp_path / 'round1'}", f"init_from={sft}", f"out_dir={tmp_path / 'run'}",
                 "train.max_steps=2", "train.micro_batch_size=2", *CHAT[:1], stage="dpo",
                 config=DPO_CONFIG)
    assert sorted(losses(tmp_path / "run")) == [1, 2]
