"""A data owner's node: its configuration, the apps it approved, and the processes that
run it with the code installed at the site (``fedvault site start``).

``site.toml``::

    [site]
    name = "site-0"                 # the site's name (also node-config site-name)
    superlink = "10.0.0.5:9092"     # the SuperLink's Fleet API
    insecure = false                # true: no TLS (loud warning; rehearsals only)
    root-certificates = "ca.pem"    # the CA the SuperLink's certificate chains to
    auth-key = "node-auth.key"      # this node's authentication key (`fedvault site keygen`;
                                    # the central team registers node-auth.pub), mode 0600
    runtime-port = 9094             # local Runtime API (SuperNode <-> ClientApp processes)

    [node-config]                   # the node config (protocols/node_config.py): data,
    data-path = "/data/table.csv"   # ledger, the site's own privacy limits, ...
    ledger-path = "/var/lib/fedvault/ledger.jsonl"
    max-epsilon = 10.0

Beside it, ``site.approvals.jsonl`` (hash-chained, mode 0600): the app bundles (FAB
SHA-256) this site serves, appended by ``fedvault site approve``. Its SuperNode runs
with ``--isolation process``; its ``flower-superexec`` finds, first on its ``PATH``,
fedvault's ``flwr-clientapp`` (:mod:`client.runtime`), which refuses unapproved apps
and runs this interpreter's fedvault for the others. Flower >= 1.42, < 2 (the
superexec's command line and the Runtime API are Flower's).
"""

from __future__ import annotations

import getpass
import hashlib
import os
import shutil
import stat
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from client.runtime import APPROVALS_ENV
from fedvault.processes import Deployment, Proc, find_executable, wait_for_log
from privacy.pki import check_secret_file
from protocols.errors import ConfigError
from protocols.hashchain import HashChainLog, utc_now
from protocols.node_config import NodeConfig
from protocols.run_events import ApprovalEvent

#: the script name Flower's superexec launches for a ClientApp task
CLIENTAPP_COMMAND = "flwr-clientapp"
#: node-config keys that name files (feature-bounds may instead be "LOW:HIGH")
_NODE_PATHS = ("data-path", "ledger-path", "he-federation", "feature-bounds")
_SITE_KEYS = {"name", "superlink", "insecure", "root-certificates", "auth-key",
              "runtime-port"}


@dataclass(frozen=True, slots=True, kw_only=True)
class SiteConfig:
    """A validated ``site.toml``."""

    path: Path
    name: str
    superlink: str
    insecure: bool = False
    root_certificates: str = ""
    auth_key: str = ""
    runtime_port: int = 9094
    node_config: dict[str, Any] = field(default_factory=dict)

    @property
    def approvals(self) -> Path:
        return self.path.with_name(self.path.stem + ".approvals.jsonl")

    @property
    def home(self) -> Path:
        """The SuperNode's FLWR_HOME (Flower's state) and the runtime shim."""
        return self.path.with_name(self.path.stem + ".flwr-home")


