import pytest

from rlhf.tiny import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random chat model + tokenizer folder (pad id == EOS id, like the default model)."""
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-model")))
