"""Serving throughput and latency with and without batching, and a bounded load-and-fault soak.

    python benchmarks/serving.py                          # 1, 2, 4, 8 clients x batching off/on, demo model
    python benchmarks/serving.py --clients 1 2 --requests 2 --steps 5 --out /tmp/x   # a quick look
    python benchmarks/serving.py --clients 1 --requests 10 --name serving_one_client  # a lone client's cost
    python benchmarks/serving.py --soak                   # a few hundred requests, a kill -9 and restart

Everything runs on the loopback: `cinemo-rt serve` as a child process (batching off = --max-batch 1, on =
--max-batch 4 with the default padding or --exact-batching: see cinemo_rt/serve/runner.py), closed-loop clients (each submits a request,
waits for it, submits the next). Latency is submit-to-done as the client sees it; throughput is videos
finished per minute of wall time. Each server's first request is a warm-up and not counted. A UNet call's
cost by its rows is measured in-process first. Results go to <out>/serving.md and serving.json, atomically.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from cinemo_rt.defaults import EXAMPLE_IMAGE  # noqa: E402
from cinemo_rt.serve.client import FINAL, ApiError, Client, JobFailed, ServerProcess  # noqa: E402
from cinemo_rt.video import read_video  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PROMPTS = ("the camera pans left", "the camera pans right", "the camera zooms in", "a boat drifting on the sea")
# mode -> server flags: batching off; on (the default padding: to the next power of two rows, so a lone request
# pays for none); on with batched videos bit-equal to alone (every UNet call padded to 2 x max batch rows)
BATCHING = {"off": ("--max-batch", "1"), "on": ("--max-batch", "4"),
            "on, exact": ("--max-batch", "4", "--exact-batching")}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run_load(url: str, clients: int, requests_per_client: int, steps: int, image: bytes) -> dict:
    """Closed loop: every client submits, waits for done, repeats. Returns latencies and throughput."""
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def one_client(index: int) -> None:
        client = Client(url)
        rng = random.Random(index)
        for _ in range(requests_per_client):
            start = time.perf_counter()
            try:
                job = client.submit(image, rng.choice(PROMPTS), steps=steps, seed=rng.randrange(2**31),
                                    bucket=rng.randrange(20))
                client.wait(job, poll=0.02, max_poll=0.02)
            except (ApiError, JobFailed) as err:
                with lock:
                    failures.append(str(err))
                continue
            with lock:
                latencies.append(time.perf_counter() - start)
        client.close()

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one_client, range(clients)))
    wall = time.perf_counter() - start
    return {"clients": clients, "videos": len(latencies), "failures": failures, "wall_s": wall,
            "videos_per_min": 60 * len(latencies) / wall, "p50_s": percentile(latencies, 50),
            "p95_s": percentile(latencies, 95), "latencies_s": latencies}


def merge_rounds(rounds: list[dict]) -> dict:
    """One row from several rounds of the same mode and client count: videos over the summed wall time."""
    latencies = [x for r in rounds for x in r["latencies_s"]]
    wall = sum(r["wall_s"] for r in rounds)
    return {"clients": rounds[0]["clients"], "videos": len(latencies), "rounds": len(rounds),
            "failures": [f for r in rounds for f in r["failures"]], "wall_s": wall,
            "videos_per_min": 60 * len(latencies) / wall, "p50_s": percentile(latencies, 50),
            "p95_s": percentile(latencies, 95)}


def unet_cost_by_rows(rows_list=(2, 4, 8, 16), rounds: int = 15) -> dict[int, float]:
    """Median milliseconds of one UNet call of the demo model by its rows (a request is 2 rows with CFG),
    in-process, the sizes interleaved round by round so that a change of the machine's load hits them all."""
    import torch

    from cinemo_rt.serve.runner import Runner

    runner = Runner.open()
    backend, size = runner.backend, runner.defaults
    h, w = size.height // backend.info.vae_factor, size.width // backend.info.vae_factor
    c, text_dim = backend.info.latent_channels, backend.info.text_dim
    times: dict[int, list[float]] = {rows: [] for rows in rows_list}
    with torch.no_grad():
        for round_index in range(rounds + 1):
            for rows in rows_list:
                inputs = (torch.randn(rows, c, size.frames, h, w), torch.full((rows,), 500),
                          torch.randn(rows, 77, text_dim), torch.randn(rows, c, 1, h, w), torch.full((rows,), 90.0))
                start = time.perf_counter()
                backend.unet(*inputs)
                if round_index:  # the first round is warm-up
                    times[rows].append(1000 * (time.perf_counter() - start))
    return {rows: statistics.median(values) for rows, values in times.items()}


