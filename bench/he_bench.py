"""Encrypted aggregation on the code path a real round runs, side by side in one
interleaved run: plaintext FedAvg, an NVFlare-style CKKS configuration, and
fedvault's default (quantised BFV).

    python bench/he_bench.py [--sites 10] [--repeats 3] [--models 100k,1M,10M]
                             [--out bench/results/he_bench.json]

For MLPs of about 100k, 1M and 10M parameters and ``--sites`` sites, every
scheme goes through the same three phases, each timed (CPU and wall) in a fresh
process per (model, scheme, repeat), the schemes interleaved within a repeat:

* **site**: the trained model (a torch module) becomes a Flower reply message
  and is serialised to the protobuf bytes the SuperNode pushes
  (``flwr.common.serde.message_to_proto``). fedvault: ``client.he_client.
  encrypt_update`` (flatten, clip, fold the weight, quantise, pack, encrypt) and
  its wire record; plaintext: the state dict as an ``ArrayRecord``;
  NVFlare-style: one CKKS vector per layer (N = 8192, moduli [60, 40, 40], scale
  2**40) with the serialised context beside every vector. "fedvault BFV compact"
  is the same code with other parameters (moduli [60, 40], 12-bit quantisation),
  to show the trade: fewer bytes and less CPU for an 8x coarser step.
* **server**: the ``--sites`` replies are parsed from those bytes
  (``message_from_proto``) and aggregated. fedvault and plaintext run their real
  strategies' ``aggregate_train`` (``EncryptedFedAvg``: every header and
  ciphertext validated, parsed once and added as it passes; ``FedVaultFedAvg``:
  validation and weighted averaging); NVFlare-style loads the context that came
  with each vector, multiplies by the weight and sums.
* **decrypt**: the global model message the server sends (fedvault:
  ``EncryptedFedAvg._as_encrypted``, the "he-global" record) is serialised,
  parsed at a site and loaded into its model (``client.he_client.
  load_encrypted_global``: decrypt, verify the sites and weight it holds, scale).

Columns: bytes per parameter of one site's reply on the wire, CPU seconds of
each phase, the server's peak memory during aggregation above what the received
replies (Flower's Messages) already take, sampled every 2 ms from /proc, and the
size of one update for scale, "added" (site + server + decrypt CPU
minus plaintext's: what the scheme adds to a round, sites working in parallel)
and the largest distance between the decrypted model and the exact
example-weighted average. Medians over ``--repeats``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS: dict[str, list[int]] = {  # MLP layer widths: input, hidden..., output
    "100k": [784, 120, 64, 10],
    "1M": [784, 1024, 256, 10],
    "10M": [784, 8192, 512, 10],
}
SCHEMES = ("plaintext", "NVFlare-style CKKS", "fedvault BFV (default)",
           "fedvault BFV compact")
RUN = 4242


# -- measuring ---------------------------------------------------------------------------
def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Peak:
    """Peak resident memory above the level at entry, sampled every 2 ms."""

    def __init__(self) -> None:
        self.base = 0.0
        self.peak = 0.0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mib())
            time.sleep(0.002)

    def __enter__(self) -> Peak:
        self.base = self.peak = _rss_mib()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_mib())

    @property
    def above(self) -> float:
        return self.peak - self.base


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(CPU s, wall s, result) of ``fn()``."""
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return time.process_time() - c0, time.perf_counter() - w0, out


# -- the worker: one (model, scheme) in this process ----------------------------------------
def _mlp(widths: list[int]) -> Any:
    import torch

    layers: list[torch.nn.Module] = []
    for a, b in itertools.pairwise(widths):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def _site_models(widths: list[int], sites: int, seed: int) -> tuple[list[Any], list[int]]:
    import torch

    torch.manual_seed(seed)
    models = []
    for _ in range(sites):
        m = _mlp(widths)
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0.0, 0.05)
        models.append(m)
    rng = np.random.default_rng(seed)
    return models, [int(v) for v in rng.integers(50, 500, sites)]


def _wire(msg: Any) -> bytes:
    from flwr.common.serde import message_to_proto

    return bytes(message_to_proto(msg).SerializeToString())


def _unwire(data: bytes) -> Any:
    from flwr.common.serde import message_from_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage

    p = ProtoMessage()
    p.ParseFromString(data)
    return message_from_proto(p)


def _instruction(node: int) -> Any:
    from flwr.app import Message, RecordDict

    return Message(content=RecordDict({}), dst_node_id=node, message_type="train")


def _recorder(tmp: Path, **settings: Any) -> Any:
    from protocols.config import RunSettings
    from protocols.rundir import RunDirectory
    from server.recorder import RunRecorder

    rec = RunRecorder(RunDirectory(tmp / "run"), settings=RunSettings(**settings), run_id=RUN,
                      mode="bench")
    rec.start(num_sites=16, num_parameters=1)
    return rec


