"""Rollout, evaluation and one update of every algorithm with the model on an accelerator.

With a GPU the roles really move there. Without one (CI), `FakeDevice` makes the model's tensors pass
for tensors on "cuda:0" while they stay in CPU memory: inside it, every torch call checks that it does
not mix such tensors with real CPU tensors (0-dim CPU tensors aside, as CUDA allows), so a tensor built
on the CPU (`torch.full(...)`, `sample_batch`'s ids) that meets the model fails here as it would on a
GPU, with the call named.
"""

import contextlib

import pytest
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from policy.config import PPOConfig
from policy.evaluate import evaluate
from policy.roles import build_roles
from policy.rollout import reward_function, rollout
from policy.trainer import grpo_update, ppo_update, rloo_update
from rlhf.models import eos_token_ids

FAKE = torch.device("cuda", 0)
_TAG = "_on_fake_device"


pytestmark = pytest.mark.usefixtures("one_thread")

class DeviceMismatch(AssertionError):
    pass


def on_fake(t: Tensor) -> bool:
    return bool(getattr(t, _TAG, False))


def _tag(t, value: bool) -> None:
    if isinstance(t, Tensor):
        setattr(t, _TAG, value)


def _names_fake(device) -> bool:
    return isinstance(device, int) or torch.device(device).type == "cuda"


def to_fake_device(module):
    """"Move" a module: its parameters and buffers now count as tensors on FAKE."""
    for t in [*module.parameters(), *module.buffers()]:
        _tag(t, True)
    return module


