#!/usr/bin/env python3
"""User-space instructions per request of one or more Portico binaries,
counted by callgrind: repeatable to a fraction of a percent whatever else
the machine is doing, where CPU time is not. For A/B comparisons of a
change (docs/benchmarks.md), never for comparing with nginx.

    python3 bench/callgrind.py --portico A=target/release/portico \\
        --portico B=/tmp/portico-before [--nginx] [--seconds 5] [--out DIR]

Each binary runs `portico ingress` under valgrind with instrumentation
off, in front of the benchmark's two nginx replicas and a Tower; after a
warm-up, instrumentation is switched on for one wrk run per cell and off
again, and the instructions are divided by the responses. --nginx counts
nginx as a proxy the same way (one process, the benchmark's proxy
configuration with master_process off), for where a gap in user time
lies; instructions are not time, so this is no CPU comparison. Cells:
  keep-alive 50     GET over 50 keep-alive connections (our HTTP/1.1 client)
  close 10          GET with a new connection per request
  post keep-alive   POST with a 1 KiB body over 10 connections (hyper's
                    client)
Needs valgrind (callgrind_control), wrk, nginx and taskset.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

POST_LUA = """
wrk.method = "POST"
wrk.body = string.rep("p", 1024)
wrk.headers["Content-Type"] = "application/octet-stream"
"""

CELLS = [
    ("keep-alive 50", 50, False, None),
    ("close 10", 10, True, None),
    ("post keep-alive 10", 10, False, "post"),
]


def run_wrk(port, conns, seconds, close, script, cpu):
    argv = ["taskset", "-c", cpu, "wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--timeout", "5s"]
    if close:
        argv += ["-H", "Connection: close"]
    if script:
        argv += ["-s", script]
    argv.append(f"http://127.0.0.1:{port}/")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60).stdout
    found = re.search(r"(\d+) requests in", out)
    if not found:
        raise RuntimeError(f"wrk printed no result: {out!r}")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return int(found.group(1)) - (int(non2xx.group(1)) if non2xx else 0)


def instructions(out_file):
    """Total Ir of a callgrind output file (its `totals:` line; `summary:`
    is 0 in a part written by a dump)."""
    with open(out_file) as f:
        for line in f:
            if line.startswith("totals:"):
                return int(line.split()[1])
    raise RuntimeError(f"no totals in {out_file}")


def portico_argv(portico, tower):
    def argv(port, work):
        return [portico, "ingress", "--listen", f"127.0.0.1:{port}",
                "--tower", f"127.0.0.1:{tower.port}", "--route", f"/:{tower.service}",
                "--threads", "1", "--admin", "off", "--log-level", "warn"]
    return argv


def nginx_argv(backend_ports):
    def argv(port, work):
        d = os.path.join(work, f"nginx-{port}")
        os.makedirs(os.path.join(d, "tmp"), exist_ok=True)
        conf = os.path.join(d, "nginx.conf")
        bench.render("proxy.nginx.conf.in", conf, NOFILE=4096, WORKERS=1, CONNS=4000,
                     PORT=port, B1=backend_ports[0], B2=backend_ports[1], LISTEN="", TLS="")
        # One process, so that valgrind counts the one serving the requests.
        with open(conf) as f:
            text = f.read().replace("master_process on;", "master_process off;")
        with open(conf, "w") as f:
            f.write(text)
        return ["nginx", "-p", d, "-c", "nginx.conf"]
    return argv


def measure(name, proxy_argv, work, args):
    port = bench.free_port()
    out_file = os.path.join(work, f"callgrind.{name}.out")
    argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={out_file}"] + proxy_argv(port, work)
    proc = bench.Proc(argv, args.proxy_cpu)
    results = {}
    try:
        bench.wait_listening(port, proc, within=60)
        post = os.path.join(work, "post.lua")
        with open(post, "w") as f:
            f.write(POST_LUA)
        for cell, conns, close, script in CELLS:
            script = post if script else None
            run_wrk(port, conns, 2, close, script, args.load_cpu)  # warm-up
            before = dumped(proc, out_file)
            subprocess.run(["callgrind_control", "-i", "on", str(proc.p.pid)],
                           capture_output=True, check=True)
            ok = run_wrk(port, conns, args.seconds, close, script, args.load_cpu)
            subprocess.run(["callgrind_control", "-i", "off", str(proc.p.pid)],
                           capture_output=True, check=True)
            after = dumped(proc, out_file)
            results[cell] = (after - before) / max(ok, 1)
    finally:
        proc.stop()
    return results


def dumped(proc, out_file):
    """Instructions counted so far: dump, and add up every part file."""
    subprocess.run(["callgrind_control", "-d", str(proc.p.pid)],
                   capture_output=True, check=True)
    total = 0
    d, base = os.path.split(out_file)
    for f in os.listdir(d):
        if f.startswith(base):
            try:
                total += instructions(os.path.join(d, f))
            except RuntimeError:
                pass
    return total


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--portico", action="append", required=True, help="NAME=PATH, repeatable")
    p.add_argument("--nginx", action="store_true", help="count nginx too")
    p.add_argument("--seconds", type=int, default=5)
    p.add_argument("--rounds", type=int, default=1, help="alternate the binaries this many times")
    p.add_argument("--proxy-cpu", default="0")
    p.add_argument("--load-cpu", default="1")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    work = args.out or tempfile.mkdtemp(prefix="portico-callgrind-")
    os.makedirs(work, exist_ok=True)
    binaries = [b.split("=", 1) for b in args.portico]
    nofile = 4096
    backend_ports = [bench.free_port(), bench.free_port()]
    backends = []
    for i, port in enumerate(backend_ports, 1):
        d = os.path.join(work, f"backend{i}")
        os.makedirs(os.path.join(d, "tmp"), exist_ok=True)
        bench.render("backend.nginx.conf.in", os.path.join(d, "nginx.conf"), NOFILE=nofile,
                     CONNS=nofile - 100, PORT=port, NAME=f"b{i}", BODY="x" * 100)
        proc = bench.Proc(["nginx", "-p", d, "-c", "nginx.conf"], args.load_cpu)
        bench.wait_listening(port, proc)
        backends.append(proc)
    tower = bench.Tower(binaries[0][1], args.load_cpu, backend_ports)
    proxies = [(name, portico_argv(path, tower)) for name, path in binaries]
    if args.nginx:
        proxies.append(("nginx", nginx_argv(backend_ports)))
    table = {}
    try:
        for r in range(args.rounds):
            for name, argv in proxies:
                res = measure(f"{name}.{r}", argv, work, args)
                for cell, ir in res.items():
                    table.setdefault(cell, {}).setdefault(name, []).append(ir)
                    print(f"{name} round {r + 1}: {cell}: {ir / 1000:.2f}k instructions/request",
                          flush=True)
    finally:
        tower.stop()
        for b in backends:
            b.stop()
    print()
    print("| cell | " + " | ".join(n for n, _ in proxies) + " |")
    print("|---|" + "---|" * len(proxies))
    for cell, by in table.items():
        row = [", ".join(f"{v / 1000:.2f}k" for v in by.get(n, [])) for n, _ in proxies]
        print(f"| {cell} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
