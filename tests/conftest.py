import sys

import pytest
from tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random chat model + tokenizer folder (pad id == EOS id, like the default model)."""
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-model")))


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one state per process: on a machine with a GPU, a test's `Accelerator(cpu=True)` after
    another test's `Accelerator()` (on the GPU) in the same process is refused. Each test starts without one."""
    yield
    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


@pytest.fixture(autouse=True)
def cpu_without_bf16(monkeypatch):
    """`--dtype auto` resolves as on a CPU without bf16 units (float32), whatever CPU runs the tests, so that their
    numbers do not depend on the machine; tests/test_hardware.py fakes the other devices."""
    from rlhf import hardware

    monkeypatch.setattr(hardware, "detect_capabilities",
                        lambda device=None: hardware.Capabilities("cpu", False, "tests: no AVX-512 BF16 or AMX"))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests: tiny models gain nothing from threads, and on a shared
    2-core machine spinning OpenMP threads make every op many times slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def rm_dir(tiny_model_dir, tmp_path_factory):
    """An untrained reward model (last-token read-out) on the tiny model, its LoRA B made non-zero so the
    reward adapter really differs from the base."""
    import torch

    from reward_model.model import create_reward_model, save_reward_model

    torch.manual_seed(3)
    rm, _ = create_reward_model(tiny_model_dir, lora_r=4)
    with torch.no_grad():
        for name, param in rm.backbone.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    out = tmp_path_factory.mktemp("rm")
    save_reward_model(rm, out, {"base_model": tiny_model_dir, "max_length": 256, "lora_r": 4})
    return str(out)


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory):
    """The policy tests' prompts (tests/policy_helpers.py) as a JSONL prompt file."""
    import json

    from policy_helpers import PROMPTS

    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    return str(path)


@pytest.fixture(scope="session")
def peaked_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with 10x larger (tied) embeddings: its logits are no longer near-uniform, so a
    LoRA adapter can move the distribution a lot in a few steps (the plain tiny model can barely move
    its logits through the final RMSNorm)."""
    import shutil
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(10)
    out = tmp_path_factory.mktemp("peaked")
    model.save_pretrained(out)
    for f in Path(tiny_model_dir).iterdir():
        if "token" in f.name or f.suffix == ".jinja":
            shutil.copy(f, out)
    return str(out)


@pytest.fixture(scope="session")
def postgres_cluster():
    """A throwaway PostgreSQL server for the whole run (tests/postgres_cluster.py); skipped, with the reason,
    where PostgreSQL is not installed."""
    from postgres_cluster import Cluster, unavailable

    reason = unavailable()
    if reason:
        pytest.skip(reason)
    cluster = Cluster(fsync=False).start()
    yield cluster
    cluster.remove()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """Where a test's label store goes, once per backend: a SQLite file, then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield str(tmp_path / "labels.db")
        return
    cluster = request.getfixturevalue("postgres_cluster")
    url = cluster.new_database()
    yield url
    cluster.drop_database(url)
