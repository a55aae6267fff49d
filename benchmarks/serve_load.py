"""Load test of `ddim-fast serve` (issue 24): dynamic batching under open-loop Poisson arrivals.

    python -m benchmarks.serve_load            # digits, a 10-step plan: ~5 minutes
    python -m benchmarks.serve_load --quick    # a seconds-long smoke run (3 steps, 1 s per rate; a test runs it)

The server runs as a subprocess (`python -m ddim_fast.cli serve --port 0`, 127.0.0.1, the bundled digits model,
backend auto) twice: batching off (--max-batch 1) and on (--max-batch 16). Clients are threads of this process,
at most --workers at once, on 127.0.0.1 only; every request asks for one image (n = 1) of its own seed.
  idle       single requests one after another on each idle server: the latency of one request alone
  capacity   closed loop (--closed clients, each sending its next request when the last is answered) for one
             duration: the throughput each server sustains; batching off's is C1, "the unbatched capacity"
  open loop  Poisson arrivals at RATES x C1, each rate for --duration seconds, on both servers: p50/p95/p99
             latency (from each request's scheduled arrival, so a client-side backlog counts), throughput,
             errors, 503s, and the rows per batch (the server's /metrics histogram, before and after)
  overload   10 x C1 on the batching server: every request must get 200 or 503, and the server's RSS
             (/proc/<pid>/status VmRSS, sampled) must stay bounded
Goals (the issue): capacity with batching >= 3 x C1; at 2 x C1 with batching, p99 <= 3 x the idle latency and
0 errors; at 10 x C1 every request answered and memory bounded. Prints a table; writes JSON (machine, load
averages) and a PNG of p50/p99 against offered load to benchmarks/results/serve-load-<machine>-<date>.*.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.common import machine_info, machine_tag, result_path, write_json

ROOT = Path(__file__).resolve().parents[1]
RATES = (0.5, 1.0, 1.5, 2.0, 3.0)  # offered load, in multiples of the unbatched capacity C1
OVERLOAD = 10.0
GOAL_BATCHING = 3.0  # capacity with batching / without
GOAL_P99 = 3.0  # p99 at 2 x C1 / idle latency
RSS_GROWTH_MB = 100.0  # "bounded": the peak RSS of the overload run at most this far above its start


# -- the server ------------------------------------------------------------------------------------------------
class Server:
    """`ddim-fast serve` in a subprocess on a free port; .port, .pid, .backend, .rss_mb(), .stop() -> exit code."""

    def __init__(self, *, steps, max_batch, max_wait_ms, max_queue, backend):
        cmd = [sys.executable, "-m", "ddim_fast.cli", "serve", "--model", "digits", "--steps", str(steps),
               "--port", "0", "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms),
               "--max-queue", str(max_queue), "--max-n", "1", "--backend", backend, "--no-progress"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.pid, self.lines, self.port, self.backend = self.proc.pid, [], None, None
        deadline = time.time() + 180
        while self.port is None:
            line = self.proc.stderr.readline()
            if not line or time.time() > deadline:
                self.proc.kill()
                raise RuntimeError("the server did not start:\n" + "".join(self.lines))
            self.lines.append(line)
            m = re.search(r"backend (\w+)", line)
            self.backend = self.backend or (m and m.group(1))
            m = re.match(r"serving on http://127\.0\.0\.1:(\d+)$", line.strip())
            self.port = m and int(m.group(1))
        threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True).start()

    def rss_mb(self) -> float | None:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def batch_rows(self) -> dict[int, int]:
        """Cumulative batches by rows from /metrics: {rows: batches with at most that many rows}."""
        text = request(self.port, "GET", "/metrics")[1]
        out = {}
        for m in re.finditer(r'ddim_fast_batch_rows_bucket\{le="([0-9.]+)"\} ([0-9.e+]+)', text):
            out[int(float(m.group(1)))] = int(float(m.group(2)))
        return out

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def request(port, method, path, body=None, timeout=120.0):
    """(status, body text) of one request on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


def generate(port, seed) -> int | str:
    """The status of one n = 1 request, or the exception's name."""
    try:
        return request(port, "POST", "/v1/images/generations", json.dumps({"n": 1, "seed": seed}))[0]
    except Exception as e:  # noqa: BLE001 - counted as an error
        return type(e).__name__


