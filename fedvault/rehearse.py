"""Loopback rehearsal: a real Flower deployment on this machine.

``fedvault rehearse --sites 3`` starts one real ``flower-superlink`` and N sites on
127.0.0.1, each as ``fedvault site start`` starts a data owner's node
(:mod:`fedvault.node`: a ``flower-supernode --isolation process`` whose ClientApps
run the fedvault installed here, for the approved app only), each with its own
``FLWR_HOME``, ``site.toml`` and node config (its own data file, written from its
partition of the task's data), submits the run with ``flwr run``, follows the
run's event log for progress, and stops every process it started (also on
Ctrl-C, SIGTERM or failure: each process is the leader of its own process
group, and the whole group is terminated, then killed).

Layout under the run directory::

    RUN_DIR/deployment/
      superlink/            FLWR_HOME of the SuperLink (its unpacked app)
      cli/config.toml       FLWR_HOME of the `flwr` CLI: the SuperLink connection
      central/ca/           the central team's CA (ca.key, mode 0600)
      central/test.csv      its own test data (the held-out split no site got)
      superlink/            also its TLS certificate and key (superlink.pem/.key, 0600)
      federation/           what the central team relays: the sites' public keys, the
                            public HE context (the server's) and the sealed secrets
      sites/site-K/         site K: data.csv (its private data), site.toml, node-config.toml,
                            node-auth.key/.pub and kx.key/.pub (its keys), he/ (its own
                            secret HE context), its ledger and approvals,
                            site.flwr-home/ (its FLWR_HOME)
      logs/*.log            every process's output
      run-config.toml       the run config submitted with `flwr run`

Secure by default: the rehearsal plays the key ceremony of a real deployment. The
central team's CA (``central/ca``) signs the SuperLink's TLS certificate for 127.0.0.1;
every site generates its own node-authentication key pair (``sites/site-K/node-auth.key``,
mode 0600, never copied) and the central team registers only its public half with
``flwr supernode register`` before the SuperLink, started with
``--enable-supernode-auth``, lets the node in. With HE, the key ceremony of
:mod:`privacy.ceremony`: site-0 makes the HE keys and seals the secret to each other
site's key-agreement key; the server gets the public context only. ``secure=False``
(``fedvault rehearse --insecure``) drops TLS and node authentication and provisions HE
as one party (``fedvault provision``), loudly.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import tomli_w

from fedvault.node import (
    SiteConfig,
    approve,
    fab_hash_of,
    flower_env,
    load_site_config,
    spawn_node,
    spawn_runtime,
    stage_app,
    write_site_config,
)
from fedvault.processes import (
    Deployment,
    Proc,
    become_subreaper,
    find_executable,
    free_port,
    reap_orphans,
    sigterm_as_interrupt,
    wait_for_log,
    wait_for_port,
)
from fedvault_tasks.datasets import pool_bounds, pooled_table
from fedvault_tasks.partition import partition_indices
from fedvault_tasks.tables import save_table
from fedvault_tasks.tasks import get_task
from privacy.ceremony import KX_KEY, add_site, kx_key_pair, make_he_keys, receive_he_keys
from privacy.he import bfv_params_for
from privacy.pki import NODE_KEY, TLSFiles, new_ca, node_key_pair, server_certificate
from protocols import summary as run_summary
from protocols.config import RunSettings
from protocols.errors import ConfigError, DeploymentError
from protocols.names import site_name
from protocols.node_config import NodeConfig
from protocols.rundir import RunDirectory
from protocols.summary import DeploymentBlock, ProcessExit, RunSummary
from simulations.runner import check_run, ensure_federation, tail_events

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


def write_site_data(settings: RunSettings, sites: int, root: Path) -> list[Path]:
    """Lay out each site's private data file from its partition of the pool."""
    task = get_task(settings.task)
    pool, _ = pooled_table(task, settings)
    if len(pool) < sites:
        raise ConfigError(f"{len(pool)} training rows cannot be split across {sites} sites.")
    parts = partition_indices(pool.y, sites, partitioner=settings.partitioner,
                              alpha=settings.alpha, seed=settings.seed)
    label = settings.label_column or task.default_label_column
    return [save_table(pool.subset(idx), root / "sites" / site_name(k) / "data.csv",
                       label_column=label)
            for k, idx in enumerate(parts)]


