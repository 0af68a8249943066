"""The reward model stage: LoRA on the SFT model + a linear score head, trained on rankings
with InstructGPT's K-wise loss.

- `reward_model.model`: `RewardModel`, `create_reward_model`, `load_reward_model(dir)` (the one call
  that loads a trained RM), `score_texts`, `final_hidden_states`, `last_token_index`; the on-disk format.
- `reward_model.loss`: the ranking loss on hand-checkable tensors.
- `reward_model.data`: reading rankings / pairs, tokenizing once, batching whole rankings.
- `reward_model.train`: `RewardTrainingConfig` + `train_reward_model(config)`.
- `reward_model.evaluate`: `evaluate_reward_model(rm, tokenizer, path_or_records)`.
- `reward_model.commands`: `rlhf train-rm`, `rlhf eval-rm`, `rlhf score`.
"""
