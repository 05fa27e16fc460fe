"""Supervising local processes: start each as the leader of its own process group,
log its output to a file, wait until it listens or logs a line, and stop the whole
group (terminate, then kill), also on Ctrl-C or SIGTERM, reaping orphans as a
subreaper where Linux allows it. Generic: nothing here knows Flower; the loopback
rehearsal (:mod:`fedvault.rehearse`) orchestrates Flower's processes with it.

A supervisor killed outright (``kill -9``) runs no cleanup, and the processes it
started, each in its own session, would go on (a site's ClientApps training and
spending budget for a run nobody follows). So every :class:`Deployment` starts a
**guard**: a small process of its own session that holds the read end of a pipe
only the supervisor writes to. When the supervisor dies, however it dies, the
kernel closes the pipe; the guard reads end-of-file, then terminates and kills every
process of the deployment (by ``FLWR_HOME`` under the deployment's root, and their
descendants). A supervisor that stops normally tells the guard so first."""

from __future__ import annotations

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

from protocols.errors import DeploymentError

STARTUP_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_executable(name: str) -> str:
    cand = Path(sys.executable).parent / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if not found:
        raise DeploymentError(f"{name!r} not found: install flwr (pip install 'flwr[simulation]').")
    return found


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    handle: IO[bytes]
    #: the deployment cannot go on without it (a site's processes are not: a run
    #: continues without a site that went away)
    essential: bool = True
    #: whether the supervisor has reported this process's exit
    reported: bool = False

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
    procs: list[Proc] = field(default_factory=list)
    guard: subprocess.Popen[bytes] | None = None
    _guard_fd: int | None = None

    def spawn(self, name: str, argv: list[str], env: dict[str, str], cwd: Path | None = None,
              *, essential: bool = True) -> Proc:
        if self.guard is None:
            self._start_guard()
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        fh = log.open("wb")
        popen = subprocess.Popen(
            argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            cwd=cwd, start_new_session=True,
        )
        proc = Proc(name=name, popen=popen, log=log, handle=fh, essential=essential)
        self.procs.append(proc)
        return proc

    def _start_guard(self) -> None:
        read_fd, write_fd = os.pipe()  # (not inherited by the processes spawned later)
        self.root.mkdir(parents=True, exist_ok=True)
        self.guard = subprocess.Popen(
            [sys.executable, "-m", "fedvault.processes", "guard", str(self.root.resolve()),
             str(read_fd)], pass_fds=(read_fd,), start_new_session=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(read_fd)
        self._guard_fd = write_fd

    def _tell_guard(self, line: str) -> None:
        if self._guard_fd is not None:
            try:
                os.write(self._guard_fd, line.encode())
            except OSError:  # the guard is gone: nothing to tell
                pass

    def check_alive(self, exclude: tuple[str, ...] = ()) -> list[Proc]:
        """``DeploymentError`` if an essential process exited; the non-essential ones
        that exited since the last call (each reported once)."""
        exited: list[Proc] = []
        for p in self.procs:
            if p.name in exclude or p.reported:
                continue
            rc = p.popen.poll()
            if rc is None:
                continue
            if p.essential:
                raise DeploymentError(
                    f"{p.name} exited with status {rc} during the run; last lines of "
                    f"{p.log}:\n{p.tail()}", process=p.name, returncode=rc)
            p.reported = True
            exited.append(p)
        return exited

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
        self._release_guard()

    def _release_guard(self) -> None:
        """Every process is stopped: tell the guard there is nothing left to do."""
        if self._guard_fd is None:
            return
        self._tell_guard("done\n")
        os.close(self._guard_fd)
        self._guard_fd = None
        if self.guard is not None:
            try:
                self.guard.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.guard.kill()


def guard(root: Path, fd: int, grace: float = 3.0) -> None:
    """The guard's body (see the module docstring): wait for the pipe's end of file;
    unless the supervisor said ``done`` first, stop every process of the deployment
    (found by ``FLWR_HOME`` under ``root``, as :meth:`Deployment.stop` finds them, with
    their descendants: not by remembered process ids, which may be reused)."""
    buf = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except InterruptedError:
            continue
        if not chunk:
            break
        buf += chunk
    if b"done\n" in buf:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 0.2), (signal.SIGKILL, 0.2)):
        found = deployment_processes(root, [])
        for pid in found:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        if not found:
            return
        time.sleep(wait)


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
    """Live PIDs whose ``FLWR_HOME`` lies under ``root``, or descending from one of them
    or from ``roots`` (Linux ``/proc``; elsewhere only the process groups are
    signalled)."""
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
    stack = [*roots, *found]  # their descendants too (one that reset its environment)
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


def _wait_until(proc: Proc, ready: Callable[[], bool], waited_for: str, timeout: float) -> None:
    """Poll ``ready`` until it holds; ``DeploymentError`` if ``proc`` exits first (with
    the last lines of its log) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise DeploymentError(
                f"{proc.name} exited with status {proc.popen.returncode} at start-up; "
                f"last lines of {proc.log}:\n{proc.tail()}",
                process=proc.name, returncode=proc.popen.returncode)
        if ready():
            return
        time.sleep(0.2)
    raise DeploymentError(f"{proc.name} did not {waited_for} within {timeout:.0f} s.",
                          process=proc.name)


def wait_for_port(port: int, proc: Proc, timeout: float = STARTUP_TIMEOUT) -> None:
    def listening() -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", port)) == 0

    _wait_until(proc, listening, f"listen on 127.0.0.1:{port}", timeout)


def wait_for_log(proc: Proc, needle: str, timeout: float = STARTUP_TIMEOUT) -> None:
    def logged() -> bool:
        return needle in proc.log.read_text(encoding="utf-8", errors="replace")

    _wait_until(proc, logged, f"report {needle!r}", timeout)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
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


if __name__ == "__main__":  # python -m fedvault.processes guard ROOT FD
    if len(sys.argv) == 4 and sys.argv[1] == "guard":
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the pipe's end stops it
        guard(Path(sys.argv[2]), int(sys.argv[3]))
    else:
        sys.exit("usage: python -m fedvault.processes guard ROOT FD")
