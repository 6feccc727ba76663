"""Run one scenario against several servers in the same session, interleaved, and compare.

Every claim in BENCHMARKS.md is a ratio from one run of this script: the variants take
turns (round 1: a, b, c; round 2: a, b, c; ...) so that whatever else the machine is
doing weighs on all of them alike, and the medians are compared.

Variants:
  kaldrix               the current code, as `kaldrix serve` runs by default
  kaldrix-writer-task   direct writes off: every frame through the per-connection writer task
                        (the hot path before this work)
  kaldrix-no-latency    delivery latency timing off (what metrics cost on the hot path)
  websockets            bench/peers/websockets_server.py on Python `websockets` (asyncio)
  socketio              bench/peers/socketio_server.js on Node + Socket.IO 4 (the seed's stack)

Peers are installed from the package registries into a temporary directory for the run
(pip: websockets; npm: socket.io@4) and deleted afterwards; nothing of theirs is kept.

    python bench/compare.py bench/scenarios/p99-25k.toml --variants kaldrix,kaldrix-writer-task --rounds 3
    python bench/compare.py bench/scenarios/fanout-sweep.toml --variants kaldrix,websockets,socketio
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / "bench" / "peers"

KALDRIX_ENV = {
    "kaldrix": {},
    "kaldrix-writer-task": {"KALDRIX_DIRECT_WRITES": "false"},
    "kaldrix-no-latency": {"KALDRIX_RECORD_LATENCY": "false"},
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_listening(port: int, process: subprocess.Popen, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"peer exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"peer not listening on {port}")


class Peers:
    """The reference servers' packages, installed for this run only."""

    def __init__(self, wanted: set[str]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="kaldrix-peers-"))
        self.python = None
        self.versions: dict[str, str] = {}
        if "websockets" in wanted:
            subprocess.run([sys.executable, "-m", "venv", str(self.dir / "venv")], check=True)
            self.python = str(self.dir / "venv" / "bin" / "python")
            subprocess.run([self.python, "-m", "pip", "install", "-q", "websockets"], check=True)
            self.versions["websockets"] = subprocess.run(
                [self.python, "-c", "import websockets; print(websockets.__version__)"], capture_output=True, text=True, check=True
            ).stdout.strip()
        if "socketio" in wanted:
            subprocess.run(["npm", "install", "--silent", "--prefix", str(self.dir / "node"), "socket.io@4"], check=True)
            package = json.loads((self.dir / "node" / "node_modules" / "socket.io" / "package.json").read_text())
            self.versions["socket.io"] = package["version"]
            self.versions["node"] = subprocess.run(["node", "--version"], capture_output=True, text=True, check=True).stdout.strip()

    def start(self, variant: str, port: int) -> subprocess.Popen:
        pin = ["taskset", "-c", "0"] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else []
        if variant == "websockets":
            command = [*pin, self.python, str(PEERS / "websockets_server.py"), str(port)]
            env = os.environ
        else:
            command = [*pin, "node", str(PEERS / "socketio_server.js"), str(port)]
            env = {**os.environ, "NODE_PATH": str(self.dir / "node" / "node_modules")}
        process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL)
        wait_listening(port, process)
        return process

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def bench_command(scenario: str, save: Path, extra: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "kaldrix", "bench", "--scenario", scenario, "--output", "json",
        "--log-level", "warning", "--save", str(save), "--hgrm", str(save.with_suffix(".hgrm")), *extra,
    ]  # fmt: skip


