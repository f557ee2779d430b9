"""Run folders read from disk, grouped over seeds and aggregated into curves.

A path is either a run folder (it holds ``recipe.yaml`` and ``metrics.jsonl``) or a
folder with run folders somewhere below it (a sweep). Runs whose resolved recipes
differ only in ``seed`` (and in fields that differ per run by nature: ``name``,
``device``, ``log.dir``, ``log.wandb.*``) are seeds of one configuration, a *group*;
the recipe keys that tell groups apart name them (``optim.lr=0.5``). For one group
and one metric every x value that any of its runs logged is kept (the union); at
each x the median, min and max are taken over the runs that have a value there.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lnsgd.errors import LnsgdError
from lnsgd.recipe import describe_measured_loss
from lnsgd.track import read_jsonl

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"

# Every metric the training loop may log (DESIGN.md, "Metric names"), in the order
# a table should list them.
KNOWN_METRICS = (
    "epoch",
    "step",
    "time_s",
    "lr",
    "lambda_eff",
    "train/loss",
    "train/acc",
    "train/expected_loss",
    "train/expected_loss_gap",
    "test/loss",
    "test/acc",
    "train/noisy_loss",
    "grad/norm",
    "weight/norm",
    "sharp/trace_hessian",
    "sharp/lambda_max",
    "sharp/trace_gn",
    "sharp/R",
    "sharp/proj_trace_hessian",
    "sharp/proj_lambda_max",
    "sharp/proj_trace_gn",
    "sharp/proj_R",
    "sharp/proj_distance",
    "throughput/img_per_s",
)

# Recipe keys that differ between runs of one configuration by nature, not by
# design; a key is ignored when it equals an entry or starts with "<entry>.".
PER_RUN_KEYS = ("seed", "name", "device", "log.dir", "log.wandb")


# --------------------------------------------------------------------------- runs


@dataclass
class Run:
    """One run folder as read from disk."""

    path: Path  # the run folder
    name: str  # the folder name (a longer relative path when folder names collide)
    recipe: dict  # recipe.yaml, the resolved recipe as run
    rows: list[dict]  # metrics.jsonl, one dict per evaluation, in file order
    finished: bool  # summary.json exists
    summary: dict | None  # summary.json, or None while the run is in progress


@dataclass
class Group:
    """Runs of one configuration (they differ only in seed and per-run fields)."""

    label: str  # legend/table name, e.g. "optim.lr=0.5, noise.kind=flip"
    differing: dict  # the values of the recipe keys that tell groups apart
    runs: list[Run]


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a ``metrics.jsonl`` file (the file itself, or its run folder).

    The last line may be torn while a run is writing it, so an unparsable last
    line is dropped; an unparsable line anywhere else is an error.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise LnsgdError(f"cannot read {path}: no such file")
    return read_jsonl(path)


def is_run_folder(path: Path) -> bool:
    return (path / RECIPE_FILE).is_file() and (path / METRICS_FILE).is_file()


def load_run(path: str | Path) -> Run:
    """Read one run folder: recipe, metrics and (when finished) summary."""
    path = Path(path)
    if not is_run_folder(path):
        missing = [f for f in (RECIPE_FILE, METRICS_FILE) if not (path / f).is_file()]
        raise LnsgdError(f"{path} is not a run folder (no {'/'.join(missing)})")
    recipe_file = path / RECIPE_FILE
    try:
        recipe = yaml.safe_load(_read_text(recipe_file))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise LnsgdError(f"{recipe_file}{where}: not valid YAML ({getattr(exc, 'problem', None) or 'unreadable'})") from None
    if not isinstance(recipe, dict):
        raise LnsgdError(f"{recipe_file}: expected a mapping of recipe fields")
    summary = None
    summary_file = path / SUMMARY_FILE
    if summary_file.is_file():
        try:
            summary = json.loads(_read_text(summary_file))
        except json.JSONDecodeError as exc:
            raise LnsgdError(f"{summary_file}, line {exc.lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(summary, dict):
            raise LnsgdError(f"{summary_file}: expected a JSON object")
    return Run(
        path=path,
        name=path.resolve().name,
        recipe=recipe,
        rows=read_metrics(path / METRICS_FILE),
        finished=summary is not None,
        summary=summary,
    )


def _read_text(path: Path) -> str:
    """A run-folder file as text, or one line naming it (and the line) when it cannot be read."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LnsgdError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise LnsgdError(f"{path}, line {line}: not UTF-8 text (a corrupt or binary file)") from None