class FakeDevice(TorchFunctionMode):
    """Tensors tagged as on FAKE report `device == cuda:0`; factories and `.to`/`.cuda` given that
    device make tagged tensors, `.cpu()`/`.to("cpu")` untagged copies; an op's outputs are on FAKE
    when any input is; an op that mixes tagged tensors with untagged non-scalar ones raises
    DeviceMismatch (indexing with CPU indices and `copy_` across devices are allowed, as on CUDA)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func == Tensor.device.__get__:
            return FAKE if on_fake(args[0]) else func(*args)
        if func == Tensor.is_cuda.__get__:
            return on_fake(args[0])
        if func == Tensor.is_cpu.__get__:
            return not on_fake(args[0])
        if func == Tensor.grad.__get__:
            grad = func(*args)
            if grad is not None and on_fake(args[0]):
                _tag(grad, True)
            return grad
        if func in (Tensor.numpy, Tensor.__array__) and on_fake(args[0]):
            raise DeviceMismatch("numpy() of a tensor on cuda")
        target = None  # None: the op stays where its inputs are; True/False: to FAKE / to the CPU
        if func is Tensor.cpu:
            target = False
        elif func is Tensor.cuda:
            target, args = True, args[:1]
            kwargs.pop("device", None)
        elif func is Tensor.to:
            rest = []
            for a in args[1:]:
                if isinstance(a, (str, torch.device)) or (isinstance(a, int) and not isinstance(a, bool)):
                    target = _names_fake(a)
                    a = torch.device("cpu")
                elif isinstance(a, Tensor):
                    target = on_fake(a)
                rest.append(a)
            args = (args[0], *rest)
        if kwargs.get("device") is not None:
            target = _names_fake(kwargs["device"])
            kwargs["device"] = torch.device("cpu")
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        if target is None:
            self._check(func, args, tensors)
            target = any(on_fake(t) for t in tensors)
            out = func(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
            source = args[0] if args and isinstance(args[0], Tensor) else None
            if source is not None and out is source and on_fake(source) != target:
                out = source.clone()  # a transfer is a copy: never re-tag the source
        for t in tree_flatten(out)[0]:
            _tag(t, target)
        return out

    @staticmethod
    def _check(func, args, tensors) -> None:
        if func is Tensor.copy_:
            return
        if func in (Tensor.__getitem__, Tensor.__setitem__):
            self_t, index = args[0], [t for t in tree_flatten(args[1])[0] if isinstance(t, Tensor)]
            bad = [t for t in index if on_fake(t) and not on_fake(self_t)]
            value = args[2] if func is Tensor.__setitem__ else None
            if index and isinstance(value, Tensor) and value.dim() > 0 and on_fake(value) != on_fake(self_t):
                bad.append(value)  # advanced-index assignment runs one kernel over self and value
            if bad:
                raise DeviceMismatch(f"{func.__name__}: indexing across cpu and cuda")
            return
        fake = [t for t in tensors if on_fake(t)]
        host = [t for t in tensors if not on_fake(t) and t.dim() > 0]
        if fake and host:
            name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
            raise DeviceMismatch(f"{name}: CPU tensors {[tuple(t.shape) for t in host]} meet tensors on cuda "
                                 f"{[tuple(t.shape) for t in fake]}")


def test_fake_device_catches_cpu_tensors_meeting_model_tensors():
    """The harness itself: without it catching these, the tests below would prove nothing."""
    weight = to_fake_device(torch.nn.Linear(3, 2))
    with FakeDevice():
        assert weight.weight.device == FAKE and weight.weight.is_cuda
        x = torch.ones(4, 3)
        with pytest.raises(DeviceMismatch, match="linear"):
            weight(x)
        y = weight(x.to(weight.weight.device))
        assert on_fake(y) and not on_fake(x)  # .to(device) copies; the CPU tensor stays on the CPU
        assert on_fake(torch.arange(4, device=y.device)) and not on_fake(torch.arange(4))
        with pytest.raises(DeviceMismatch, match="cat"):
            torch.cat([y, torch.zeros(4, 1)], dim=1)
        assert on_fake(y * torch.tensor(2.0))  # a 0-dim CPU tensor is a scalar, as on CUDA
        assert on_fake(y[torch.tensor([0, 2])])  # CPU indices are fine, as on CUDA
        host = y.cpu()
        assert not on_fake(host) and on_fake(y) and host.device.type == "cpu"
        with pytest.raises(DeviceMismatch):
            y + host
        y.sum().backward()
        assert on_fake(weight.weight.grad)


def _on_device():
    """(move roles, context to run in, is this tensor on the accelerator?)"""
    if torch.cuda.is_available():
        return (lambda roles: roles.to("cuda"), contextlib.nullcontext,
                lambda t: t.device.type == "cuda")
    return to_fake_device, FakeDevice, on_fake


@pytest.mark.parametrize("algo,reward", [("ppo", "length"), ("rloo", "length"), ("grpo", "length"),
                                         ("ppo", "rm"), ("grpo", "rm")])
def test_rollout_evaluate_and_update_on_the_model_device(tiny_model_dir, rm_dir, algo, reward):
    from accelerate import Accelerator

    torch.manual_seed(0)
    config = PPOConfig(algo=algo, reward=reward, rm=rm_dir if reward == "rm" else None, response_length=5,
                       batch_size=4, rloo_k=2, grpo_k=2, micro_batch_size=2, ppo_epochs=2 if algo != "rloo" else None,
                       minibatch_size=2 if algo != "rloo" else None, eval_size=2)
    config.check()
    move, context, on_accelerator = _on_device()
    roles, tokenizer = build_roles(tiny_model_dir, config.rm, lora_r=4, lora_alpha=8, critic=algo == "ppo")
    roles = move(roles)
    optimizer = torch.optim.Adam(roles.trainable_parameters(), lr=1e-3)
    eos = eos_token_ids(roles.model, tokenizer)
    reward_fn = reward_function(config, tokenizer)
    with context():
        # evaluation runs first in train_policy (step 0), on the policy and at the end on the reference
        metrics, rows = evaluate(roles, tokenizer, ["Hi there", "Tell a story"], config, reward_fn, None, eos)
        evaluate(roles, tokenizer, ["Hi there"], config, reward_fn, None, eos, reference=True)
        batch = rollout(roles, tokenizer, ["Hi there", "Tell a story"], config.samples_per_prompt, config,
                        reward_fn, eos, generator_seed=1, with_values=algo == "ppo", with_logprobs=algo != "rloo")
        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        if algo == "ppo":
            update = ppo_update(roles, accelerator, optimizer, batch, 0.05, config, 1)
        elif algo == "grpo":
            update = grpo_update(roles, accelerator, optimizer, batch, 0.04, config, 1)
        else:
            update = rloo_update(roles, accelerator, optimizer, batch, 0.05, config)
    assert len(rows) == 2 and all(isinstance(v, float) for v in metrics.values())
    for name in ("input_ids", "attention_mask", "responses", "mask", "finished", "ref_logprobs", "scores"):
        assert on_accelerator(getattr(batch, name)), name
    assert on_accelerator(update.logprobs) and on_accelerator(update.entropy)
    assert update.skipped == 0 and all(v == v for v in update.metrics.values())  # no NaN
