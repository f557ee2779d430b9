"""Sweeps: a grid of runs from one recipe, as child processes here or as a submitit job array.

Read top to bottom:

1. *Grid.* ``--grid optim.lr=0.5,1,2 --grid seed=0,1,2`` (or a sweep spec file, below)
   is expanded into points, the cartesian product of the axes, or with ``zip`` the
   axes paired element by element. Each point is a list of ``key=value`` overrides
   of the base recipe and gets a short, readable, filesystem-safe id made of the
   last key component and the value: ``lr=0.5,seed=0``.
2. *Plan.* Every point's recipe is loaded and validated before anything runs, so a
   grid key that is not a recipe field, or a value of the wrong type, is one clear
   error and no run starts. A point's run folder is ``<log.dir>/<sweep>/<id>`` and
   its recipe name is ``<sweep>/<id>``; runs of a sweep share the wandb group
   ``<sweep>`` and carry the grid values as tags (``lr=0.5``); the values are in
   the wandb config anyway, since the config is the resolved recipe.
3. *State.* ``<log.dir>/<sweep>/sweep.json`` lists the recipe, base overrides and
   grid the sweep was built from, and per point its overrides, folder and status
   (pending, running, done, failed, interrupted). The sweep is idempotent: a point
   whose ``summary.json`` has ``epochs == train.epochs`` is skipped, one with
   ``checkpoints/last.pt`` is resumed, the rest start fresh. A folder built from a
   different recipe or grid is refused unless ``force`` (which keeps the runs the
   new sweep would redo identically and deletes the rest). A lock file keeps two
   sweeps from driving the same folder at once.
4. *Executors.*
   - ``process``: up to ``jobs`` runs at once, each ``python -m lnsgd.cli train
     RECIPE overrides... --out <point> --quiet [--resume]`` in its own session, with
     stdout+stderr in ``<point>/train.log``, pinned round robin to one GPU when
     several are visible. SIGINT/SIGTERM/SIGHUP to the sweep stops launching and
     forwards SIGTERM once to every child, which checkpoints and exits 130; the
     sweep then raises ``RunInterrupted``: rerunning the same command continues.
     Children get their own session so a terminal's Ctrl-C reaches them only
     through the sweep, once (a second signal would make them give up at once).
   - ``submitit``: one job array (``executor.batch()``) of ``PointJob``s, a
     ``submitit.helpers.Checkpointable`` that trains one point in-process.
     *Preemption and timeout.* SLURM (and submitit's local backend) send SIGUSR2
     shortly before killing a job; submitit's handler calls ``checkpoint()`` and
     requeues. ``checkpoint()`` cannot reach into the training loop, and waiting
     for the next ``train.checkpoint_every`` boundary could lose hours of a
     ResNet18 run, so ``PointJob`` puts its own SIGUSR2 handler in front of
     submitit's for the duration of training: it sets the loop's stop flag (the
     same one SIGTERM sets), the loop writes ``last.pt`` after the current step and
     raises ``RunInterrupted``, and only then is submitit's handler called, which
     calls ``checkpoint()`` (a ``DelayedSubmission`` of the same ``PointJob``) and
     requeues. The requeued job finds ``last.pt`` and resumes exactly. If the
     signal arrives outside the loop (data loading, writing final.pt) submitit's
     handler runs at once; the last ``last.pt`` is still a consistent state.
     Logs go to ``<log.dir>/<sweep>/submitit/``; submitit is imported only here.

Sweep spec files (``recipes/sweeps/*.sweep``, YAML; detected by their top-level
``grid`` key, which no recipe has)::

    name: fig3-cifar10            # sweep name (default: the recipe's name)
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

import collections
import contextlib
import hashlib
import itertools
import json
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lnsgd.errors import LnsgdError, RunInterrupted
from lnsgd.recipe import (
    RESUME_TOLERATED,
    Recipe,
    load_recipe,
    parse_override,
    read_yaml,
    recipe_differences,
    recipe_from_dict,
    recipe_to_dict,
)

FORMAT = "lnsgd-sweep-1"
SWEEP_FILE = "sweep.json"
LOCK_FILE = ".sweep.lock"
LOG_FILE = "train.log"
SUBMITIT_DIR = "submitit"
STATUSES = ("pending", "running", "done", "failed", "interrupted")

# Recipe fields holding paths; relative values resolve against the spec file (spec) or cwd (command line).
PATH_KEYS = ("data.root", "init.checkpoint", "log.dir")
# Keys the sweep sets itself: the run folder and name come from the point id.
RESERVED_KEYS = ("name", "log.dir")
# Differences a resumed run tolerates (lnsgd.train refuses any other on --resume).

# --------------------------------------------------------------------------- grid values


def value_text(value: Any) -> str:
    """The override text (YAML) that parses back to ``value``: 0.5 → "0.5", "0.5" → "'0.5'", [a, b] → "[a, b]"."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30, allow_unicode=True).strip()
    text = text.removesuffix("...").strip()
    assert _yaml_load(text) == value, (value, text)
    return text


