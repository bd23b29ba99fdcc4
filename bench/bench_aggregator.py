"""Aggregator benchmark: sustained accepted updates/s for a full float32 update of the real model.

The model is a real export at the default size (V=8000, E=96, H=256: 1.16M parameters), made in a
temporary folder the way an operator makes one, `fedkb data prepare --dataset shakespeare` then
`fedkb export` (~15 s; or --model DIR). So publishing a version does what it does in production:
the flatbuffer weight rewrite of trainable.tflite and the int8 re-quantization of inference.tflite.
Starts a real `fedkb serve` on loopback and drives it with many concurrent clients (threads with
their own HTTP sessions); every client checks in, gets a task and uploads a full float32 update.
Prints, per configuration:
    - accepted updates/s, p50/p99 upload latency;
    - the server's peak RSS with 10 and with 1,000 updates per round (must not grow with the count);
    - the ratio of the time per accepted update to a bare numpy add of the same update (the floor
      of any streaming sum) and to an fsync'd write of its bytes (the floor of a durable accept);
    - the time from a round's last accepted update to its new version being downloadable (its
      manifest served and every file in it downloaded), and the server's own publish time;
    - where the CPU went while the clients ran: the server's and the load generator's CPU time per
      accepted update (the load generator shares the machine with the server, so it is part of
      what is measured), the rate at which the two would keep every core busy, and how many cores
      other processes (including kernel threads) took meanwhile: on a shared machine, read the
      rate next to that figure;
    - where a client's time went per upload: check-in, retry-after waits, building the body, the
      upload itself.

Usage:
    python bench/bench_aggregator.py                 # both round sizes, 1 process and 2 gunicorn workers
    python bench/bench_aggregator.py --updates 300 --clients 8 --quick
    python bench/bench_aggregator.py --model runs/model   # reuse an export (its manifest's shapes)
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import resource
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SECRET, ADMIN = "bench-secret", "bench-admin"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UpdateFactory:
    """Builds safetensors update bodies by hand around one shared data block (cheap per upload)."""

    def __init__(self, shapes: dict, seed: int = 0):
        rng = np.random.default_rng(seed)
        arrays = {k: (0.01 * rng.normal(size=s)).astype(np.float32) for k, s in sorted(shapes.items())}
        offset, self.entries, blocks = 0, {}, []
        for name, a in arrays.items():
            self.entries[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
            offset += a.nbytes
            blocks.append(a.tobytes())
        self.data = b"".join(blocks)
        self.num_params = sum(a.size for a in arrays.values())
        self.example = arrays

    def body(self, task: dict, device_id: str, num_examples: int = 100) -> bytes:
        meta = {"round_id": str(task["round_id"]), "model_version": str(task["model_version"]), "device_id": device_id,
                "num_examples": str(num_examples), "clip_norm": str(task["clip_norm"]), "update_norm": "0.5",
                "encoding": "float32"}
        header = json.dumps({"__metadata__": meta, **self.entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        return struct.pack("<Q", len(header)) + header + self.data


def _fedkb(*args: str) -> None:
    """Run one `fedkb` command as an operator would (its output goes to this one's)."""
    subprocess.run([sys.executable, "-m", "fedkb", "--quiet", *args], cwd=REPO, check=True)


def export_default_model(root: Path) -> Path:
    """A default-size model version with its TFLite files, exported into `root`."""
    _fedkb("data", "prepare", "--dataset", "shakespeare", "--out", str(root / "data"))
    _fedkb("export", "--data", str(root / "data"), "--out", str(root / "model"))
    return root / "model"


def model_shapes(model: Path) -> dict[str, tuple[int, ...]]:
    from fedkb_core.manifest import load_manifest

    return {w.name: tuple(w.shape) for w in load_manifest(model).weights}


class Server:
    def __init__(self, state: Path, model: Path, *, goal: int, workers: int, log: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "fedkb", "serve", "--state", str(state), "--init-model", str(model),
               "--port", str(self.port), "--workers", str(workers), "--goal-clients", str(goal), "--min-clients", "1",
               "--round-timeout", "3600", "--clip-norm", "10", "--device-max-examples", "1000",
               "--retry-after", "0.05", "--retry-jitter", "0.5"]
        env = {**os.environ, "FEDKB_ENROLLMENT_SECRET": SECRET, "FEDKB_ADMIN_TOKEN": ADMIN}
        self.log = open(log, "wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.url}/v1/status", timeout=1).ok:
                    return
            except requests.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError(f"server did not start; see {log}")

    def pids(self) -> list[int]:
        out = [self.proc.pid]
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        if children.exists():
            out += [int(p) for p in children.read_text().split()]
        return out

    def peak_rss_mb(self) -> float:
        """Largest VmHWM among the server's processes (the master and each gunicorn worker)."""
        peaks = []
        for pid in self.pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peaks.append(int(line.split()[1]) / 1024)
            except FileNotFoundError:
                pass
        return max(peaks)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _process_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by the live processes among `pids`."""
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _machine_busy() -> float:
    """CPU seconds all processes on the machine have used since boot (from /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _drive(url: str, factory: UpdateFactory, *, updates: int, clients: int, server_pids=lambda: []) -> dict:
    """`updates` devices, `clients` concurrent: check in until a task, then upload once.

    Besides throughput and latency, measures over the upload phase only (enrollment excluded):
    CPU seconds of this process (the load generator), of the server's processes, and of the
    whole machine, and per-phase wall time of the clients.
    """
    session = requests.Session()
    devices = []
    for _ in range(updates):
        r = session.post(f"{url}/v1/devices", json={"enrollment_secret": SECRET})
        r.raise_for_status()
        devices.append(r.json())
    work: queue.Queue = queue.Queue()
    for d in devices:
        work.put(d)
    latencies, accepted, refused, close_marks = [], [0], {}, []
    lock = threading.Lock()
    state = {"bytes": 0}
    phases = {"checkin": 0.0, "retry_wait": 0.0, "build_body": 0.0, "upload": 0.0}

    def client():
        http = requests.Session()
        while True:
            try:
                device = work.get_nowait()
            except queue.Empty:
                return
            headers = {"Authorization": f"Bearer {device['token']}"}
            checkin = wait = 0.0
            while True:
                t0 = time.perf_counter()
                answer = http.post(f"{url}/v1/checkin", headers=headers,
                                   json={"state": {"idle": True, "charging": True, "unmetered": True, "battery": 80}}).json()
                checkin += time.perf_counter() - t0
                if answer["action"] == "train":
                    break
                time.sleep(answer["retry_after"])
                wait += answer["retry_after"]
            t0 = time.perf_counter()
            body = factory.body(answer["task"], device["device_id"])
            start = time.perf_counter()
            r = http.post(f"{url}/v1/rounds/{answer['task']['round_id']}/updates", data=body,
                          headers={**headers, "Content-Type": "application/octet-stream"})
            elapsed = time.perf_counter() - start
            with lock:
                for key, seconds in (("checkin", checkin), ("retry_wait", wait), ("build_body", start - t0),
                                     ("upload", elapsed)):
                    phases[key] += seconds
                if r.status_code == 200:
                    latencies.append(elapsed)
                    accepted[0] += 1
                    state["bytes"] += len(body)
                    close_marks.append(time.perf_counter())
                else:
                    code = r.json().get("error", str(r.status_code))
                    refused[code] = refused.get(code, 0) + 1
                    work.put(device)  # round closed under it: check in again

    cpu0 = (_self_cpu(), _process_cpu(server_pids()), _machine_busy())
    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    cpu1 = (_self_cpu(), _process_cpu(server_pids()), _machine_busy())
    client_cpu, server_cpu, machine_cpu = (b - a for a, b in zip(cpu0, cpu1))
    last_accept = max(close_marks)
    return {"wall": wall, "latencies": latencies, "accepted": accepted[0], "refused": refused,
            "last_accept": last_accept, "bytes": state["bytes"], "client_cpu_s": client_cpu,
            "server_cpu_s": server_cpu, "other_cpu_s": max(0.0, machine_cpu - client_cpu - server_cpu),
            "phases_s": phases}


def _time_to_download(url: str, version: int, since: float) -> float:
    """Seconds from `since` (perf_counter of the last accept) until version `version` is served:
    its manifest, then every file it lists, downloaded as a device would."""
    while True:
        manifest = requests.get(f"{url}/v1/models/latest").json()
        if manifest["version"] >= version:
            for name in manifest["files"]:
                requests.get(f"{url}/v1/models/{manifest['version']}/{name}").raise_for_status()
            return time.perf_counter() - since
        time.sleep(0.005)


def _floors(factory: UpdateFactory, tmp: Path) -> dict:
    acc = np.zeros(factory.num_params, np.float64)
    flat = np.frombuffer(factory.data, np.float32)
    reps = 50
    start = time.perf_counter()
    for _ in range(reps):
        acc += flat
    add = (time.perf_counter() - start) / reps
    start = time.perf_counter()
    for i in range(10):
        with open(tmp / f"floor{i}", "wb") as f:
            f.write(factory.data)
            f.flush()
            os.fsync(f.fileno())
    fsync = (time.perf_counter() - start) / 10
    for i in range(10):
        (tmp / f"floor{i}").unlink()
    return {"numpy_add_s": add, "fsync_write_s": fsync}


def run_case(tmp: Path, factory: UpdateFactory, model: Path, *, goal: int, updates: int, clients: int,
             workers: int, floors: dict) -> dict:
    state = tmp / f"state-{goal}-{workers}"
    server = Server(state, model, goal=goal, workers=workers, log=tmp / f"serve-{goal}-{workers}.log")
    try:
        rss_idle = server.peak_rss_mb()
        result = _drive(server.url, factory, updates=updates, clients=clients, server_pids=server.pids)
        versions = 1 + updates // goal
        download = _time_to_download(server.url, versions, result["last_accept"])
        status = requests.get(f"{server.url}/v1/admin/status", headers={"Authorization": f"Bearer {ADMIN}"}).json()
        latest = requests.get(f"{server.url}/v1/models/latest").json()["files"]
        rss_peak = server.peak_rss_mb()
    finally:
        server.stop()
    lat = sorted(result["latencies"])
    per_update = result["wall"] / result["accepted"]
    publish = [r["publish_seconds"] for r in status["rounds"] if r["publish_seconds"] is not None]
    n = result["accepted"]
    initial = json.loads((model / "manifest.json").read_text())["files"]
    rewritten = sorted(name for name in initial if name.endswith(".tflite")
                       and latest.get(name, {}).get("sha256") != initial[name]["sha256"])
    return {
        "goal_clients": goal, "workers": workers, "clients": clients, "accepted": result["accepted"],
        "refused": result["refused"], "updates_per_s": result["accepted"] / result["wall"],
        "mb_per_s": result["bytes"] / result["wall"] / 1e6,
        "p50_ms": 1000 * lat[len(lat) // 2], "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "rss_idle_mb": rss_idle, "rss_peak_mb": rss_peak,
        "x_numpy_add": per_update / floors["numpy_add_s"], "x_fsync_write": per_update / floors["fsync_write_s"],
        "last_accept_to_downloadable_s": download,
        "publish_s_median": statistics.median(publish) if publish else None,
        "tflite_rewritten": rewritten,
        "versions_published": status["model_version"] - 1,
        "server_cpu_ms_per_update": 1000 * result["server_cpu_s"] / n,
        "client_cpu_ms_per_update": 1000 * result["client_cpu_s"] / n,
        "other_processes_cores": result["other_cpu_s"] / result["wall"],
        "client_ms_per_update": {k: 1000 * v / n for k, v in result["phases_s"].items()},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=1000, help="uploads per configuration")
    parser.add_argument("--clients", type=int, default=16, help="concurrent client threads")
    parser.add_argument("--quick", action="store_true", help="one process only, skip the gunicorn case")
    parser.add_argument("--model", type=Path, default=None,
                        help="a folder written by `fedkb export` (default: export the default size in a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="fedkb-bench-") as tmp_name:
        tmp = Path(tmp_name)
        if args.model is None:
            started = time.perf_counter()
            model = export_default_model(tmp)
            print(f"exported the default-size model with `fedkb export` in {time.perf_counter() - started:.0f} s")
        else:
            model = args.model
        factory = UpdateFactory(model_shapes(model))
        files = ", ".join(f"{p.name} {p.stat().st_size / 1e6:.2f} MB" for p in sorted(model.glob("*.tflite")))
        floors = _floors(factory, tmp)
        print(f"model {model}: {files or 'NO TFLite files (the publish then rewrites none)'}")
        print(f"update: {factory.num_params:,} float32 parameters ({len(factory.data) / 1e6:.1f} MB); "
              f"numpy add {1000 * floors['numpy_add_s']:.2f} ms, fsync'd write {1000 * floors['fsync_write_s']:.1f} ms")
        cases = [(10, 1), (args.updates, 1)] + ([] if args.quick else [(args.updates, 2)])
        results = []
        for goal, workers in cases:
            r = run_case(tmp, factory, model, goal=goal, updates=args.updates, clients=args.clients, workers=workers,
                         floors=floors)
            results.append(r)
            print(f"goal {goal:>5}/round, {workers} process{'es' if workers > 1 else ''}, {args.clients} clients: "
                  f"{r['updates_per_s']:6.1f} updates/s ({r['mb_per_s']:.0f} MB/s), p50 {r['p50_ms']:.0f} ms, "
                  f"p99 {r['p99_ms']:.0f} ms, peak RSS {r['rss_peak_mb']:.0f} MB (idle {r['rss_idle_mb']:.0f}), "
                  f"{r['x_numpy_add']:.0f}x numpy add, {r['x_fsync_write']:.2f}x fsync'd write; "
                  f"last accept -> v{r['versions_published'] + 1} downloadable {r['last_accept_to_downloadable_s']:.3f} s "
                  f"(publish {r['publish_s_median']:.3f} s, rewrote {', '.join(r['tflite_rewritten']) or 'no TFLite file'}); "
                  f"refused {r['refused'] or 'none'}")
            phases = ", ".join(f"{k} {v:.1f}" for k, v in r["client_ms_per_update"].items())
            cpu_ms = r["server_cpu_ms_per_update"] + r["client_cpu_ms_per_update"]
            print(f"    CPU per accepted update: server {r['server_cpu_ms_per_update']:.1f} ms + load generator "
                  f"{r['client_cpu_ms_per_update']:.1f} ms (all {os.cpu_count()} cores busy at "
                  f"{1000 * os.cpu_count() / cpu_ms:.0f} updates/s); other processes took "
                  f"{r['other_processes_cores']:.2f} cores meanwhile; a client's ms per accepted upload: {phases}")
        if args.json:
            args.json.write_text(json.dumps({"floors": floors, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
