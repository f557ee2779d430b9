"""`lnsgd sweep-status`: each point's status, refreshed from its run folder, and its last metrics.

A point marked running in sweep.json whose sweep no longer holds the lock was not seen to
finish: it shows as interrupted (it has ``last.pt``) or pending — unless Slurm still holds
its job (a submitit sweep whose watcher died): then it shows as Slurm says, running or
requeued. Points with a Slurm job show its id and Slurm's state (``squeue``, else ``sacct``).
"""

from __future__ import annotations

import collections
import contextlib
from pathlib import Path

from lnsgd.errors import LnsgdError
from lnsgd.sweep.plan import STATUSES, is_locked, read_sweep, run_state
from lnsgd.sweep.slurm import ACTIVE_STATES, slurm_states

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
    job_ids = [str(p["job_id"]) for p in data.get("points", []) if p.get("job_id")]
    slurm = (slurm_states(job_ids) or {}) if job_ids else {}
    rows = []
    for p in data.get("points", []):
        run_dir = sweep_dir / p.get("dir", p["id"])
        epochs = p.get("epochs") or base_epochs
        state = run_state(run_dir, epochs) if epochs else "fresh"
        status = p.get("status", "pending")
        job = str(p["job_id"]) if p.get("job_id") else None
        slurm_state = slurm.get(job) if job else None
        if state == "done":
            status = "done"
        elif slurm_state in ACTIVE_STATES:  # Slurm still holds the job, whoever watches it
            if slurm_state in ("RUNNING", "COMPLETING"):
                status = "running"
            else:
                status = "requeued" if p.get("requeues") or state == "resumable" else "pending"
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
                     "job_id": job, "slurm_state": slurm_state, "requeues": p.get("requeues", 0),
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
    jobs = any(r.get("job_id") for r in rows)
    table = Table("point", "status", "epoch", *(["job", "slurm"] if jobs else []), *(label for _, label in shown), "note",
                  title=escape(title))  # fmt: skip
    colors = {"done": "green", "failed": "red", "interrupted": "yellow", "running": "cyan", "requeued": "cyan", "pending": "dim"}
    for r in rows:
        epoch = "—" if r["epoch"] is None else f"{r['epoch']}/{r['epochs']}" if r["epochs"] else str(r["epoch"])
        cells = []
        for k, _ in shown:
            v = r.get(k)
            cells.append("—" if not isinstance(v, (int, float)) else f"{100 * v:.2f}%" if k.endswith("acc") else f"{v:.4g}")
        status = f"[{colors.get(r['status'], 'white')}]{r['status']}[/]"
        note = r.get("unreadable") or (r.get("error") if r["status"] == "failed" else "")
        slurm = []
        if jobs:
            state = r.get("slurm_state") or ("—" if r.get("job_id") else "")
            slurm = [r.get("job_id") or "—", state + (f" ({r['requeues']} requeued)" if r.get("requeues") else "")]
        table.add_row(escape(r["id"]), status, epoch, *map(escape, slurm), *cells, escape(note or ""))
    return table