def histogram(before: dict, after: dict) -> dict[str, int]:
    """Batches per rows between two /metrics reads (cumulative buckets -> counts; empty rows left out)."""
    out, last = {}, 0
    for rows in sorted(after):
        cum = after[rows] - before.get(rows, 0)
        if cum - last:
            out[str(rows)] = cum - last
        last = cum
    return out


def pct(values, q):
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q / 100 * len(s))) - 1))]


# -- the measurements ----------------------------------------------------------------------------------------
def idle(server, count) -> dict:
    for s in range(3):
        generate(server.port, 10**9 + s)
    lat = []
    for s in range(count):
        t0 = time.perf_counter()
        assert generate(server.port, s) == 200
        lat.append(time.perf_counter() - t0)
    return {"requests": count, "p50_ms": 1e3 * statistics.median(lat), "p99_ms": 1e3 * pct(lat, 99),
            "mean_ms": 1e3 * statistics.fmean(lat)}


def closed_loop(server, clients, duration) -> dict:
    stop, done, errors = time.perf_counter() + duration, [], []
    t0 = time.perf_counter()

    def client(k):
        seed = k * 10**6
        while time.perf_counter() < stop:
            seed += 1
            status = generate(server.port, seed)
            (done if status == 200 else errors).append(time.perf_counter())

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = max(done, default=time.perf_counter()) - t0
    return {"clients": clients, "seconds": elapsed, "ok": len(done), "errors": len(errors),
            "throughput_rps": len(done) / elapsed}


def open_loop(server, rate, duration, workers, seed, rss_every=None) -> dict:
    """Poisson arrivals at `rate` per second for `duration` seconds (scheduled in advance: open loop)."""
    rng = random.Random(seed)
    arrivals, t = [], rng.expovariate(rate)
    while t < duration:
        arrivals.append(t)
        t += rng.expovariate(rate)
    before, load0 = server.batch_rows(), os.getloadavg()[0]
    rss, sampling = [], threading.Event()

    def sample_rss():
        while not sampling.wait(rss_every):
            rss.append(server.rss_mb())

    if rss_every:
        rss.append(server.rss_mb())
        threading.Thread(target=sample_rss, daemon=True).start()
    t0 = time.perf_counter() + 0.05

    def one(i, at):
        status = generate(server.port, seed * 10**7 + i)
        return at, time.perf_counter(), status

    futures = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, a in enumerate(arrivals):
            delay = t0 + a - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            futures.append(pool.submit(one, i, t0 + a))
    results = [f.result() for f in futures]
    sampling.set()
    if rss_every:
        rss.append(server.rss_mb())
    ok = [end - at for at, end, st in results if st == 200]
    last = max((end for _, end, _ in results), default=t0)
    statuses = [st for _, _, st in results]
    row = {"offered_rps": rate, "seconds": duration, "sent": len(results), "ok": len(ok),
           "rejected_503": statuses.count(503), "errors": sum(1 for s in statuses if s not in (200, 503)),
           "error_kinds": sorted({str(s) for s in statuses if s not in (200, 503)}),
           "throughput_rps": len(ok) / max(last - t0, 1e-9),
           "p50_ms": ok and 1e3 * pct(ok, 50), "p95_ms": ok and 1e3 * pct(ok, 95), "p99_ms": ok and 1e3 * pct(ok, 99),
           "batch_rows": histogram(before, server.batch_rows()), "load_average": [load0, os.getloadavg()[0]]}
    hist = row["batch_rows"]
    row["mean_rows_per_batch"] = (sum(int(k) * v for k, v in hist.items()) / sum(hist.values())) if hist else None
    if rss_every:
        row["rss_mb"] = [round(r, 1) for r in rss if r is not None]
    return row


# -- report ------------------------------------------------------------------------------------------------------
def table(result) -> str:
    lines = ["| batching | offered (x C1) | offered req/s | throughput req/s | p50 ms | p95 ms | p99 ms | 200 | 503 | "
             "errors | mean rows/batch |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"] + [result["overload"]]:
        lines.append(f"| {r['mode']} | {r['multiple']:g} | {r['offered_rps']:.1f} | {r['throughput_rps']:.1f} | "
                     f"{_ms(r['p50_ms'])} | {_ms(r['p95_ms'])} | {_ms(r['p99_ms'])} | {r['ok']} | "
                     f"{r['rejected_503']} | {r['errors']} | {r['mean_rows_per_batch'] or 0:.1f} |")
    return "\n".join(lines)


