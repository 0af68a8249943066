"""What the policy tests share: a handful of prompts and a toy oracle a tiny model can learn."""

PROMPTS = [
    "Describe a sunny morning at the beach.",
    "Continue this story: Once upon a time, a small fox found a silver key.",
    "Give three tips for staying focused while studying.",
    "Write a short poem about the moon.",
    "The lighthouse keeper heard a knock at midnight.",
    "Explain why the sky is blue.",
]


def e_fraction(prompt, completion):
    """Toy oracle for the learning tests (`--reward policy_helpers:e_fraction`): the share of non-space
    characters that are 'e'."""
    text = completion.replace(" ", "")
    return sum(c == "e" for c in text) / max(1, len(text))
