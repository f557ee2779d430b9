"""The grid: ``--grid`` options and spec axes expanded into points, each with a readable id.

``--grid optim.lr=0.5,1,2 --grid seed=0,1,2`` (or a sweep spec's ``grid:``) is expanded
into points, the cartesian product of the axes, or with ``zip`` the axes paired element by
element. Each point is an ordered {key: value}, a list of ``key=value`` overrides of the
base recipe, and gets a short, readable, filesystem-safe id made of the last key component
and the value: ``lr=0.5,seed=0``. Values are YAML, typed as in recipe overrides.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lnsgd.errors import LnsgdError
from lnsgd.recipe import parse_override

# Keys the sweep sets itself: the run folder and name come from the point id.
RESERVED_KEYS = ("name", "log.dir")


def value_text(value: Any) -> str:
    """The override text (YAML) that parses back to ``value``: 0.5 → "0.5", "0.5" → "'0.5'", [a, b] → "[a, b]"."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30, allow_unicode=True).strip()
    text = text.removesuffix("...").strip()
    assert yaml_value(text) == value, (value, text)
    return text


def yaml_value(text: str) -> Any:
    """``text`` parsed as YAML, or the text itself where it is not valid YAML (as overrides are)."""
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
    return key, [yaml_value(v) for v in values]


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
        bad = next((v for v in ax.values if not _finite(v)), None)
        if bad is not None:
            raise LnsgdError(f"grid key {ax.key}: {value_label(bad)} is not a finite number; use finite values, e.g. {ax.key}=0.5,1")
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


def _finite(value: Any) -> bool:
    """No NaN or ±inf anywhere in a value: a NaN equals nothing, so it could not name or find its point."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True


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
