"""Reward functions for the GRPO tests: the contract (keywords by signature, None, bad values) and rewards that
tell a tiny model's completions apart."""


def exact_answer(completion, answer):
    return float(completion.strip() == answer)


def vowel_share(text, **_):
    letters = [c for c in text.lower() if c.isalpha()]
    return sum(c in "aeiou" for c in letters) / max(1, len(letters))


def no_reward(text):
    return None


def raises(text):
    return 1 / 0


def not_a_number(text):
    return "many"


def infinite(text):
    return float("inf")


def constant(text):
    return 1.0


def fails_on_rank_1(text):
    """A reward that breaks on one rank only: the other must not wait for it."""
    import os

    if os.environ.get("RANK") == "1":
        raise RuntimeError("no scorer on this node")
    return float(len(text) % 2)


def leading_number(completion, answer):
    """1 when the completion starts with the answer's number (an arithmetic prompt's exact answer)."""
    import re

    found = re.match(r"\s*(\d+)", completion)
    return float(found is not None and found.group(1) == answer)