def _yaml_load(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def value_label(value: Any) -> str:
    """Short readable form of a grid value for a point id (made filesystem-safe later)."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    if isinstance(value, str):
        if "/" in value:  # a path: its stem, or its folder for final.pt / last.pt
            p = Path(value)
            return p.parent.name if p.stem in ("final", "last", "model", "checkpoint") and p.parent.name else p.stem
        return value
    if isinstance(value, (list, tuple)):
        return "+".join(value_label(v) for v in value) or "none"
    return str(value)


_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]+")
MAX_ID = 100


def safe_name(text: str) -> str:
    """Filesystem-safe: letters, digits and ``._=,+-``; long names keep a hash of the whole."""
    s = _UNSAFE.sub("_", text).strip("._") or "_"
    if len(s) > MAX_ID:
        s = s[: MAX_ID - 9] + "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return s


def split_values(raw: str) -> list[str]:
    """``0.5,1,[a,b]`` → ["0.5", "1", "[a,b]"]: commas inside brackets or quotes do not split."""
    parts, depth, quote, cur = [], 0, None, []
    for ch in raw:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def parse_grid_option(text: str) -> tuple[str, list[Any]]:
    """``optim.lr=0.5,1,2`` → ("optim.lr", [0.5, 1, 2]), each value typed as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part.isidentifier() for part in key.split(".")):
        raise LnsgdError(
            f"malformed --grid {text!r}: expected key=v1,v2,... with a dotted recipe key, e.g. --grid optim.lr=0.5,1,2"
        )
    values = split_values(raw)
    if not raw.strip() or any(v == "" for v in values):
        raise LnsgdError(f"--grid {text!r}: empty value; expected key=v1,v2,... e.g. --grid seed=0,1,2")
    return key, [_yaml_load(v) for v in values]


@dataclass(frozen=True)
class Axis:
    """One grid key and its values, each with the label that names it in point ids."""

    key: str
    values: tuple
    labels: tuple[str, ...] | None = None  # from a spec's mapping form; None: derived from the values


def _check_axes(axes: Sequence[Axis], zip_: bool) -> None:
    if not axes:
        raise LnsgdError("the grid is empty: give at least one --grid key=v1,v2,... (or a sweep spec file with a grid:)")
    seen = set()
    for ax in axes:
        parse_override(f"{ax.key}=0")  # a dotted identifier, or the usual one-line error
        if ax.key in seen:
            raise LnsgdError(f"grid key {ax.key} is given twice; list all its values in one --grid {ax.key}=v1,v2,...")
        if ax.key in RESERVED_KEYS:
            raise LnsgdError(
                f"grid key {ax.key}: the sweep sets it (runs go to <log.dir>/<sweep>/<point>); use --name for the sweep"
            )
        seen.add(ax.key)
        if not ax.values:
            raise LnsgdError(f"grid key {ax.key} has no values; expected {ax.key}=v1,v2,...")
        if not zip_:
            texts = [value_text(v) for v in ax.values]
            dup = next((t for t in texts if texts.count(t) > 1), None)
            if dup is not None:
                raise LnsgdError(f"grid key {ax.key} lists the value {dup} twice")
    if zip_:
        lengths = {ax.key: len(ax.values) for ax in axes}
        if len(set(lengths.values())) > 1:
            shown = ", ".join(f"{k}: {n}" for k, n in lengths.items())
            raise LnsgdError(f"--zip pairs the grid lists element by element, so they need equal lengths ({shown})")


def expand(axes: Sequence[Axis], zip_: bool = False) -> list[dict[str, Any]]:
    """Points as ordered {key: value}: the cartesian product of the axes, or their zip."""
    _check_axes(axes, zip_)
    combos = zip(*(ax.values for ax in axes), strict=True) if zip_ else itertools.product(*(ax.values for ax in axes))
    points = [dict(zip((ax.key for ax in axes), combo, strict=True)) for combo in combos]
    texts = [tuple(value_text(v) for v in p.values()) for p in points]
    dup = next((t for t in texts if texts.count(t) > 1), None)
    if dup is not None:
        raise LnsgdError(f"--zip lists the point {', '.join(f'{k}={v}' for k, v in zip(points[0], dup, strict=True))} twice")
    return points