def lone_request_s(steps: int, rounds: int = 5) -> dict[str, float]:
    """Median seconds of one request served alone (prepare, every step, decode) by the runner in-process, with
    batching off, on (the default padding) and on with exact batching, the modes interleaved round by round."""
    from cinemo_rt.image import load_image
    from cinemo_rt.request import Request
    from cinemo_rt.serve.runner import Runner

    image = load_image(EXAMPLE_IMAGE)
    off = Runner.open(max_batch=1)
    runners = {"off": off, "on": Runner(off.animator, max_batch=4),
               "on, exact": Runner(off.animator, max_batch=4, exact=True)}
    request = Request(prompt=PROMPTS[0], seed=1, steps=steps).resolve(off.defaults)
    times: dict[str, list[float]] = {mode: [] for mode in runners}
    for round_index in range(rounds + 1):
        for mode, runner in runners.items():
            start = time.perf_counter()
            segment = runner.prepare(image, request)
            while not segment.done:
                runner.step([segment])
            runner.finish(segment)
            if round_index:  # the first round is warm-up
                times[mode].append(time.perf_counter() - start)
    return {mode: statistics.median(values) for mode, values in times.items()}


def benchmark(args) -> dict:
    """All modes' servers start first and idle while another runs; the modes then take turns at each client
    count, so each comparison is made minutes apart at most on a machine whose load changes."""
    image = Path(EXAMPLE_IMAGE).read_bytes()
    unet_ms = unet_cost_by_rows()
    print("UNet call, median ms by rows:", {k: round(v, 1) for k, v in unet_ms.items()}, flush=True)
    lone = lone_request_s(args.steps)
    print("one request alone, in-process, median s:", {k: round(v, 3) for k, v in lone.items()}, flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        servers = {}
        try:
            for index, (mode, flags) in enumerate(BATCHING.items()):
                servers[mode] = ServerProcess(Path(scratch) / str(index) / "jobs", *flags,
                                              "--max-wait-ms", str(args.max_wait_ms), "--max-queue", "64")
                run_load(servers[mode].url, 1, 1, args.steps, image)  # warm-up
            for clients in args.clients:
                # Round by round, each mode in turn (one request per client per round): a change of the shared
                # machine's load hits every mode alike.
                rounds = {mode: [] for mode in servers}
                for _ in range(args.requests):
                    for mode, server in servers.items():
                        rounds[mode].append(run_load(server.url, clients, 1, args.steps, image))
                for mode, done in rounds.items():
                    row = {**merge_rounds(done), "batching": mode}
                    rows.append(row)
                    print(f"batching {mode:13} clients {clients}: {row['videos_per_min']:6.1f} videos/min, "
                          f"p50 {row['p50_s']:.2f} s, p95 {row['p95_s']:.2f} s", flush=True)
        finally:
            for server in servers.values():
                server.kill()
    return {"rows": rows, "unet_ms_by_rows": unet_ms, "lone_request_s": lone}


def soak(args) -> dict:
    """A few hundred requests (valid and invalid) from concurrent clients, with a kill -9 and restart of the
    server in the middle. Every accepted job must end in a final state, every finished video must decode."""
    image = Path(EXAMPLE_IMAGE).read_bytes()
    invalid = [dict(steps=0), dict(bucket=25), dict(frames=4096, height=512, width=512), dict(format="avi"),
               dict(segments=99), "not an image"]
    accepted: list[str] = []
    rejected: dict[int, int] = {}
    latencies: list[float] = []
    lock = threading.Lock()
    jobs = Path(args.jobs or tempfile.mkdtemp(prefix="cinemo-soak-")) / "jobs"
    server = {"url": None}
    server_up = threading.Event()
    stop_at = time.monotonic() + args.soak_seconds

    def one_client(index: int) -> None:
        rng = random.Random(1000 + index)
        sent = 0
        while sent < args.soak_requests // args.soak_clients and time.monotonic() < stop_at:
            server_up.wait()
            client = Client(server["url"])
            bad = rng.random() < 0.3
            choice = rng.choice(invalid) if bad else {}
            try:
                start = time.perf_counter()
                try:
                    if choice == "not an image":
                        job = client.submit(b"GIF89a but not really", "x", steps=args.steps)
                    else:
                        job = client.submit(image, rng.choice(PROMPTS), seed=rng.randrange(2**31),
                                            **{"steps": args.steps, **choice})
                except ApiError as err:
                    sent += 1
                    with lock:
                        rejected[err.status] = rejected.get(err.status, 0) + 1
                    if err.status == 429:  # queue full: back off as told (bounded)
                        time.sleep(min(err.retry_after or 1, 2.0))
                    continue
                sent += 1
                with lock:
                    accepted.append(job.id)
                if client.wait(job, timeout=args.soak_seconds, check=False).state == "done":
                    with lock:
                        latencies.append(time.perf_counter() - start)
            except (httpx.TransportError, ApiError, TimeoutError):
                time.sleep(0.2)  # the server is being restarted; try again
            finally:
                client.close()

    flags = ("--max-batch", "4", "--max-queue", str(args.soak_queue))
    process = ServerProcess(jobs, *flags)
    try:
        server["url"] = process.url
        server_up.set()
        with ThreadPoolExecutor(args.soak_clients) as pool:
            futures = [pool.submit(one_client, i) for i in range(args.soak_clients)]
            kill_at = time.monotonic() + args.soak_seconds / 2
            half = args.soak_requests // 2
            while len(accepted) + sum(rejected.values()) < half and time.monotonic() < kill_at:
                time.sleep(0.05)
            server_up.clear()
            process.kill()  # SIGKILL in the middle of the work
            killed_after = len(accepted)
            process = ServerProcess(jobs, *flags, port=process.port)
            server_up.set()
            for future in futures:
                future.result()
        client = process.client()
        states: dict[str, int] = {}
        reasons: dict[str, int] = {}
        undecodable = []
        not_final = []
        for job_id in accepted:
            try:
                job = client.status(job_id)
            except ApiError:
                job = None
            state = job.state if job else "missing"
            states[state] = states.get(state, 0) + 1
            if state not in FINAL:
                not_final.append(job_id)
            if state == "failed":
                reasons[job.error] = reasons.get(job.error, 0) + 1
            if state == "done":
                with tempfile.NamedTemporaryFile(suffix=".mp4") as handle:
                    handle.write(client.video(job_id))
                    handle.flush()
                    try:
                        frames = read_video(handle.name)
                        assert frames.shape[0] > 1
                    except Exception as err:  # noqa: BLE001 - counted and reported
                        undecodable.append(f"{job_id}: {err}")
        metrics = client.http.get("/metrics").text
    finally:
        process.kill()
    return {"steps": args.steps, "sent": len(accepted) + sum(rejected.values()), "accepted": len(accepted),
            "accepted_before_kill": killed_after, "rejected_by_status": rejected, "final_states": states,
            "failure_reasons": reasons,
            "not_final": not_final, "undecodable": undecodable, "p50_s": percentile(latencies, 50),
            "p95_s": percentile(latencies, 95), "p99_s": percentile(latencies, 99),
            "metrics_sample": [line for line in metrics.splitlines() if line.startswith("cinemo_jobs")]}


def environment() -> dict:
    import torch

    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "load_average": os.getloadavg(), "python": platform.python_version(), "torch": torch.__version__,
            "command": "python benchmarks/serving.py " + shlex.join(sys.argv[1:])}


