"""Group-head checkpoints shipped with the project (in the `checkpoints/` folder beside this
module), one per supported base model."""

from __future__ import annotations

from pathlib import Path

from model.head.files import CONFIG_FILE

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
# model name (as `LoadedModel.name` gives it) -> checkpoint folder under CHECKPOINT_DIR
SHIPPED = {"SmolLM2-135M-Instruct": "smollm2-135m-instruct"}


def shipped_checkpoint(model_name: str) -> Path | None:
    """The shipped checkpoint for `model_name`, or None when there is none."""
    folder = SHIPPED.get(model_name)
    path = CHECKPOINT_DIR / folder if folder else None
    return path if path is not None and (path / CONFIG_FILE).is_file() else None
