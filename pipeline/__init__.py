"""The entry points: the `rlhf` command, the end-to-end demo and its report. The top floor: it imports
every stage, and nothing imports it."""
