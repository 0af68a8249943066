"""`rlhf export-model`: a trained reward model or policy as a standard transformers folder. An entry point, as it
serves both stages (`reward_model.export_model`, `policy.export`); heavy imports happen inside the handler."""

from __future__ import annotations

from pathlib import Path


def add_commands(sub) -> None:
    p = sub.add_parser("export-model", help="write a reward model or a policy as a standard transformers folder",
                       description="--rm: the reward model as a folder that AutoModelForSequenceClassification."
                                   "from_pretrained(OUT, trust_remote_code=True) loads, giving the rewards of "
                                   "`rlhf score`. --policy: the policy merged into its base model, a folder that "
                                   "AutoModelForCausalLM.from_pretrained(OUT) loads. Both with the tokenizer and "
                                   "a model card (README.md).")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--rm", help="reward model folder written by `rlhf train-rm`")
    source.add_argument("--policy", help="policy folder written by `rlhf ppo` (OUT/policy)")
    p.add_argument("--out", required=True, help="the folder to write (new, or an earlier export to replace)")
    p.add_argument("--base-model", default=None,
                   help="the base model's folder or hub id, when it is no longer where training found it "
                        "(default: the one recorded with the model)")
    p.set_defaults(func=run_export_model)


def run_export_model(args) -> None:
    if args.rm:
        from reward_model.export_model import export_reward_model

        out = export_reward_model(args.rm, args.out, base_model=args.base_model)
        print(f"reward model written to {out}: AutoModelForSequenceClassification.from_pretrained({str(out)!r}, "
              f"trust_remote_code=True)")
        return
    from policy.export import merge_policy

    out = merge_policy(Path(args.policy), Path(args.out), base_model=args.base_model)
    print(f"policy written to {out}: AutoModelForCausalLM.from_pretrained({str(out)!r})")