def load_site_config(path: str | Path) -> SiteConfig:
    """Parse and validate ``site.toml``; every error names the key."""
    p = Path(path).expanduser().absolute()
    if not p.is_file():
        raise ConfigError(f"no site config {str(p)!r} (see `fedvault site --help`).")
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: not a TOML file ({exc}).") from None
    extra = set(doc) - {"site", "node-config"}
    if extra:
        raise ConfigError(f"{p}: unknown table(s) {sorted(extra)}; expected [site] and "
                          "[node-config].")
    site = doc.get("site", {})
    unknown = set(site) - _SITE_KEYS
    if unknown:
        raise ConfigError(f"{p} [site]: unknown key(s) {sorted(unknown)}; known: "
                          f"{sorted(_SITE_KEYS)}.", key=sorted(unknown)[0])
    for key in ("name", "superlink"):
        if not isinstance(site.get(key), str) or not site[key]:
            raise ConfigError(f"{p} [site] {key!r} must be a non-empty string.", key=key)
    insecure = site.get("insecure", False)
    certs = site.get("root-certificates", "")
    if not isinstance(insecure, bool):
        raise ConfigError(f"{p} [site] 'insecure' must be true or false.", key="insecure")
    if not isinstance(certs, str):
        raise ConfigError(f"{p} [site] 'root-certificates' must be a path.",
                          key="root-certificates")
    if not insecure and not certs:
        raise ConfigError(f"{p} [site]: set 'root-certificates' (the CA of the SuperLink's "
                          "TLS certificate) or, for a rehearsal only, insecure = true.",
                          key="root-certificates")
    auth_key = site.get("auth-key", "")
    if not isinstance(auth_key, str):
        raise ConfigError(f"{p} [site] 'auth-key' must be a path.", key="auth-key")
    if not insecure and not auth_key:
        raise ConfigError(f"{p} [site]: set 'auth-key' (this node's authentication key: "
                          "create it with `fedvault site keygen`, and have the central team "
                          "register its .pub) or, for a rehearsal only, insecure = true.",
                          key="auth-key")
    certs, auth_key = (str(p.parent / Path(v).expanduser()) if v else ""
                       for v in (certs, auth_key))
    if certs and not Path(certs).is_file():
        raise ConfigError(f"{p} [site] 'root-certificates': no file {certs!r}.",
                          key="root-certificates")
    if auth_key:
        check_secret_file(auth_key, f"{p} [site] 'auth-key'")
    port = site.get("runtime-port", 9094)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"{p} [site] 'runtime-port' must be a port number.",
                          key="runtime-port")
    node_config = dict(doc.get("node-config", {}))
    for key in _NODE_PATHS:  # relative to site.toml, like the [site] paths
        v = node_config.get(key)
        if isinstance(v, str) and v and not Path(v).expanduser().is_absolute() and (
                key != "feature-bounds" or (p.parent / v).exists()):
            node_config[key] = str(p.parent / v)
    node_config.setdefault("site-name", site["name"])
    if node_config["site-name"] != site["name"]:
        raise ConfigError(f"{p}: [node-config] site-name {node_config['site-name']!r} differs "
                          f"from [site] name {site['name']!r}.", key="site-name")
    NodeConfig.parse(node_config, simulated=False)  # fails closed, naming the key
    return SiteConfig(path=p, name=site["name"], superlink=site["superlink"],
                      insecure=insecure, root_certificates=certs, auth_key=auth_key,
                      runtime_port=port,
                      node_config=node_config)


def write_site_config(path: Path, *, name: str, superlink: str, node: NodeConfig,
                      insecure: bool = False, root_certificates: str = "",
                      auth_key: str = "", runtime_port: int = 9094) -> Path:
    """Write a ``site.toml`` (the rehearsal writes one per simulated data owner)."""
    site: dict[str, Any] = {"name": name, "superlink": superlink, "insecure": insecure,
                            "runtime-port": runtime_port}
    if root_certificates:
        site["root-certificates"] = root_certificates
    if auth_key:
        site["auth-key"] = auth_key
    node_config = node.to_dict()
    path.write_text(tomli_w.dumps({"site": site, "node-config": node_config}),
                    encoding="utf-8")
    return path


# -- approvals ---------------------------------------------------------------------------
#: directories Flower's FAB builder excludes anyway (.gitignore, its own defaults); not
#: walking them turns ~16 s (a virtualenv holds ~100k files) into well under 1 s
_NEVER_IN_A_FAB = {".venv", "venv", ".git", "runs", "node_modules", "__pycache__",
                   ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis"}


def app_files(app: Path) -> dict[str, Path]:
    """The files of an app directory that may go into its FAB (relative POSIX path ->
    file), before Flower's own filters (``.gitignore``, its defaults) apply."""
    root = app.expanduser().resolve()
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if d not in _NEVER_IN_A_FAB]
        for name in filenames:
            f = Path(dirpath) / name
            if not f.is_symlink() and f.resolve().is_relative_to(root):
                files[f.relative_to(root).as_posix()] = f
    return files


def fab_hash_of(app: str | Path) -> str:
    """SHA-256 of an app bundle: a ``.fab`` file, or the FAB that ``flwr run`` builds from
    an app directory (Flower builds it deterministically: the same files through the
    same filters, ``flwr.cli.build.build_fab_from_files``)."""
    p = Path(app)
    if p.is_dir():
        from flwr.cli.build import build_fab_from_files

        return hashlib.sha256(build_fab_from_files(app_files(p))[0]).hexdigest()
    if p.is_file():
        return hashlib.sha256(p.read_bytes()).hexdigest()
    raise ConfigError(f"no app directory or FAB file {str(p)!r}.")


