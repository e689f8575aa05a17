"""A reward is any Python function text -> float, named on the command line as module:function (an importable
module, e.g. mypkg.scores:length_ok) or path/to/file.py:function. The recipes ship theirs
(recipes/shakespeare.py:question_reward, recipes/tang.py:five_character_reward)."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable

from preprocess.errors import UserError


def load_reward(spec: str) -> Callable[[str], float]:
    module_name, sep, function = spec.rpartition(":")
    if not sep or not module_name or not function:
        raise UserError(f"--reward {spec!r}: expected module:function or path/to/file.py:function")
    try:
        if module_name.endswith(".py"):
            if not os.path.isfile(module_name):
                raise UserError(f"--reward {spec!r}: {module_name} not found")
            # the file's own directory first, so that it imports its neighbours as when it runs (recipes/common.py)
            sys.path.insert(0, os.path.dirname(os.path.abspath(module_name)))
            loaded = importlib.util.spec_from_file_location(f"reward_{abs(hash(module_name))}", module_name)
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except UserError:
        raise
    except Exception as e:  # a missing module, or the user's file failing as it loads (a syntax error, ...)
        raise UserError(f"--reward {spec!r}: cannot import {module_name} ({type(e).__name__}: {e})") from None
    reward = getattr(module, function, None)
    if not callable(reward):
        raise UserError(f"--reward {spec!r}: {module_name} has no function {function!r}")
    return reward


def score(reward: Callable[[str], float], text: str, where: str) -> float:
    """reward(text) as a float; anything else (or an exception) is one line naming the sample."""
    try:
        value = reward(text)
    except Exception as e:  # the user's function: name it and the sample, not our stack
        raise UserError(f"{where}: the reward raised {type(e).__name__}: {e}") from None
    number = None
    boolean = isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool")
    if not boolean and not isinstance(value, (str, bytes, bytearray)):  # numpy and 0-d torch numbers count
        with contextlib.suppress(TypeError, ValueError, RuntimeError):
            number = float(value)
    if number is None or not math.isfinite(number):
        raise UserError(f"{where}: the reward returned {value!r}, not a finite number")
    return number
