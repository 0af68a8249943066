"""The four PPO roles on ONE base model in memory (actor, critic, reward, reference).

The base causal LM is loaded once and wrapped with peft; the roles differ only in which LoRA adapter
runs and which head reads the hidden states:

- actor: adapter "actor" (fresh LoRA, trainable) + the base LM head -> token logits;
- critic: adapter "critic" + `value_head`, trainable, reading the state after layer `critic_layer` (a
  third of the depth by default: only those layers run). When the RM reads that layer's last token (with
  critic_layer 0: the papers' read-out), both start as the RM's adapter and score head, as in
  InstructGPT/Ziegler et al.; otherwise (the default RM pools a mean) a fresh adapter and a zero head;
- reward: adapter "reward" (the RM's adapter, frozen) + `score_head` (frozen) on the RM's read-out;
- reference: the same base with every adapter DISABLED; its weights are never updated.

With an oracle reward there is no RM: the critic is a fresh LoRA on the base with a fresh value head,
and there is no reward adapter. RLOO and GRPO have no critic (`build_roles(..., critic=False)`).

peft's `set_adapter` and `disable_adapter` toggle `requires_grad` (only the active adapter trains);
`_activate` restores it after every switch and re-selects the actor, even when the block raises, so
the actor and the critic both train, the reward adapter and base weights never do, and code outside
a role's block runs the actor.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from reward_model.model import RMParts, first_layers, load_rm_parts, num_decoder_layers, reward_features
from rlhf.causal_lm import final_hidden_states, lora_target_modules, position_ids_from_mask
from rlhf.layer_request import resolve_layer
from rlhf.models import load_causal_lm, load_tokenizer

ACTOR, CRITIC, REWARD = "actor", "critic", "reward"
POLICY_META = "policy.json"


class PolicyRoles(nn.Module):
    """The shared peft model plus the value and score heads; one method per role."""

    def __init__(self, peft_model, value_head: nn.Linear | None, rm: RMParts | None = None, critic_layer: int = 0):
        super().__init__()
        self.model = peft_model
        self.value_head = value_head
        self.critic_layer = critic_layer  # decoder layers the critic runs (0 = all)
        # The reward model's head, read-out and max_length (None with an oracle reward); its bias
        # already holds the RM's normalisation.
        self.score_head = rm.score_head if rm is not None else None
        self.rm_readout = rm.readout if rm is not None else None
        self.rm_max_length = rm.max_length if rm is not None else None
        # Decided by name, once: peft's requires_grad flags depend on which adapter was set last.
        self._trainable = {name for name, _ in self.named_parameters()
                           if ("lora_" in name and (f".{ACTOR}." in name or f".{CRITIC}." in name))
                           or name.startswith("value_head.")}
        self._restore_trainable()

    def _restore_trainable(self) -> None:
        for name, param in self.named_parameters():
            param.requires_grad_(name in self._trainable)

    def named_trainable(self) -> dict[str, nn.Parameter]:
        """The trainable parameters by name (actor and critic adapters, value head): what a checkpoint holds."""
        return {name: p for name, p in self.named_parameters() if name in self._trainable}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.named_trainable().values())

    def parameters_of(self, role: str) -> dict[str, Tensor]:
        """Named parameters of one adapter ("actor", "critic", "reward") or "base" (everything else in
        the peft model), for tests and checks."""
        if role == "base":
            return {n: p for n, p in self.model.named_parameters() if "lora_" not in n}
        return {n: p for n, p in self.model.named_parameters() if f".{role}." in n}

    @contextmanager
    def _activate(self, adapter: str | None):
        """Run the block with `adapter` active (None = all disabled: the reference). On exit, also on an
        exception, the actor is active again and `requires_grad` is restored (peft's `set_adapter` has
        just made the selected adapter, even the frozen reward adapter, trainable)."""
        try:
            if adapter is None:
                with self.model.disable_adapter():
                    yield
            else:
                self.model.set_adapter(adapter)
                yield
        finally:
            if self.model.active_adapter != ACTOR:
                self.model.set_adapter(ACTOR)
            self._restore_trainable()

    @property
    def reference(self):
        """Context manager: inside it, the model is the frozen reference (adapters disabled)."""
        return self._activate(None)

    def actor(self):
        return self._activate(ACTOR)

    def forward(self, role: str, input_ids: Tensor, attention_mask: Tensor, response_length: int) -> Tensor:
        """The trainable roles' one entry point: the actor's response logits [B, T, V] (role ACTOR) or the
        critic's values [B, T] (role CRITIC). The updates call the roles through it, so that under several
        processes, where `accelerator.prepare` wraps the roles in DistributedDataParallel, every forward pass
        goes through DDP and the backward pass all-reduces the gradients (TRL's PolicyAndValueWrapper does the
        same). Generation, the reward and the reference run on the unwrapped roles, without gradients."""
        if role == CRITIC:
            return self.values(input_ids, attention_mask, response_length)
        if role != ACTOR:
            raise ValueError(f"only the actor and the critic train, not {role!r}")
        return self.response_logits(ACTOR, input_ids, attention_mask, response_length)

    def response_logits(self, adapter: str | None, input_ids: Tensor, attention_mask: Tensor,
                        response_length: int) -> Tensor:
        """Logits [B, T, V] that predict the last T tokens of `input_ids` (the response), computed only
        at those positions: a 49k-vocabulary head over the prompt would be wasted work."""
        with self._activate(adapter):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids_from_mask(attention_mask),
                             logits_to_keep=response_length + 1, use_cache=False)
        return out.logits[:, :-1]

    def values(self, input_ids: Tensor, attention_mask: Tensor, response_length: int) -> Tensor:
        """Critic values [B, T]: V of the state before each response token (prompt + earlier tokens)."""
        if self.value_head is None:
            raise RuntimeError("no critic in these roles (built with critic=False, as for RLOO and GRPO)")
        with self._activate(CRITIC), first_layers(self.model, self.critic_layer):
            hidden = final_hidden_states(self.model, input_ids, attention_mask)
        hidden = hidden[:, -response_length - 1:-1]
        return self.value_head(hidden.float()).squeeze(-1)

    @torch.no_grad()
    def scores(self, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor) -> Tensor:
        """The reward model's score [B] of rows laid out as `reward_model.model.pad_samples` makes them,
        read exactly as `RewardModel.forward` reads them (same read-out, same head)."""
        if self.score_head is None:
            raise RuntimeError("no reward model loaded (the reward is an oracle)")
        with self._activate(REWARD):
            features = reward_features(self.model, self.rm_readout, input_ids, attention_mask, completion_mask)
        return self.score_head(features).squeeze(-1)


def _lora_config(targets: list[str], r: int, alpha: int, layers: int = 0):
    from peft import LoraConfig

    # dropout 0: the rollout's logprobs and values must be what the update recomputes (Huang et al.
    # 2024 disable dropout in the policy and value networks for the same reason).
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=targets,
                      layers_to_transform=list(range(layers)) if layers else None)


def build_roles(model_name: str, rm_dir: str | None, *, lora_r: int = 16, lora_alpha: int = 32,
                dtype: torch.dtype = torch.float32, critic: bool = True, critic_layer: float = 0,
                init_actor: str | None = None):
    """(PolicyRoles, tokenizer) on one base model: actor and critic trainable, reward and base frozen.
    critic=False (RLOO, GRPO: no value function) loads no critic adapter and no value head. `critic_layer`
    is PPOConfig.critic_layer (0: the last layer). `init_actor`: a policy folder (`save_actor`) whose adapter
    the actor starts from instead of a fresh one; the reference stays the base model."""
    from peft import get_peft_model

    tokenizer = load_tokenizer(model_name)
    base = load_causal_lm(model_name, dtype=dtype)
    base.requires_grad_(False)
    hidden_size = base.config.hidden_size
    targets = lora_target_modules(base)  # before peft wraps the projections
    model = get_peft_model(base, _lora_config(targets, lora_r, lora_alpha), adapter_name=ACTOR)
    if init_actor is not None:
        load_actor_weights(model, init_actor, lora_r, lora_alpha)
    value_head = nn.Linear(hidden_size, 1, dtype=torch.float32)
    # Fresh value head at zero: V = 0 makes the first advantages the plain reward-to-go, where random
    # initial values would drown a small reward in noise. It still learns (h != 0).
    nn.init.zeros_(value_head.weight)
    nn.init.zeros_(value_head.bias)
    rm = load_rm_parts(rm_dir, hidden_size) if rm_dir is not None else None
    if rm is not None:
        model.load_adapter(str(rm_dir), adapter_name=REWARD, is_trainable=False)
    depth = num_decoder_layers(base)
    layer = resolve_layer(critic_layer, depth, "--critic-layer")
    # The critic starts as the RM (InstructGPT; Ziegler et al. 2019) when the RM reads the states the critic
    # reads, one layer's state per token. An RM that pools a mean has a head fitted to pooled features:
    # the critic then starts fresh, like an oracle run's.
    critic_from_rm = rm is not None and rm.readout.layer == layer and rm.readout.pool == "last"
    if critic and critic_from_rm:
        model.load_adapter(str(rm_dir), adapter_name=CRITIC, is_trainable=True)
        with torch.no_grad():
            value_head.weight.copy_(rm.score_head.weight)
            value_head.bias.copy_(rm.score_head.bias)
    elif critic:
        model.add_adapter(CRITIC, _lora_config(targets, lora_r, lora_alpha, layers=layer))
    model.set_adapter(ACTOR)
    model.eval()  # no dropout anywhere; gradients still flow
    roles = PolicyRoles(model, value_head if critic else None, rm, critic_layer=layer)
    return roles, tokenizer


def load_actor_weights(model, policy_dir: str | Path, lora_r: int, lora_alpha: int) -> None:
    """Copy a saved policy's adapter (`save_actor`) into the actor adapter of `model`; the same LoRA shape is
    required, and every saved tensor must find its place."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from rlhf.errors import UserError

    policy_dir = Path(policy_dir)
    weights, config_file = policy_dir / "adapter_model.safetensors", policy_dir / "adapter_config.json"
    if not weights.is_file() or not config_file.is_file():
        raise UserError(f"{policy_dir} is not a policy directory (no adapter); train one with `rlhf ppo`")
    saved = json.loads(config_file.read_text(encoding="utf-8"))
    if (saved.get("r"), saved.get("lora_alpha")) != (lora_r, lora_alpha):
        raise UserError(f"{policy_dir} holds a LoRA adapter of rank {saved.get('r')} and alpha "
                        f"{saved.get('lora_alpha')}; this run's actor has rank {lora_r} and alpha {lora_alpha}")
    result = set_peft_model_state_dict(model, load_file(str(weights)), adapter_name=ACTOR)
    if result.unexpected_keys:
        raise UserError(f"{policy_dir}: its adapter does not fit this base model (e.g. {result.unexpected_keys[0]})")


