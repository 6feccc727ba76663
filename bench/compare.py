"""Run one scenario against several servers in the same session, interleaved, and compare.

Every claim in BENCHMARKS.md is a ratio from one run of this script: the variants take
turns (round 1: a, b, c; round 2: a, b, c; ...) so that whatever else the machine is
doing weighs on all of them alike, and the medians are compared.

Variants:
  kaldrix               the current code, as `kaldrix serve` runs by default
  kaldrix-writer-task   direct writes off: every frame through the per-connection writer task
                        (the hot path before this work)
  kaldrix-no-latency    delivery latency timing off (what metrics cost on the hot path)
  kaldrix-redis         the Redis broker (KALDRIX_BROKER=redis://...): a redis-server of its own
                        for the run, on CPU 0 with the server (one machine: Redis takes its CPU
                        from the same core the memory broker's server has to itself)
  kaldrix-redis-2nodes  two nodes on that Redis, both on CPU 0 too: the subscribers on node B,
                        the publisher on node A (--publish-url), so every event crosses Redis
  websockets            bench/peers/websockets_server.py on Python `websockets` (asyncio)
  socketio              bench/peers/socketio_server.js on Node + Socket.IO 4 (the seed's stack)

Redis variants start `redis-server --save "" --appendonly no` on a free port in a temporary
directory (pinned to CPU 0), give each run its own key prefix, stop it after the run and
report its CPU share (and node A's) next to the server's (`--watch-pid`).

Peers are installed from the package registries into a temporary directory for the run
(pip: websockets; npm: socket.io@4) and deleted afterwards; nothing of theirs is kept.

    python bench/compare.py bench/scenarios/p99-25k.toml --variants kaldrix,kaldrix-writer-task --rounds 3
    python bench/compare.py bench/scenarios/fanout-sweep.toml --variants kaldrix,websockets,socketio
    python bench/compare.py bench/scenarios/p99-25k.toml --variants kaldrix,kaldrix-redis,kaldrix-redis-2nodes
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
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEERS = ROOT / "bench" / "peers"
sys.path.insert(0, str(ROOT))

from kaldrix.bench._server import ServerProcess, wait_ready  # noqa: E402

KALDRIX_ENV = {
    "kaldrix": {},
    "kaldrix-writer-task": {"KALDRIX_DIRECT_WRITES": "false"},
    "kaldrix-no-latency": {"KALDRIX_RECORD_LATENCY": "false"},
    "kaldrix-redis": {},
    "kaldrix-redis-2nodes": {},
}
REDIS_VARIANTS = ("kaldrix-redis", "kaldrix-redis-2nodes")
BROKER_ENV = ("KALDRIX_BROKER", "KALDRIX_REDIS_PREFIX")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def pin_cpu0() -> list[str]:
    """`taskset -c 0` where there are two CPUs or more: the server side's core."""
    return ["taskset", "-c", "0"] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else []


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
        pin = pin_cpu0()
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


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Redis:
    """A redis-server for one run: no persistence, a temporary directory, pinned to CPU 0."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="kaldrix-redis-"))
        self.port = free_port()
        binary = os.environ.get("KALDRIX_REDIS_SERVER") or shutil.which("redis-server")
        if not binary:
            raise RuntimeError("the Redis variants need redis-server (apt-get install redis-server)")
        command = [
            *pin_cpu0(), binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(self.dir), "--loglevel", "warning",
        ]  # fmt: skip
        with open(self.dir / "redis.log", "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self._pong():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        stop_process(self.process)
        shutil.rmtree(self.dir, ignore_errors=True)


def start_node(env: dict[str, str]) -> tuple[int, subprocess.Popen]:
    """A `kaldrix serve` as the harness starts it (same flags, CPU 0), ready once /readyz
    says so (its broker is reachable); its port and process."""
    node = ServerProcess(cpu=0 if pin_cpu0() else None)
    process = subprocess.Popen(node.command(), env=env, stdin=subprocess.DEVNULL)
    try:
        wait_ready(process, "127.0.0.1", node.port)
    except RuntimeError:
        stop_process(process)
        raise
    return node.port, process


def bench_command(scenario: str, save: Path, extra: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "kaldrix", "bench", "--scenario", scenario, "--output", "json",
        "--log-level", "warning", "--save", str(save), "--hgrm", str(save.with_suffix(".hgrm")), *extra,
    ]  # fmt: skip


def run_variant(variant: str, scenario: str, save: Path, extra: list[str], peers: Peers | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in [*KALDRIX_ENV.values(), BROKER_ENV]:
        for key in name:
            env.pop(key, None)
    peer = None
    redis = None
    nodes: list[subprocess.Popen] = []
    command = bench_command(scenario, save, extra)
    if variant in REDIS_VARIANTS:
        redis = Redis()
        env.update(KALDRIX_BROKER=redis.url, KALDRIX_REDIS_PREFIX=f"kxbench-{uuid.uuid4().hex[:8]}")
        command += ["--label", variant, "--watch-pid", f"redis={redis.process.pid}"]
        if variant == "kaldrix-redis-2nodes":
            try:
                a_port, a = start_node(env)
                nodes.append(a)
                b_port, b = start_node(env)
                nodes.append(b)
            except RuntimeError:
                for node in nodes:
                    stop_process(node)
                redis.stop()
                raise
            command += [
                "--url", f"ws://127.0.0.1:{b_port}/ws", "--server-pid", str(b.pid),
                "--publish-url", f"ws://127.0.0.1:{a_port}/ws", "--watch-pid", f"node-a={a.pid}",
            ]  # fmt: skip
    elif variant in KALDRIX_ENV:
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
        for process in [*nodes, *([peer] if peer is not None else [])]:
            stop_process(process)
        if redis is not None:
            redis.stop()
    if done.returncode != 0:
        raise RuntimeError(f"{variant}: bench failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def figures(result: dict) -> dict:
    delivery, throughput, resources = result["eventDelivery"], result["throughput"], result["resources"]
    cpu = resources.get("serverCpu")
    rate = throughput["deliveriesPerSecond"]
    per_delivery = cpu / rate * 1e6 if cpu and rate else None
    watched = resources.get("watchedCpu") or {}
    # Everything on the server side: the subscribers' node, node A and Redis.
    side = cpu + sum(watched.values()) if cpu is not None else None
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
        "node A CPU": watched.get("node-a"),
        "redis CPU": watched.get("redis"),
        "server side CPU us/delivery": round(side / rate * 1e6, 1) if side and rate else None,
        "RSS KB/conn": round(resources["rssPerConnectionBytes"] / 1024, 1) if resources.get("rssPerConnectionBytes") else None,
        "generator CPU": resources["generatorCpu"],
    }
    if "maxCleanDeliveriesPerSecond" in result:
        out["max clean deliveries/s"] = result["maxCleanDeliveriesPerSecond"]
        out["max clean, kept up"] = result.get("maxKeptUpDeliveriesPerSecond")
    return out


def code_version() -> str:
    """The commit the servers ran (`git describe --dirty`): others may commit during a run."""
    done = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True, check=False)
    return done.stdout.strip() or "unknown"


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
    code_before = code_version()
    try:
        for round_ in range(1, args.rounds + 1):
            for variant in variants:
                load = os.getloadavg()[0]
                save = out / f"{variant}-{round_}.json"
                result = run_variant(variant, args.scenario, save, extra, peers)
                result["loadAverage"] = load
                result["loadAverageAfter"] = os.getloadavg()[0]
                save.write_text(json.dumps(result, indent=2) + "\n")
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
            ("server side CPU us/delivery", False),
        ):
            a, b = rows[base].get(key), rows[variant].get(key)
            if a and b:
                ratio = a / b if higher_is_better else b / a
                lines.append(f"- {key}, {base} vs {variant}: {ratio:.2f}x")
    loads = [f"{r['loadAverage']:.1f}-{r['loadAverageAfter']:.1f}" for rs in zip(*results.values(), strict=True) for r in rs]
    lines.append("- load average (1 min) before-after each run, in run order: " + ", ".join(loads))
    code_after = code_version()
    lines.append(f"- code: {code_before}" + ("" if code_after == code_before else f", then {code_after} (it changed during the run)"))
    if any(v in REDIS_VARIANTS for v in variants):
        binary = os.environ.get("KALDRIX_REDIS_SERVER") or shutil.which("redis-server") or "redis-server"
        reported = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout.split()
        versions["redis-server"] = next((w[2:] for w in reported if w.startswith("v=")), "unknown")
    if versions:
        lines.append("- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
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
