"""Checkpoints: atomic writes, safe loads, and rebuilding a model from one.

A checkpoint is a plain dict of tensors, numbers, strings and dicts, so it loads
with ``torch.load(weights_only=True)``: a file from elsewhere can never run code.
It holds the model and optimizer state, the position in training (epoch, batch,
step), every generator state needed for an exact continuation, the recipe as a
plain mapping, the data spec, and the lnsgd version.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lnsgd import __version__
from lnsgd.errors import LnsgdError
from lnsgd.track import replace_atomically

FORMAT = "lnsgd-checkpoint-1"

# How torch files begin: a zip archive (torch.save since 1.6) or a pickle (protocol 2+).
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")


class _Writer:
    """A file for ``torch.save`` that keeps the OSError torch would turn into "unexpected pos"."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        return self._keep(self.file.write, data)

    def flush(self) -> None:
        self._keep(self.file.flush)

    def _keep(self, fn, *args):
        try:
            return fn(*args)
        except OSError as exc:
            self.error = exc
            raise


class _Counter:
    """A file for ``torch.save`` that only counts bytes: the size a checkpoint needs on disk."""

    size = 0

    def write(self, data) -> int:
        self.size += len(data)
        return len(data)

    def flush(self) -> None: ...


def save_atomic(obj: dict, path: Path) -> None:
    """Write ``obj`` to ``path`` via this writer's temporary file and ``os.replace``.

    A crash, a kill or a full disk leaves the old file intact; the temporary file is
    removed on failure (and, if a killed writer left one, by the next save). A full disk
    is a ``DiskFull`` naming the folder and the space the file needs.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "lnsgd_version": __version__, **obj}

    def write(f) -> None:
        writer = _Writer(f)
        try:
            torch.save(payload, writer)
        except RuntimeError:
            if writer.error is not None:  # torch reports a failed write as "unexpected pos"
                raise writer.error from None
            raise

    def size() -> int:
        counter = _Counter()
        torch.save(payload, counter)
        return counter.size

    replace_atomically(path, write, size)


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load an lnsgd checkpoint safely, turning every failure into one clear line."""
    path = Path(path)
    if not path.exists():
        raise LnsgdError(f"checkpoint {path} does not exist (expected a final.pt or checkpoints/last.pt of a run)")
    if path.is_dir():
        hint = path / "final.pt"
        raise LnsgdError(f"checkpoint {path} is a folder; give a file such as {hint}")
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise LnsgdError(f"cannot read checkpoint {path} ({e.strerror or e})") from None
    if not head.startswith(_TORCH_MAGIC):
        kind = "it is empty" if not head else "it holds text: a recipe or a log?" if _is_text(head) else "no torch archive"
        raise LnsgdError(f"checkpoint {path} is truncated, corrupt or not a torch file ({kind}); "
                         "give a final.pt or checkpoints/last.pt of a run")  # fmt: skip
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to unpickle means the file is not usable
        text = str(e).strip()
        if text.startswith("Weights only load failed"):
            # torch's advice here (weights_only=False) would let the file run code: never pass it on.
            why = "it holds objects other than tensors and plain data, which lnsgd refuses to unpickle"
        else:
            why = text.splitlines()[0] if text else type(e).__name__
            why = why if len(why) <= 160 else why[:160].rsplit(" ", 1)[0] + " …"
        raise LnsgdError(f"checkpoint {path} is truncated, corrupt or not a torch file ({why})") from None
    fmt = obj.get("format") if isinstance(obj, dict) else None
    if isinstance(fmt, str) and fmt.startswith("lnsgd-checkpoint-") and fmt != FORMAT:
        newer = _format_number(fmt) > _format_number(FORMAT)
        raise LnsgdError(
            f"checkpoint {path} was written by lnsgd {obj.get('lnsgd_version', '?')} in format {fmt}, "
            f"{'newer than' if newer else 'unknown to'} this lnsgd {__version__} (it reads {FORMAT}): "
            "read it with the lnsgd that wrote it, or upgrade lnsgd"
        )
    if not isinstance(obj, dict) or fmt != FORMAT or "model" not in obj:
        raise LnsgdError(f"{path} is a torch file but not an lnsgd checkpoint (no {FORMAT!r} marker); use a final.pt or last.pt from lnsgd")
    return obj


def require_keys(ckpt: dict, keys, path: Path, purpose: str) -> None:
    """Refuse a checkpoint that lacks what ``purpose`` needs (one from another lnsgd version, or a final.pt)."""
    missing = [k for k in keys if k not in ckpt]
    if missing:
        raise LnsgdError(
            f"checkpoint {path} (lnsgd {ckpt.get('lnsgd_version', '?')}) has no {', '.join(missing[:4])}, "
            f"which {purpose} needs; this lnsgd is {__version__}"
        )


def _is_text(head: bytes) -> bool:
    return all(c >= 32 or c in b"\t\n\r" for c in head)  # no control bytes: text, whatever its encoding


def _format_number(fmt: str) -> int:
    tail = fmt.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


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
    require_keys(ckpt, ("recipe", "data_spec"), Path(path), "rebuilding its model")
    recipe = recipe_from_dict(ckpt["recipe"], source=f"recipe stored in {path}")
    spec = DataSpec.from_dict(ckpt["data_spec"])
    model = build_model(recipe.model, spec)
    load_state_strict(model, ckpt["model"], f"checkpoint {path}")
    return model.to(device).eval(), recipe