def save_actor(roles: PolicyRoles, out_dir: str | Path, meta: dict) -> Path:
    """Write the actor adapter as a standalone peft adapter folder (loads with PeftModel.from_pretrained)
    plus policy.json ({"base_model", "temperature", ...})."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(roles.model, adapter_name=ACTOR)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(out_dir / "adapter_model.safetensors"))
    config = roles.model.peft_config[ACTOR]
    config.save_pretrained(str(out_dir))
    (out_dir / POLICY_META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out_dir


def load_policy(policy_dir: str | Path, model_name: str | None = None, dtype: torch.dtype = torch.float32):
    """(peft model with the trained actor as its "default" adapter, tokenizer, policy.json meta).
    The reference is the same model under `with model.disable_adapter():`."""
    from peft import PeftModel

    from rlhf.errors import UserError

    policy_dir = Path(policy_dir)
    meta_path = policy_dir / POLICY_META
    if not meta_path.is_file() or not (policy_dir / "adapter_model.safetensors").is_file():
        raise UserError(f"{policy_dir} is not a policy directory (no {POLICY_META} or adapter); "
                        f"train one with `rlhf ppo`")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    name = model_name or meta["base_model"]
    tokenizer = load_tokenizer(name)
    base = load_causal_lm(name, dtype=dtype)
    model = PeftModel.from_pretrained(base, str(policy_dir), is_trainable=False).eval()
    return model, tokenizer, meta
