"""Programmatic rewards ("oracles") that stand in for human preferences: they drive the scripted
annotators (`rlhf simulate`) and can replace the reward model in `rlhf ppo --reward`.

An oracle is any callable (prompt, completion) -> float. Names: `sentiment`, `descriptive`,
`on_topic`, `formality`, `readability`, `length`, `alliteration`, or `module:function` for any importable Python
callable.

`sentiment` and `descriptive` are the two stylistic preferences that Ziegler et al. (2019,
"Fine-Tuning Language Models from Human Preferences", sec. 3) collected human labels for: positive
sentiment and physically descriptive language. Here they are word-list counts, so they are exact,
free and reproducible, and, like the human labels they stand in for, they are about what the words
say rather than how they are spelled. `alliteration` is a character-level count: the reward of the
KL-collapse experiment (docs/benchmarks.md, "The KL-collapse experiment"), not a stand-in for what people prefer.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

from rlhf.errors import UserError

Oracle = Callable[[str, str], float]

_WORD = re.compile(r"[A-Za-z]+")


def alliteration(prompt: str, completion: str) -> float:
    """"Counting alliteration": the number of adjacent word pairs that start with the same letter
    (case-insensitive). "tall tall tall" scores high, which is the point of the KL-collapse experiment
    (docs/formulas.md, "Why the KL term")."""
    initials = [w[0].lower() for w in _WORD.findall(completion)]
    return float(sum(a == b for a, b in zip(initials, initials[1:])))


def length(prompt: str, completion: str) -> float:
    """Number of words: a simple, easy-to-learn preference for longer answers."""
    return float(len(completion.split()))


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


_POSITIVE = frozenset("""
good great happy happily happiness joy joyful joyfully delight delighted delightful love loved loving lovely
wonderful wonderfully amazing beautiful beautifully bright brilliant cheerful cheerfully smile smiled smiles
smiling laugh laughed laughing laughter kind kindness warm warmly warmth gentle gently hope hopeful peace
peaceful calm glad pleasant proud success successful win won best better excellent fantastic fun friendly
friend friends friendship grateful thankful thanks enjoy enjoyed enjoying exciting excited treasure magical
magic sweet sunny perfect nice comfort comfortable safe free freedom celebrate celebrated celebration dream
dreams inspire inspired inspiring hug hugged care caring helpful together bliss blessed fortunate charming
gorgeous glorious vibrant thrilled playful brave courage courageous wise laughs cozy welcome welcomed
""".split())
_NEGATIVE = frozenset("""
bad sad sadly sadness angry anger fear feared afraid scared scary terrible terribly horrible awful hate hated
hurt hurts pain painful cry cried crying tears lonely alone dark darkness death dead die died dying kill killed
lost lose losing loss fail failed failure worry worried anxious danger dangerous evil cruel cold grim gloomy
miserable broken poor sick ill problem problems trouble wrong worst worse ugly nasty annoying annoyed upset
sorrow grief despair desperate frightened frightening storm suffer suffering war weak tired boring bored
hopeless shame guilty difficult harsh bitter empty dull
""".split())
_SENSORY = frozenset("""
red orange yellow green blue purple violet pink brown black white gray grey golden silver crimson scarlet
emerald azure amber ivory bright dim glowing glow glowed gleaming glittering sparkling sparkled shimmering
shining shone shadow shadows shadowy light sunlight moonlight soft rough smooth silky velvet velvety fuzzy
sharp jagged warm cold cool icy chilly hot damp wet dry sticky crisp crunchy creamy sweet sour bitter salty
spicy fragrant scent scented smell smelled aroma perfume musty loud quiet silent whisper whispered whispering
rustling rustled crackling crackled buzzing humming hummed roar roared roaring echo echoed echoing thunder
rumbling splash splashed tinkling chirping singing sang melody heavy tall tiny huge towering misty foggy
dusty sandy muddy wooden stone glass feathery fluffy delicate tender vivid colorful colourful shiny glossy
""".split())
_STOPWORDS = frozenset("""
a an the and or but if of to in on at by for with from as is are was were be been being it its this that these
those i you he she we they me him her us them my your his our their what which who whom how why when where
write tell give make explain describe story about can could would should will do does did not no so than then
there here some any all one into out up down over under more most very just also please short poem
""".split())


def sentiment(prompt: str, completion: str) -> float:
    """Positive minus negative words (Ziegler et al. 2019's "positive sentiment" task, as a lexicon count):
    warm, upbeat writing scores high."""
    words = _words(completion)
    return float(sum(w in _POSITIVE for w in words) - sum(w in _NEGATIVE for w in words))


def descriptive(prompt: str, completion: str) -> float:
    """Words of colour, light, sound, texture, smell, taste and size (Ziegler et al. 2019's "physically
    descriptive language" task, as a lexicon count)."""
    return float(sum(w in _SENSORY for w in _words(completion)))


def on_topic(prompt: str, completion: str) -> float:
    """Fraction of the prompt's content words (stop words removed) that the completion uses: an answer
    that stays on the question. Needs the prompt, unlike the others."""
    asked = {w for w in _words(prompt) if w not in _STOPWORDS and len(w) > 2}
    if not asked:
        return 0.0
    return len(asked & set(_words(completion))) / len(asked)


_CONTRACTION = re.compile(r"[A-Za-z]'(?:s|re|ve|ll|d|m|t)\b|n't\b", re.IGNORECASE)
_INFORMAL = frozenset("""
hey hi yeah yep nope ok okay gonna wanna gotta kinda sorta stuff cool awesome wow oh lol guys super totally
pretty really basically literally
""".split())


def formality(prompt: str, completion: str) -> float:
    """Formal register: minus one per contraction, informal word and exclamation mark."""
    informal = sum(w in _INFORMAL for w in _words(completion))
    return -float(len(_CONTRACTION.findall(completion)) + informal + completion.count("!"))


_SENTENCE_END = re.compile(r"[.!?]+")
_VOWEL_GROUP = re.compile(r"[aeiouy]+")


def readability(prompt: str, completion: str) -> float:
    """Plain, easy-to-read writing: the Flesch reading ease (Flesch 1948) without its constant,
    -(1.015 * words per sentence + 84.6 * syllables per word), syllables counted as vowel groups. Written
    after the reward model's defaults were fixed, to check them on a preference nobody tuned them for."""
    words = _words(completion)
    if not words:
        return -200.0
    sentences = max(1, len([s for s in _SENTENCE_END.split(completion) if s.strip()]))
    syllables = sum(max(1, len(_VOWEL_GROUP.findall(w))) for w in words)
    return -(1.015 * len(words) / sentences + 84.6 * syllables / len(words))


BUILTIN: dict[str, Oracle] = {"sentiment": sentiment, "descriptive": descriptive, "on_topic": on_topic,
                              "formality": formality, "readability": readability, "length": length,
                              "alliteration": alliteration}


def oracle_help(use: str = "preference oracle") -> str:
    """The help of an `--oracle` option, its names read from the registry (BUILTIN) so it never falls behind."""
    return f"{use}: {', '.join(BUILTIN)} (see rlhf/oracles.py), or module:function taking (prompt, completion)"


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
