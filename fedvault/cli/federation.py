"""``fedvault provision``: create a federation (kept light: no torch)."""

from __future__ import annotations

import argparse
import os

from fedvault.cli.render import console
from fedvault.errors import ConfigError
from fedvault.provision import provision
from fedvault.rundir import check_output_dir
from privacy.he import bfv_params_for, ckks_params


def cmd_provision(args: argparse.Namespace) -> int:
    check_output_dir(args.out)
    passphrase = None
    if args.passphrase_env:
        passphrase = os.environ.get(args.passphrase_env)
        if not passphrase:
            raise ConfigError(f"environment variable {args.passphrase_env} is empty or unset.")
    params = ckks_params() if args.scheme == "ckks" else bfv_params_for(args.sites)
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