def point_labels(axes: Sequence[Axis], points: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """Per point, ``key=value`` labels: the last key component (the full key where two
    axes share it) and a short form of the value (distinct values with one label get -i)."""
    last = [ax.key.rsplit(".", 1)[-1] for ax in axes]
    key_label = {ax.key: (ax.key if last.count(lst) > 1 else lst) for ax, lst in zip(axes, last, strict=True)}
    value_labels: dict[str, dict[str, str]] = {}
    for ax in axes:
        labels = list(ax.labels) if ax.labels else [value_label(v) for v in ax.values]
        texts = [value_text(v) for v in ax.values]
        clash = [i for i, lab in enumerate(labels) if any(o == lab and texts[j] != texts[i] for j, o in enumerate(labels))]
        for i in clash:
            labels[i] = f"{labels[i]}-{i + 1}"
        value_labels[ax.key] = dict(zip(texts, labels, strict=True))
    return [[f"{key_label[k]}={value_labels[k][value_text(v)]}" for k, v in p.items()] for p in points]


def point_ids(axes: Sequence[Axis], points: Sequence[Mapping[str, Any]]) -> list[str]:
    """Readable, unique, filesystem-safe ids: ``lr=0.5,seed=0``."""
    ids = [safe_name(",".join(parts)) for parts in point_labels(axes, points)]
    counts = collections.Counter(ids)
    seen: collections.Counter = collections.Counter()
    unique = []
    for i in ids:  # safe_name can merge ids ("a/b" and "a_b"); the grid itself never repeats a point
        seen[i] += 1
        unique.append(i if counts[i] == 1 else f"{i}-{seen[i]}")
    return unique


# --------------------------------------------------------------------------- sweep spec files


class SweepSpec(BaseModel):
    """A sweep spec file: a recipe, base overrides and a grid (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    recipe: str = Field(description="the base recipe, relative to the spec file")
    name: str | None = Field(None, description="sweep name; runs go to <log.dir>/<name>/<point>; null: the recipe's name")
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
        parts = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            msg = (
                "unknown key (a sweep spec has recipe, name, overrides, zip, grid)"
                if err["type"] == "extra_forbidden"
                else err["msg"]
            )
            parts.append(f"{loc}: {msg}" if loc else msg)
        raise LnsgdError(f"sweep spec {path}: " + "; ".join(parts)) from None


def _absolute(key: str, value: Any, base: Path) -> Any:
    """Relative path values of path fields, made absolute against ``base``."""
    if key in PATH_KEYS and isinstance(value, str):
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
            "grid": _jsonable(self.grid), "labels": {ax.key: list(ax.labels) for ax in self.axes if ax.labels},
            "zip": self.zip, "base_recipe": recipe_to_dict(self.base),
        }  # fmt: skip


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


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
    name = name or base.name
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
    """Atomically (tmp file + os.replace), so a reader never sees half a file."""
    path = Path(sweep_dir) / SWEEP_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _now() -> str:
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
            same_grid = list(_jsonable(plan.grid).items()) == list((old.get("grid") or {}).items())
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


# --------------------------------------------------------------------------- running a sweep


@dataclass
class Task:
    """One point to run now: fresh or resumed."""

    point: Point
    resume: bool
    command: list[str]  # the equivalent `lnsgd train ...` (what the process executor runs)


@dataclass
class SweepResult:
    name: str
    dir: Path
    statuses: dict[str, str]  # point id → status
    errors: dict[str, str]  # point id → last line of its error
    skipped: list[str]  # ids already done before this call

    def count(self, status: str) -> int:
        return sum(1 for s in self.statuses.values() if s == status)


Event = Callable[[str, str, dict], None]  # (kind, point id, info): started, finished, note


def train_command(recipe_path: Path, point: Point, resume: bool) -> list[str]:
    """The `lnsgd train` arguments that run one point (after the program name)."""
    cmd = ["train", str(recipe_path), *point.overrides, "--out", str(point.dir), "--quiet"]
    return cmd + (["--resume"] if resume else [])


class ProcessExecutor:
    """Runs points as child processes, up to ``jobs`` at once, each pinned to one GPU of ``gpus``."""

    def __init__(self, jobs: int = 1, gpus: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 python: str = "python", poll_s: float = 0.1):  # fmt: skip
        if jobs < 1:
            raise LnsgdError(f"--jobs {jobs}: expected at least 1 run at a time")
        self.jobs, self.gpus, self.env, self.python, self.poll_s = jobs, list(gpus), dict(env or {}), python, poll_s

    def run(self, plan: SweepPlan, tasks: list[Task], update: Callable[[str, dict], None], event: Event) -> None:
        queue = collections.deque(tasks)
        running: dict[str, _Child] = {}
        signals = _SignalCounter()
        forwarded = 0
        try:
            with signals:
                while queue or running:
                    if signals.count > forwarded:  # forward each stop request once (a second makes children give up)
                        for child in running.values():
                            with contextlib.suppress(ProcessLookupError):
                                child.proc.send_signal(signal.SIGTERM)
                        forwarded = signals.count
                    while not signals.count and queue and len(running) < self.jobs:
                        task = queue.popleft()
                        gpu = self._pick_gpu(running)
                        running[task.point.id] = child = self._launch(task, gpu)
                        update(task.point.id, {"status": "running", "started": _now(), "gpu": gpu, "resumed": task.resume,
                                               "error": None, "returncode": None})  # fmt: skip
                        event("started", task.point.id, {"resume": task.resume, "gpu": gpu, "pid": child.proc.pid})
                    for pid, child in list(running.items()):
                        rc = child.proc.poll()
                        if rc is None:
                            continue
                        child.pump.join(timeout=10)
                        del running[pid]
                        status, error = self._outcome(child, rc, stopping=bool(signals.count))
                        update(pid, {"status": status, "returncode": rc, "error": error, "finished": _now()})
                        event("finished", pid, {"status": status, "error": error, "seconds": time.time() - child.started})
                    if signals.count and not running:
                        break
                    time.sleep(self.poll_s)
        finally:
            for child in running.values():  # only on an unexpected error in the sweep itself
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signal.SIGTERM)
            for child in running.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.proc.wait(timeout=60)
        if signals.count:
            raise RunInterrupted(f"sweep stopped by {signals.name}")

    def _pick_gpu(self, running: Mapping[str, _Child]) -> str | None:
        """The least busy GPU, round robin among equals; None on CPU or with a single GPU."""
        if len(self.gpus) < 2:
            return None
        load = collections.Counter(c.gpu for c in running.values())
        return min(self.gpus, key=lambda g: (load[g], self.gpus.index(g)))

    def _launch(self, task: Task, gpu: str | None) -> _Child:
        point = task.point
        if not task.resume and point.dir.exists():
            shutil.rmtree(point.dir)  # a start that never checkpointed: nothing worth keeping
        env = dict(self.env, PYTHONUNBUFFERED="1")
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        cmd = [self.python, "-m", "lnsgd.cli", *task.command]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
        header = f"# {_now()} lnsgd sweep runs: {shlex.join(['lnsgd', *task.command])}\n"
        return _Child(point, proc, gpu, header, ready_immediately=task.resume)

    @staticmethod
    def _outcome(child: _Child, rc: int, stopping: bool) -> tuple[str, str | None]:
        if rc == 0 and run_state(child.point.dir, child.point.recipe.train.epochs) == "done":
            return "done", None
        last = child.last_line()
        if rc == 130 or (stopping and rc < 0):
            return "interrupted", None  # checkpointed; its message only repeats how to resume
        if rc < 0:
            return "failed", f"killed by {signal.Signals(-rc).name}" + (f"; {last}" if last else "")
        return "failed", last or f"exit code {rc}"


class _Child:
    """A running point: its process, and a thread copying its output into <point>/train.log.

    A fresh run's folder must not exist or be empty when `lnsgd train` prepares it, so the log
    is held in memory until the run has written its recipe.yaml, and written from then on.
    """

    def __init__(self, point: Point, proc: subprocess.Popen, gpu: str | None, header: str, ready_immediately: bool):
        self.point, self.proc, self.gpu, self.started = point, proc, gpu, time.time()
        self.tail = collections.deque(maxlen=64)
        self._partial = b""
        self._ready = ready_immediately
        self._header = header.encode()
        self.pump = threading.Thread(target=self._copy, name=f"log {point.id}", daemon=True)
        self.pump.start()

    def _copy(self) -> None:
        fd = self.proc.stdout.fileno()
        pending = bytearray(self._header)
        log = None
        try:
            while True:
                readable, _, _ = select.select([fd], [], [], 0.5)
                chunk = os.read(fd, 1 << 16) if readable else None
                if chunk:
                    self._remember(chunk)
                if log is None and (self._ready or chunk == b"" or (self.point.dir / "recipe.yaml").exists()):
                    self.point.dir.mkdir(parents=True, exist_ok=True)
                    log = open(self.point.dir / LOG_FILE, "ab")
                    log.write(pending)
                    pending.clear()
                if chunk == b"":
                    break
                if chunk:
                    if log is None:
                        pending += chunk
                    else:
                        log.write(chunk)
                        log.flush()
        finally:
            if log is not None:
                log.close()
            self.proc.stdout.close()

    def _remember(self, chunk: bytes) -> None:
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()[-4096:]
        self.tail.extend(ln for ln in lines if ln.strip())

    def last_line(self) -> str | None:
        lines = list(self.tail) + ([self._partial] if self._partial.strip() else [])
        if not lines:
            return None
        text = lines[-1].decode("utf-8", "replace").strip()
        return text.removeprefix("error:").strip()[:500]


class _SignalCounter:
    """Counts SIGINT/SIGTERM/SIGHUP while the sweep runs (main thread only; elsewhere a no-op)."""

    SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)

    def __init__(self):
        self.count = 0
        self.name = "signal"
        self._old: dict = {}

    def __enter__(self) -> _SignalCounter:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.count += 1
        self.name = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


def run_sweep(
    plan: SweepPlan,
    executor: ProcessExecutor | SubmititExecutor,
    *,
    force: bool = False,
    event: Event | None = None,
) -> SweepResult:
    """Run every point of ``plan`` that is not done yet; record progress in sweep.json.

    Raises ``RunInterrupted`` if stopped by a signal (runs are checkpointed; calling again
    continues). Failed runs do not stop the others: they are in the result.
    """
    event = event or (lambda kind, pid, info: None)
    for p in plan.points:  # before anything is written or launched
        ckpt = p.recipe.init.checkpoint
        if ckpt is not None and not Path(ckpt).exists() and run_state(p.dir, p.recipe.train.epochs) == "fresh":
            raise LnsgdError(
                f"sweep point {p.id}: init.checkpoint {ckpt} does not exist; build it first "
                "(lnsgd init-fullbatch / init-adversarial) or fix the path"
            )
    delete = check_existing(plan, force)
    with sweep_lock(plan.dir):
        for name in delete:
            target = plan.dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
            event("note", name, {"text": f"deleted {target} (--force)"})
        old = {}
        if (plan.dir / SWEEP_FILE).exists():
            with contextlib.suppress(LnsgdError):
                old = read_sweep(plan.dir)
        old_points = {p.get("id"): p for p in old.get("points", [])}
        data = {**plan.record(), "created": old.get("created", _now()), "updated": _now(),
                "executor": type(executor).__name__.removesuffix("Executor").lower(), "points": []}  # fmt: skip
        tasks: list[Task] = []
        skipped: list[str] = []
        for p in plan.points:
            state = run_state(p.dir, p.recipe.train.epochs)
            prev = old_points.get(p.id, {})
            entry = {"id": p.id, "values": _jsonable(p.values), "overrides": p.grid_overrides, "dir": p.id,
                     "epochs": p.recipe.train.epochs, "status": "done" if state == "done" else "pending",
                     "error": None}  # fmt: skip
            command = train_command(plan.recipe_path, p, resume=state == "resumable")
            entry["command"] = shlex.join(["lnsgd", *command])
            for k in ("started", "finished", "returncode", "job_id", "gpu"):
                if k in prev and state == "done":
                    entry[k] = prev[k]
            if state == "done":
                skipped.append(p.id)
            else:
                if prev.get("status") in ("failed", "interrupted"):
                    entry["previous"] = {"status": prev["status"], "error": prev.get("error")}
                tasks.append(Task(p, state == "resumable", command))
            data["points"].append(entry)
        by_id = {e["id"]: e for e in data["points"]}
        write_sweep(plan.dir, data)

        def update(pid: str, fields: dict) -> None:
            by_id[pid].update(_jsonable(fields))
            data["updated"] = _now()
            write_sweep(plan.dir, data)

        for pid in skipped:
            event("skipped", pid, {})
        try:
            executor.run(plan, tasks, update, event)
        except RunInterrupted as e:
            counts = collections.Counter(e["status"] if e["status"] != "running" else "interrupted" for e in data["points"])
            shown = ", ".join(f"{counts[s]} {s}" for s in STATUSES if counts[s])
            raise RunInterrupted(f"{e} ({shown}); runs were checkpointed") from None
        finally:
            for e in data["points"]:  # anything still marked running was not seen to finish
                if e["status"] == "running":
                    e["status"] = "interrupted"
            data["updated"] = _now()
            write_sweep(plan.dir, data)
    return SweepResult(plan.name, plan.dir, {e["id"]: e["status"] for e in data["points"]},
                       {e["id"]: e["error"] for e in data["points"] if e.get("error")}, skipped)  # fmt: skip


# --------------------------------------------------------------------------- submitit


def import_submitit():
    try:
        import submitit
    except ImportError:
        raise LnsgdError(
            "--executor submitit needs the submitit package: pip install submitit (or pip install 'lnsgd[slurm]')"
        ) from None
    return submitit


def __getattr__(name: str):
    # PointJob subclasses submitit's Checkpointable, so it is defined on first use: importing
    # lnsgd.sweep never needs submitit. Unpickling a job looks the class up here, by name.
    if name == "PointJob":
        cls = _define_point_job()
        globals()["PointJob"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _define_point_job():
    submitit = import_submitit()

    class PointJob(submitit.helpers.Checkpointable):
        """Trains one sweep point in-process; requeued with the same arguments on preemption/timeout."""

        def __init__(self, recipe: dict, run_dir: str):
            self.recipe = recipe  # a plain mapping: pickles without lnsgd classes
            self.run_dir = run_dir

        def __call__(self) -> dict:
            from lnsgd.measure import training_hook
            from lnsgd.train import train

            recipe = recipe_from_dict(self.recipe)
            run_dir = Path(self.run_dir)
            state = run_state(run_dir, recipe.train.epochs)
            if state == "done":  # e.g. requeued after it finished
                return json.loads((run_dir / "summary.json").read_text())
            resume = state == "resumable"
            with _checkpoint_on_preemption() as preempted:
                try:
                    return train(recipe, run_dir, resume=resume, force=not resume, sharpness_hook=training_hook(recipe))
                except RunInterrupted:
                    if preempted.pending is None:
                        raise  # cancelled (scancel / Ctrl-C): the sweep reports it interrupted
                    preempted.requeue()  # submitit: checkpoint() below, requeue, exit
                    raise

        def checkpoint(self, *args, **kwargs):
            # The training loop has already written last.pt (see _checkpoint_on_preemption); the
            # requeued job resumes from it. Returning self resubmits the same point.
            return submitit.helpers.DelayedSubmission(self)

    PointJob.__module__ = __name__
    PointJob.__qualname__ = "PointJob"
    return PointJob


class _checkpoint_on_preemption:
    """Route submitit's preemption/timeout signal (SIGUSR2) through the training loop's stop flag.

    While training, SIGTERM/SIGINT belong to the loop's StopFlag: on SIGUSR2 we call that
    handler, so the loop checkpoints after the current step and raises RunInterrupted; the
    caller then calls ``requeue()``, which runs submitit's own handler (checkpoint() and
    requeue). Outside the loop (loading data, writing final.pt), submitit's handler runs at once.
    """

    def __init__(self):
        self.pending: tuple | None = None
        self.submitit_handler = None
        self.sig = getattr(signal, "SIGUSR2", None)

    def __enter__(self) -> _checkpoint_on_preemption:
        if self.sig is not None and threading.current_thread() is threading.main_thread():
            self.submitit_handler = signal.signal(self.sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        from lnsgd.runtime import StopFlag

        loop = signal.getsignal(signal.SIGTERM)
        if self.pending is None and isinstance(getattr(loop, "__self__", None), StopFlag):
            self.pending = (signum, frame)
            loop(signal.SIGTERM, frame)  # the loop checkpoints after this step, then raises RunInterrupted
        elif self.pending is None:
            self.pending = (signum, frame)
            self.requeue()

    def requeue(self) -> None:
        if callable(self.submitit_handler) and self.pending is not None:
            self.submitit_handler(*self.pending)

    def __exit__(self, *exc) -> None:
        if self.submitit_handler is not None:
            signal.signal(self.sig, self.submitit_handler)


@dataclass
class SubmititOptions:
    cluster: str | None = None  # slurm, local, debug; None: submitit's detection
    partition: str | None = None
    gpus_per_job: int | None = None  # None: 1 on slurm, 0 otherwise
    timeout_min: int = 24 * 60
    mem_gb: float | None = None
    array_parallelism: int | None = None
    slurm: dict[str, Any] = field(default_factory=dict)  # --slurm key=value
    poll_s: float = 1.0


def parse_slurm_options(items: Sequence[str]) -> dict[str, Any]:
    out = {}
    for text in items:
        key, sep, value = text.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise LnsgdError(f"malformed --slurm {text!r}: expected key=value, e.g. --slurm qos=high or --slurm constraint=a100")
        out[key] = _yaml_load(value) if value.strip() else value
    return out


class SubmititExecutor:
    """Submits the points as one submitit job array and waits for them."""

    def __init__(self, options: SubmititOptions):
        self.options = options
        self.submitit = import_submitit()  # fail early, before the sweep folder is touched
        if options.cluster not in (None, "slurm", "local", "debug"):
            raise LnsgdError(f"--cluster {options.cluster!r}: expected slurm, local or debug")

    def make_executor(self, folder: Path, name: str = "lnsgd"):
        o = self.options
        try:
            ex = self.submitit.AutoExecutor(folder=folder, cluster=o.cluster)
        except Exception as e:  # noqa: BLE001 - e.g. slurm asked for where there is none
            raise LnsgdError(f"submitit cannot use cluster {o.cluster or 'auto'!r} here ({str(e).splitlines()[0]})") from None
        gpus = o.gpus_per_job if o.gpus_per_job is not None else (1 if ex.cluster == "slurm" else 0)
        params: dict[str, Any] = {"timeout_min": int(o.timeout_min), "gpus_per_node": int(gpus), "name": name}
        if o.mem_gb is not None:
            params["mem_gb"] = float(o.mem_gb)
        if o.partition:
            params["slurm_partition"] = o.partition
        if o.array_parallelism:
            params["slurm_array_parallelism"] = int(o.array_parallelism)
        known = self.submitit.SlurmExecutor._valid_parameters()
        extra = {}
        for k, v in o.slurm.items():
            if k in known and k != "additional_parameters":
                params[f"slurm_{k}"] = v
            else:
                extra[k] = v
        if extra:
            params["slurm_additional_parameters"] = extra
        try:
            ex.update_parameters(**params)
        except (NameError, ValueError, AssertionError, TypeError) as e:
            raise LnsgdError(f"submitit refused the job parameters ({str(e).splitlines()[0]})") from None
        return ex

    def run(self, plan: SweepPlan, tasks: list[Task], update: Callable[[str, dict], None], event: Event) -> None:
        if not tasks:
            return
        PointJob = globals().get("PointJob") or __getattr__("PointJob")
        ex = self.make_executor(plan.dir / SUBMITIT_DIR, name=f"lnsgd-{plan.name}")
        with ex.batch():
            jobs = [ex.submit(PointJob(recipe_to_dict(t.point.recipe), str(t.point.dir))) for t in tasks]
        for t, job in zip(tasks, jobs, strict=True):
            update(t.point.id, {"status": "running", "job_id": str(job.job_id), "started": _now(), "error": None,
                                "returncode": None, "resumed": t.resume})  # fmt: skip
            event("started", t.point.id, {"resume": t.resume, "job_id": str(job.job_id)})
        waiting = {t.point.id: (t, job) for t, job in zip(tasks, jobs, strict=True)}
        signals = _SignalCounter()
        with signals:
            if ex.cluster == "debug":  # debug jobs run in this process, one by one, when asked for their result
                for pid, (task, job) in list(waiting.items()):
                    if signals.count:
                        break
                    self._collect(pid, task, job, update, event)
                    del waiting[pid]
            while waiting and not signals.count:
                for pid, (task, job) in list(waiting.items()):
                    if job.done():
                        self._collect(pid, task, job, update, event)
                        del waiting[pid]
                if waiting:
                    time.sleep(self.options.poll_s)
            if signals.count and waiting:
                # Cancelling sends each job SIGINT (local) or SIGTERM (scancel): its training loop
                # checkpoints and stops. Wait a little for that, so a rerun finds the checkpoints.
                for _, job in waiting.values():
                    with contextlib.suppress(Exception):
                        job.cancel(check=False)
                deadline = time.time() + 60
                while time.time() < deadline and not all(_quiet_done(job) for _, job in waiting.values()):
                    time.sleep(0.5)
                for pid in waiting:
                    update(pid, {"status": "interrupted", "finished": _now()})
        if signals.count:
            raise RunInterrupted(f"sweep stopped by {signals.name}; its unfinished jobs were cancelled")

    @staticmethod
    def _collect(pid: str, task: Task, job, update, event) -> None:
        error = None
        try:
            job.result()
        except Exception as e:  # noqa: BLE001 - a failed job is reported, not raised
            error = _last_error_line(str(e))
        state = run_state(task.point.dir, task.point.recipe.train.epochs)
        if state == "done":
            status, error = "done", None
        elif error and "RunInterrupted" in error:
            status, error = "interrupted", None
        else:
            status = "failed"
            error = error or "the job ended without finishing the run"
        update(pid, {"status": status, "error": error, "finished": _now()})
        event("finished", pid, {"status": status, "error": error})


def _quiet_done(job) -> bool:
    try:
        return bool(job.done())
    except Exception:  # noqa: BLE001
        return True


def _last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    exc = [ln for ln in lines if re.match(r"^[\w.]+(Error|Interrupted|Exception)\b.*:", ln)]
    line = exc[-1] if exc else (lines[-1] if lines else "unknown error")
    line = re.sub(r"^lnsgd\.errors\.(LnsgdError|DivergedError): ", "", line)
    return line[:500]


# --------------------------------------------------------------------------- status


STATUS_METRICS = (
    ("train/acc", "train acc"),
    ("test/acc", "test acc"),
    ("sharp/trace_hessian", "tr H"),
    ("sharp/lambda_max", "λmax"),
)


def status_rows(sweep_dir: Path) -> tuple[dict, list[dict]]:
    """sweep.json with each point's status refreshed from its run folder, plus the last metrics."""
    from lnsgd.track import read_jsonl

    sweep_dir = Path(sweep_dir)
    data = read_sweep(sweep_dir)
    live = is_locked(sweep_dir)
    base_epochs = (data.get("base_recipe") or {}).get("train", {}).get("epochs")
    rows = []
    for p in data.get("points", []):
        run_dir = sweep_dir / p.get("dir", p["id"])
        epochs = p.get("epochs") or base_epochs
        state = run_state(run_dir, epochs) if epochs else "fresh"
        status = p.get("status", "pending")
        if state == "done":
            status = "done"
        elif status == "running" and not live:  # the sweep that ran it is gone
            status = "interrupted" if state == "resumable" else "pending"
        metrics = read_jsonl(run_dir / "metrics.jsonl")
        last = metrics[-1] if metrics else {}
        epoch = last.get("epoch")
        if epoch is None and state == "resumable":
            epoch = _checkpoint_epoch(run_dir)
        rows.append({"id": p["id"], "status": status, "epoch": epoch, "epochs": epochs, "error": p.get("error"),
                     **{k: last.get(k) for k, _ in STATUS_METRICS}})  # fmt: skip
    data["running_now"] = live
    return data, rows


