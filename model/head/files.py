"""The files of a group-head checkpoint directory, the checkpoints shipped with the project (in
the `checkpoints/` folder beside this module, one per supported base model), and the error for a
checkpoint made for another base model. Torch-free: the server checks a --csa path before it
imports torch."""

from __future__ import annotations

from pathlib import Path

WEIGHTS_FILE = "csa.safetensors"
CONFIG_FILE = "config.json"  # the config's fields and, under "meta", the training metadata
CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
# model name (as `LoadedModel.name` gives it) -> checkpoint folder under CHECKPOINT_DIR
SHIPPED = {"SmolLM2-135M-Instruct": "smollm2-135m-instruct"}


class CheckpointMismatchError(ValueError):
    """A checkpoint was made for another base model. Messages call checkpoints "CSA
    checkpoints", the name the `--csa` option gives them."""


def shipped_checkpoint(model_name: str) -> Path | None:
    """The shipped checkpoint for `model_name`, or None when there is none."""
    folder = SHIPPED.get(model_name)
    path = CHECKPOINT_DIR / folder if folder else None
    return path if path is not None and (path / CONFIG_FILE).is_file() else None
