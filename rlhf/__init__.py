"""rlhf: the CLI and the end-to-end pipeline that ties labeling, reward_model and policy together."""
