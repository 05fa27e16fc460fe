"""ServerApp peak memory when one site sends a huge hostile reply, beside an honest round.

    python bench/reply_memory.py [--hostile-mib 256] [--out bench/results/reply_memory.json]

Three scenarios, each measured in a fresh ServerApp-side process, on the real code
path: the run's strategy from ``server.app.build_strategy`` (plaintext
``FedVaultFedAvg``), its ``configure_train`` (against a stub grid of 11 nodes) and
``aggregate_train`` over real Flower ``Message`` replies, a real ``RunRecorder``:

* ``honest``: 10 honest replies (the digits model's arrays, perturbed per site since
  the strategy rejects a replayed update; ``metrics`` with ``num-examples`` 100 and
  ``steps``);
* ``hostile: bytes != shape``: the same 10 plus one reply whose first layer declares
  the model's shape and dtype but carries ``--hostile-mib`` MiB of data (a valid
  ``.npy`` of that many random float32s);
* ``hostile: huge shape``: the same 10 plus one reply whose first layer is a
  correctly declared ``--hostile-mib`` MiB float32 array.

The replies arrive as from the wire: a separate "site" process builds each reply,
deflates it into Flower 1.42's object contents (``Message`` -> ``RecordDict`` ->
``ArrayRecord`` -> ``Array`` -> 5 MiB ``ArrayChunk``s) and writes them to a file; the
ServerApp-side process reads those contents (as ``PullObject`` would hand them over)
and inflates them with ``inflate_object_from_contents``, as Flower's grid does in
``pull_messages``. So the process peak includes what receiving the payload costs in
Flower itself, before fedvault sees it.

Memory, from /proc/self/status and ``getrusage(RUSAGE_SELF).ru_maxrss``:
``baseline`` (resident, after imports and strategy set-up), ``held`` (resident once
the replies are inflated and the wire contents freed), ``receive peak`` (ru_maxrss
after receiving), ``aggregate peak`` (high-water mark during ``aggregate_train``
alone: the mark is reset through /proc/self/clear_refs just before; ``aggregate
extra`` is that minus ``held``) and ``process peak`` (the larger of the two peaks).
``extra over payload`` = process peak(hostile) - process peak(honest) - payload: what
receiving and validating the hostile reply cost beyond holding its bytes once.

Goal (the issue): ServerApp peak memory with a 256 MiB hostile reply under 1.2x of
the honest round.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GOAL_RATIO = 1.2
NUM_HONEST = 10
HOSTILE_NODE = NUM_HONEST + 1
MIB = 1 << 20
SCENARIOS: dict[str, str] = {
    "honest": "10 honest replies",
    "bytes-vs-shape": "hostile: bytes != shape",
    "huge-shape": "hostile: huge shape",
}


# --------------------------------------------------------------------------------------
# memory probes (Linux)
# --------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _rss_mib() -> float:
    return _status_kib("VmRSS") / 1024


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _reset_peak() -> bool:
    """Reset this process's resident high-water mark (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# --------------------------------------------------------------------------------------
# the wire file: (message object id, {object id: deflated content}) per reply
# --------------------------------------------------------------------------------------
def _write_blob(f: Any, b: bytes) -> None:
    f.write(struct.pack("<Q", len(b)))
    f.write(b)


def _read_blob(f: Any) -> bytes:
    (n,) = struct.unpack("<Q", f.read(8))
    data: bytes = f.read(n)
    return data


def _write_wire(path: Path, wire: list[tuple[str, dict[str, bytes]]]) -> None:
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(wire)))
        for msg_id, contents in wire:
            _write_blob(f, msg_id.encode())
            f.write(struct.pack("<Q", len(contents)))
            for oid, content in contents.items():
                _write_blob(f, oid.encode())
                _write_blob(f, content)


def _read_wire(f: Any) -> Any:
    """Yield (message object id, contents) one reply at a time."""
    (num,) = struct.unpack("<Q", f.read(8))
    for _ in range(num):
        msg_id = _read_blob(f).decode()
        (k,) = struct.unpack("<Q", f.read(8))
        contents: dict[str, bytes] = {}
        for _ in range(k):
            oid = _read_blob(f).decode()
            contents[oid] = _read_blob(f)
        yield msg_id, contents


