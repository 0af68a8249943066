import pytest

from rlhf.errors import UserError
from rlhf.oracles import alliteration, length, load_oracle


def test_alliteration_counts_adjacent_same_initials():
    assert alliteration("", "Peter Piper picked a peck") == 2.0  # Peter-Piper, Piper-picked
    assert alliteration("", "tall tall tall tall") == 3.0
    assert alliteration("", "The cat sat.") == 0.0
    assert alliteration("", "") == 0.0


def test_length_counts_words():
    assert length("", "one two  three\nfour") == 4.0


def test_load_oracle_builtin_module_and_errors():
    assert load_oracle("alliteration") is alliteration
    assert load_oracle("rlhf.oracles:length") is length
    with pytest.raises(UserError, match="unknown oracle"):
        load_oracle("nope")
    with pytest.raises(UserError, match="cannot import"):
        load_oracle("no_such_module_xyz:f")
    with pytest.raises(UserError, match="no callable"):
        load_oracle("rlhf.oracles:missing")


def test_word_list_oracles_count_what_they_say():
    from rlhf.oracles import descriptive, formality, on_topic, readability, sentiment

    assert sentiment("", "What a lovely, happy day! But the storm was awful.") == 0.0  # +2 -2
    assert sentiment("", "A joyful, warm smile.") == 3.0
    assert descriptive("", "The red sky glowed over the quiet sandy beach") == 4.0  # red, glowed, quiet, sandy
    assert on_topic("Write a story about a dragon and a castle", "The dragon flew over the castle") == 1.0
    assert on_topic("Write a story about a dragon and a castle", "A knight rode home.") == 0.0
    assert on_topic("Write about it", "anything") == 0.0  # no content words asked
    assert formality("", "Hey, it's gonna be awesome! Don't worry.") == -6.0
    assert formality("", "The results are conclusive.") == 0.0
    # 6 words, 2 sentences, 6 syllables: -(1.015 * 3 + 84.6 * 1)
    assert readability("", "The cat sat. It was fun.") == pytest.approx(-(1.015 * 3 + 84.6))
    assert readability("", "Notwithstanding considerable opposition.") < readability("", "The cat sat.")
