"""Checkpoints: atomic writes, safe loads, and rebuilding a model from one.

A checkpoint is a plain dict of tensors, numbers, strings and dicts, so it loads
with ``torch.load(weights_only=True)``: a file from elsewhere can never run code.
It holds the model and optimizer state, the position in training (epoch, batch,
step), every generator state needed for an exact continuation, the recipe as a
plain mapping, the data spec, and the lnsgd version.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from lnsgd import __version__
from lnsgd.errors import LnsgdError

FORMAT = "lnsgd-checkpoint-1"


def save_atomic(obj: dict, path: Path) -> None:
    """Write ``obj`` to ``path`` via a temporary file and ``os.replace``: a crash leaves the old file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, "lnsgd_version": __version__, **obj}, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load an lnsgd checkpoint safely, turning every failure into one clear line."""
    path = Path(path)
    if not path.exists():
        raise LnsgdError(f"checkpoint {path} does not exist (expected a final.pt or checkpoints/last.pt of a run)")
    if path.is_dir():
        hint = path / "final.pt"
        raise LnsgdError(f"checkpoint {path} is a folder; give a file such as {hint}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to unpickle means the file is not usable
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LnsgdError(f"checkpoint {path} is truncated, corrupt or not a torch file ({first[:160]})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or "model" not in obj:
        raise LnsgdError(f"{path} is a torch file but not an lnsgd checkpoint (no {FORMAT!r} marker); use a final.pt or last.pt from lnsgd")
    return obj


def load_state_strict(model: nn.Module, state: dict, source: str) -> None:
    """Load weights, naming every missing, unexpected or mis-shaped tensor on failure."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)}≠{tuple(v.shape)}" for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                more = f" (+{len(items) - 4} more)" if len(items) > 4 else ""
                parts.append(f"{label}: {', '.join(items[:4])}{more}")
        raise LnsgdError(
            f"{source} does not fit this model ({'; '.join(parts)}); the checkpoint was made for a different "
            "model.name/width/norm or dataset: match the recipe it was trained with"
        )
    model.load_state_dict(state)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """Return ``(model, recipe)`` from a checkpoint: the model built from the stored recipe, weights loaded.

    The model is in eval mode on ``device``; the recipe is the frozen ``Recipe`` it was trained with.
    """
    from lnsgd.models import DataSpec, build_model
    from lnsgd.recipe import recipe_from_dict

    ckpt = read_checkpoint(path, map_location=device)
    recipe = recipe_from_dict(ckpt["recipe"], source=f"recipe stored in {path}")
    spec = DataSpec.from_dict(ckpt["data_spec"])
    model = build_model(recipe.model, spec)
    load_state_strict(model, ckpt["model"], f"checkpoint {path}")
    return model.to(device).eval(), recipe
