"""A trained policy as a standard transformers folder (`rlhf export-model --policy`, `rlhf ppo --save-merged`): the
base model with the actor's LoRA adapter merged in, the tokenizer, the generation config of training and a model
card (README.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlhf.errors import UserError
from rlhf.model_folder import base_model_error, model_card, read_json, write_folder


def merge_policy(policy_dir: Path, target: Path, base_model: str | None = None) -> Path:
    """Base model with the actor adapter merged in, saved as a plain HF model folder that
    AutoModelForCausalLM.from_pretrained loads: weights, tokenizer, the generation config of training
    (sampling at its temperature, up to its response length, stopping at EOS) and a model card.
    `base_model` replaces the base model recorded in policy.json (moved or renamed)."""
    from policy.roles import POLICY_META, load_policy
    from rlhf.models import eos_token_ids
    from rlhf.runlog import read_log

    base = base_model or read_json(policy_dir / POLICY_META).get("base_model", "")
    try:
        model, tokenizer, meta = load_policy(policy_dir, model_name=base_model)
    except UserError as exc:
        if not (policy_dir / POLICY_META).is_file():
            raise
        raise base_model_error(policy_dir, base, exc) from None
    merged = model.merge_and_unload()
    merged.generation_config.update(do_sample=True, temperature=meta["temperature"], top_p=1.0, top_k=0,
                                    max_new_tokens=meta["response_length"], min_new_tokens=1,
                                    eos_token_id=eos_token_ids(merged, tokenizer), pad_token_id=tokenizer.pad_token_id)
    evals = read_log(policy_dir.parent / "eval.csv")
    card = policy_model_card(meta, read_json(policy_dir.parent / "config.json"),
                             evals.iloc[-1].to_dict() if len(evals) else {})

    def write(folder: Path) -> None:
        merged.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / "README.md").write_text(card, encoding="utf-8")

    return write_folder(Path(target), write, Path(policy_dir))


POLICY_USAGE = """
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained(FOLDER)
tokenizer = AutoTokenizer.from_pretrained(FOLDER)
inputs = tokenizer.apply_chat_template([{"role": "user", "content": "Write a poem."}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True)
output = model.generate(**inputs)   # sampling settings of the training run: generation_config.json
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
"""


def policy_model_card(meta: dict[str, Any], config: dict[str, Any], final: dict[str, Any]) -> str:
    """The card of a merged policy, from its policy.json, the run's config.json and its last evaluation."""
    algo = str(meta.get("algo", "ppo")).upper()
    reward = f"the reward model {meta.get('rm')}" if meta.get("reward") == "rm" else f"the oracle {meta.get('reward')}"
    intro = (f"A policy fine-tuned by `rlhf ppo --algo {meta.get('algo')}` ({algo}, {meta.get('steps')} steps) "
             f"against {reward}, with a KL penalty towards the base model; the LoRA adapter is merged into the "
             f"weights. `generation_config.json` holds the sampling settings of training.")
    return model_card(
        "Policy", str(meta.get("base_model")), intro, POLICY_USAGE.replace("FOLDER", '"path/to/this/folder"'),
        {"Data": {"training prompts": config.get("prompts"), "held-out prompts": config.get("eval_prompts")},
         "Settings": {"algorithm": meta.get("algo"), "steps": meta.get("steps"), "learning rate": config.get("lr"),
                      "KL coefficient": config.get("kl_coef"), "rollouts per step": config.get("batch_size"),
                      "temperature": meta.get("temperature"), "response length": meta.get("response_length"),
                      "LoRA r": config.get("lora_r")},
         "Evaluation (held-out prompts, last evaluation)": {key: value for key, value in final.items()
                                                           if isinstance(value, (int, float))}},
        ["rlhf", algo.lower()])