def write_central_test(settings: RunSettings, root: Path) -> RunSettings:
    """The central team's own test data, as a deployment needs it for central evaluation:
    the held-out split of the pool no site got (``central/test.csv``)."""
    if not settings.central_eval or settings.central_test_path:
        return settings
    task = get_task(settings.task)
    _, test = pooled_table(task, settings)
    path = save_table(test, root / "central" / "test.csv",
                      label_column=settings.label_column or task.default_label_column)
    return settings.replace(central_test_path=str(path.resolve()))


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


def rehearsal_node_config(settings: RunSettings, k: int, *, data: Path, label: str,
                     bounds: str | None, he_home: str | None = None) -> NodeConfig:
    """The node config the rehearsal's data owner ``site-k`` sets on its SuperNode."""
    home = data.parent
    return NodeConfig(
        data_path=str(data), label_column=label, task=settings.task,
        partition_id=k, site_name=site_name(k),
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
        he_federation=(he_home or settings.he_federation) if settings.he else None)


def superlink_security(tls: TLSFiles | None) -> list[str]:
    """``flower-superlink``'s TLS and node-authentication flags (``--insecure`` without)."""
    if tls is None:
        return ["--insecure"]
    return ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.cert),
            "--ssl-keyfile", str(tls.key), "--enable-supernode-auth"]


def he_key_ceremony(settings: RunSettings, homes: list[Path], fed: Path
                    ) -> tuple[RunSettings, dict[int, str]]:
    """The key ceremony of :mod:`privacy.ceremony`, played: the central team collects each
    site's public keys in ``fed``; site-0 makes the HE keys and seals the secret to every
    other site; each opens its own. Returns the settings pointing the server at ``fed``
    (public context only) and each site's own federation directory."""
    for k, home in enumerate(homes):
        add_site(fed, site_name(k), home)
    he_homes = {0: str(homes[0] / "he")}
    make_he_keys(fed, site=site_name(0), params=bfv_params_for(len(homes)), home=homes[0] / "he")
    for k, home in enumerate(homes[1:], start=1):
        receive_he_keys(fed, site=site_name(k), kx_key=home / KX_KEY, home=home / "he")
        he_homes[k] = str(home / "he")
    return settings.replace(he_federation=str(fed.resolve())), he_homes


def register_nodes(keys: list[tuple[Path, str]], env: dict[str, str]) -> None:
    """The central team registers each site's node public key with the SuperLink
    (``flwr supernode register``, over the Control API; all at once)."""
    procs = [(name, subprocess.Popen(
        [find_executable("flwr"), "supernode", "register", str(key), CONNECTION_NAME,
         "--name", name], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, stdin=subprocess.DEVNULL)) for key, name in keys]
    failed = []
    for name, p in procs:
        out, _ = p.communicate(timeout=120)
        if p.returncode != 0:
            failed.append(f"{name}: {out.strip()[-1000:]}")
    if failed:
        raise DeploymentError("`flwr supernode register` failed:\n" + "\n".join(failed))


