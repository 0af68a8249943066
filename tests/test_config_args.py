"""rlhf.config_args: every config field is a flag whose help is the field's docstring; values are checked once."""

import dataclasses
from dataclasses import dataclass
from typing import Literal

import pytest

from labeling.generate import GenerateConfig
from pipeline.cli import build_parser
from pipeline.demo import DemoConfig
from policy.config import PPOConfig
from reward_model.config import RewardTrainingConfig
from rlhf.config_args import add_config_arguments, check_fields, config_from_args, field_docs, given_fields
from rlhf.errors import UserError


def _subparser(command: str):
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sub.choices[command]


@pytest.mark.parametrize("command, cls", [("ppo", PPOConfig), ("train-rm", RewardTrainingConfig),
                                          ("demo", DemoConfig), ("generate", GenerateConfig)])
def test_every_field_is_a_flag_with_its_docstring_as_help(command, cls):
    actions = {a.dest: a for a in _subparser(command)._actions}
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        assert f.name in actions, f"{command}: no flag for {f.name}"
        flag = actions[f.name]
        assert flag.option_strings[0] == "--" + f.name.replace("_", "-")
        assert docs[f.name][1] and flag.help.replace("%%", "%").startswith(docs[f.name][1])
    assert all(group for group, _ in docs.values())  # every field sits under a group title


def test_flags_build_the_config_and_leave_the_rest_at_its_defaults():
    parser = build_parser()
    args = parser.parse_args(["ppo", "--prompts", "p.jsonl", "--out", "o", "--algo", "grpo", "--stop-kl", "off",
                              "--lora-alpha", "8", "--no-grpo-scale-rewards", "--missing-eos-penalty", "0.5"])
    config = config_from_args(PPOConfig, args)
    assert (config.algo, config.stop_kl, config.lora_alpha, config.grpo_scale_rewards) == ("grpo", None, 8, False)
    assert config.missing_eos_penalty == 0.5 and config.lr == PPOConfig.lr
    assert config.kl_coef == 0.04 and config.kl_estimator == "k3"  # the algorithm's defaults still fill in
    with pytest.raises(SystemExit):
        parser.parse_args(["ppo", "--out", "o"])  # --prompts is required on the command line
    with pytest.raises(SystemExit):
        parser.parse_args(["ppo", "--prompts", "p", "--out", "o", "--algo", "dpo"])
    with pytest.raises(SystemExit):
        parser.parse_args(["ppo", "--prompts", "p", "--out", "o", "--steps", "many"])


def test_quick_demo_keeps_the_flags_given():
    args = build_parser().parse_args(["demo", "--quick", "--ppo-steps", "5", "--out", "x"])
    cfg = DemoConfig.quick(**given_fields(DemoConfig, args))
    assert (cfg.ppo_steps, cfg.out, cfg.label_prompts) == (5, "x", DemoConfig.quick().label_prompts)


@dataclass
class _Example:
    # group one
    size: int = 2
    """How many."""
    mode: Literal["a", "b"] = "a"
    """Which."""
    # group two
    limit: float | None = 1.0
    """A cap; off for none."""


def test_check_fields_names_the_flag():
    check_fields(_Example(), positive=("size",))
    with pytest.raises(UserError, match="--size must be >= 1, got 0"):
        check_fields(_Example(size=0), positive=("size",))
    with pytest.raises(UserError, match="--mode must be one of a, b, got 'c'"):
        check_fields(_Example(mode="c"))
    assert field_docs(_Example) == {"size": ("group one", "How many."), "mode": ("group one", "Which."),
                                    "limit": ("group two", "A cap; off for none.")}
    import argparse

    parser = argparse.ArgumentParser()
    add_config_arguments(parser, _Example)
    assert config_from_args(_Example, parser.parse_args(["--limit", "off"])).limit is None
    assert config_from_args(_Example, parser.parse_args([])) == _Example()
    assert "(default: 1.0)" in parser.format_help() and "group two" in parser.format_help()
