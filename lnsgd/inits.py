"""Poor global minimizers to start label-noise SGD from (Damian, Ma & Lee 2021, Sec. 6).

- *full batch*: gradient descent with the exact full-dataset gradient from random
  initialization until 100% train accuracy and train loss < ``init.stop_loss``.
- *adversarial* (Liu, Papailiopoulos & Achlioptas 2019, as the paper's code does):
  first *memorize* the training set replicated R times, each copy with uniformly
  random labels and a random fraction of pixel locations zeroed, then *fit* the true
  labels without label noise until 100% train accuracy (and ``init.stop_loss``).

The replicas are never stored: label and mask of example i in replica r are pure
functions of (seed, r, i) computed by an integer hash on the device, so CIFAR-10 ×10
costs no memory beyond the original images.
"""

from __future__ import annotations

import torch

from lnsgd.data import Data, model_targets
from lnsgd.errors import LnsgdError
from lnsgd.recipe import Recipe, with_overrides
from lnsgd.track import write_atomic
from lnsgd.train import Phase
from lnsgd.train.step import TrainSet

_P = 2_147_483_647  # 2^31 − 1: products of two values below it fit in int64
_ROUNDS = ((1_103_515_245, 12_345), (69_069, 1), (1_664_525, 1_013_904_223), (22_695_477, 1))


def hash_int(x: torch.Tensor) -> torch.Tensor:
    """A deterministic integer mix of non-negative int64 keys to [0, 2^31 − 1)."""
    x = x % _P
    for a, b in _ROUNDS:
        x = (x * a + b) % _P
        x = x ^ (x >> 13)
    return x


def _key(seed: int, *parts: torch.Tensor | int) -> torch.Tensor:
    """Fold (seed, part1, part2, …) into one hashed key; each fold stays below 2^31 before mixing."""
    key = hash_int(torch.as_tensor(seed % _P, dtype=torch.int64))
    for part in parts:
        key = hash_int(key * 31 + torch.as_tensor(part, dtype=torch.int64) % _P)
    return key


