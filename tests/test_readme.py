"""Every `lnsgd …` command the README and the commands' --help examples show runs as written,
in a fresh folder with a copy of recipes/, at a tiny size where needed (a few size
overrides appended, listed in TINY), and exits 0."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]

# Lines shown for reading, not for running here, and why.
NOT_RUN = {
    "lnsgd train RECIPE": "a synopsis, not a command",
    "--executor submitit --partition gpu": "needs a Slurm cluster with a GPU partition and CIFAR-10",
}
# Commands that read what others write run after every command that writes.
READERS = ("plot", "compare", "measure-sharpness", "sweep-status")


def tiny(args: list[str]) -> list[str]:
    """The same command at a size a test can afford: size overrides appended, never removed."""
    cmd, rest = args[0], args[1:]
    epochs = ["train.epochs=1"]
    if cmd in ("train", "sweep") and not any(a in ("--dry-run",) for a in rest):
        extra = epochs + (["track.sharpness.examples=64"] if "escape" in " ".join(rest) else [])
        return [cmd, *rest, *extra]
    if cmd in ("init-adversarial", "init-fullbatch"):
        memorize = ["init.adversarial.memorize_epochs=1"] if cmd == "init-adversarial" else []
        return [cmd, *rest, *epochs, *memorize, "init.allow_unconverged=true"]
    if cmd == "theory":
        return [cmd, *rest, "theory.steps=200", "theory.eval_every=100", "theory.fit_steps=10"]
    if cmd == "demo":  # two seeds at the smoke-test size: still a folder of seeds for plot --baseline
        return [cmd, *rest, "--quick", *([] if "--seeds" in rest else ["--seeds", "2"])]
    if cmd == "measure-sharpness":
        return [cmd, *rest, "--examples", "64"]
    if cmd == "bench":
        return [cmd, *rest, "--steps", "2", "--no-epoch"]
    return args


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        lines += [ln.strip() for ln in block.splitlines() if ln.strip().startswith("lnsgd ")]
    return lines


def help_examples() -> list[str]:
    from lnsgd.cli import app

    lines = []
    for command in app.registered_commands:
        for m in re.finditer(r"Example[^:]*: (lnsgd .+)", command.callback.__doc__ or ""):
            lines.append(m.group(1).strip())
    return lines


def runnable(lines: list[str]) -> list[list[str]]:
    out = []
    for line in lines:
        if any(marker in line for marker in NOT_RUN):
            continue
        args = shlex.split(line, comments=True)[1:]  # drop "lnsgd" and a trailing # comment
        out.append(args)
    writers = [a for a in out if a[0] not in READERS]
    return writers + [a for a in out if a[0] in READERS]


def test_the_readme_and_every_help_show_commands():
    from lnsgd.cli import app

    assert len(readme_commands()) >= 25
    with_example = {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands
                    if re.search(r"Example[^:]*: lnsgd ", c.callback.__doc__ or "")}  # fmt: skip
    every = {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}
    assert with_example == every, every - with_example


@pytest.mark.slow
def test_every_command_in_the_readme_and_the_help_runs_as_written(tmp_path, monkeypatch):
    from lnsgd.cli import app

    runner = CliRunner()
    failures = []
    # The README as one session, and the help examples as another (they repeat some of it).
    for session, lines in (("readme", readme_commands()), ("help", help_examples())):
        folder = tmp_path / session
        shutil.copytree(ROOT / "recipes", folder / "recipes")
        monkeypatch.chdir(folder)
        for args in runnable(lines):
            res = runner.invoke(app, tiny(args), catch_exceptions=True)
            if res.exit_code != 0:
                failures.append(f"{session}: lnsgd {shlex.join(tiny(args))} → exit {res.exit_code}: "
                                f"{res.output.strip()[-300:]!r} {res.exception!r}")  # fmt: skip
    assert not failures, "\n".join(failures)
