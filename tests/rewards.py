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


def bad_when_odd(completion, *, prompt, completion_tokens, stopped, name):
    """No number for a text of an odd number of characters (grpo.skip_bad_rewards counts it); else 0, or 1e6 when
    a keyword is not what the contract gives (the record's prompt and fields, the token count, whether it stopped)."""
    if len(completion) % 2:
        return "many"
    given = (isinstance(prompt, (str, list)) and isinstance(completion_tokens, int) and isinstance(stopped, bool)
             and isinstance(name, str) and name.isupper())
    return 0.0 if given else 1e6