def _run_folders_below(root: Path) -> list[Path]:
    """Run folders at any depth below `root`, in sorted order; run folders are
    not searched further (their checkpoints/ and wandb/ hold no runs)."""
    found = []
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        if here != root and is_run_folder(here):
            found.append(here)
            dirnames.clear()
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    return found


def find_runs(paths: str | Path | Iterable[str | Path]) -> list[Run]:
    """Every run in `paths`; each is a run folder or a folder with runs below it."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if not paths:
        raise LnsgdError("no run folders given; pass a run folder or a sweep folder")
    runs: list[Run] = []
    seen: set[Path] = set()
    for path in paths:
        if not path.exists():
            raise LnsgdError(f"{path} does not exist; pass a run folder or a sweep folder")
        if is_run_folder(path):
            folders = [path]
        elif path.is_dir():
            folders = _run_folders_below(path)
        else:
            folders = []
        if not folders:
            raise LnsgdError(
                f"{path} is not a run folder (no {RECIPE_FILE}/{METRICS_FILE}) and contains none"
            )
        for folder in folders:
            if folder.resolve() not in seen:
                seen.add(folder.resolve())
                runs.append(load_run(folder))
    _disambiguate_names(runs)
    return runs


def _disambiguate_names(runs: list[Run]) -> None:
    """Sweeps may nest runs as lr=0.5/seed=0, lr=1.0/seed=0: lengthen the names
    that collide with parent folder names until they don't."""
    depth = 1
    while depth < 8:
        names = [r.name for r in runs]
        clashing = {n for n in names if names.count(n) > 1}
        if not clashing:
            return
        depth += 1
        for run in runs:
            if run.name in clashing:
                parts = run.path.resolve().parts[-depth:]
                run.name = "/".join(parts)


def as_runs(paths_or_runs: Any) -> list[Run]:
    """Runs from what `plot_runs`/`compare_runs` accept: a Run, a path, or a mix of
    Runs and paths (each path a run folder or a folder with runs below it)."""
    if isinstance(paths_or_runs, Run):
        return [paths_or_runs]
    if isinstance(paths_or_runs, (str, Path)):
        return find_runs([paths_or_runs])
    items = list(paths_or_runs)
    if not items:
        raise LnsgdError("no runs found: no run folders given")
    if all(isinstance(i, Run) for i in items):
        return items
    runs = [i for i in items if isinstance(i, Run)]
    paths = [i for i in items if not isinstance(i, Run)]
    return runs + find_runs(paths)


# ----------------------------------------------------------------------- grouping


def flatten(recipe: dict, prefix: str = "") -> dict[str, object]:
    """Nested mapping → {"optim.lr": 0.5, ...}. Lists stay values; an empty
    mapping stays as a value so that its key is not lost."""
    flat: dict[str, object] = {}
    for key, value in recipe.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, prefix=f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def _ignored(key: str, ignore: Sequence[str]) -> bool:
    return any(key == k or key.startswith(k + ".") for k in ignore)


_MISSING = object()  # a key one recipe has and another lacks


