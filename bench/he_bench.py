"""Encrypted aggregation cost, side by side in one run: plaintext FedAvg, an
NVFlare-style CKKS configuration, and fedvault's default (quantised BFV).

    python bench/he_bench.py [--sites 10] [--repeats 3] [--out bench/results/he_bench.json]

For models of about 100k and 1M parameters (MLPs) and 10 sites:

* plaintext: float32 arrays, weighted average in NumPy.
* NVFlare-style CKKS: N = 8192, moduli [60, 40, 40], scale 2**40; one CKKS
  vector per layer (TenSEAL splits long vectors), the serialised context sent
  with every vector; the server multiplies each by its weight and sums.
* fedvault: BFV N = 4096, 16-bit stochastic quantisation, two values per slot,
  the whole flattened model in as few ciphertexts as possible, no context on
  the wire; the server sums.

Columns: bytes per parameter on the wire (one site's update), client encrypt
time, server aggregate time (10 updates, including parsing), client decrypt
time, and the time the scheme adds to a round over plaintext
(encrypt + aggregate + decrypt, the sites encrypting in parallel). Times are
medians over ``--repeats``; one core (TenSEAL is single-threaded here).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import tenseal as ts
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from privacy.he import HEContext, bfv_params_for, new_secret_context, public_bytes  # noqa: E402

MODELS = {
    "100k": [(784, 120), (120,), (120, 64), (64,), (64, 10), (10,)],
    "1M": [(784, 1024), (1024,), (1024, 256), (256,), (256, 10), (10,)],
}


T = TypeVar("T")


def _median(fn: Callable[[], T], repeats: int) -> tuple[float, T]:
    times: list[float] = []
    out = fn()
    for _ in range(max(0, repeats - 1)):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    if not times:  # one repeat: time the only call
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def layers_for(shapes: list[tuple[int, ...]], rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.normal(0, 0.05, s).astype(np.float32) for s in shapes]


def bench_plain(updates: list[list[np.ndarray]], weights: list[float], repeats: int
                ) -> dict[str, float]:
    n = sum(a.size for a in updates[0])
    wire = sum(len(a.tobytes()) for a in updates[0])

    def agg() -> list[Any]:
        tot = sum(weights)
        return [sum(w * u[i] for w, u in zip(weights, updates, strict=True)) / tot
                for i in range(len(updates[0]))]

    t_agg, _ = _median(agg, repeats)
    return {"bytes_per_param": wire / n, "encrypt_s": 0.0, "aggregate_s": t_agg,
            "decrypt_s": 0.0}


def bench_nvflare(updates: list[list[np.ndarray]], weights: list[float], repeats: int
                  ) -> dict[str, float]:
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192,
                     coeff_mod_bit_sizes=[60, 40, 40])
    ctx.global_scale = 2.0 ** 40
    # No Galois keys: a sum needs none, and they would multiply the context that travels
    # with every vector (NVFlare-favourable; its reported 15-20x matches this).
    pub_ctx = ctx.copy()
    pub_ctx.make_context_public()
    ctx_bytes = pub_ctx.serialize()
    n = sum(a.size for a in updates[0])

    def encrypt(u: list[np.ndarray]) -> list[bytes]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [ts.ckks_vector(ctx, a.ravel().tolist()).serialize() for a in u]

    t_enc, enc0 = _median(lambda: encrypt(updates[0]), repeats)
    enc_all = [enc0] + [encrypt(u) for u in updates[1:]]
    wire = sum(len(b) + len(ctx_bytes) for b in enc0)

    def aggregate() -> list[bytes]:
        out = []
        for i in range(len(updates[0])):
            acc: Any = None
            for w, e in zip(weights, enc_all, strict=True):
                server_ctx = ts.context_from(ctx_bytes)  # the context arrives with each vector
                v = ts.ckks_vector_from(server_ctx, e[i]) * w
                acc = v if acc is None else acc + v
            out.append(acc.serialize())
        return out

    t_agg, summed = _median(aggregate, max(1, repeats // 2))

    def decrypt() -> list[Any]:
        return [np.asarray(ts.ckks_vector_from(ctx, b).decrypt()) / sum(weights)
                for b in summed]

    t_dec, _ = _median(decrypt, repeats)
    return {"bytes_per_param": wire / n, "encrypt_s": t_enc, "aggregate_s": t_agg,
            "decrypt_s": t_dec}


def bench_fedvault(updates: list[list[np.ndarray]], repeats: int, sites: int
                   ) -> dict[str, float]:
    params = bfv_params_for(sites)
    sctx = new_secret_context(params)
    site = HEContext(sctx, params)
    server = HEContext.load(public_bytes(sctx), params)
    flats = [np.concatenate([a.ravel() for a in u]) for u in updates]
    n = flats[0].size
    t_enc, enc0 = _median(lambda: site.encrypt(flats[0]), repeats)
    enc_all = [enc0] + [site.encrypt(f) for f in flats[1:]]
    wire = sum(len(b) for b in enc0)
    t_agg, summed = _median(lambda: server.add(enc_all), repeats)
    t_dec, mean = _median(lambda: site.decrypt_mean(summed, num_values=n, count=len(flats)),
                          repeats)
    err = float(np.abs(mean - np.mean(np.stack(flats), axis=0)).max())
    return {"bytes_per_param": wire / n, "encrypt_s": t_enc, "aggregate_s": t_agg,
            "decrypt_s": t_dec, "max_abs_error": err, "error_bound": params.step}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "he_bench.json")
    args = ap.parse_args()
    warnings.simplefilter("ignore")  # TenSEAL warns for every vector longer than its slots
    console = Console(width=140)
    rng = np.random.default_rng(0)
    results: list[dict[str, Any]] = []
    for name, shapes in MODELS.items():
        updates = [layers_for(shapes, rng) for _ in range(args.sites)]
        weights = [float(rng.integers(50, 500)) for _ in range(args.sites)]
        n = sum(a.size for a in updates[0])
        console.print(f"model {name}: {n} parameters, {args.sites} sites")
        rows: dict[str, dict[str, float]] = {
            "plaintext": bench_plain(updates, weights, args.repeats)}
        console.print("  NVFlare-style CKKS…")
        rows["NVFlare-style CKKS"] = bench_nvflare(updates, weights, args.repeats)
        console.print("  fedvault BFV…")
        rows["fedvault BFV (default)"] = bench_fedvault(updates, args.repeats, args.sites)
        base = rows["plaintext"]["aggregate_s"]
        for r in rows.values():
            r["added_round_s"] = r["encrypt_s"] + r["aggregate_s"] + r["decrypt_s"] - base
        ratio = (rows["fedvault BFV (default)"]["added_round_s"]
                 / rows["NVFlare-style CKKS"]["added_round_s"])
        for label, r in rows.items():
            results.append({"model": name, "parameters": n, "scheme": label, **r})
        results.append({"model": name, "parameters": n, "scheme": "ratio",
                        "fedvault_added_over_nvflare_added": ratio})
    t = Table(title=f"encrypted aggregation, {args.sites} sites (median of {args.repeats})")
    for c in ("model", "scheme", "bytes/param", "× float32", "encrypt s", "aggregate s",
              "decrypt s", "added to round s"):
        t.add_column(c, justify="right")
    for r in results:
        if r["scheme"] == "ratio":
            t.add_row(str(r["model"]), "fedvault added / NVFlare added", "", "", "", "", "",
                      f"{r['fedvault_added_over_nvflare_added']:.3f}")
            continue
        t.add_row(str(r["model"]), str(r["scheme"]), f"{r['bytes_per_param']:.2f}",
                  f"{r['bytes_per_param'] / 4:.2f}", f"{r['encrypt_s']:.3f}",
                  f"{r['aggregate_s']:.3f}", f"{r['decrypt_s']:.3f}",
                  f"{r['added_round_s']:.3f}")
    console.print(t)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"sites": args.sites, "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
