"""llamba replicas behind Ray Serve (llamba.cluster): throughput of N replicas vs one, and a replica killed under load.

    python bench/bench_cluster.py compare -m MODEL [--replicas 2] [--threads-per-replica 1] [-np 4]
        [--one-parallel NP] [--clients 8,8] [--duration 30] [--max-tokens 64] [--json FILE]
    python bench/bench_cluster.py kill -m MODEL [--replicas 2] [--clients 8] [--duration 40] [--kill-at 12]

compare: one local Ray cluster, two applications behind one HTTP proxy: /many (--replicas replicas) and /one (one
replica), each replica --threads-per-replica threads and -np slots; then bench/bench_serve.py with --url .../many
--compare-url .../one (the two measured alternately, level by level, so background load hits both alike; idle
replicas wait without using a CPU). Ray is told the machine has replicas+1 CPUs x threads so both applications fit;
only one of them runs at a time. Also printed: the CPU seconds each Ray process used during the run.

kill: one application of --replicas replicas; --clients clients send requests back to back (even clients streaming
chat, odd ones non-streamed chat, --max-tokens each, 4 conversations per client so prefix affinity is used), and
--kill-at seconds in, one replica is killed (ray.kill; Ray Serve starts a new one). Reported: requests by outcome;
the rule is that a non-streamed request, or a streamed one that had received nothing yet, must still be answered,
and a stream cut in the middle must end with an error event (data: {"error": ...}); and the time until the
deployment is back to --replicas replicas.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _uptime() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def _ray_cpu() -> dict:
    """CPU seconds used so far by this machine's Ray processes, by process title (ray::ProxyActor,
    ray::ServeReplica:APP:DEPLOYMENT, raylet, gcs_server, ...)."""
    try:
        import psutil
    except ImportError:
        return {}
    out: dict = {}
    for p in psutil.process_iter(["cmdline", "name"]):
        try:
            cmd = p.info["cmdline"] or []
            title = cmd[0] if cmd else (p.info["name"] or "")
            if title.startswith("ray::"):
                key = title.split()[0].split(".")[0]
            elif "ray" in " ".join(cmd[:2]) and ("raylet" in title or "gcs_server" in title):
                key = os.path.basename(title)
            else:
                continue
            t = p.cpu_times()
            out[key] = out.get(key, 0.0) + t.user + t.system
        except (psutil.Error, IndexError):
            continue
    return out


def _cpu_report(before: dict, after: dict, wall: float):
    rows = sorted(((after.get(k, 0.0) - before.get(k, 0.0), k) for k in after), reverse=True)
    print(f"CPU used by Ray processes over {wall:.0f} s (seconds, % of one core):", file=sys.stderr)
    for dt, k in rows:
        if dt >= 0.05:
            print(f"  {dt:8.1f} s {100 * dt / wall:6.1f}%  {k}", file=sys.stderr)


def _start(a, n_cpus: int):
    import ray
    ray.init(num_cpus=n_cpus, include_dashboard=False, log_to_driver=False)


def _llama_kw(a) -> dict:
    return {"n_ctx": a.ctx}


def cmd_compare(a) -> int:
    import bench_serve
    import ray
    from ray import serve
    from llamba import cluster
    port = a.port or _free_port()
    t = a.threads_per_replica
    _start(a, (a.replicas + 1) * t)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for name, n, np_ in (("many", a.replicas, a.parallel), ("one", 1, a.one_parallel or a.parallel)):
            app = cluster.deployment(a.model, replicas=n, threads_per_replica=t, n_parallel=np_,
                                     llama_kwargs=_llama_kw(a), stream_interval=a.stream_interval)
            serve.run(app, name=name, route_prefix=f"/{name}")
            if not cluster.wait_replicas(n, timeout=300, name=name):
                raise SystemExit(f"{name}: the replicas did not start")
        base = f"http://127.0.0.1:{port}"
        print(f"load before: {_uptime()}", file=sys.stderr)
        argv = ["--url", f"{base}/many", "--label", f"{a.replicas}x{t}t-np{a.parallel}", "--compare-url", f"{base}/one",
                "--compare-label", f"1x{t}t-np{a.one_parallel or a.parallel}", "--clients", a.clients, "--duration", str(a.duration),
                "--max-tokens", str(a.max_tokens)]
        if a.json:
            argv += ["--json", a.json]
        c0, t0 = _ray_cpu(), time.monotonic()
        rc = bench_serve.main(argv)
        _cpu_report(c0, _ray_cpu(), time.monotonic() - t0)
        print(f"load after: {_uptime()}", file=sys.stderr)
        return rc
    finally:
        serve.shutdown()
        ray.shutdown()


# ---------------------------------------------------------------- kill under load

_WORDS = ("river", "market", "harbour", "cathedral", "university", "merchant", "flood", "bridge")


def _one(host, port, body: dict, timeout: float = 300.0) -> dict:
    """One chat request; {kind, status, got (bytes of content before the end), outcome, replica, retried}."""
    t0 = time.perf_counter()
    out = {"stream": bool(body.get("stream")), "status": None, "chunks": 0, "outcome": None, "replica": None,
           "retried": None, "t": 0.0}
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        c.request("POST", "/v1/chat/completions", body=json.dumps(body),
                  headers={"content-type": "application/json"})
        r = c.getresponse()
        out["status"] = r.status
        out["replica"] = r.getheader("x-llamba-replica")
        out["retried"] = r.getheader("x-llamba-retried-from")
        if r.status != 200:
            r.read()
            out["outcome"] = f"http {r.status}"
            return out
        if not out["stream"]:
            d = json.loads(r.read())
            out["outcome"] = "ok" if d.get("choices") else "bad body"
            return out
        done = False
        error = None
        buf = b""
        while True:
            line = r.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                break
            ev = json.loads(data)
            if "error" in ev:
                error = ev["error"]
                break
            out["chunks"] += 1
        if done:
            out["outcome"] = "ok"
        elif error is not None:
            out["outcome"] = "cut with error event" if out["chunks"] else "error event before any chunk"
            out["error"] = error.get("message")
        else:
            out["outcome"] = "cut without error event"
        return out
    except (OSError, http.client.HTTPException, ValueError) as e:
        out["outcome"] = f"exception {type(e).__name__}"
        return out
    finally:
        out["t"] = time.perf_counter() - t0
        c.close()


def cmd_kill(a) -> int:
    import ray
    from ray import serve
    from llamba import cluster
    port = a.port or _free_port()
    _start(a, a.replicas * a.threads_per_replica)
    try:
        app = cluster.deployment(a.model, replicas=a.replicas, threads_per_replica=a.threads_per_replica,
                                 n_parallel=a.parallel, llama_kwargs=_llama_kw(a))
        cluster.run(app, port=port)
        if not cluster.wait_replicas(a.replicas, timeout=300):
            raise SystemExit("the replicas did not start")
        print(f"load before: {_uptime()}", file=sys.stderr)
        results: list = []
        lock = threading.Lock()
        stop = time.monotonic() + a.duration

        def client(ci: int):
            k = 0
            while time.monotonic() < stop:
                conv = f"Conversation {ci}.{k % 4}: tell me about the {_WORDS[(ci + k) % len(_WORDS)]}."
                body = {"messages": [{"role": "user", "content": conv}], "max_tokens": a.max_tokens,
                        "temperature": 0, "stream": ci % 2 == 0}
                r = _one("127.0.0.1", port, body)
                r["t_end"] = time.monotonic()
                with lock:
                    results.append(r)
                k += 1

        ths = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(a.clients)]
        t0 = time.monotonic()
        for th in ths:
            th.start()
        time.sleep(a.kill_at)
        st = serve.status().applications[cluster.APP_NAME].deployments["LlambaReplica"]
        victim = cluster.replica_names()[0]
        t_kill = time.monotonic()
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        print(f"killed {victim} at {t_kill - t0:.1f} s (replicas were {st.replica_states})", file=sys.stderr)
        back = cluster.wait_replicas(a.replicas, timeout=300, gone=[victim])
        t_back = time.monotonic() - t_kill
        print(f"back to {a.replicas} replicas: {back} after {t_back:.1f} s", file=sys.stderr)
        for th in ths:
            th.join(600)
        print(f"load after: {_uptime()}", file=sys.stderr)
        vic_id = victim.rsplit("#", 1)[-1]
        summary: dict = {}
        for r in results:
            key = ("stream" if r["stream"] else "whole") + ": " + r["outcome"]
            if r["outcome"] == "ok" and r["retried"]:
                key += " (retried on another replica)"
            summary[key] = summary.get(key, 0) + 1
        for k in sorted(summary):
            print(f"  {summary[k]:5d}  {k}")
        lost = [r for r in results if r["outcome"] != "ok" and not (r["stream"] and r["chunks"] > 0
                                                                     and r["outcome"] == "cut with error event")]
        on_victim = sum(1 for r in results if (r["replica"] or "").endswith(vic_id) or r["retried"] == vic_id)
        print(f"requests {len(results)}, involving the killed replica {on_victim}, lost (not streaming yet, or "
              f"cut without an error event): {len(lost)}; recovered to {a.replicas} replicas in {t_back:.1f} s")
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"summary": summary, "lost": lost, "recovered_s": t_back, "victim": victim,
                           "load": _uptime()}, f, indent=1)
        return 1 if lost or not back else 0
    finally:
        serve.shutdown()
        ray.shutdown()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("compare", "kill"):
        p = sub.add_parser(name)
        p.add_argument("-m", "--model", required=True)
        p.add_argument("--replicas", type=int, default=2)
        p.add_argument("--threads-per-replica", type=int, default=1)
        p.add_argument("-np", "--parallel", type=int, default=4)
        p.add_argument("-c", "--ctx", type=int, default=4096)
        p.add_argument("--max-tokens", type=int, default=64)
        p.add_argument("--port", type=int, default=0)
        p.add_argument("--json")
        p.add_argument("--stream-interval", type=float, default=0.05,
                       help="seconds a replica gathers a stream's events into one Ray object (default 0.05)")
        if name == "compare":
            p.add_argument("--clients", default="8,8")
            p.add_argument("--one-parallel", type=int, default=0,
                           help="-np of the single replica (default: the same as -np)")
            p.add_argument("--duration", type=float, default=30.0)
        else:
            p.add_argument("--clients", type=int, default=8)
            p.add_argument("--duration", type=float, default=40.0)
            p.add_argument("--kill-at", type=float, default=12.0)
    a = ap.parse_args(argv)
    a.model = os.path.abspath(os.path.expanduser(a.model))
    return cmd_compare(a) if a.cmd == "compare" else cmd_kill(a)


if __name__ == "__main__":
    sys.exit(main())
