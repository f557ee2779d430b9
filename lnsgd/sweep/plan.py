"""The plan of a sweep and its record on disk: spec files, points, sweep.json, the lock.

*Plan.* Every point's recipe is loaded and validated before anything runs, so a grid key
that is not a recipe field, or a value of the wrong type, is one clear error and no run
starts. A point's run folder is ``<log.dir>/<sweep>/<id>`` and its recipe name is
``<sweep>/<id>``; runs of a sweep share the wandb group ``<sweep>`` and carry the grid
values as tags (``lr=0.5``); the values are in the wandb config anyway, since the config is
the resolved recipe.

*State.* ``<log.dir>/<sweep>/sweep.json`` lists the recipe, base overrides and grid the
sweep was built from, and per point its overrides, folder and status (``STATUSES``). A
point whose ``summary.json`` has ``epochs == train.epochs`` is done, one with
``checkpoints/last.pt`` is resumable, the rest are fresh (``run_state``). A folder built
from a different recipe or grid is refused unless ``force`` (``check_existing``), and a
lock file keeps two sweeps from driving the same folder at once (``sweep_lock``).

Sweep spec files (``recipes/sweeps/*.sweep``, YAML; detected by their top-level ``grid``
key, which no recipe has)::

    name: fig3-cifar10            # sweep name (default: <recipe name>-<grid keys>)
    recipe: ../cifar10-lnsgd.yaml # relative to this file
    overrides: [train.epochs=100] # base overrides (relative paths: to this file)
    zip: false                    # true: pair the axes instead of crossing them
    grid:                         # ordered; the id lists keys in this order
      init.checkpoint:            # a mapping gives values readable labels
        fullbatch: ../../runs/cifar10-init-fullbatch/final.pt
      optim.lr: [0.5, 1, 2]
      seed: [0, 1, 2]
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lnsgd.errors import LnsgdError
from lnsgd.recipe import (
    PATH_FIELDS,
    RESUME_TOLERATED,
    Recipe,
    format_validation_error,
    load_recipe,
    parse_override,
    read_yaml,
    recipe_differences,
    recipe_from_dict,
    recipe_to_dict,
)
from lnsgd.sweep.grid import Axis, expand, parse_grid_option, point_ids, point_labels, safe_name, value_text
from lnsgd.track import write_atomic

FORMAT = "lnsgd-sweep-1"
SWEEP_FILE = "sweep.json"
LOCK_FILE = ".sweep.lock"
SUBMITIT_DIR = "submitit"  # submitit's logs and pickles, inside the sweep folder
STATUSES = ("pending", "running", "requeued", "done", "failed", "interrupted")

# --------------------------------------------------------------------------- sweep spec files


class SweepSpec(BaseModel):
    """A sweep spec file: a recipe, base overrides and a grid (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    recipe: str = Field(description="the base recipe, relative to the spec file")
    name: str | None = Field(None, description="sweep name; runs go to <log.dir>/<name>/<point>; null: <recipe name>-<grid keys>")
    overrides: list[str] = Field(default_factory=list, description="key=value overrides applied to every point")
    zip: bool = Field(False, description="pair the grid lists element by element instead of crossing them")
    grid: dict[str, list[Any] | dict[str, Any]] = Field(
        description="recipe key → list of values, or → {label: value} to name the values in point ids"
    )

    @field_validator("overrides", mode="before")
    @classmethod
    def _strings(cls, v):
        if isinstance(v, list):
            return [o if isinstance(o, str) else str(o) for o in v]
        return v


def is_sweep_spec(path: Path) -> bool:
    """A YAML file with a top-level ``grid`` key (no recipe has one)."""
    if not path.is_file():
        return False
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        return False
    return isinstance(raw, dict) and "grid" in raw


def read_spec(path: Path) -> SweepSpec:
    raw = read_yaml(path)
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as e:
        unknown = "unknown key (a sweep spec has recipe, name, overrides, zip, grid)"
        raise LnsgdError(format_validation_error(e, f"sweep spec {path}", unknown_key=unknown)) from None


def _absolute(key: str, value: Any, base: Path) -> Any:
    """Relative path values of path fields, made absolute against ``base``."""
    if key in PATH_FIELDS and isinstance(value, str):
        p = Path(value).expanduser()
        return str(p if p.is_absolute() else (base / p).resolve())
    return value


def _absolute_overrides(overrides: Sequence[str], base: Path) -> list[str]:
    out = []
    for text in overrides:
        keys, value = parse_override(text)
        key = ".".join(keys)
        new = _absolute(key, value, base)
        out.append(text if new is value else f"{key}={value_text(new)}")
    return out


def _axes_from_spec(spec: SweepSpec, base: Path) -> list[Axis]:
    axes = []
    for key, values in spec.grid.items():
        if isinstance(values, dict):
            labels = tuple(safe_name(str(lab)) for lab in values)
            vals = tuple(_absolute(key, v, base) for v in values.values())
        else:
            labels, vals = None, tuple(_absolute(key, v, base) for v in values)
        axes.append(Axis(key, vals, labels))
    return axes


# --------------------------------------------------------------------------- the plan


@dataclass
class Point:
    """One run of the sweep."""

    id: str
    values: dict[str, Any]  # grid key → value
    overrides: list[str]  # every override the run gets on top of the recipe file
    recipe: Recipe  # resolved and validated
    dir: Path

    @property
    def grid_overrides(self) -> list[str]:
        return [f"{k}={value_text(v)}" for k, v in self.values.items()]


@dataclass
class SweepPlan:
    """Everything needed to run, resume or check a sweep; built without touching the sweep folder."""

    name: str
    dir: Path
    recipe_path: Path  # absolute
    spec_path: Path | None
    overrides: list[str]  # base overrides (paths absolute)
    axes: list[Axis]
    zip: bool
    base: Recipe  # the recipe file + base overrides, resolved
    points: list[Point] = field(default_factory=list)

    @property
    def grid(self) -> dict[str, list]:
        return {ax.key: list(ax.values) for ax in self.axes}

    def record(self) -> dict:
        """The sweep.json fields that say what the sweep was built from."""
        return {
            "format": FORMAT, "name": self.name, "recipe": str(self.recipe_path),
            "spec": str(self.spec_path) if self.spec_path else None, "overrides": list(self.overrides),
            "grid": jsonable(self.grid), "labels": {ax.key: list(ax.labels) for ax in self.axes if ax.labels},
            "zip": self.zip, "base_recipe": recipe_to_dict(self.base),
        }  # fmt: skip


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON types (paths and other objects become strings), as sweep.json stores it."""
    return json.loads(json.dumps(obj, default=str))


def default_name(recipe_name: str, axes: Sequence[Axis], zip_: bool) -> str:
    """``<recipe name>-<grid keys>`` (``-zip`` when paired), e.g. ``quickstart-lr-seed``.

    Never the recipe's own name, so a sweep does not land in the run folder that ``lnsgd
    train`` made from the same recipe; the same command gives the same name, so a rerun
    finds its own sweep. Keys are named as in point ids (the last component, the full key
    where two axes share it).
    """
    last = [ax.key.rsplit(".", 1)[-1] for ax in axes]
    keys = [ax.key if last.count(lst) > 1 else lst for ax, lst in zip(axes, last, strict=True)]
    return safe_name("-".join([recipe_name, *keys] + (["zip"] if zip_ else [])))


def plan_sweep(
    recipe: str | Path,
    grid: Sequence[str] = (),
    overrides: Sequence[str] = (),
    *,
    name: str | None = None,
    zip_: bool = False,
    cwd: Path | None = None,
) -> SweepPlan:
    """Expand a sweep and validate every point's recipe; reads files, writes nothing.

    ``recipe`` is a recipe file, a sweep spec file (then ``grid`` and ``overrides`` extend
    the spec's: a ``--grid`` key replaces the spec's axis of that key), or a sweep folder
    holding ``sweep.json`` (continue that sweep as it was built).
    """
    cwd = Path(cwd or Path.cwd())
    path = Path(recipe)
    spec_path = None
    base_overrides: list[str] = []
    axes: list[Axis] = []
    if path.is_dir() and (path / SWEEP_FILE).exists():
        stored = read_sweep(path)
        path = Path(stored["recipe"])
        spec_path = Path(stored["spec"]) if stored.get("spec") else None
        base_overrides = list(stored.get("overrides", []))
        labels = stored.get("labels", {})
        axes = [Axis(k, tuple(v), tuple(labels[k]) if k in labels else None) for k, v in stored["grid"].items()]
        zip_ = zip_ or bool(stored.get("zip"))
        name = name or stored.get("name")
    elif path.is_dir():
        raise LnsgdError(
            f"{path} is a folder without {SWEEP_FILE}; give a recipe, a sweep spec file, or a sweep folder to continue"
        )
    elif is_sweep_spec(path):
        spec_path = path.resolve()
        spec = read_spec(path)
        base = spec_path.parent
        path = base / spec.recipe
        base_overrides = _absolute_overrides(spec.overrides, base)
        axes = _axes_from_spec(spec, base)
        zip_ = zip_ or spec.zip
        name = name or spec.name
        if not path.exists():
            raise LnsgdError(f"sweep spec {spec_path}: recipe {path} does not exist (recipe: is relative to the spec file)")
    base_overrides += _absolute_overrides(overrides, cwd)
    cli_axes = []
    for text in grid:
        key, values = parse_grid_option(text)
        if any(a.key == key for a in cli_axes):
            raise LnsgdError(f"--grid {key} is given twice; list all its values in one --grid {key}=v1,v2,...")
        cli_axes.append(Axis(key, tuple(_absolute(key, v, cwd) for v in values)))
    # A --grid key replaces the spec's (or stored sweep's) axis of that key; new keys come last.
    given = {a.key: a for a in cli_axes}
    axes = [given.pop(a.key, a) for a in axes] + [a for a in cli_axes if a.key in given]
    recipe_path = path.resolve()
    base = load_recipe(recipe_path, base_overrides)
    points = expand(axes, zip_)
    name = name or default_name(base.name, axes, zip_)
    if not name or safe_name(name) != name:
        raise LnsgdError(f"sweep name {name!r} is not a plain folder name; use letters, digits and ._=,+- (--name NAME)")
    sweep_dir = Path(base.log.dir) / name
    plan = SweepPlan(name, sweep_dir, recipe_path, spec_path, base_overrides, axes, zip_, base)
    explicit_group = any(o.startswith("log.wandb.group=") for o in base_overrides)
    labels = point_labels(axes, points)
    for pid, values, parts in zip(point_ids(axes, points), points, labels, strict=True):
        grid_ov = [f"{k}={value_text(v)}" for k, v in values.items()]
        tags = list(base.log.wandb.tags) + [t[:64] for t in parts]  # wandb caps tags at 64 characters
        extra = [f"name={value_text(f'{name}/{pid}')}", f"log.wandb.tags={value_text(tags)}"]
        if not explicit_group:
            extra.append(f"log.wandb.group={value_text(name)}")
        ovs = base_overrides + grid_ov + extra
        try:
            r = load_recipe(recipe_path, ovs)
        except LnsgdError as e:
            raise LnsgdError(f"sweep point {pid}: {e}") from None
        plan.points.append(Point(pid, dict(values), ovs, r, sweep_dir / pid))
    return plan


# --------------------------------------------------------------------------- sweep.json and point state


def read_sweep(sweep_dir: Path) -> dict:
    path = Path(sweep_dir) / SWEEP_FILE
    if not path.exists():
        raise LnsgdError(f"{sweep_dir} has no {SWEEP_FILE}; give the folder `lnsgd sweep` made (<log.dir>/<sweep name>)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LnsgdError(f"{path} is not valid JSON ({e}); rerun the sweep with --force to rebuild it") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise LnsgdError(f"{path} is not an lnsgd sweep file (no {FORMAT!r} marker)")
    return data


def write_sweep(sweep_dir: Path, data: dict) -> None:
    """Atomically (this writer's own temporary file + os.replace), so a reader never sees
    half a file and two writers never share a temporary file."""
    write_atomic(Path(sweep_dir) / SWEEP_FILE, json.dumps(data, indent=2, default=str) + "\n")


def utc_now() -> str:
    """The time now, as the ISO 8601 UTC timestamps of sweep.json."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_state(run_dir: Path, epochs: int) -> str:
    """done (summary.json with all epochs), resumable (checkpoints/last.pt) or fresh."""
    summary = run_dir / "summary.json"
    if summary.exists():
        with contextlib.suppress(json.JSONDecodeError, OSError, UnicodeDecodeError):
            if json.loads(summary.read_text()).get("epochs") == epochs:
                return "done"
    if (run_dir / "checkpoints" / "last.pt").exists():
        return "resumable"
    return "fresh"


def _differences(new: dict, old: dict) -> list[str]:
    """Dotted keys where two recipes differ, ignoring what a resume tolerates."""
    return [key for key, _, _ in recipe_differences(new, old, RESUME_TOLERATED)]


def _stored_recipe(run_dir: Path) -> dict | None:
    path = run_dir / "recipe.yaml"
    if not path.exists():
        return None
    try:
        return recipe_to_dict(recipe_from_dict(yaml.safe_load(path.read_text()) or {}, str(path)))
    except (LnsgdError, yaml.YAMLError):
        return {}


def check_existing(plan: SweepPlan, force: bool) -> list[str]:
    """Refuse (unless ``force``) a sweep folder built from another recipe or grid.

    Returns the entries of the sweep folder to delete before running (only ever non-empty
    with ``force``): runs whose recipe differs from their point's, folders of points the new
    grid dropped, and anything in a folder that was not a sweep. Runs the new sweep would
    redo identically are kept.
    """
    d = plan.dir
    entries = [c for c in d.iterdir() if c.name != LOCK_FILE] if d.is_dir() else []
    if not entries:
        return []
    why: list[str] = []
    old_ids: list[str] = []
    is_sweep = (d / SWEEP_FILE).exists()
    if is_sweep:
        try:
            old = read_sweep(d)
        except LnsgdError as e:
            old, why = {}, [str(e)]
        old_ids = [p.get("id") for p in old.get("points", [])]
        if old:
            diffs = _differences(recipe_to_dict(plan.base), old.get("base_recipe", {}))
            if diffs:
                why.append(f"its base recipe differs in {', '.join(diffs[:4])}")
            same_grid = list(jsonable(plan.grid).items()) == list((old.get("grid") or {}).items())
            if not same_grid or plan.zip != bool(old.get("zip")) or plan.record()["labels"] != old.get("labels", {}):
                why.append(f"it was built with the grid {_grid_text(old.get('grid') or {}, old.get('zip'))}")
    elif (d / "recipe.yaml").exists() or (d / "metrics.jsonl").exists():
        why.append("it is a run folder, not a sweep")
    else:
        why.append(f"it has no {SWEEP_FILE}")
    changed = []
    for p in plan.points:
        stored = _stored_recipe(p.dir)
        if stored is not None:
            diffs = _differences(recipe_to_dict(p.recipe), stored)
            if diffs:
                why.append(f"run {p.id} has a different recipe ({', '.join(diffs[:3])})")
                changed.append(p.id)
    if why and not force:
        raise LnsgdError(
            f"sweep folder {d} exists and was not built from this recipe and grid ({'; '.join(why[:3])}); "
            "rerun the command it was built with, choose another --name, or pass --force to start over "
            "(keeps the runs the new sweep would redo identically)"
        )
    if not why:
        return []
    keep = {p.id for p in plan.points} - set(changed)
    if is_sweep:
        return sorted(set(changed) | {i for i in old_ids if i not in keep and (d / i).exists()})
    return sorted(c.name for c in entries if c.name not in keep and c.name != SUBMITIT_DIR)


def _grid_text(grid: Mapping[str, list], zip_: bool | None) -> str:
    text = " ".join(f"{k}={','.join(value_text(v) for v in vals)}" for k, vals in grid.items())
    return text + (" --zip" if zip_ else "")


@contextlib.contextmanager
def sweep_lock(sweep_dir: Path):
    """Hold an exclusive lock on the sweep folder; a second sweep on it is refused."""
    import fcntl

    sweep_dir.mkdir(parents=True, exist_ok=True)
    path = sweep_dir / LOCK_FILE
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise LnsgdError(f"sweep {sweep_dir} is already running ({holder}); wait for it or stop it first") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def is_locked(sweep_dir: Path) -> bool:
    import fcntl

    path = Path(sweep_dir) / LOCK_FILE
    if not path.exists():
        return False
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False