def _set_identity() -> None:
    """Flower's Message constructor reads the task identity a Flower runtime sets."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 4242
    TaskIdentity.node_id = 1


# --------------------------------------------------------------------------------------
# the site side (its own process: its memory is not measured)
# --------------------------------------------------------------------------------------
def site_worker(work: Path, hostile_mib: int) -> None:
    """Write one wire file per scenario into ``work``, plus ``model.json`` facts."""
    import io

    import numpy as np
    import torch
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from fedvault.tasks import get_task
    from protocols.config import RunSettings

    _set_identity()
    settings = RunSettings()
    torch.manual_seed(settings.seed)
    model = get_task(settings.task).build_model(num_features=settings.num_features,
                                                num_classes=settings.num_classes)
    state = model.state_dict()
    first = next(iter(state))

    def deflated(node: int, arrays: ArrayRecord) -> tuple[str, dict[str, bytes]]:
        instruction = Message(content=RecordDict({}), dst_node_id=node, message_type="train")
        instruction.metadata.__dict__["_message_id"] = instruction.object_id  # as pushed
        reply = Message(content=RecordDict({
            "arrays": arrays,
            "metrics": MetricRecord({"num-examples": 100, "steps": 10})}),
            reply_to=instruction)
        contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(reply).items()}
        return reply.object_id, contents

    def trained(node: int) -> dict[str, torch.Tensor]:
        """The model after a site's (pretend) local training: distinct per site, since
        the strategy rejects an update identical to one it accepted (a replay)."""
        g = torch.Generator().manual_seed(node)
        return {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point()
                else v for k, v in state.items()}

    honest = [deflated(node, ArrayRecord(trained(node))) for node in range(1, NUM_HONEST + 1)]
    n = hostile_mib * MIB // 4
    rng = np.random.default_rng(0)
    payload = rng.standard_normal(n, dtype=np.float32)  # random: chunks do not dedupe
    facts: dict[str, Any] = {"layer": first, "layer_shape": list(state[first].shape),
                             "num_parameters": sum(int(v.numel()) for v in state.values()),
                             "payload": {}}
    for name in SCENARIOS:
        wire = list(honest)
        if name != "honest":
            arrays = ArrayRecord(trained(HOSTILE_NODE))
            ref = arrays[first]
            if name == "bytes-vs-shape":
                buf = io.BytesIO()
                np.save(buf, payload, allow_pickle=False)
                bad = Array(dtype=ref.dtype, shape=tuple(ref.shape), stype=ref.stype,
                            data=buf.getvalue())
                del buf
            else:
                bad = Array(payload)
            facts["payload"][name] = len(bad.data)
            arrays[first] = bad
            wire.append(deflated(HOSTILE_NODE, arrays))
            del arrays, bad
        _write_wire(work / f"{name}.wire", wire)
        del wire
    (work / "model.json").write_text(json.dumps(facts))


# --------------------------------------------------------------------------------------
# the ServerApp side (one fresh process per scenario)
# --------------------------------------------------------------------------------------
def server_worker(wire: Path, out: Path) -> None:
    from collections.abc import Iterable

    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Message
    from flwr.serverapp import Grid
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    from fedvault.rundir import RunDirectory
    from fedvault.tasks import get_task
    from protocols.config import RunSettings
    from protocols.hashchain import read_chain
    from server.app import build_strategy
    from server.recorder import RunRecorder

    class StubGrid(Grid):
        """Only what ``configure_train`` asks of a grid: the connected node ids."""

        def __init__(self, node_ids: list[int]) -> None:
            self._nodes = node_ids

        def get_node_ids(self) -> Iterable[int]:
            return list(self._nodes)

        def _no(self, *_: object, **__: object) -> Any:
            raise NotImplementedError("stub grid")

        set_run = run = create_message = push_messages = pull_messages = _no  # type: ignore
        send_and_receive = _no

    _set_identity()
    settings = RunSettings()
    torch.manual_seed(settings.seed)
    model = get_task(settings.task).build_model(num_features=settings.num_features,
                                                num_classes=settings.num_classes)
    initial = ArrayRecord(model.state_dict())
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        recorder = RunRecorder(RunDirectory(Path(tmp) / "run"), settings=settings, run_id=1,
                               mode="bench")
        recorder.start(num_sites=HOSTILE_NODE,
                       num_parameters=sum(p.numel() for p in model.parameters()))
        strategy = build_strategy(settings, recorder=recorder, run_id=1,
                                  num_values=sum(int(v.numel())
                                                 for v in model.state_dict().values()),
                                  sampling_seed=settings.seed)
        train_config = ConfigRecord({"local-epochs": settings.local_epochs,
                                     "batch-size": settings.batch_size,
                                     "learning-rate": settings.learning_rate,
                                     "momentum": settings.momentum})
        sent = list(strategy.configure_train(1, initial, train_config,
                                             StubGrid(list(range(1, HOSTILE_NODE + 1)))))
        result["instructions"] = len(sent)
        del sent
        gc.collect()
        result["baseline_mib"] = _rss_mib()
        result["baseline_maxrss_mib"] = _maxrss_mib()

        # receive: the wire contents, inflated one reply at a time as Flower does
        t0 = time.perf_counter()
        replies: list[Message] = []
        with wire.open("rb") as f:
            for msg_id, contents in _read_wire(f):
                msg = inflate_object_from_contents(msg_id, contents)
                assert isinstance(msg, Message)
                msg.metadata.__dict__["_message_id"] = msg_id
                replies.append(msg)
                del contents, msg
        gc.collect()
        result["receive_seconds"] = time.perf_counter() - t0
        result["held_mib"] = _rss_mib()
        result["receive_peak_mib"] = _maxrss_mib()

        # aggregate_train alone
        result["peak_reset"] = _reset_peak()
        t0 = time.perf_counter()
        try:
            arrays, _ = strategy.aggregate_train(1, replies)
            result["outcome"] = "aggregated" if arrays is not None else "no aggregate"
            result["error"] = None
        except Exception as exc:  # the bench reports, never dies, on a crash
            result["outcome"] = "crashed"
            result["error"] = f"{type(exc).__name__}: {exc}"
        result["aggregate_seconds"] = time.perf_counter() - t0
        result["aggregate_peak_mib"] = (_status_kib("VmHWM") / 1024 if result["peak_reset"]
                                        else None)
        result["aggregate_maxrss_mib"] = _maxrss_mib()
        del replies
        gc.collect()
        rejected = [e for e in read_chain(recorder.dir.events)
                    if e.get("kind") == "update_rejected"]
        result["rejected"] = [{"node_id": e.get("node_id"), "reason": e.get("reason")}
                              for e in rejected]
        result["accepted"] = recorder._rounds[1].accepted if 1 in recorder._rounds else None
    # the process peak: the larger of the receive peak and the aggregate peak (the
    # high-water mark was reset between them)
    result["peak_mib"] = max(result["receive_peak_mib"], result["aggregate_maxrss_mib"])
    out.write_text(json.dumps(result))


# --------------------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------------------
def _run(argv: list[str]) -> None:
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], cwd=ROOT,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({r.returncode}):\n{r.stderr.strip()}")


def _verdict(r: dict[str, Any]) -> str:
    if r["outcome"] == "crashed":
        return f"crashed: {r['error']}"
    hostile = [x for x in r["rejected"] if x["node_id"] == HOSTILE_NODE]
    if hostile:
        return "rejected (reason below)"
    return f"{r['outcome']}, {r['accepted']} accepted (not rejected)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hostile-mib", type=int, default=256,
                    help="size of the hostile reply's layer data, MiB")
    ap.add_argument("--out", type=Path,
                    default=ROOT / "bench" / "results" / "reply_memory.json")
    ap.add_argument("--site-worker", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--server-worker", nargs=2, type=Path, default=None,
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.site_worker is not None:
        site_worker(args.site_worker, args.hostile_mib)
        return 0
    if args.server_worker is not None:
        server_worker(*args.server_worker)
        return 0
    if args.hostile_mib < 1:
        ap.error("--hostile-mib must be >= 1")

    from rich.console import Console
    from rich.table import Table

    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        _run(["--site-worker", str(tmp), "--hostile-mib", str(args.hostile_mib)])
        facts = json.loads((tmp / "model.json").read_text())
        for name in SCENARIOS:
            out = tmp / f"{name}.json"
            _run(["--server-worker", str(tmp / f"{name}.wire"), str(out)])
            results[name] = json.loads(out.read_text())
            results[name]["payload_mib"] = facts["payload"].get(name, 0) / MIB
            (tmp / f"{name}.wire").unlink()

    honest = results["honest"]
    for name, r in results.items():
        r["ratio"] = r["peak_mib"] / honest["peak_mib"]
        r["extra_over_payload_mib"] = (r["peak_mib"] - honest["peak_mib"] - r["payload_mib"]
                                       if name != "honest" else None)
        r["aggregate_extra_mib"] = (r["aggregate_peak_mib"] - r["held_mib"]
                                    if r["aggregate_peak_mib"] is not None else None)
        r["verdict"] = _verdict(r) if name != "honest" else (
            f"{r['outcome']}, {r['accepted']} accepted" if r["outcome"] != "crashed"
            else f"crashed: {r['error']}")

    def mib(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    table = Table(title=f"ServerApp memory, MiB: {NUM_HONEST} honest replies (digits, "
                  f"{facts['num_parameters']} parameters) +/- one {args.hostile_mib} MiB "
                  f"hostile reply (layer {facts['layer']!r})")
    for col in ("scenario", "payload", "baseline", "held", "receive peak",
                "aggregate peak", "aggregate extra", "process peak", "peak / honest",
                "extra over payload", "hostile reply"):
        table.add_column(col, justify="left" if col in ("scenario", "hostile reply")
                         else "right")
    for name, r in results.items():
        table.add_row(SCENARIOS[name], mib(r["payload_mib"]), mib(r["baseline_mib"]),
                      mib(r["held_mib"]), mib(r["receive_peak_mib"]),
                      mib(r["aggregate_peak_mib"]), mib(r["aggregate_extra_mib"]),
                      mib(r["peak_mib"]), f"{r['ratio']:.2f}x",
                      mib(r["extra_over_payload_mib"]), r["verdict"])
    console = Console(width=200)
    console.print(table)
    goal_met = {name: r["ratio"] < GOAL_RATIO and r["outcome"] != "crashed"
                for name, r in results.items() if name != "honest"}
    console.print(f"goal: ServerApp peak with a {args.hostile_mib} MiB hostile reply under "
                  f"{GOAL_RATIO}x the honest round's ({mib(honest['peak_mib'])} MiB, i.e. under "
                  f"{mib(GOAL_RATIO * honest['peak_mib'])} MiB)" +
                  ("" if args.hostile_mib == 256 else " [the issue states it for 256 MiB]"))
    for name, met in goal_met.items():
        r = results[name]
        console.print(
            f"  {SCENARIOS[name]}: {r['ratio']:.2f}x -> {'MET' if met else 'NOT MET'}  (over "
            f"the honest peak: {r['payload_mib']:.0f} payload held, "
            f"{r['receive_peak_mib'] - r['held_mib']:.0f} transient while Flower inflates "
            f"the wire contents, {mib(r['aggregate_extra_mib'])} in aggregate_train)")
    for name, r in results.items():
        for x in r["rejected"]:
            console.print(f"  {SCENARIOS[name]}: node {x['node_id']} rejected: {x['reason']}")
    console.print("held = resident with the replies inflated; receive peak includes Flower "
                  "inflating the wire contents; aggregate peak = high-water mark during "
                  "aggregate_train alone.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"hostile_mib": args.hostile_mib, "goal_ratio": GOAL_RATIO,
                                    "goal_met": goal_met, "model": facts,
                                    "python": sys.version.split()[0],
                                    "scenarios": results}, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
