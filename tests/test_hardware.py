"""`--dtype auto` and the threads: the resolver on faked devices, and every command that loads a model going
through it (each is stopped at its model load, where the dtype it asked for is recorded)."""

import json
import os
import shutil
from pathlib import Path

import pytest

from pipeline.cli import main
from rlhf import hardware, models
from rlhf.hardware import Capabilities, resolve_dtype

REAL_DETECT = hardware.detect_capabilities  # conftest fakes it for every test

CUDA_BF16 = Capabilities("cuda", True, "NVIDIA H100")
CUDA_OLD = Capabilities("cuda", False, "Tesla T4")
CPU_BF16 = Capabilities("cpu", True, "AVX-512 BF16, AMX")
CPU_AVX2 = Capabilities("cpu", False, "AVX2, no AVX-512 BF16 or AMX")


@pytest.mark.parametrize("caps, expected", [(CUDA_BF16, "bfloat16"), (CUDA_OLD, "float32"), (CPU_BF16, "bfloat16"),
                                            (CPU_AVX2, "float32")])
def test_auto_follows_the_devices_bf16_units(caps, expected):
    name, why = resolve_dtype("auto", caps)
    assert name == expected
    assert why.startswith(f"this {'GPU' if caps.device == 'cuda' else 'CPU'} has {'' if caps.bf16_units else 'no '}"
                          "bf16 units")


@pytest.mark.parametrize("caps", [CUDA_BF16, CUDA_OLD, CPU_BF16, CPU_AVX2])
@pytest.mark.parametrize("explicit", ["bfloat16", "float32"])
def test_an_explicit_dtype_wins(caps, explicit):
    assert resolve_dtype(explicit, caps) == (explicit, "as asked")


def test_an_unknown_dtype_is_one_line():
    from rlhf.errors import UserError

    with pytest.raises(UserError, match="--dtype must be one of auto, bfloat16, float32, got 'float16'"):
        resolve_dtype("float16", CPU_AVX2)


@pytest.mark.parametrize("avx512_bf16, amx, units", [(False, False, False), (True, False, True), (False, True, True)])
def test_cpu_capabilities_come_from_torchs_checks(monkeypatch, avx512_bf16, amx, units):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    caps = REAL_DETECT()
    assert (caps.device, caps.bf16_units) == ("cpu", units)
    named = [unit for unit in ("AVX-512 BF16", "AMX") if unit in caps.detail.split(", ")]
    assert named == [unit for unit, has in (("AVX-512 BF16", avx512_bf16), ("AMX", amx)) if has]


@pytest.mark.parametrize("bf16", [True, False])
def test_cuda_capabilities_come_from_torchs_checks(monkeypatch, bf16):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "faked GPU")
    assert REAL_DETECT() == Capabilities("cuda", bf16, "faked GPU")


def test_threads_follow_the_affinity_mask_and_omp_num_threads(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert hardware.usable_cores() == (3, "cores this process may use")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert hardware.usable_cores() == (1, "OMP_NUM_THREADS; 3 cores this process may use")


def test_setup_compute_sets_threads_and_says_so_once(monkeypatch, capsys):
    import torch

    previous = torch.get_num_threads()
    monkeypatch.setattr(hardware, "usable_cores", lambda: (1, "cores this process may use"))
    monkeypatch.setattr(hardware, "_announced", set())
    try:
        assert hardware.setup_compute("auto") == "float32"
        assert torch.get_num_threads() == 1
        hardware.setup_compute("auto")
    finally:
        torch.set_num_threads(previous)
    err = capsys.readouterr().err
    assert err == ("dtype: float32 (this CPU has no bf16 units: tests: no AVX-512 BF16 or AMX); "
                   "threads: 1 (cores this process may use)\n")


# ---- every command resolves through it ----

class _Loaded(Exception):
    """Raised at a command's model load: the test has what it needs."""


@pytest.fixture
def loaded_dtypes(monkeypatch):
    """The dtypes asked for by each causal-LM load (tokenizers still load); the first load stops the command."""
    seen, real = [], models._load

    def spy(loader, name, **kwargs):
        if "dtype" not in kwargs:
            return real(loader, name, **kwargs)
        seen.append(str(kwargs["dtype"]).removeprefix("torch."))
        raise _Loaded

    monkeypatch.setattr(models, "_load", spy)
    return seen


def _run(*argv):
    try:
        main([str(a) for a in argv])
    except _Loaded:
        pass


@pytest.fixture
def command_inputs(tmp_path, tiny_model_dir, rm_dir, prompts_file):
    """A rankings file, a reward model trained in bfloat16 (as its metadata says), a policy folder."""
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"task_id": f"t{i}", "annotator": "a", "prompt": f"Say {i}.",
             "completions": [{"id": "x", "text": "yes", "rank": 1}, {"id": "y", "text": "no", "rank": 2}]}
            for i in range(4)]
    (data / "rankings.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rm = Path(shutil.copytree(rm_dir, tmp_path / "rm-bf16"))
    meta = json.loads((rm / "reward_model.json").read_text())
    (rm / "reward_model.json").write_text(json.dumps({**meta, "dtype": "bfloat16"}))
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "policy.json").write_text(json.dumps({"base_model": tiny_model_dir}))
    (policy / "adapter_model.safetensors").write_bytes(b"")
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"prompt": "Say 1.", "completion": "yes"}) + "\n")
    model = ["--model", tiny_model_dir]
    return {
        "generate": ["generate", "--prompts", prompts_file, "--out", tmp_path / "tasks.jsonl", *model],
        "train-rm": ["train-rm", "--data", data, "--out", tmp_path / "out-rm", *model],
        "ppo": ["ppo", "--prompts", prompts_file, "--out", tmp_path / "out-ppo", "--reward", "length", *model],
        "dpo": ["dpo", "--data", data, "--out", tmp_path / "out-dpo", *model],
        "demo": ["demo", "--quick", "--resume", "--out", tmp_path / "out-demo", *model],
        "eval-rm": ["eval-rm", "--rm", rm, "--data", data],
        "score": ["score", "--rm", rm, "--input", samples, "--out", tmp_path / "scores.jsonl"],
        "sample": ["sample", "--policy", policy, "--prompts", prompts_file],
    }