def _format_value(value: object) -> str:
    if value is _MISSING:
        return "unset"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _checkpoint_names(paths: list[object]) -> list[str]:
    """Readable names for init checkpoints: the run folder a checkpoint belongs
    to (".../adversarial/final.pt" → "adversarial", ".../adversarial/checkpoints/
    last.pt" → "adversarial/last"), with more of the path where names collide."""

    def short(value: object, extra: int) -> str:
        if value is None:
            return "random"
        if not isinstance(value, str):
            return _format_value(value)
        parts = list(Path(value).parts)
        stem = Path(value).stem
        folder = parts[:-1]
        if folder and folder[-1] == "checkpoints":
            folder = folder[:-1]
        head = "/".join(folder[len(folder) - 1 - extra :]) if folder else ""
        if stem == "final" and head:
            return head
        return f"{head}/{stem}" if head else stem

    for extra in range(8):
        names = [short(p, extra) for p in paths]
        distinct = {json.dumps(p, default=str) for p in paths}
        if len(set(names)) == len(distinct):
            return names
    return [_format_value(p) for p in paths]


def _sort_key(value: object) -> tuple:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    if value is None or value is _MISSING:
        return (2, 0.0, "")
    return (1, 0.0, _format_value(value))


def _common_name(runs: list[Run]) -> str:
    names = [str(r.recipe.get("name") or r.path.name) for r in runs]
    if len(set(names)) == 1:
        return names[0]
    prefix = os.path.commonprefix(names)
    # "cifar-lr0.5-s0", "cifar-lr0.5-s1" → "cifar-lr0.5"
    prefix = re.sub(r"([-_. ]+(seed|s)[-_.= ]*|[-_.= ]+)$", "", prefix)
    return prefix or "runs"


def _label_parts(differing: list[dict], keys: list[str], shown: dict[str, list[str]], i: int) -> list[tuple[str, str]]:
    """(key, text) pairs of config ``i``'s label.

    A section that is null in some recipes and set in others (``track.sharpness: null``
    against ``track.sharpness: {every: 8, ...}``) is one key K in the first and keys K.* in
    the second; the label names it once, so it never reads ``K=unset, K.every=8``: ``K=null``
    where K is a value, else the K.* that vary between the recipes that set K (``K=set``
    when none do).
    """

    def sets(d: dict, section: str) -> bool:
        return any(v is not _MISSING for c, v in d.items() if c.startswith(section + "."))

    def varies(key: str, section: str) -> bool:
        return len({_format_value(d[key]) for d in differing if sets(d, section)}) > 1

    parts = []
    for k in keys:
        section = next((p for p in keys if k.startswith(p + ".")), None)
        if section is not None and (differing[i][section] is not _MISSING or not varies(k, section)):
            continue  # K=null says it, or K=set / the varying K.* do
        if differing[i][k] is _MISSING and sets(differing[i], k):
            if not any(varies(c, k) for c in keys if c.startswith(k + ".")):
                parts.append((k, "set"))
            continue
        parts.append((k, shown[k][i]))
    return parts


