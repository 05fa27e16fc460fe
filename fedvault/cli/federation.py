"""``fedvault provision`` and ``fedvault federation``: create a federation, its TLS
certificates, and print fingerprints to compare out of band (kept light: no torch)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.table import Table as RichTable

from fedvault.cli.options import passphrase_from_env
from fedvault.cli.render import console
from privacy.he import params_for
from privacy.pki import (
    CA_CERT,
    NODE_PUB,
    SERVER_CERT,
    certificate_fingerprint,
    new_ca,
    public_key_fingerprint,
    server_certificate,
    short_hex,
)
from privacy.provision import provision
from protocols.errors import ConfigError
from protocols.rundir import check_output_dir


def cmd_provision(args: argparse.Namespace) -> int:
    check_output_dir(args.out)
    passphrase = passphrase_from_env(args.passphrase_env)
    params = params_for(args.scheme, args.sites)
    m = provision(args.out, sites=args.sites, params=params, passphrase=passphrase)
    he = m["he"]
    console.print(f"federation of {args.sites} sites in {args.out}")
    console.print(f"  HE: {he['scheme'].upper()} N={he['poly_modulus_degree']} "
                  f"coeff moduli {he['coeff_mod_bit_sizes']} (128-bit security)"
                  + (f", plain modulus {he['plain_modulus']}" if "plain_modulus" in he else ""))
    console.print(f"  fingerprint: {he['fingerprint']}")
    console.print(f"  server: {args.out / m['server']['he_context']} (public: cannot decrypt)")
    console.print(f"  sites:  {args.out / 'sites'}/site-K/ (secret, mode 0600, "
                  f"{he['secret_at_rest']})")
    return 0


def cmd_federation_tls(args: argparse.Namespace) -> int:
    check_output_dir(args.out)
    if (args.out / "ca" / CA_CERT).exists():
        raise ConfigError(f"{args.out / 'ca'} already holds a CA.")
    new_ca(args.out / "ca")
    tls = server_certificate(args.out / "ca", args.out / "superlink", hosts=tuple(args.host))
    console.print(f"CA:        {tls.ca_cert.parent.parent / 'ca' / CA_CERT} "
                  f"(its key ca/ca.key, mode 0600: keep it offline)\n"
                  f"SuperLink: {tls.cert}, {tls.key} (mode 0600), valid for "
                  f"{', '.join(args.host)}\n"
                  f"  flower-superlink --ssl-ca-certfile {tls.ca_cert} --ssl-certfile "
                  f"{tls.cert} --ssl-keyfile {tls.key} --enable-supernode-auth\n"
                  f"CA fingerprint: [bold]{certificate_fingerprint(tls.ca_cert)}[/] (every "
                  "site compares it with its copy of ca.pem)", highlight=False)
    return 0


def cmd_federation_add_site(args: argparse.Namespace) -> int:
    from privacy.ceremony import KX_PUB, add_site, kx_fingerprint

    m = add_site(args.federation, args.name, args.keys)
    console.print(f"{args.name} added to {args.federation} ({len(m['sites'])} site(s)); "
                  f"kx.pub {kx_fingerprint(args.keys / KX_PUB)}"
                  + (f", node-auth.pub {public_key_fingerprint(args.keys / NODE_PUB)}"
                     if (args.keys / NODE_PUB).exists() else ""), highlight=False)
    return 0


def fingerprints(paths: list[Path]) -> list[tuple[str, str, str]]:
    """``(file, what, fingerprint)`` for every certificate (``*.pem``), OpenSSH public key
    (``*.pub``) and federation manifest under ``paths``."""
    found: list[Path] = []
    for p in paths:
        if not p.exists():
            raise ConfigError(f"no file or directory {str(p)!r}.")
        found += sorted(p.rglob("*")) if p.is_dir() else [p]
    rows: list[tuple[str, str, str]] = []
    for f in found:
        if not f.is_file() or f.name.endswith(".key"):
            continue
        if f.suffix == ".pem":
            what = ("CA certificate" if f.name == CA_CERT else
                    "SuperLink TLS certificate" if f.name == SERVER_CERT else "certificate")
            rows.append((str(f), what, certificate_fingerprint(f)))
        elif f.name == "kx.pub":
            from privacy.ceremony import kx_fingerprint

            rows.append((str(f), "key-agreement public key", kx_fingerprint(f)))
        elif f.suffix == ".pub":
            rows.append((str(f), "node public key", public_key_fingerprint(f)))
        elif f.name == "manifest.json":
            he = json.loads(f.read_text(encoding="utf-8")).get("he")
            if he:
                rows.append((str(f), "HE context (manifest)", short_hex(str(he["fingerprint"]))))
    return rows


def cmd_federation_show(args: argparse.Namespace) -> int:
    rows = fingerprints(list(args.paths))
    if not rows:
        raise ConfigError("no certificate (*.pem), public key (*.pub) or manifest.json "
                          "found there.")
    t = RichTable(title="fingerprints (first 128 bits of SHA-256): compare them out of band")
    t.add_column("file", overflow="fold")
    t.add_column("what")
    t.add_column("fingerprint", no_wrap=True)
    for row in rows:
        t.add_row(*row)
    console.print(t)
    return 0