def rehearse(
    settings: RunSettings,
    *,
    sites: int,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    on_status: Callable[[str], None] | None = None,
    timeout: float = 3600.0,
    app: Path | None = None,
    site_code: str = "installed",
    approved: list[str] | Mapping[int, list[str]] | None = None,
    secure: bool = True,
) -> RunSummary:
    """Run ``settings`` on a real loopback SuperLink with ``sites`` SuperNodes; ``app``
    is the Flower App directory ``flwr run`` ships (default: fedvault's own; the tests
    pass a modified copy to play a central team or a site running hostile code).

    ``site_code="installed"`` (the default) runs every site as ``fedvault site start``
    does: its ClientApps run the fedvault installed here, never the shipped app's code,
    and only for the app bundles in ``approved`` (FAB SHA-256, for every site or per
    site index; default: the bundle of ``app``, as if each data owner had reviewed
    and approved it). ``"shipped"`` is
    Flower's own behaviour: each SuperNode installs and runs the app it is sent.

    ``secure`` (the default) runs TLS, node authentication and the key ceremony (see
    the module docstring)."""
    if site_code not in ("installed", "shipped"):
        raise ConfigError(f"site-code must be 'installed' or 'shipped'. Found {site_code!r}.")
    check_run(settings, sites)
    status = on_status or (lambda _msg: None)
    run_dir = RunDirectory(Path(settings.run_dir).resolve())
    if run_dir.events.exists():
        raise ConfigError(f"run directory {str(run_dir.root)!r} already holds a run.")
    settings = settings.replace(run_dir=str(run_dir.root), data_path=str(
        Path(settings.data_path).resolve()) if settings.data_path else "")
    app = app or app_root()
    approvals: Mapping[int, list[str]] = (
        approved if isinstance(approved, Mapping) else
        dict.fromkeys(range(sites), approved if approved is not None else [fab_hash_of(app)]))
    dep_root = run_dir.root / "deployment"
    dep_root.mkdir(parents=True, exist_ok=True)

    status("writing each site's data file")
    data_files = write_site_data(settings, sites, dep_root)
    settings = write_central_test(settings, dep_root)
    homes = [f.parent for f in data_files]
    he_homes: dict[int, str] = {}
    if secure:
        status("key ceremony: each site makes its keys")
        for k, home in enumerate(homes):
            node_key_pair(home, comment=site_name(k))
            kx_key_pair(home)
        if settings.he and not settings.he_federation:
            status("key ceremony: site-0 makes the HE keys, sealed to each other site")
            settings, he_homes = he_key_ceremony(settings, homes, dep_root / "federation")
    settings = ensure_federation(settings, sites, dep_root)  # insecure: one party provisions
    task = get_task(settings.task)
    label = settings.label_column or task.default_label_column
    bounds_file = write_declared_bounds(settings, dep_root)

    base_env = flower_env()
    dep = Deployment(root=dep_root)
    subreaper = become_subreaper()
    stop = threading.Event()
    tail: threading.Thread | None = None
    with sigterm_as_interrupt():
        try:
            link_port = free_port()
            link_home = dep_root / "superlink"
            link_home.mkdir(exist_ok=True)
            tls: TLSFiles | None = None
            if secure:
                status("central team: CA and the SuperLink's TLS certificate")
                new_ca(dep_root / "central" / "ca")
                tls = server_certificate(dep_root / "central" / "ca", link_home)
            status(f"starting flower-superlink on 127.0.0.1:{link_port}"
                   + (" (TLS, node authentication)" if tls else " (INSECURE)"))
            link = dep.spawn(
                "superlink",
                [find_executable("flower-superlink"), *superlink_security(tls),
                 "--disable-runtime-dependency-installation", "--port", str(link_port)],
                env={**base_env, "FLWR_HOME": str(link_home)},
            )
            wait_for_port(link_port, link)
            cli_home = dep_root / "cli"
            cli_home.mkdir(exist_ok=True)
            connection: dict[str, Any] = {"address": f"127.0.0.1:{link_port}"}
            connection.update({"root-certificates": str(tls.ca_cert)} if tls
                              else {"insecure": True})
            (cli_home / "config.toml").write_text(tomli_w.dumps({
                "superlink": {"default": CONNECTION_NAME, CONNECTION_NAME: connection}}),
                encoding="utf-8")
            cli_env = {**base_env, "FLWR_HOME": str(cli_home)}

            if tls is not None:
                status(f"central team: registering the {sites} sites' node keys")
                register_nodes([(h / "node-auth.pub", site_name(k))
                                for k, h in enumerate(homes)], cli_env)
            status(f"starting {sites} sites"
                   + (" (their installed code)" if site_code == "installed" else ""))
            starting: list[tuple[Proc, SiteConfig | None]] = []
            for k, path in enumerate(data_files):
                home = path.parent
                node = rehearsal_node_config(settings, k, data=path, label=label,
                                        bounds=bounds_file, he_home=he_homes.get(k))
                node_config = node.write_toml(home / "node-config.toml")
                auth_key = str(home / NODE_KEY) if tls is not None else ""
                if site_code == "installed":
                    cfg = load_site_config(write_site_config(
                        home / "site.toml", name=site_name(k),
                        superlink=f"127.0.0.1:{link_port}", node=node, insecure=tls is None,
                        root_certificates=str(tls.ca_cert) if tls else "",
                        auth_key=auth_key, runtime_port=free_port()))
                    for h in approvals.get(k, []):
                        approve(cfg, h, note="rehearsal")
                    starting.append((spawn_node(dep, cfg, node_config_file=node_config,
                                                env=base_env, essential=False), cfg))
                    continue
                security = (["--root-certificates", str(tls.ca_cert),
                             "--auth-supernode-private-key", auth_key] if tls else
                            ["--insecure"])
                starting.append((dep.spawn(
                    site_name(k),
                    [find_executable("flower-supernode"), *security, "--superlink",
                     f"127.0.0.1:{link_port}", "--port", str(free_port()),
                     "--node-config", str(node_config)],
                    env={**base_env, "FLWR_HOME": str(home)}, essential=False,
                ), None))
            for proc, site_cfg in starting:  # the nodes join in parallel
                wait_for_log(proc, "SuperNode ID")
                if site_cfg is not None:
                    spawn_runtime(dep, site_cfg, proc, env=base_env, essential=False)
            status("staging the app bundle")
            staged = stage_app(app, dep_root / "app")

            run_config = dep_root / "run-config.toml"
            run_config.write_text(tomli_w.dumps(settings.to_config()), encoding="utf-8")

            if on_event is not None:
                tail = threading.Thread(target=tail_events, args=(run_dir.events, stop, on_event),
                                        daemon=True)
                tail.start()
            status("submitting the run with `flwr run`")
            runner = dep.spawn(
                "flwr-run",
                [find_executable("flwr"), "run", str(staged), CONNECTION_NAME, "--run-config",
                 str(run_config), "--stream"],
                env=cli_env, cwd=staged,
            )
            submitted = time.monotonic()
            deadline = submitted + timeout
            exits: list[ProcessExit] = []
            while runner.popen.poll() is None:
                for gone in dep.check_alive(exclude=("flwr-run",)):
                    status(f"{gone.name} exited with status {gone.popen.returncode}; the "
                           "run goes on without it")
                    exits.append(ProcessExit(process=gone.name,
                                             status=int(gone.popen.returncode or 0),
                                             seconds=round(time.monotonic() - submitted, 1)))
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
            summary = run_summary.read(run_dir)
            if summary["status"] != "completed":
                raise DeploymentError(f"the run failed: {summary['error'] or 'unknown error'}")
            return run_summary.amend(run_dir, summary, deployment=DeploymentBlock(
                superlink=f"127.0.0.1:{link_port}", supernodes=sites,
                transport=("Flower SuperLink Fleet API on loopback, TLS (rehearsal CA), "
                           "node authentication" if tls else
                           "Flower SuperLink Fleet API on loopback, INSECURE (no TLS, no "
                           "node authentication)"),
                logs=str(dep_root / "logs"), exits=exits))
        finally:
            stop.set()
            status("stopping every process")
            dep.stop()
            if subreaper:
                reap_orphans()
            if tail is not None:
                tail.join(timeout=5)