def _ms(v):
    return f"{v:.0f}" if v else "-"


def plot(result, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for mode, color in (("on", "tab:blue"), ("off", "tab:red")):
        rows = [r for r in result["runs"] if r["mode"] == mode and r["p50_ms"]]
        x = [r["multiple"] for r in rows]
        ax.plot(x, [r["p50_ms"] for r in rows], "o-", color=color, label=f"batching {mode}: p50")
        ax.plot(x, [r["p99_ms"] for r in rows], "s--", color=color, label=f"batching {mode}: p99")
    idle_ms = idle_latency(result)
    ax.axhline(GOAL_P99 * idle_ms, color="grey", lw=0.8, ls=":",
               label=f"{GOAL_P99:g} x idle latency ({idle_ms:.0f} ms)")
    ax.set_yscale("log")
    c1 = result["capacity"]["off"]["throughput_rps"]
    ax.set_xlabel(f"offered load (x the unbatched capacity C1 = {c1:.1f} req/s)")
    ax.set_ylabel("latency (ms, log)")
    ax.set_title(f"ddim-fast serve, digits, {result['steps']} steps, {result['backend']} ({result['machine_tag']})",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def idle_latency(result) -> float:
    """The goal's "single request on an idle server": the smaller of the two servers' idle medians (ms)."""
    return min(result["idle"]["on"]["p50_ms"], result["idle"]["off"]["p50_ms"])


def goals(result) -> dict:
    cap = result["capacity"]
    ratio = cap["on"]["throughput_rps"] / cap["off"]["throughput_rps"]
    at2 = next(r for r in result["runs"] if r["mode"] == "on" and r["multiple"] == 2.0)
    idle_ms = idle_latency(result)
    over = result["overload"]
    rss = over.get("rss_mb") or [0]
    growth = max(rss) - rss[0]
    return {
        "batching_capacity": {"ratio": ratio, "goal": GOAL_BATCHING, "met": ratio >= GOAL_BATCHING},
        "p99_at_2x": {"p99_ms": at2["p99_ms"], "idle_ms": idle_ms, "ratio": (at2["p99_ms"] or 0) / idle_ms,
                      "errors": at2["errors"], "rejected_503": at2["rejected_503"], "goal": GOAL_P99,
                      "met": bool(at2["p99_ms"]) and at2["p99_ms"] <= GOAL_P99 * idle_ms and at2["errors"] == 0
                      and at2["rejected_503"] == 0},
        "overload": {"answered": over["ok"] + over["rejected_503"], "sent": over["sent"], "errors": over["errors"],
                     "rss_start_mb": rss[0], "rss_peak_mb": max(rss), "rss_growth_mb": growth,
                     "goal_rss_growth_mb": RSS_GROWTH_MB,
                     "met": over["errors"] == 0 and over["ok"] + over["rejected_503"] == over["sent"]
                     and growth <= RSS_GROWTH_MB},
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 steps, 1 s per rate: a smoke run")
    ap.add_argument("--steps", type=int, default=None, help="plan steps (default 10; 3 with --quick)")
    ap.add_argument("--duration", type=float, default=None, help="seconds per rate (default 15; 1 with --quick)")
    ap.add_argument("--max-batch", type=int, default=16, help="the batching server's --max-batch")
    ap.add_argument("--max-wait-ms", type=float, default=5.0, help="the batching server's --max-wait-ms")
    ap.add_argument("--max-queue", type=int, default=64, help="both servers' --max-queue (rows)")
    ap.add_argument("--workers", type=int, default=128, help="client threads at most")
    ap.add_argument("--closed", type=int, default=48, help="closed-loop clients for the capacity runs")
    ap.add_argument("--backend", default="auto", help="the servers' --backend")
    ap.add_argument("--out", default=None, help="JSON path (default: results/serve-load-<machine>-<date>.json); "
                    "the PNG is written beside it")
    args = ap.parse_args(argv)
    steps = args.steps or (3 if args.quick else 10)
    duration = args.duration or (1.0 if args.quick else 15.0)
    rates = (1.0, 2.0) if args.quick else RATES
    info = machine_info()
    out = Path(args.out) if args.out else result_path("serve-load", info)
    result = {"date": info["date"], "machine": info, "machine_tag": machine_tag(info), "quick": args.quick,
              "model": "digits", "steps": steps, "duration_s": duration, "max_batch": args.max_batch,
              "max_wait_ms": args.max_wait_ms, "max_queue": args.max_queue, "workers": args.workers,
              "closed_clients": args.closed, "load_average": {"before": os.getloadavg()[0]},
              "idle": {}, "capacity": {}, "runs": [], "exit_codes": {}}
    servers = {}
    try:
        for mode, mb in (("off", 1), ("on", args.max_batch)):  # one server at a time on the machine
            srv = servers[mode] = Server(steps=steps, max_batch=mb, max_wait_ms=0 if mb == 1 else args.max_wait_ms,
                                         max_queue=args.max_queue, backend=args.backend)
            result["backend"] = srv.backend
            result["idle"][mode] = idle(srv, 5 if args.quick else 30)
            result["capacity"][mode] = closed_loop(srv, 4 if mode == "off" else args.closed, duration)
            print(f"batching {mode}: idle p50 {result['idle'][mode]['p50_ms']:.1f} ms, capacity "
                  f"{result['capacity'][mode]['throughput_rps']:.1f} req/s (load {os.getloadavg()[0]:.2f})", flush=True)
            c1 = result["unbatched_capacity_rps"] = result["capacity"]["off"]["throughput_rps"]
            for k, m in enumerate(rates):
                row = {"mode": mode, "multiple": m, **open_loop(srv, m * c1, duration, args.workers, seed=100 + k)}
                result["runs"].append(row)
                print(f"batching {mode} at {m:g} x C1 ({m * c1:.1f} req/s): p50 {_ms(row['p50_ms'])} ms, p99 "
                      f"{_ms(row['p99_ms'])} ms, {row['throughput_rps']:.1f} req/s, 503: {row['rejected_503']}, "
                      f"errors {row['errors']}, mean rows/batch {row['mean_rows_per_batch'] or 0:.1f} "
                      f"(load {os.getloadavg()[0]:.2f})", flush=True)
            if mode == "on":
                over = open_loop(srv, OVERLOAD * c1, duration, args.workers, seed=999, rss_every=0.25)
                result["overload"] = {"mode": "on", "multiple": OVERLOAD, **over}
                print(f"overload {OVERLOAD:g} x C1: {over['ok']} 200, {over['rejected_503']} 503, {over['errors']} "
                      f"errors of {over['sent']}; RSS {over['rss_mb'][0]:.0f} -> peak {max(over['rss_mb']):.0f} MB",
                      flush=True)
            result["exit_codes"][mode] = srv.stop()
    finally:
        for s in servers.values():
            if s.proc.poll() is None:
                s.proc.kill()
    result["load_average"]["after"] = os.getloadavg()[0]
    result["goals"] = goals(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    png = plot(result, out.with_suffix(".png"))
    print()
    print(table(result))
    g = result["goals"]
    print(f"\nbatching capacity {g['batching_capacity']['ratio']:.2f} x unbatched (goal >= {GOAL_BATCHING:g}): "
          f"{'met' if g['batching_capacity']['met'] else 'NOT met'}")
    print(f"p99 at 2 x C1 {_ms(g['p99_at_2x']['p99_ms'])} ms = {g['p99_at_2x']['ratio']:.2f} x idle "
          f"{g['p99_at_2x']['idle_ms']:.1f} ms, {g['p99_at_2x']['errors']} errors (goal <= {GOAL_P99:g} x, 0 errors): "
          f"{'met' if g['p99_at_2x']['met'] else 'NOT met'}")
    print(f"overload: {g['overload']['answered']} of {g['overload']['sent']} answered, RSS growth "
          f"{g['overload']['rss_growth_mb']:.1f} MB: {'met' if g['overload']['met'] else 'NOT met'}")
    print(f"load average {result['load_average']['before']:.2f} before, {result['load_average']['after']:.2f} after")
    print(f"-> {out}" + (f", {png}" if png else ""))
    return result


if __name__ == "__main__":
    main()
