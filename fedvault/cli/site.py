"""``fedvault site``: a data owner's node (start, approve, approvals)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.table import Table as RichTable

from client.runtime import approved_hashes
from fedvault.cli.options import passphrase_from_env
from fedvault.cli.render import console, err_console
from fedvault.node import approve, fab_hash_of, flower_env, load_site_config, start_site
from fedvault.processes import Deployment, sigterm_as_interrupt
from privacy.pki import node_key_pair, public_key_fingerprint
from protocols.hashchain import read_chain
from protocols.run_events import ApprovalEvent


def cmd_site_start(args: argparse.Namespace) -> int:
    cfg = load_site_config(args.config)
    if cfg.insecure:
        err_console.print("[bold red]warning: insecure = true: no TLS to the SuperLink and "
                          "no check of who it is. Use this for a rehearsal only.[/]")
    if not approved_hashes(cfg.approvals):
        err_console.print(f"[yellow]no app is approved yet ({cfg.approvals}): every run "
                          "will be refused until `fedvault site approve`.[/]")
    node_config = cfg.home / "node-config.toml"
    cfg.home.mkdir(parents=True, exist_ok=True)
    from protocols.node_config import NodeConfig

    NodeConfig.parse(cfg.node_config).write_toml(node_config)
    env = flower_env()
    dep = Deployment(root=cfg.home)
    with sigterm_as_interrupt():
        try:
            start_site(dep, cfg, node_config_file=node_config, env=env)
            console.print(f"site {cfg.name}: connected to {cfg.superlink}; ClientApps run "
                          f"the fedvault installed at {Path(sys.executable).parent}; logs in "
                          f"{cfg.home / 'logs'}. Ctrl-C stops it.")
            while True:
                dep.check_alive()
                time.sleep(1.0)
        except KeyboardInterrupt:
            console.print("stopping")
            return 130
        finally:
            dep.stop()


def cmd_site_keygen(args: argparse.Namespace) -> int:
    from privacy.ceremony import kx_fingerprint, kx_key_pair

    priv, pub = node_key_pair(args.dir, comment=args.name)
    kx_priv, kx_pub = kx_key_pair(args.dir)
    console.print(f"node key:          {priv} (mode 0600: never leaves this site)\n"
                  f"key-agreement key: {kx_priv} (mode 0600: never leaves this site)\n"
                  f"send to the central team: {pub}, {kx_pub}, and read them the "
                  "fingerprints (`fedvault federation show` prints the same):\n"
                  f"  node-auth.pub [bold]{public_key_fingerprint(pub)}[/]\n"
                  f"  kx.pub        [bold]{kx_fingerprint(kx_pub)}[/]", highlight=False)
    return 0


def _he_done(manifest: dict[str, object], home: Path, what: str) -> None:
    from privacy.pki import short_hex

    he = manifest["he"]
    assert isinstance(he, dict)
    console.print(f"{what}; your secret context is in {home} (mode 0600): set node-config "
                  f"he-federation = \"{home.resolve()}\".\nHE context fingerprint: "
                  f"[bold]{short_hex(str(he['fingerprint']))}[/]  (made by {he['made_by']}): "
                  "compare it with every site's over the phone; a different one means a "
                  "substituted key: do not train.", highlight=False)


def cmd_site_he_keys(args: argparse.Namespace) -> int:
    from privacy.ceremony import make_he_keys
    from privacy.federation import read_manifest
    from privacy.he import params_for

    sites = len(read_manifest(args.federation)["sites"])
    params = params_for(args.scheme, sites)
    m = make_he_keys(args.federation, site=args.name, params=params, home=args.out,
                     passphrase=passphrase_from_env(args.passphrase_env))
    _he_done(m, args.out, f"HE keys made; {args.federation} now holds the public context "
             f"and a sealed secret for each of the other {sites - 1} site(s): return it to "
             "the central team")
    return 0


def cmd_site_he_receive(args: argparse.Namespace) -> int:
    from privacy.ceremony import KX_KEY, receive_he_keys

    m = receive_he_keys(args.federation, site=args.name, kx_key=args.keys / KX_KEY,
                        home=args.out, passphrase=passphrase_from_env(args.passphrase_env))
    _he_done(m, args.out, "HE secret context received and checked")
    return 0


def cmd_site_approve(args: argparse.Namespace) -> int:
    cfg = load_site_config(args.config)
    h = args.hash if args.hash else fab_hash_of(args.app)
    entry = approve(cfg, h, note=args.note, revoke=args.revoke)
    console.print(f"{'revoked' if args.revoke else 'approved'}: {entry['fab_hash']} "
                  f"(entry {entry['seq']} of {cfg.approvals})", highlight=False)
    return 0


def cmd_site_approvals(args: argparse.Namespace) -> int:
    cfg = load_site_config(args.config)
    current = approved_hashes(cfg.approvals)
    t = RichTable(title=f"apps site {cfg.name} serves ({cfg.approvals})")
    for col in ("FAB sha256", "approved", "by", "note"):
        t.add_column(col)
    entries = read_chain(cfg.approvals) if cfg.approvals.exists() else []
    for e in entries:
        if e["kind"] == ApprovalEvent.APP_APPROVED and e["fab_hash"] in current:
            t.add_row(e["fab_hash"], e["at"], e["by"], e["note"])
    console.print(t)
    return 0


def _run_config(path: Path | None) -> dict[str, object]:
    import tomllib

    from protocols.errors import ConfigError

    if path is None:
        return {}
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"run config {str(path)!r}: {exc}") from None
    app = doc.get("tool", {}).get("flwr", {}).get("app", {})
    return dict(app.get("config", {})) if "tool" in doc else doc


def cmd_site_preview(args: argparse.Namespace) -> int:
    from client.preview import preview
    from protocols.config import RunSettings
    from protocols.node_config import NodeConfig

    cfg = load_site_config(args.config)
    settings = RunSettings.from_config(_run_config(args.run_config))
    p = preview(settings, NodeConfig.parse(cfg.node_config))
    console.print(f"[bold]site {p.site}[/]: task {p.task}, {p.rounds} round(s)")
    plan = p.plan
    if plan.get("dp"):
        console.print(
            f"per round: {plan['steps_per_round']} DP-SGD steps on {plan['train_examples']} "
            f"training examples, sampling rate {plan['sample_rate']:.4f}, noise multiplier "
            f"{plan['noise_multiplier']:.4f}, clipping {plan['max_grad_norm']:g}\n"
            f"budget scope {plan['scope']!r} ({plan['accountant']}, delta {plan['delta']:g}): "
            f"ε {plan['epsilon_before']:.4f} spent -> {plan['epsilon_after']:.4f} after this "
            f"run, of {plan['epsilon_limit']:g}; {plan['epsilon_remaining']:.4f} would remain",
            highlight=False)
    elif plan:
        console.print(f"[yellow]the run trains WITHOUT differential privacy on "
                      f"{plan['train_examples']} examples[/]")
    t = RichTable(title="checks (a round makes the same ones before it reserves any ε)")
    for col in ("check", "", "detail"):
        t.add_column(col, overflow="fold")
    for name, ok, detail in p.checks:
        t.add_row(name, "[green]ok[/]" if ok else "[red]FAILS[/]", detail)
    console.print(t)
    console.print("what leaves the site each round: " + "; ".join(p.leaves), highlight=False)
    return 1 if args.check and not p.ok else 0
