"""A reward model exported by `rlhf export-model`, in a folder that transformers loads on its own:

    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)   # it reads config.json too
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    inputs = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), return_tensors="pt",
                       add_special_tokens=False)
    reward = model(**inputs).logits[:, 0]

This file is copied into every exported folder and imports only torch and transformers.

The reward reads what `rlhf score` reads: the hidden state after the decoder's first
`config.body["num_hidden_layers"]` layers (the folder holds only those; the model's final norm is
applied after them), averaged over the completion's tokens (`config.pool == "mean"`) or taken at its
last token (`"last"`), then a linear head whose bias already has the reward normalisation subtracted.
The completion is found in the token ids: the tokens after the last assistant header of the chat
template (`config.assistant_header_ids`) up to and including the last end-of-sequence token
(`config.eos_token_id`) after it, so a conversation formatted by the chat template (which may add a
newline after that token) reads the same tokens as `rlhf score`. Callers that format samples otherwise
pass `completion_mask` (1 on the completion's tokens). Positions are counted over real tokens, so left
and right padding give the same rewards.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutputWithPast


class RLHFRewardConfig(PretrainedConfig):
    """`body`: the decoder's own config as a dict (truncated to the read-out layer); `pool`: "mean" or
    "last"; `assistant_header_ids`, `eos_token_id`: where the completion is; `reward_bias`: the
    normalisation already folded into the head (kept to document it); `base_model`, `readout_layer`: where
    the reward model came from."""

    model_type = "rlhf_reward_model"

    def __init__(self, body: dict | None = None, pool: str = "mean", assistant_header_ids: list[int] | None = None,
                 eos_token_id: int | None = None, reward_bias: float = 0.0, base_model: str = "",
                 readout_layer: int = 0, **kwargs):
        self.body = dict(body or {})
        self.pool = pool
        self.assistant_header_ids = list(assistant_header_ids or [])
        self.eos_token_id = eos_token_id
        self.reward_bias = reward_bias
        self.base_model = base_model
        self.readout_layer = readout_layer
        kwargs.setdefault("num_labels", 1)
        super().__init__(**kwargs)


class RLHFRewardModel(PreTrainedModel):
    """The decoder body (`AutoModel` of the body config) and a linear score head: logits [B, 1] = rewards."""

    config_class = RLHFRewardConfig
    base_model_prefix = "body"

    def __init__(self, config: RLHFRewardConfig):
        super().__init__(config)
        body = dict(config.body)
        self.body = AutoModel.from_config(AutoConfig.for_model(body.pop("model_type"), **body))
        self.score = nn.Linear(self.body.config.hidden_size, 1, dtype=torch.float32)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Every weight comes from the folder; nothing to initialise."""

    def completion_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """1 on each row's completion: after the last assistant header, up to the last EOS after it (or the
        last real token when there is none). Without a chat template only the last real token can be found."""
        header = torch.tensor(self.config.assistant_header_ids, device=input_ids.device)
        mask = torch.zeros_like(input_ids)
        width = input_ids.shape[1]
        for row in range(input_ids.shape[0]):
            ids, real = input_ids[row], attention_mask[row].bool()
            if not len(header):  # a tokenizer without a chat template: the last real token is the EOS
                if self.config.pool == "mean":
                    raise ValueError("the tokenizer has no chat template to find the completion by: pass "
                                     "completion_mask")
                mask[row, int(real.nonzero().flatten()[-1])] = 1
                continue
            found = []
            if len(header) <= width:
                windows = (ids.unfold(0, len(header), 1) == header).all(-1) & real.unfold(0, len(header), 1).all(-1)
                found = windows.nonzero().flatten().tolist()
            if not found:
                raise ValueError(f"row {row}: no assistant turn (the header ids {self.config.assistant_header_ids}) "
                                 f"in the input; format it with the chat template or pass completion_mask")
            start = found[-1] + len(header)
            ends = ((ids == self.config.eos_token_id) & real).nonzero().flatten()
            ends = ends[ends >= start]
            end = int(ends[-1]) if len(ends) else int(real.nonzero().flatten()[-1])
            mask[row, start:end + 1] = 1
        return mask

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                completion_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                **kwargs) -> SequenceClassifierOutputWithPast:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False).last_hidden_state
        if completion_mask is None:
            completion_mask = self.completion_mask(input_ids, attention_mask)
        mask = (completion_mask * attention_mask).to(hidden.device)
        if self.config.pool == "mean":
            weights = mask.to(torch.float32).unsqueeze(-1)
            features = (hidden.float() * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        else:
            last = mask.shape[1] - 1 - mask.flip(-1).to(torch.int8).argmax(-1)
            features = hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()
        logits = self.score(features.to(self.score.weight.dtype))
        return SequenceClassifierOutputWithPast(logits=logits)