COMMANDS = ["generate", "train-rm", "ppo", "dpo", "demo", "eval-rm", "score", "sample"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_loads_in_the_dtype_auto_resolves_to(command, command_inputs, loaded_dtypes, monkeypatch):
    _run(*command_inputs[command])  # conftest: a CPU without bf16 units
    monkeypatch.setattr(hardware, "detect_capabilities", lambda device=None: CPU_BF16)
    _run(*command_inputs[command])
    assert loaded_dtypes == ["float32", "bfloat16"]


@pytest.mark.parametrize("command", COMMANDS)
def test_an_explicit_dtype_reaches_every_command(command, command_inputs, loaded_dtypes, monkeypatch):
    monkeypatch.setattr(hardware, "detect_capabilities", lambda device=None: CPU_BF16)
    _run(*command_inputs[command], "--dtype", "float32")
    assert loaded_dtypes == ["float32"]


def test_a_reward_model_trained_in_float32_scores_in_float32_on_bf16_hardware(command_inputs, rm_dir, loaded_dtypes,
                                                                              monkeypatch, tmp_path):
    monkeypatch.setattr(hardware, "detect_capabilities", lambda device=None: CPU_BF16)
    _run("score", "--rm", rm_dir, "--input", tmp_path / "samples.jsonl")  # its metadata has no dtype: float32
    assert loaded_dtypes == ["float32"]


def test_the_saved_config_records_the_resolved_dtype(tiny_model_dir, command_inputs, tmp_path, monkeypatch):
    from reward_model.config import RewardTrainingConfig
    from reward_model.train import train_reward_model

    monkeypatch.setattr(hardware, "detect_capabilities", lambda device=None: CPU_BF16)
    train_reward_model(RewardTrainingConfig(data=str(tmp_path / "data"), out=str(tmp_path / "rm"), model=tiny_model_dir,
                                            epochs=1, checkpoint_every=0), progress=False)
    meta = json.loads((tmp_path / "rm" / "reward_model.json").read_text())
    assert meta["dtype"] == meta["config"]["dtype"] == "bfloat16"


def test_doctor_reports_versions_device_dtype_threads_and_the_model_cache(monkeypatch, tmp_path, capsys):
    import torch

    monkeypatch.setenv("RLHF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(hardware, "detect_capabilities", lambda device=None: CPU_BF16)
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["torch"] == torch.__version__
    assert report["dtype auto"] == "bfloat16 (this CPU has bf16 units: AVX-512 BF16, AMX)"
    assert report["threads"].startswith(f"{hardware.usable_cores()[0]} (")
    assert report["cache folder"] == f"{tmp_path / 'cache'} ($RLHF_CACHE)"
    assert report["default model"].startswith(("not converted yet", "missing: pip install"))
    assert main(["doctor"]) == 0
    assert "dtype auto" in capsys.readouterr().out