def worker(model: str, scheme: str, sites: int, seed: int) -> dict[str, Any]:
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedvault_tasks.tasks import flatten

    torch.set_num_threads(1)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN, 1
    warnings.simplefilter("ignore")
    widths = MODELS[model]
    models, examples = _site_models(widths, sites, seed)
    flats = [flatten(m.state_dict()) for m in models]
    n = int(flats[0].size)
    exact = np.average(np.stack(flats), axis=0, weights=examples)
    receiver = _mlp(widths)
    tmp = Path(tempfile.mkdtemp(prefix="he-bench-"))
    out: dict[str, Any] = {"model": model, "parameters": n, "scheme": scheme, "sites": sites}

    def metrics(k: int) -> MetricRecord:
        return MetricRecord({"num-examples": examples[k], "steps": 1})

    if scheme == "plaintext":
        from server.strategy import FedVaultFedAvg

        def site(k: int) -> bytes:
            return _wire(Message(content=RecordDict({
                "arrays": ArrayRecord(models[k].state_dict()), "metrics": metrics(k)}),
                reply_to=_instruction(k + 1)))

        strategy = FedVaultFedAvg(recorder=_recorder(tmp, min_sites=2), min_sites=2,
                                  max_weight_share=1.0)
        strategy.global_arrays = ArrayRecord(receiver.state_dict())  # what it sent

        def server(msgs: list[Any]) -> Any:
            arrays, _ = strategy.aggregate_train(1, msgs)
            assert arrays is not None, "plaintext aggregation formed no model"
            return Message(content=RecordDict({"arrays": arrays, "config": ConfigRecord()}),
                           dst_node_id=1, message_type="train")

        def decrypt(data: bytes) -> None:
            msg = _unwire(data)
            receiver.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())

    elif scheme.startswith("NVFlare"):
        import tenseal as ts

        ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=8192,
                         coeff_mod_bit_sizes=[60, 40, 40])
        ctx.global_scale = 2.0 ** 40
        # No Galois keys: a sum needs none, and they would multiply the context that
        # travels with every vector (NVFlare-favourable; its reported 15-20x matches).
        pub = ctx.copy()
        pub.make_context_public()
        ctx_bytes = pub.serialize()

        def site(k: int) -> bytes:
            layers = [t.detach().numpy().ravel() for t in models[k].state_dict().values()]
            vecs = [ts.ckks_vector(ctx, a.tolist()).serialize() for a in layers]
            return _wire(Message(content=RecordDict({
                "ckks": ConfigRecord({"vectors": vecs, "contexts": [ctx_bytes] * len(vecs)}),
                "metrics": metrics(k)}), reply_to=_instruction(k + 1)))

        def server(msgs: list[Any]) -> Any:
            acc: list[Any] = []
            total = 0
            for msg in msgs:
                rec = msg.content.config_records["ckks"]
                weight = int(msg.content.metric_records["metrics"]["num-examples"])
                total += weight
                for i, (v, c) in enumerate(zip(rec["vectors"], rec["contexts"], strict=True)):
                    x = ts.ckks_vector_from(ts.context_from(c), v) * weight
                    if len(acc) <= i:
                        acc.append(x)
                    else:
                        acc[i] = acc[i] + x
            return Message(content=RecordDict({"ckks-global": ConfigRecord({
                "vectors": [a.serialize() for a in acc], "total": total})}),
                dst_node_id=1, message_type="train")

        def decrypt(data: bytes) -> None:
            rec = _unwire(data).content.config_records["ckks-global"]
            total = int(rec["total"])
            flat = np.concatenate([np.asarray(ts.ckks_vector_from(ctx, v).decrypt()) / total
                                   for v in rec["vectors"]])
            from fedvault_tasks.tasks import unflatten
            receiver.load_state_dict(unflatten(flat, receiver.state_dict()))

    else:
        from client.he_client import encrypt_update, load_encrypted_global
        from privacy.he import HEContext, new_secret_context, params_for, public_bytes
        from server.he_strategy import EncryptedFedAvg

        params = params_for("bfv-compact" if scheme.endswith("compact") else "bfv", sites)
        sctx = new_secret_context(params)
        he_site = HEContext(sctx, params)
        he_server = HEContext.load(public_bytes(sctx), params)
        scale = max(examples)  # a later round's scale: the largest count of the last one

        def site(k: int) -> bytes:
            ctx = Context(run_id=RUN, node_id=k + 1, node_config={}, state=RecordDict(),
                          run_config={})
            u = encrypt_update(models[k], he_site, context=ctx, server_round=1,
                               num_examples=examples[k], weight_scale=scale)
            return _wire(Message(content=RecordDict({"he-update": u.to_record(),
                                                     "metrics": metrics(k)}),
                                 reply_to=_instruction(k + 1)))

        strategy = EncryptedFedAvg(he=he_server, num_values=n, run_id=RUN,
                                   recorder=_recorder(tmp, he=True, min_sites=2),
                                   min_sites=2, weight_scale=scale)

        def server(msgs: list[Any]) -> Any:
            arrays, _ = strategy.aggregate_train(1, msgs)
            assert arrays is not None, "encrypted aggregation formed no model"
            (msg,) = strategy._as_encrypted([_instruction(1)], arrays, ConfigRecord())
            return msg

        def decrypt(data: bytes) -> None:
            rec = _unwire(data).content.config_records["he-global"]
            load_encrypted_global(receiver, rec, he_site, min_sites=2, max_change=0.0)

    cpu, wall, w0 = timed(lambda: site(0))
    out.update(site_cpu_s=cpu, site_wall_s=wall, bytes_per_param=len(w0) / n)
    wires = [w0] + [site(k) for k in range(1, sites)]
    # Flower's grid hands the strategy every reply at once, parsed into Messages; the
    # peak is what aggregation takes beyond them
    cpu0, wall0, msgs = timed(lambda: [_unwire(w) for w in wires])
    wires.clear()
    with Peak() as peak:
        cpu, wall, global_msg = timed(lambda: server(msgs))
    out.update(server_cpu_s=cpu0 + cpu, server_wall_s=wall0 + wall,
               server_peak_mib=peak.above,
               update_mib=len(w0) / 2**20)
    g = _wire(global_msg)
    cpu, wall, _ = timed(lambda: decrypt(g))
    out.update(decrypt_cpu_s=cpu, decrypt_wall_s=wall, global_bytes_per_param=len(g) / n)
    got = flatten(receiver.state_dict())
    out["max_abs_error"] = float(np.abs(got - exact).max())
    return out


