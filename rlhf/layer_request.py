"""Which decoder layer a read-out asks for (`--readout-layer` of the reward model, `--critic-layer` of PPO's
critic): 0 for the last layer, a fraction in (0, 1) of the depth, or a layer number. Torch-free, so the
configs check a request before any model loads; the model code resolves it against the depth."""

from __future__ import annotations

from rlhf.errors import UserError


def check_layer_request(requested: float, flag: str, num_layers: int | None = None) -> None:
    """UserError naming `flag` unless `requested` is 0, a fraction in (0, 1) or a layer number, at most
    `num_layers` where the depth is known."""
    if 0 <= requested < 1:
        return
    if requested < 0 or requested != int(requested) or (num_layers is not None and requested > num_layers):
        where = f"in 1..{num_layers}" if num_layers is not None else "number"
        raise UserError(f"{flag} must be 0 (last), a fraction in (0, 1) or a layer {where}, got {requested}")


def resolve_layer(requested: float, num_layers: int, flag: str = "--readout-layer") -> int:
    """The decoder layers to run for a request: an int >= 1 is a layer number, a fraction in (0, 1) a share of
    the depth (0.5 = the middle layer, whatever the model's size), 0 the last layer. The last layer is returned
    as 0 however it was asked for, as a read-out records it (0 = run every layer). `flag` names the option in
    the error."""
    check_layer_request(requested, flag, num_layers)
    layer = max(1, round(requested * num_layers)) if 0 < requested < 1 else int(requested)
    return 0 if layer == num_layers else layer
