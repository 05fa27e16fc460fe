"""Helpers for tests that run the real command line and real processes."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, timeout: float = 600, cwd: Path | None = None
            ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-m", "fedvault", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd or ROOT, env=env)


def run_cli_together(*argvs: list[str], timeout: float = 600
                     ) -> list[subprocess.CompletedProcess[str]]:
    """Several ``run_cli`` calls at once (independent runs of the same command: on two
    cores the start-up of one overlaps the work of the other)."""
    env = {**os.environ, "COLUMNS": "120"}
    procs = [subprocess.Popen([sys.executable, "-m", "fedvault", *argv], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
             for argv in argvs]
    out = []
    for argv, p in zip(argvs, procs, strict=True):
        stdout, stderr = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess([sys.executable, "-m", "fedvault", *argv],
                                               p.returncode, stdout, stderr))
    return out


def cli_in_process(*args: str, timeout: float = 0, cwd: Path | None = None
                   ) -> subprocess.CompletedProcess[str]:
    """The real command line (``fedvault.cli.main``) called in this process, its output
    captured: for the many bad-input tests, which then pay neither an interpreter
    start-up nor a torch import per call. ``run_cli`` runs the installed entry point
    in a subprocess (the help, the end-to-end runs). ``timeout`` and ``cwd`` are
    accepted for symmetry with ``run_cli`` and ignored: these calls fail early."""
    from fedvault.cli import main, render

    out, err = io.StringIO(), io.StringIO()
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "120"
    # rich fixes a console's width when it is made (at the first import of the CLI in
    # this process, whichever test that was): give the calls here the width they'd have
    widths = (render.console._width, render.err_console._width)
    render.console.width = render.err_console.width = 120
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse's own usage errors
                code = exc.code if isinstance(exc.code, int) else 2
    finally:
        render.console._width, render.err_console._width = widths
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    return subprocess.CompletedProcess(["fedvault", *args], code, out.getvalue(),
                                       err.getvalue())


def write_site_toml(tmp_path: Path, site: str = "insecure = true", node: str = "") -> Path:
    """A ``site.toml`` for site "clinic" (its ``[site]`` lines beyond name and superlink,
    its ``[node-config]`` lines beyond a one-row ``data.csv``)."""
    data = tmp_path / "data.csv"
    data.write_text("x,y\n1,0\n")
    p = tmp_path / "site.toml"
    p.write_text(f'[site]\nname = "clinic"\nsuperlink = "127.0.0.1:9092"\n{site}\n'
                 f'[node-config]\ndata-path = "{data}"\n{node}')
    return p


def processes_with_flwr_home_under(root: Path) -> list[int]:
    """PIDs of live (non-zombie) processes whose FLWR_HOME lies under ``root``."""
    found = []
    prefix = f"FLWR_HOME={root.resolve()}".encode()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = (d / "environ").read_bytes()
            state = (d / "stat").read_text().split(") ", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and any(v.startswith(prefix) for v in env.split(b"\0")):
            found.append(int(d.name))
    return found


class MessageGrid:
    """The part of Flower's ``Grid`` a strategy's configure_* calls (node ids, and
    ``create_message`` building real Flower messages), for unit tests of strategies."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def create_message(self, content: Any, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Any:
        from flwr.app import Message

        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type,
                       group_id=group_id)
