"""`lnsgd sweep-status`: each point's status, refreshed from its run folder, and its last metrics.

A point marked running in sweep.json whose sweep no longer holds the lock was not seen to
finish: it shows as interrupted (it has ``last.pt``) or pending.
"""

from __future__ import annotations

import collections
import contextlib
from pathlib import Path

from lnsgd.errors import LnsgdError
from lnsgd.sweep.plan import STATUSES, is_locked, read_sweep, run_state

# (metrics.jsonl key, column title); sharpness columns show only when some point measured them.
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
        elif status in ("running", "requeued") and not live:  # the sweep that ran it is gone
            status = "interrupted" if state == "resumable" else "pending"
        error, unreadable = p.get("error"), None
        try:
            metrics = read_jsonl(run_dir / "metrics.jsonl")
        except LnsgdError as e:  # one unreadable run folder: say so in its row, show the others
            metrics, error = [], str(e)
            unreadable = error
        last = metrics[-1] if metrics else {}
        epoch = last.get("epoch")
        if epoch is None and state == "resumable":
            epoch = _checkpoint_epoch(run_dir)
        rows.append({"id": p["id"], "status": status, "epoch": epoch, "epochs": epochs, "error": error, "unreadable": unreadable,
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
    colors = {"done": "green", "failed": "red", "interrupted": "yellow", "running": "cyan", "requeued": "cyan", "pending": "dim"}
    for r in rows:
        epoch = "—" if r["epoch"] is None else f"{r['epoch']}/{r['epochs']}" if r["epochs"] else str(r["epoch"])
        cells = []
        for k, _ in shown:
            v = r.get(k)
            cells.append("—" if not isinstance(v, (int, float)) else f"{100 * v:.2f}%" if k.endswith("acc") else f"{v:.4g}")
        status = f"[{colors.get(r['status'], 'white')}]{r['status']}[/]"
        note = r.get("unreadable") or (r.get("error") if r["status"] == "failed" else "")
        table.add_row(escape(r["id"]), status, epoch, *cells, escape(note or ""))
    return table