def run_variant(variant: str, scenario: str, save: Path, extra: list[str], peers: Peers | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in KALDRIX_ENV.values():
        for key in name:
            env.pop(key, None)
    peer = None
    command = bench_command(scenario, save, extra)
    if variant in KALDRIX_ENV:
        env.update(KALDRIX_ENV[variant])
    else:
        assert peers is not None
        port = free_port()
        peer = peers.start(variant, port)
        url = f"ws://127.0.0.1:{port}" + ("/ws" if variant == "websockets" else "")
        command += ["--url", url, "--server-pid", str(peer.pid), "--label", variant]
        if variant == "socketio":
            command += ["--dialect", "socketio"]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    finally:
        if peer is not None:
            peer.send_signal(signal.SIGTERM)
            try:
                peer.wait(10)
            except subprocess.TimeoutExpired:
                peer.kill()
    if done.returncode != 0:
        raise RuntimeError(f"{variant}: bench failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def figures(result: dict) -> dict:
    delivery, throughput, resources = result["eventDelivery"], result["throughput"], result["resources"]
    cpu = resources.get("serverCpu")
    per_delivery = cpu / throughput["deliveriesPerSecond"] * 1e6 if cpu and throughput["deliveriesPerSecond"] else None
    out = {
        "deliveries/s": throughput["deliveriesPerSecond"],
        "events/s": throughput["eventsPerSecond"],
        "p50 ms": delivery["p50"],
        "p99 ms": delivery["p99"],
        "p99.9 ms": delivery["p999"],
        "lost": result["lost"],
        "dup": result["duplicates"],
        "connected": result["connections"]["active"],
        "server CPU": cpu,
        "server CPU us/delivery": round(per_delivery, 1) if per_delivery else None,
        "RSS KB/conn": round(resources["rssPerConnectionBytes"] / 1024, 1) if resources.get("rssPerConnectionBytes") else None,
        "generator CPU": resources["generatorCpu"],
    }
    if "maxCleanDeliveriesPerSecond" in result:
        out["max clean deliveries/s"] = result["maxCleanDeliveriesPerSecond"]
        out["max clean, kept up"] = result.get("maxKeptUpDeliveriesPerSecond")
    return out


def median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenario")
    parser.add_argument("--variants", default="kaldrix,kaldrix-writer-task")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", help="directory for the results (default bench/results/<scenario>-<time>)")
    args, extra = parser.parse_known_args()  # anything else goes to `kaldrix bench`
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in KALDRIX_ENV and v not in ("websockets", "socketio")]
    if unknown:
        parser.error(f"unknown variant(s): {', '.join(unknown)}")
    extra = [a for a in extra if a != "--"]
    name = Path(args.scenario).stem
    out = Path(args.out or ROOT / "bench" / "results" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    wanted = {v for v in variants if v not in KALDRIX_ENV}
    peers = Peers(wanted) if wanted else None
    results: dict[str, list[dict]] = {v: [] for v in variants}
    try:
        for round_ in range(1, args.rounds + 1):
            for variant in variants:
                load = os.getloadavg()[0]
                result = run_variant(variant, args.scenario, out / f"{variant}-{round_}.json", extra, peers)
                result["loadAverage"] = load
                results[variant].append(result)
                print(f"round {round_} {variant}: {json.dumps(figures(result))} (load {load:.1f})", file=sys.stderr, flush=True)
    finally:
        if peers is not None:
            versions = peers.versions
            peers.remove()
        else:
            versions = {}
    rows = {v: {k: median([figures(r)[k] for r in rs]) for k in figures(rs[0])} for v, rs in results.items()}
    base = variants[0]
    lines = [f"# {name}: {', '.join(variants)} ({args.rounds} round(s), medians)", ""]
    keys = list(rows[base])
    lines.append("| variant | " + " | ".join(keys) + " |")
    lines.append("| --- " * (len(keys) + 1) + "|")
    for variant in variants:
        lines.append(f"| {variant} | " + " | ".join("" if rows[variant][k] is None else f"{rows[variant][k]:g}" for k in keys) + " |")
    lines.append("")
    lines.append(f"Ratios, as how many times better {base} is (above 1: {base} ahead):")
    for variant in variants[1:]:
        for key, higher_is_better in (
            ("max clean deliveries/s", True),
            ("max clean, kept up", True),
            ("deliveries/s", True),
            ("p99 ms", False),
            ("server CPU us/delivery", False),
        ):
            a, b = rows[base].get(key), rows[variant].get(key)
            if a and b:
                ratio = a / b if higher_is_better else b / a
                lines.append(f"- {key}, {base} vs {variant}: {ratio:.2f}x")
    if versions:
        lines.append("- peers: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    summary = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(summary)
    print(summary)
    try:
        from hdrh.histogram import HdrHistogram

        sys.path.insert(0, str(ROOT))
        from kaldrix.bench._result import write_plot

        curves = {v: HdrHistogram.decode(rs[0]["latencyHistogram"]) for v, rs in results.items()}
        write_plot(curves, out / "latency.png", f"{name}: delivery latency by percentile")
    except (ImportError, RuntimeError, KeyError) as exc:
        print(f"no plot: {exc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
