"""Loopback rehearsal: a real Flower deployment on this machine.

``fedvault rehearse --sites 3`` starts one real ``flower-superlink`` and N real
``flower-supernode`` processes on 127.0.0.1, each SuperNode with its own
``FLWR_HOME`` and ``--node-config`` (its own data file, written from its
partition of the task's data), submits the run with ``flwr run``, follows the
run's event log for progress, and stops every process it started (also on
Ctrl-C, SIGTERM or failure: each process is the leader of its own process
group, and the whole group is terminated, then killed).

Layout under the run directory::

    RUN_DIR/deployment/
      superlink/            FLWR_HOME of the SuperLink (its unpacked app)
      cli/config.toml       FLWR_HOME of the `flwr` CLI: the SuperLink connection
      sites/site-K/         FLWR_HOME of SuperNode K, and data.csv (its private data)
      logs/*.log            every process's output
      run-config.toml       the run config submitted with `flwr run`

Insecure mode (no TLS, no node authentication) only: those come with the
deployment issue, and every process logs that it is insecure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import tomli_w

from fedvault.datasets import pool_bounds, pooled_table
from fedvault.errors import ConfigError, DeploymentError
from fedvault.partition import partition_indices
from fedvault.rundir import RunDirectory
from fedvault.tables import save_table
from fedvault.tasks import get_task
from protocols.config import RunSettings
from protocols.node_config import NodeConfig
from simulations.runner import check_run, ensure_federation, tail_events

STARTUP_TIMEOUT = 60.0
CONNECTION_NAME = "fedvault-rehearsal"


def app_root() -> Path:
    """The Flower App directory (the one holding fedvault's pyproject.toml)."""
    root = Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if not pyproject.exists() or "[tool.flwr.app]" not in pyproject.read_text(encoding="utf-8"):
        raise DeploymentError(
            f"cannot find fedvault's Flower App (pyproject.toml) beside {root}: "
            "install fedvault from a source checkout (pip install -e .) to rehearse."
        )
    return root


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    cand = Path(sys.executable).parent / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if not found:
        raise DeploymentError(f"{name!r} not found: install flwr (pip install 'flwr[simulation]').")
    return found


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    handle: IO[bytes]

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


@dataclass
class Deployment:
    """Processes of one loopback deployment; :meth:`stop` ends all of them."""

    root: Path
    procs: list[_Proc] = field(default_factory=list)

    def spawn(self, name: str, argv: list[str], env: dict[str, str], cwd: Path | None = None,
              ) -> _Proc:
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        fh = log.open("wb")
        popen = subprocess.Popen(
            argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            cwd=cwd, start_new_session=True,
        )
        proc = _Proc(name=name, popen=popen, log=log, handle=fh)
        self.procs.append(proc)
        return proc

    def check_alive(self, exclude: tuple[str, ...] = ()) -> None:
        for p in self.procs:
            if p.name in exclude:
                continue
            rc = p.popen.poll()
            if rc is not None:
                raise DeploymentError(
                    f"{p.name} exited with status {rc} during the run; last lines of "
                    f"{p.log}:\n{p.tail()}"
                )

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every process group, wait ``grace`` seconds, then SIGKILL every
        process left of this deployment: the groups, their descendants, and any
        process carrying a ``FLWR_HOME`` under this deployment (Flower's SuperExec
        starts its own session, so a group kill alone would miss it)."""
        for p in reversed(self.procs):
            _signal_group(p.popen, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in reversed(self.procs):
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for _ in range(3):  # a dying parent may still spawn; sweep until nothing is left
            leftovers = deployment_processes(self.root, [p.popen.pid for p in self.procs])
            for p in self.procs:
                _signal_group(p.popen, signal.SIGKILL)
            for pid in leftovers:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            if not leftovers:
                break
            time.sleep(0.2)
        for p in self.procs:
            try:
                p.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            p.handle.close()


def become_subreaper() -> bool:
    """Adopt orphaned descendants (Linux ``PR_SET_CHILD_SUBREAPER``), so the
    ``flwr-serverapp``/``flwr-clientapp`` children that the SuperLink and SuperNodes
    leave behind when they exit are reaped here instead of lingering as zombies
    under an init that does not reap. Returns whether it took effect."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(36, 1, 0, 0, 0)) == 0  # 36 = PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def reap_orphans(timeout: float = 3.0) -> None:
    """Collect the exit status of every adopted orphan (all were sent SIGKILL)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # no children left
        if pid == 0:
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)


def deployment_processes(root: Path, roots: list[int]) -> list[int]:
    """Live PIDs descending from ``roots`` or whose ``FLWR_HOME`` lies under ``root``
    (Linux ``/proc``; elsewhere only the process groups are signalled)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    prefix = f"FLWR_HOME={root.resolve()}".encode()
    children: dict[int, list[int]] = {}
    found: set[int] = set()
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        pid = int(d.name)
        try:
            stat = (d / "stat").read_text()
            state, ppid = stat.rsplit(") ", 1)[1].split()[:2]
            if state == "Z":
                continue
            children.setdefault(int(ppid), []).append(pid)
            env = (d / "environ").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if any(v.startswith(prefix) for v in env.split(b"\0")):
            found.add(pid)
    stack = list(roots)
    while stack:
        pid = stack.pop()
        for c in children.get(pid, []):
            if c not in found:
                found.add(c)
                stack.append(c)
    found.update(r for r in roots if (proc / str(r)).exists())
    found.discard(os.getpid())
    return sorted(found)


def _signal_group(popen: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(popen.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_for_port(port: int, proc: _Proc, timeout: float = STARTUP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise DeploymentError(
                f"{proc.name} exited with status {proc.popen.returncode} at start-up; "
                f"last lines of {proc.log}:\n{proc.tail()}"
            )
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise DeploymentError(f"{proc.name} did not listen on 127.0.0.1:{port} within {timeout:.0f} s.")


def wait_for_log(proc: _Proc, needle: str, timeout: float = STARTUP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise DeploymentError(
                f"{proc.name} exited with status {proc.popen.returncode} at start-up; "
                f"last lines of {proc.log}:\n{proc.tail()}"
            )
        if needle in proc.log.read_text(encoding="utf-8", errors="replace"):
            return
        time.sleep(0.2)
    raise DeploymentError(f"{proc.name} did not report {needle!r} within {timeout:.0f} s.")


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so cleanup runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def write_site_data(settings: RunSettings, sites: int, root: Path) -> list[Path]:
    """Lay out each site's private data file from its partition of the pool."""
    task = get_task(settings.task)
    pool, _ = pooled_table(task, settings)
    if len(pool) < sites:
        raise ConfigError(f"{len(pool)} training rows cannot be split across {sites} sites.")
    parts = partition_indices(pool.y, sites, partitioner=settings.partitioner,
                              alpha=settings.alpha, seed=settings.seed)
    label = settings.label_column or task.default_label_column
    return [save_table(pool.subset(idx), root / "sites" / f"site-{k}" / "data.csv",
                       label_column=label)
            for k, idx in enumerate(parts)]


def write_declared_bounds(settings: RunSettings, root: Path) -> str | None:
    """The feature bounds the rehearsal's data owners declare (tabular data of the
    run's own file: the range of the whole public pool), as the JSON a real data owner
    points node-config ``feature-bounds`` at; ``None`` where the task needs none."""
    task = get_task(settings.task)
    if task.fixed_scale is not None or not (settings.data_path or settings.feature_bounds):
        return None
    if settings.feature_bounds:  # "LOW:HIGH" or a file: handed to every site as declared
        f = Path(settings.feature_bounds).expanduser()
        return str(f.resolve()) if f.exists() else settings.feature_bounds
    b = pool_bounds(settings)
    p = root / "feature-bounds.json"
    p.write_text(json.dumps({"low": b.low.tolist(), "high": b.high.tolist()}), encoding="utf-8")
    return str(p)


def site_node_config(settings: RunSettings, k: int, *, data: Path, label: str,
                     bounds: str | None) -> NodeConfig:
    """The node config the rehearsal's data owner ``site-k`` sets on its SuperNode."""
    home = data.parent
    return NodeConfig(
        data_path=str(data), label_column=label, task=settings.task,
        partition_id=k, site_name=f"site-{k}",
        ledger_path=str(home / "privacy-ledger.jsonl"),
        max_epsilon=settings.site_max_epsilon, delta=settings.site_delta,
        min_noise_multiplier=settings.site_min_noise_multiplier,
        accountant=settings.accountant, require_dp=settings.dp,
        # the rehearsal's data owners are played on public data: they let the central
        # team see exact evaluation metrics (and seeded noise when the run asks for it);
        # a real site's defaults are off
        release_eval_metrics=settings.site_release_eval_metrics,
        allow_insecure_noise=True if not settings.secure_mode else None,
        feature_bounds=bounds,
        he_federation=settings.he_federation if settings.he else None)


def rehearse(
    settings: RunSettings,
    *,
    sites: int,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    on_status: Callable[[str], None] | None = None,
    timeout: float = 3600.0,
) -> dict[str, Any]:
    """Run ``settings`` on a real loopback SuperLink with ``sites`` SuperNodes."""
    check_run(settings, sites)
    status = on_status or (lambda _msg: None)
    run_dir = RunDirectory(Path(settings.run_dir).resolve())
    if run_dir.events.exists():
        raise ConfigError(f"run directory {str(run_dir.root)!r} already holds a run.")
    settings = settings.replace(run_dir=str(run_dir.root), data_path=str(
        Path(settings.data_path).resolve()) if settings.data_path else "")
    app = app_root()
    dep_root = run_dir.root / "deployment"
    dep_root.mkdir(parents=True, exist_ok=True)

    settings = ensure_federation(settings, sites, dep_root)
    status("writing each site's data file")
    data_files = write_site_data(settings, sites, dep_root)
    task = get_task(settings.task)
    label = settings.label_column or task.default_label_column
    bounds_file = write_declared_bounds(settings, dep_root)

    base_env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_")}
    base_env["PYTHONUNBUFFERED"] = "1"
    # Flower's processes start their helpers (flower-superexec, flwr-serverapp,
    # flwr-clientapp) by name from PATH: put this interpreter's scripts first, so an
    # un-activated virtualenv works and no other Flower install is picked up.
    base_env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent),
                                        base_env.get("PATH", os.defpath)])
    dep = Deployment(root=dep_root)
    subreaper = become_subreaper()
    stop = threading.Event()
    tail: threading.Thread | None = None
    with _sigterm_as_interrupt():
        try:
            link_port = free_port()
            status(f"starting flower-superlink on 127.0.0.1:{link_port}")
            link_home = dep_root / "superlink"
            link_home.mkdir(exist_ok=True)
            link = dep.spawn(
                "superlink",
                [_bin("flower-superlink"), "--insecure",
                 "--disable-runtime-dependency-installation", "--port", str(link_port)],
                env={**base_env, "FLWR_HOME": str(link_home)},
            )
            wait_for_port(link_port, link)

            for k, path in enumerate(data_files):
                home = path.parent
                node_config = site_node_config(settings, k, data=path, label=label,
                                               bounds=bounds_file).write_toml(
                                                   home / "node-config.toml")
                status(f"starting flower-supernode site-{k}")
                node = dep.spawn(
                    f"site-{k}",
                    [_bin("flower-supernode"), "--insecure", "--superlink",
                     f"127.0.0.1:{link_port}", "--port", str(free_port()),
                     "--node-config", str(node_config)],
                    env={**base_env, "FLWR_HOME": str(home)},
                )
                wait_for_log(node, "SuperNode ID")

            cli_home = dep_root / "cli"
            cli_home.mkdir(exist_ok=True)
            (cli_home / "config.toml").write_text(tomli_w.dumps({
                "superlink": {"default": CONNECTION_NAME,
                              CONNECTION_NAME: {"address": f"127.0.0.1:{link_port}",
                                                "insecure": True}}}), encoding="utf-8")
            run_config = dep_root / "run-config.toml"
            run_config.write_text(tomli_w.dumps(settings.to_config()), encoding="utf-8")

            if on_event is not None:
                tail = threading.Thread(target=tail_events, args=(run_dir.events, stop, on_event),
                                        daemon=True)
                tail.start()
            status("submitting the run with `flwr run`")
            runner = dep.spawn(
                "flwr-run",
                [_bin("flwr"), "run", str(app), CONNECTION_NAME, "--run-config", str(run_config),
                 "--stream"],
                env={**base_env, "FLWR_HOME": str(cli_home)}, cwd=app,
            )
            deadline = time.monotonic() + timeout
            while runner.popen.poll() is None:
                dep.check_alive(exclude=("flwr-run",))
                if run_dir.summary.exists():
                    break
                if time.monotonic() > deadline:
                    raise DeploymentError(f"the run did not finish within {timeout:.0f} s.")
                time.sleep(0.5)
            # `flwr run --stream` returns when the run ends; the ServerApp writes the
            # summary as its last act, so give it a moment.
            for _ in range(40):
                if run_dir.summary.exists():
                    break
                time.sleep(0.25)
            if not run_dir.summary.exists():
                raise DeploymentError(
                    f"the run ended without a summary; last lines of {runner.log}:\n"
                    f"{runner.tail()}"
                )
            summary = run_dir.read_summary()
            if summary.get("status") != "completed":
                raise DeploymentError(f"the run failed: {summary.get('error', 'unknown error')}")
            summary["deployment"] = {
                "superlink": f"127.0.0.1:{link_port}",
                "supernodes": sites,
                "transport": "Flower SuperLink Fleet API on loopback, insecure",
                "logs": str(dep_root / "logs"),
            }
            return summary
        finally:
            stop.set()
            status("stopping every process")
            dep.stop()
            if subreaper:
                reap_orphans()
            if tail is not None:
                tail.join(timeout=5)