def to_markdown(report: dict) -> str:
    env = report["environment"]
    title = "load-and-fault soak" if "soak" in report else "throughput and latency"
    lines = [f"# Serving: {title} (demo model, CPU, loopback)", "",
             f"`{env['command']}`, {env['date']}; {env['machine']}, load average at the start "
             f"{', '.join(f'{x:.1f}' for x in env['load_average'])} (a shared machine: other jobs ran too); "
             f"Python {env['python']}, torch {env['torch']}.", ""]
    if "rows" in report:
        lines += [f"Each client runs {report['requests']} requests back to back ({report['steps']} steps, "
                  "32x32, 8 frames, guidance 7.5), one per round, the modes taking turns round by round; "
                  "latency is submit-to-done.", "",
                  "| batching | clients | videos/min | p50 latency (s) | p95 latency (s) | failures |",
                  "|---|---:|---:|---:|---:|---:|"]
        for row in report["rows"]:
            lines.append(f"| {row['batching']} | {row['clients']} | {row['videos_per_min']:.1f} | "
                         f"{row['p50_s']:.2f} | {row['p95_s']:.2f} | {len(row['failures'])} |")
        one = {row["batching"]: row["videos_per_min"] for row in report["rows"] if row["clients"] == 1}
        if {"off", "on", "on, exact"} <= set(one):
            lines += ["", f"One client: `--max-batch 4` gets {one['on'] / one['off']:.2f}x the throughput of "
                      f"`--max-batch 1` with the default padding, {one['on, exact'] / one['off']:.2f}x with "
                      "`--exact-batching`."]
        lone = report.get("lone_request_s")
        if lone:
            lines += ["", "One request served alone by the runner in-process (no HTTP, no polling; median of 5, the "
                      "modes interleaved): " + ", ".join(f"{mode} {sec:.3f} s" for mode, sec in lone.items())
                      + f"; `--max-batch 4` at {lone['off'] / lone['on']:.2f}x the speed of `--max-batch 1` "
                      f"(exact: {lone['off'] / lone['on, exact']:.2f}x)."]
        unet = report["unet_ms_by_rows"]
        lines += ["", "One UNet call of the demo model by its rows (a guided request is 2 rows), median ms, the sizes "
                  "interleaved in one process: " + ", ".join(f"{rows} rows {ms:.1f} ms" for rows, ms in unet.items())
                  + ". Per row: " + ", ".join(f"{ms / int(rows):.1f}" for rows, ms in unet.items()) + " ms."]
    if "soak" in report:
        s = report["soak"]
        lines += [f"Valid and invalid requests ({s['steps']} steps each), a kill -9 and restart in the middle.", "",
                  f"- sent {s['sent']}, accepted {s['accepted']} ({s['accepted_before_kill']} before the kill), "
                  f"rejected by status {s['rejected_by_status']}",
                  f"- final states of accepted jobs: {s['final_states']}; failure reasons: {s['failure_reasons']}",
                  f"- jobs not in a final state: {len(s['not_final'])}; finished videos that do not decode: "
                  f"{len(s['undecodable'])}",
                  f"- latency of completed jobs: p50 {s['p50_s']:.2f} s, p95 {s['p95_s']:.2f} s, "
                  f"p99 {s['p99_s']:.2f} s"]
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--requests", type=int, default=3,
                        help="requests per client per mode, in as many rounds (the modes take turns each round)")
    parser.add_argument("--steps", type=int, default=25, help="denoising steps per request")
    parser.add_argument("--max-wait-ms", type=float, default=50.0)
    parser.add_argument("--soak", action="store_true", help="run the load-and-fault soak instead")
    parser.add_argument("--soak-requests", type=int, default=300)
    parser.add_argument("--soak-clients", type=int, default=12)
    parser.add_argument("--soak-queue", type=int, default=6, help="the soak server's --max-queue (small: "
                        "some requests meet 429)")
    parser.add_argument("--soak-seconds", type=float, default=600.0, help="upper bound on the soak's duration")
    parser.add_argument("--jobs", default=None, help="jobs folder for the soak (default: a temporary one)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--name", default=None,
                        help="file name of the results, without suffix (default serving, or serving_soak)")
    args = parser.parse_args(argv)
    report = {"environment": environment(), "steps": args.steps, "requests": args.requests}
    name = args.name or ("serving_soak" if args.soak else "serving")
    if args.soak:
        report["soak"] = soak(args)
    else:
        report.update(benchmark(args))
    out = Path(args.out)
    write_atomically(out / f"{name}.json", json.dumps(report, indent=2) + "\n")
    write_atomically(out / f"{name}.md", to_markdown(report))
    print(to_markdown(report))
    if args.soak:
        s = report["soak"]
        return 0 if not s["not_final"] and not s["undecodable"] else 1
    return 0 if all(not row["failures"] for row in report["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
