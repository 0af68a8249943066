"""A trained reward model as a folder that transformers loads by itself (`rlhf export-model --rm`), with its
model card (README.md).

The reward folder holds the base model with the LoRA adapter merged in, cut to the layers the reward
reads, in float32; the score head with the reward normalisation folded into its bias; the tokenizer;
and `modeling_rlhf_reward.py`, which reads the reward exactly as `rlhf score` does (see that file):

    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)

A plain `LlamaForSequenceClassification` cannot stand in for it: its score layer has no bias, so it
cannot carry the normalisation (a constant), and it reads the last non-padding token of the last layer,
which with the default tokenizer (padding id = end-of-sequence id) is the token before the completion's
EOS, and can never be the mean over the completion at a middle layer that the default read-out uses.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rlhf.errors import UserError
from rlhf.model_folder import base_model_error, model_card, write_folder

log = logging.getLogger(__name__)

REWARD_MODEL_TYPE = "rlhf_reward_model"


def assistant_header_ids(tokenizer) -> list[int]:
    """The token ids the chat template puts before an assistant reply (its generation prompt), as they end
    the prompt's ids in `encode_sample_ids`; [] without a chat template."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    turn = [{"role": "user", "content": "Hi"}]
    with_header = tokenizer(tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True),
                            add_special_tokens=False)["input_ids"]
    without = tokenizer(tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=False),
                        add_special_tokens=False)["input_ids"]
    common = next((i for i, (a, b) in enumerate(zip(with_header, without)) if a != b), min(len(with_header),
                                                                                            len(without)))
    header = with_header[common:]
    if not header:
        raise UserError("the tokenizer's chat template adds no assistant header (generation prompt) to find the "
                        "completion by")
    return header


def export_reward_model(rm_dir: str | Path, out: str | Path, base_model: str | None = None) -> Path:
    """Write the reward model of `rm_dir` (from `rlhf train-rm`) as a transformers folder at `out` (see the
    module docstring). `base_model` replaces the base model recorded at training time (moved or renamed)."""
    import torch

    from reward_model.model import load_reward_model, num_decoder_layers, read_meta
    from reward_model.modeling_rlhf_reward import RLHFRewardConfig, RLHFRewardModel
    from rlhf.causal_lm import decoder_body

    rm_dir, out = Path(rm_dir), Path(out)
    meta = read_meta(rm_dir)
    base = base_model or meta["base_model"]
    try:
        rm, tokenizer = load_reward_model(rm_dir, dtype=torch.float32, base_model=base)
    except UserError as exc:
        raise base_model_error(rm_dir, base, exc) from None
    merged = rm.backbone.merge_and_unload()
    depth = num_decoder_layers(merged)
    layers = rm.readout.layer or depth
    body_config = merged.config.to_dict()
    body_config["num_hidden_layers"] = layers
    if isinstance(body_config.get("layer_types"), list):
        body_config["layer_types"] = body_config["layer_types"][:layers]
    for key in ("architectures", "auto_map", "transformers_version"):
        body_config.pop(key, None)
    state = {name: tensor for name, tensor in decoder_body(merged).state_dict().items()
             if not (name.startswith("layers.") and int(name.split(".")[1]) >= layers)}
    reward_bias = float(meta.get("reward_bias", 0.0))
    config = RLHFRewardConfig(body=body_config, pool=rm.readout.pool,
                              assistant_header_ids=assistant_header_ids(tokenizer), eos_token_id=tokenizer.eos_token_id,
                              reward_bias=reward_bias, base_model=base, readout_layer=layers,
                              pad_token_id=tokenizer.pad_token_id)
    model = RLHFRewardModel(config)
    model.body.load_state_dict(state)
    with torch.no_grad():
        model.score.weight.copy_(rm.score_head.weight)
        model.score.bias.copy_(rm.score_head.bias - reward_bias)
    RLHFRewardConfig.register_for_auto_class()
    RLHFRewardModel.register_for_auto_class("AutoModelForSequenceClassification")

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (folder / "README.md").write_text(reward_model_card(meta, base, layers, depth), encoding="utf-8")

    return write_folder(out, write, rm_dir)


# ---- the model card ----

REWARD_USAGE = """
from transformers import AutoModelForSequenceClassification, AutoTokenizer

model = AutoModelForSequenceClassification.from_pretrained(FOLDER, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(FOLDER, trust_remote_code=True)
messages = [{"role": "user", "content": "Write a poem."}, {"role": "assistant", "content": "Silver seas sing softly."}]
# a conversation works the same: its earlier turns, then the reply to score as the last assistant message
inputs = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), return_tensors="pt",
                   add_special_tokens=False)
reward = model(**inputs).logits[:, 0]
"""


def reward_model_card(meta: dict[str, Any], base: str, layers: int, depth: int) -> str:
    """The card of an exported reward model, from its reward_model.json."""
    training, config = meta.get("training", {}), meta.get("config", {})
    test = training.get("test", {})
    readout = meta.get("readout", {})
    pool = {"mean": "the mean over the completion's tokens", "last": "the completion's last token"}.get(
        readout.get("pool", "last"), readout.get("pool"))
    intro = (f"A reward model trained by `rlhf train-rm` on ranked completions with InstructGPT's K-wise loss: "
             f"LoRA (r={meta.get('lora_r')}) on the base model and a linear score head reading {pool} after "
             f"decoder layer {layers} of {depth} (the layers above are not part of this folder). The score is "
             f"normalised so that the training completions have mean reward 0 (bias {meta.get('reward_bias', 0):.4g}, "
             f"folded into the head). Loading it needs `trust_remote_code=True`: `modeling_rlhf_reward.py` finds "
             f"the completion after the chat template's assistant header and pools it as `rlhf score` does. "
             f"Weights in float32.")
    return model_card(
        "Reward model", base, intro, REWARD_USAGE.replace("FOLDER", '"path/to/this/folder"'),
        {"Data": {"training data": training.get("data"), "rankings": training.get("train_rankings"),
                  "pairs": training.get("train_pairs"), "held-out data": test.get("source")},
         "Settings": {"epochs": config.get("epochs"), "learning rate": config.get("lr"),
                      "rankings per step": config.get("batch_rankings"), "LoRA r / alpha":
                          f"{meta.get('lora_r')} / {meta.get('lora_alpha', config.get('lora_alpha'))}",
                      "max length (tokens)": meta.get("max_length"), "training dtype": meta.get("dtype"),
                      "pair weighting": config.get("pair_weighting"), "margin": config.get("margin")},
         "Evaluation (held-out pairs)": {"pairs": test.get("pairs"), "accuracy": test.get("accuracy"),
                                         "mean margin": test.get("mean_margin"), "ECE (10 bins)": test.get("ece"),
                                         "human agreement": test.get("human_agreement")},
         "Normalisation": {"reward bias": meta.get("reward_bias"),
                           "per-prompt spread of mean reward": training.get("per_prompt_mean_std")}},
        ["reward-model", "rlhf"])


