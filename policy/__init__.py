"""The policy stage: PPO with a KL penalty to the frozen reference, RLOO and GRPO, on one shared base model
(actor, critic, reward and reference as LoRA adapters / adapters-off on the same weights)."""
