"""Programmatic rewards ("oracles") that stand in for human preferences: they drive the scripted
annotators (`rlhf simulate`) and can replace the reward model in `rlhf ppo --reward`.

An oracle is any callable (prompt, completion) -> float. Names: `alliteration`, `length`, or
`module:function` for any importable Python callable.
"""

from __future__ import annotations

import importlib
import re
from typing import Callable

from rlhf.errors import UserError

Oracle = Callable[[str, str], float]

_WORD = re.compile(r"[A-Za-z]+")


def alliteration(prompt: str, completion: str) -> float:
    """The seed's reward, "counting alliteration": the number of adjacent word pairs that start with
    the same letter (case-insensitive). "tall tall tall" scores high, which is the point of the seed's
    KL-collapse experiment."""
    initials = [w[0].lower() for w in _WORD.findall(completion)]
    return float(sum(a == b for a, b in zip(initials, initials[1:])))


def length(prompt: str, completion: str) -> float:
    """Number of words: a simple, easy-to-learn preference for longer answers."""
    return float(len(completion.split()))


BUILTIN: dict[str, Oracle] = {"alliteration": alliteration, "length": length}


def load_oracle(name: str) -> Oracle:
    """Resolve an oracle name: a built-in, or `module:function`."""
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise UserError(f"unknown oracle {name!r}: use one of {sorted(BUILTIN)} or module:function")
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"oracle {name!r}: cannot import {module_name!r} ({exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"oracle {name!r}: {module_name} has no callable {attr!r}")
    return fn