def replica_labels(seed: int, replica: torch.Tensor, index: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Uniformly random label of example ``index`` in ``replica``: a pure function of (seed, replica, index)."""
    return _key(seed, 1, replica, index) % num_classes


def replica_masks(seed: int, replica: torch.Tensor, index: torch.Tensor, locations: int, zero_fraction: float) -> torch.Tensor:
    """Boolean (batch, locations) masks, True where the location is zeroed: exactly round(fraction·locations) per example."""
    k = round(zero_fraction * locations)
    loc = torch.arange(locations, device=index.device)
    scores = _key(seed, 2, replica.unsqueeze(1), index.unsqueeze(1) * locations + loc)  # (batch, locations)
    mask = torch.zeros(len(index), locations, dtype=torch.bool, device=index.device)
    if k > 0:
        mask.scatter_(1, scores.topk(k, dim=1, largest=False).indices, True)
    return mask


def replicated_set(data: Data, recipe: Recipe) -> TrainSet:
    """The memorize phase's training set: R relabelled, partly zeroed copies of the training set, generated on the fly."""
    adv = recipe.init.adversarial
    x_all, n, C = data.train_x, len(data.train_x), data.num_classes
    shape = x_all.shape[1:]
    # Pixel locations are zeroed in every channel: images (C, H, W) → H·W locations; signals (C, L) → L; flat (d,) → d.
    locations = shape[-1] * shape[-2] if len(shape) == 3 else shape[-1]
    seed = recipe.seed

    def split(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return idx // n, idx % n

    def labels(idx: torch.Tensor) -> torch.Tensor:
        r, i = split(idx)
        return replica_labels(seed, r, i, C)

    def fetch_raw(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r, i = split(idx)
        x = x_all[i]
        mask = replica_masks(seed, r, i, locations, adv.zero_fraction)
        if len(shape) == 3:
            mask = mask.view(len(idx), 1, shape[1], shape[2])
        elif len(shape) == 2:
            mask = mask.view(len(idx), 1, shape[1])
        x = x.masked_fill(mask, 0)
        return x, model_targets(data, labels(idx), recipe.loss)

    return TrainSet(n=n * adv.replicas, fetch_raw=fetch_raw, normalize=data.normalize, labels=labels, name="replicated",
                    tensors=(x_all, data.mean, data.std))  # fmt: skip


def _fits(stop_loss: float, classification: bool):
    """Stop rule: 100% train accuracy (classification) and train loss below stop_loss."""

    def rule(row: dict) -> bool:
        loss_ok = row.get("train/loss") is not None and row["train/loss"] < stop_loss
        return loss_ok and (not classification or row.get("train/acc") == 1.0)

    return rule


def fullbatch_phases(recipe: Recipe, data: Data) -> tuple[Recipe, list[Phase]]:
    """Exact full-batch GD, no label noise, until the stop condition or train.epochs steps."""
    gd = with_overrides(recipe, ["optim.full_batch=true", "noise.kind=none", "noise.p=0", "noise.sigma=0"])
    return gd, [Phase("fullbatch", gd, stop_rule=_fits(recipe.init.stop_loss, data.is_classification))]


def adversarial_phases(recipe: Recipe, data: Data) -> tuple[Recipe, list[Phase]]:
    """Memorize random labels on R partly-zeroed replicas, then fit the true labels."""
    if not data.is_classification:
        raise LnsgdError(
            f"init-adversarial memorizes random *labels*; data.name={data.name} is regression: use a classification dataset "
            "or init-fullbatch"
        )
    adv = recipe.init.adversarial
    plain = with_overrides(recipe, ["noise.kind=none", "noise.p=0", "noise.sigma=0", "optim.full_batch=false"])
    memorize = with_overrides(plain, [f"train.epochs={adv.memorize_epochs}", f"optim.lr={adv.memorize_lr or recipe.optim.lr}",
                                      f"optim.batch_size={adv.memorize_batch_size or recipe.optim.batch_size}"])
    memorize_rule = lambda row: (row.get("train/acc") or 0.0) >= adv.memorize_acc  # noqa: E731
    return plain, [
        Phase("memorize", memorize, train_set=replicated_set(data, recipe), stop_rule=memorize_rule, optimizer=adv.optimizer),
        Phase("fit", plain, stop_rule=_fits(recipe.init.stop_loss, True), optimizer=adv.optimizer),
    ]


def init_outcome(summary: dict, recipe: Recipe, classification: bool) -> dict:
    """Did the initialization reach its stop condition? Numbers for summary.json."""
    final = summary.get("final") or {}
    reached = _fits(recipe.init.stop_loss, classification)(final)
    out = {
        "reached": reached,
        "train_acc": final.get("train/acc"),
        "train_loss": final.get("train/loss"),
        "test_acc": final.get("test/acc"),
        "stop_loss": recipe.init.stop_loss,
    }
    if not reached:
        out["warning"] = (
            f"stop condition not reached (train acc {final.get('train/acc')}, train loss {final.get('train/loss')} vs "
            f"init.stop_loss={recipe.init.stop_loss}) within train.epochs={recipe.train.epochs}; raise train.epochs or "
            "optim.lr, resume with --resume train.epochs=N, or set init.allow_unconverged=true"
        )
    return out


def run_init(kind: str, recipe: Recipe, run_dir, *, resume: bool = False, force: bool = False, progress=None,
             sharpness_hook=None) -> dict:  # fmt: skip
    """Build a full-batch or adversarial minimizer into a run folder; summary.json gains an ``init`` entry."""
    import json

    from lnsgd.runtime import run_dir_for
    from lnsgd.train import train

    run_dir = run_dir_for(recipe, run_dir)
    build = fullbatch_phases if kind == "fullbatch" else adversarial_phases
    classification = {}

    def phases(data: Data) -> list[Phase]:
        classification["value"] = data.is_classification
        return build(recipe, data)[1]

    summary = train(recipe, run_dir, resume=resume, force=force, progress=progress, phases=phases,
                    sharpness_hook=sharpness_hook, command=f"init-{kind}")  # fmt: skip
    summary["init"] = {"kind": kind, **init_outcome(summary, recipe, classification["value"])}
    write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2, default=str))
    return summary