def group_runs(runs: Sequence[Run], ignore: Iterable[str] = ()) -> list[Group]:
    """Runs that differ only in seed (and per-run fields) → one Group each.

    `ignore` adds recipe keys (dotted; a key also covers everything below it)
    that should not split groups, e.g. "init.checkpoint" when each seed starts
    from its own init. Groups are sorted by their differing values.
    """
    runs = list(runs)
    if not runs:
        raise LnsgdError("no runs found")
    skip = tuple(PER_RUN_KEYS) + tuple(ignore)
    flats = [{k: v for k, v in flatten(r.recipe).items() if not _ignored(k, skip)} for r in runs]

    by_config: dict[str, list[int]] = {}
    for index, flat in enumerate(flats):
        key = json.dumps(flat, sort_keys=True, default=str)
        by_config.setdefault(key, []).append(index)
    members = list(by_config.values())
    configs = [flats[m[0]] for m in members]

    all_keys = sorted({k for c in configs for k in c})
    differing_keys = [
        k
        for k in all_keys
        if len({json.dumps(c.get(k, "\0unset"), sort_keys=True, default=str) for c in configs}) > 1
    ]
    differing = [{k: c.get(k, _MISSING) for k in differing_keys} for c in configs]
    order = sorted(
        range(len(configs)), key=lambda i: [_sort_key(differing[i][k]) for k in differing_keys]
    )

    # Label text per key; checkpoint paths are shortened jointly so they stay distinct.
    shown = {k: [_format_value(d[k]) for d in differing] for k in differing_keys}
    for k in differing_keys:
        if k == "init.checkpoint" or k.endswith(".checkpoint"):
            shown[k] = _checkpoint_names([d[k] for d in differing])

    def key_name(k: str) -> str:
        return "init" if k == "init.checkpoint" else k

    groups = []
    for i in order:
        group_runs_ = [runs[j] for j in members[i]]
        if differing_keys:
            label = ", ".join(f"{key_name(k)}={text}" for k, text in _label_parts(differing, differing_keys, shown, i))
        else:
            label = _common_name(group_runs_)
        plain = {k: (None if v is _MISSING else v) for k, v in differing[i].items()}
        groups.append(Group(label=label, differing=plain, runs=group_runs_))
    return groups


# -------------------------------------------------------------------- aggregation


def finite_float(value: object) -> float | None:
    """A finite float, or None for missing, null, non-numeric or non-finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def run_series(run: Run, x: str, metric: str) -> tuple[list[tuple[float, float]], int]:
    """(x, value) pairs of one run, sorted by x; rows lacking either are skipped.

    When several rows share an x (a resumed run may re-log an evaluation), the
    last one in the file wins; the second value returned counts the rows dropped.
    """
    points: dict[float, float] = {}
    duplicates = 0
    for row in run.rows:
        xv, yv = finite_float(row.get(x)), finite_float(row.get(metric))
        if xv is None or yv is None:
            continue
        if xv in points:
            duplicates += 1
        points[xv] = yv
    return sorted(points.items()), duplicates


@dataclass
class Curve:
    """One group's metric over x: median and min–max over the runs that have a
    value at each x (the union of the runs' x values)."""

    x: list[float]
    median: list[float]
    lo: list[float]
    hi: list[float]
    n: list[int]


def aggregate(series: Sequence[Sequence[tuple[float, float]]]) -> Curve:
    at: dict[float, list[float]] = {}
    for points in series:
        for xv, yv in points:
            at.setdefault(xv, []).append(yv)
    xs = sorted(at)
    return Curve(
        x=xs,
        median=[statistics.median(at[v]) for v in xs],
        lo=[min(at[v]) for v in xs],
        hi=[max(at[v]) for v in xs],
        n=[len(at[v]) for v in xs],
    )


def running_mean(values: Sequence[float], window: int) -> list[float]:
    """Trailing running average: point i is the mean of points max(0, i-window+1)..i."""
    # fsum per window rather than a rolling sum: with window 1 the values come back
    # bit for bit, and the CSV stays an exact record of what is drawn.
    return [
        math.fsum(values[max(0, i - window + 1) : i + 1]) / min(i + 1, window)
        for i in range(len(values))
    ]


def measured_losses(run: Run) -> list[str]:
    """The losses a run's ``sharp/*`` columns were measured on, as labels that compare across
    runs ("flip p=0.2", "clean"). Rows written before the label named the loss itself say
    "expected" or "clean": "expected" is resolved from the run's own noise."""
    labels = []
    for row in run.rows:
        label = row.get("sharp/loss")
        if label == "expected":
            noise = run.recipe.get("noise") or {}
            label = describe_measured_loss("expected", run.recipe.get("loss", "cross_entropy"), noise.get("kind", "none"),
                                        noise.get("p", 0), noise.get("sigma", 0))  # fmt: skip
        if isinstance(label, str) and label not in labels:
            labels.append(label)
    return labels
