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