def _checkpoint_epoch(run_dir: Path) -> int | None:
    import torch

    with contextlib.suppress(Exception):
        return int(torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["epoch"])
    return None


def status_table(data: dict, rows: list[dict]):
    """A rich table of the points: status, epoch, last accuracies (and sharpness if measured)."""
    from rich.markup import escape
    from rich.table import Table

    shown = [
        (k, label) for k, label in STATUS_METRICS if k.startswith(("train", "test")) or any(r.get(k) is not None for r in rows)
    ]
    counts = collections.Counter(r["status"] for r in rows)
    title = f"sweep {data.get('name')}: " + ", ".join(f"{counts[s]} {s}" for s in STATUSES if counts[s])
    if data.get("running_now"):
        title += " (running now)"
    table = Table("point", "status", "epoch", *(label for _, label in shown), "note", title=escape(title))
    colors = {"done": "green", "failed": "red", "interrupted": "yellow", "running": "cyan", "pending": "dim"}
    for r in rows:
        epoch = "—" if r["epoch"] is None else f"{r['epoch']}/{r['epochs']}" if r["epochs"] else str(r["epoch"])
        cells = []
        for k, _ in shown:
            v = r.get(k)
            cells.append("—" if not isinstance(v, (int, float)) else f"{100 * v:.2f}%" if k.endswith("acc") else f"{v:.4g}")
        status = f"[{colors.get(r['status'], 'white')}]{r['status']}[/]"
        note = r.get("error") if r["status"] == "failed" else ""
        table.add_row(escape(r["id"]), status, epoch, *cells, escape(note or ""))
    return table