# -- the driver ------------------------------------------------------------------------------
def run_one(model: str, scheme: str, sites: int, seed: int) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--worker", model, scheme,
                           "--sites", str(sites), "--seed", str(seed)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{model} / {scheme} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


PHASES = ("site_cpu_s", "site_wall_s", "server_cpu_s", "server_wall_s", "decrypt_cpu_s",
          "decrypt_wall_s", "server_peak_mib", "update_mib", "bytes_per_param",
          "global_bytes_per_param", "max_abs_error")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "he_bench.json")
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "SCHEME"), help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.sites, args.seed)))
        return

    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    console = Console(width=160)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    runs: list[dict[str, Any]] = []
    with Progress(console=console) as progress:
        task = progress.add_task("he_bench", total=len(models) * args.repeats * len(SCHEMES))
        for model in models:
            for rep in range(args.repeats):
                for scheme in SCHEMES:  # interleaved: every repeat runs each scheme once
                    progress.update(task, description=f"{model} · {scheme} · repeat {rep + 1}")
                    runs.append(run_one(model, scheme, args.sites, seed=rep))
                    progress.advance(task)
    rows: list[dict[str, Any]] = []
    for model in models:
        base: dict[str, float] = {}
        for scheme in SCHEMES:
            mine = [x for x in runs if x["model"] == model and x["scheme"] == scheme]
            row: dict[str, Any] = {"model": model, "scheme": scheme,
                                   "parameters": mine[0]["parameters"],
                                   **{k: statistics.median(x[k] for x in mine) for k in PHASES}}
            row["round_cpu_s"] = row["site_cpu_s"] + row["server_cpu_s"] + row["decrypt_cpu_s"]
            if scheme == "plaintext":
                base = row
            row["added_cpu_s"] = row["round_cpu_s"] - base["round_cpu_s"]
            rows.append(row)
        nv = next(x for x in rows if x["model"] == model and x["scheme"].startswith("NVFlare"))
        for fv in rows[-2:]:
            fv["added_over_nvflare"] = fv["added_cpu_s"] / nv["added_cpu_s"]
    t = Table(title=f"encrypted aggregation on the real path, {args.sites} sites "
                    f"(CPU seconds, median of {args.repeats}, interleaved)")
    for c in ("model", "scheme", "bytes/param", "x float32", "site s", "server s",
              "decrypt s", "server peak MiB (one update MiB)", "added s", "added / NVFlare",
              "max |error|"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(r["model"], r["scheme"], f"{r['bytes_per_param']:.2f}",
                  f"{r['bytes_per_param'] / 4:.2f}", f"{r['site_cpu_s']:.3f}",
                  f"{r['server_cpu_s']:.3f}", f"{r['decrypt_cpu_s']:.3f}",
                  f"{r['server_peak_mib']:.0f} ({r['update_mib']:.0f})",
                  f"{r['added_cpu_s']:.3f}" if r["scheme"] != "plaintext" else "0",
                  f"{r['added_over_nvflare']:.3f}x" if "added_over_nvflare" in r else "",
                  f"{r['max_abs_error']:.2e}")
    console.print(t)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"sites": args.sites, "repeats": args.repeats,
                                    "rows": rows, "runs": runs}, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