def stage_app(app: Path, dest: Path) -> Path:
    """A copy of ``app`` holding only what its FAB may hold: ``flwr run`` on it builds the
    same FAB (same hash) without walking a virtualenv's ~100k files (~8 s here)."""
    for rel, f in app_files(app).items():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)
    return dest


def approve(cfg: SiteConfig, fab_hash: str, *, note: str = "", revoke: bool = False
            ) -> dict[str, Any]:
    """Record that this site serves (or, ``revoke``, no longer serves) runs of the app
    whose FAB has SHA-256 ``fab_hash``."""
    h = fab_hash.strip().lower()
    if len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
        raise ConfigError(f"a FAB hash is 64 hex digits (SHA-256). Found {fab_hash!r}.")
    log = HashChainLog(cfg.approvals, mode=0o600)
    kind = ApprovalEvent.APP_REVOKED if revoke else ApprovalEvent.APP_APPROVED
    return log.append(kind, fab_hash=h, site=cfg.name,
                      by=getpass.getuser(), note=note[:300], at=utc_now())


# -- processes -------------------------------------------------------------------------
def flower_env() -> dict[str, str]:
    """The environment Flower's processes start in: this one without FLWR_* settings,
    unbuffered, and this interpreter's scripts first on PATH (Flower starts its helpers,
    flower-superexec, flwr-serverapp, flwr-clientapp, by name, so an un-activated
    virtualenv works and no other Flower install is picked up)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent),
                                   env.get("PATH", os.defpath)])
    return env


def runtime_shim(home: Path) -> Path:
    """A directory holding ``flwr-clientapp``: this interpreter's :mod:`client.runtime`."""
    bin_dir = home / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / CLIENTAPP_COMMAND
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m client.runtime "$@"\n',
                      encoding="utf-8")
    script.chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP)
    return bin_dir


def spawn_node(dep: Deployment, cfg: SiteConfig, *, node_config_file: Path,
               env: dict[str, str], name: str | None = None, essential: bool = True) -> Proc:
    """Start the site's SuperNode (``--isolation process``); it joins asynchronously."""
    label = name or cfg.name
    cfg.home.mkdir(parents=True, exist_ok=True)
    tls = ["--insecure"] if cfg.insecure else ["--root-certificates", cfg.root_certificates]
    if cfg.auth_key:
        tls += ["--auth-supernode-private-key", cfg.auth_key]
    return dep.spawn(label, [find_executable("flower-supernode"), *tls, "--superlink",
                             cfg.superlink, "--isolation", "process", "--port",
                             str(cfg.runtime_port), "--node-config", str(node_config_file)],
                     env=_site_env(cfg, env), essential=essential)


def spawn_runtime(dep: Deployment, cfg: SiteConfig, node: Proc, *, env: dict[str, str],
                  name: str | None = None, essential: bool = True) -> Proc:
    """Start the site's superexec, whose ClientApp processes run :mod:`client.runtime`
    (after its SuperNode joined: ``wait_for_log(node, "SuperNode ID")``)."""
    site_env = _site_env(cfg, env)
    path = os.pathsep.join([str(runtime_shim(cfg.home)), site_env.get("PATH", os.defpath)])
    return dep.spawn(f"{name or cfg.name}-superexec", [
        find_executable("flower-superexec"), "--insecure", "--runtime-api-address",
        f"127.0.0.1:{cfg.runtime_port}", "--parent-pid", str(node.popen.pid)],
        env={**site_env, "PATH": path}, essential=essential)


def _site_env(cfg: SiteConfig, env: dict[str, str]) -> dict[str, str]:
    return {**env, "FLWR_HOME": str(cfg.home), APPROVALS_ENV: str(cfg.approvals)}


def start_site(dep: Deployment, cfg: SiteConfig, *, node_config_file: Path,
               env: dict[str, str], name: str | None = None, essential: bool = True
               ) -> tuple[Proc, Proc]:
    """Start the site's SuperNode (``--isolation process``) and its superexec, whose
    ClientApp processes run :mod:`client.runtime`; wait until the node has joined.
    ``essential=False``: the deployment goes on if they exit (a rehearsal's sites)."""
    node = spawn_node(dep, cfg, node_config_file=node_config_file, env=env, name=name,
                      essential=essential)
    wait_for_log(node, "SuperNode ID")
    return node, spawn_runtime(dep, cfg, node, env=env, name=name, essential=essential)
