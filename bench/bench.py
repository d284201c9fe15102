#!/usr/bin/env python3
"""Portico's benchmark: Portico next to nginx, HAProxy and no proxy at all
("direct"), on this machine, in the same run. Standard library only.

Layout: the proxy under test is pinned to one core (--proxy-cpu); wrk, the
load generator and the two backend replicas (nginx, one worker each) share
another (--load-cpu). Every proxy gets one worker thread or process.

Measured, each with the proxy started fresh:
  cells    wrk closed-loop load at 1, 50, 500, 2000 connections, keep-alive and
           a new connection per request: requests/s, the proxy's CPU time per
           request (utime+stime from /proc, over its processes, and the two
           apart: user and kernel time), p50/p99.
  latency  a fixed request rate (portico-loadgen rate): p50/p99/p99.9, with
           no coordinated omission; the same rate for every proxy, in
           --latency-rounds interleaved samples, reported as medians.
  memory   10,000 idle keep-alive connections held (portico-loadgen idle):
           resident memory per connection, and the time to answer a request
           on a new connection meanwhile.
  churn    Portico under keep-alive load with a registration change every
           100 ms, against the same load without.
  lookup   Portico in the seed's per-request LOOKUP mode (CPU includes the
           Tower's).
  tls      wrk over https, keep-alive (--tls-conns): each proxy terminating
           TLS with the same self-signed ECDSA P-256 certificate, plain
           HTTP/1.1 to the same replicas: requests/s and CPU per request.
  h2       h2load over h2c (HTTP/2 by prior knowledge, no TLS), --h2-conns
           connections of --h2-streams concurrent streams each, HTTP/1.1 to
           the same replicas: requests/s and CPU per request.
  nagle    one connection to python3's http.server (head and body in two
           writes, Nagle on), direct and through each proxy: a proxy that
           delays its ACK of the head stalls each reused connection's
           request by the delayed-ACK timer.
  compression  a 20 KiB HTML page (bench/conf/page.py) from an nginx
           backend, through Portico --compress and through nginx with
           `gzip on` and its Brotli filter at the same levels: bytes on the
           wire and CPU per response, for gzip, br, zstd (Portico only)
           and none; each body checked against the page.
  discovery  per registry size (--discovery-sizes endpoints over a tenth as
           many services), a Tower watched by four ingresses: the CPU each
           spends per registration change (schedstat, less an idle window),
           the bytes the Tower sends per change, the time from a REGISTER
           to the new replica answering through an ingress, and the
           Tower's CPU per heartbeat datagram.

Writes DIR/results.json, DIR/summary.md and DIR/chart.svg.
"""

import argparse
import datetime
import gzip
import http.client
import http.server
import json
import os
import platform
import random
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CLK = os.sysconf("SC_CLK_TCK")
SERVICE = "bench"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


class Proc:
    """A process started in its own session, stopped with its children."""

    def __init__(self, argv, cpu, cwd=None, stdout=subprocess.DEVNULL):
        self.argv = argv
        self.p = subprocess.Popen(
            ["taskset", "-c", cpu] + argv,
            cwd=cwd,
            stdout=stdout,
            stderr=subprocess.DEVNULL if stdout == subprocess.DEVNULL else None,
            start_new_session=True,
        )

    def pids(self):
        """This process and its descendants."""
        children = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(d))
            except OSError:
                continue
        out, todo = [], [self.p.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo.extend(children.get(pid, []))
        return out

    def stop(self):
        if self.p.poll() is not None:
            return
        try:
            os.killpg(self.p.pid, signal.SIGTERM)
            self.p.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.p.wait()


def cpu_seconds(pids):
    """(user, kernel) CPU seconds over `pids` so far."""
    user = kernel = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user += int(fields[11])
            kernel += int(fields[12])
        except OSError:
            pass
    return user / CLK, kernel / CLK


def rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def listening(port):
    want = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                for line in f.readlines()[1:]:
                    parts = line.split()
                    if parts[1].endswith(want) and parts[3] == "0A":
                        return True
        except OSError:
            pass
    return False


def wait_listening(port, proc=None, within=10):
    deadline = time.time() + within
    while not listening(port):
        if proc is not None and proc.p.poll() is not None:
            raise RuntimeError(f"{proc.argv[0]} exited with {proc.p.returncode}")
        if time.time() > deadline:
            raise RuntimeError(f"nothing listens on port {port} after {within} s")
        time.sleep(0.02)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render(template, out, **values):
    with open(os.path.join(HERE, "conf", template)) as f:
        text = f.read()
    for k, v in values.items():
        text = text.replace(f"@{k}@", str(v))
    with open(out, "w") as f:
        f.write(text)


class Tower:
    """A Portico Tower with the replicas registered (and kept so)."""

    def __init__(self, portico, cpu, backends, service=SERVICE):
        self.service = service
        self.port = free_port()
        self.proc = Proc([portico, "tower", "--listen", f"127.0.0.1:{self.port}",
                          "--log-level", "warn"], cpu)
        wait_listening(self.port, self.proc)
        self.backends = backends
        self.stop_flag = threading.Event()
        self.paused = set()
        for b in backends:
            self.send(f"REGISTER|{service}|127.0.0.1|{b}")
        self.thread = threading.Thread(target=self.heartbeat, daemon=True)
        self.thread.start()

    def send(self, msg):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(1)
            for _ in range(5):
                s.sendto(msg.encode(), ("127.0.0.1", self.port))
                try:
                    return s.recv(65536).decode()
                except socket.timeout:
                    continue
        raise RuntimeError(f"the Tower does not answer {msg}")

    def heartbeat(self):
        while not self.stop_flag.wait(5):
            for b in self.backends:
                if b not in self.paused:
                    self.send(f"REGISTER|{self.service}|127.0.0.1|{b}")

    def stop(self):
        self.stop_flag.set()
        self.proc.stop()


def parse_duration_us(text):
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    if not m:
        return None
    v = float(m.group(1))
    return v * {"us": 1, "ms": 1e3, "s": 1e6}[m.group(2)]


def wrk(port, conns, seconds, close, cpu, threads=1, headers=(), scheme="http"):
    # wrk takes whole seconds.
    seconds = max(1, round(seconds))
    argv = ["taskset", "-c", cpu, "wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s",
            "--latency", "--timeout", "2s"]
    if close:
        argv += ["-H", "Connection: close"]
    for h in headers:
        argv += ["-H", h]
    argv.append(f"{scheme}://127.0.0.1:{port}/")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60).stdout
    found = re.search(r"(\d+) requests in", out)
    if not found:
        raise RuntimeError(f"wrk printed no result: {out!r}")
    requests = int(found.group(1))
    non2xx = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    sock = 0
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        sock = sum(int(x) for x in m.groups())
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    return {
        "requests": requests,
        "ok": requests - non2xx,
        "non2xx": non2xx,
        "socket_errors": sock,
        "p50_us": parse_duration_us(lat.get("50", "")),
        "p99_us": parse_duration_us(lat.get("99", "")),
    }


def h2load(port, conns, streams, seconds, cpu):
    """h2load over h2c for `seconds` (or, with seconds None, a warm-up of
    1,000 requests on one connection): requests, 2xx, failures."""
    argv = ["taskset", "-c", cpu, "h2load", "-t1", f"-c{conns}", f"-m{streams}", "-T2"]
    argv += [f"-D{max(1, round(seconds))}"] if seconds else ["-n1000"]
    argv.append(f"http://127.0.0.1:{port}/")
    out = subprocess.run(argv, capture_output=True, text=True,
                         timeout=(seconds or 10) + 60).stdout
    req = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                    r"(\d+) failed, (\d+) errored, (\d+) timeout", out)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    took = re.search(r"finished in ([\d.]+)(ms|s)", out)
    if not (req and codes and took):
        raise RuntimeError(f"h2load printed no result: {out!r}")
    done, failed, errored, timeout = (int(req.group(i)) for i in (3, 5, 6, 7))
    ok, other = int(codes.group(1)), sum(int(codes.group(i)) for i in (2, 3, 4))
    proto = m.group(1) if (m := re.search(r"Application protocol: (\S+)", out)) else "?"
    times = re.search(r"time for request:\s+\S+\s+(\S+)\s+(\S+)", out)
    return {
        "requests": done,
        "ok": ok,
        # From the status counts, not done less 2xx: a response whose
        # status came in as -D ended is counted there and not in done.
        "non2xx": other,
        # Requests still in flight when -D ends are neither done nor failed.
        "socket_errors": failed + errored + timeout,
        "protocol": proto,
        "seconds": float(took.group(1)) / (1000 if took.group(2) == "ms" else 1),
        "max_us": parse_duration_us(times.group(1)) if times else None,
        "mean_us": parse_duration_us(times.group(2)) if times else None,
    }


def tls_session(port):
    """What an OpenSSL client (as wrk is) negotiates with the listener on
    `port`: protocol, cipher suite, key exchange group."""
    out = subprocess.run(["openssl", "s_client", "-brief", "-connect", f"127.0.0.1:{port}"],
                         input="", capture_output=True, text=True, timeout=30)
    text = out.stdout + out.stderr

    def field(name):
        m = re.search(rf"^{name}: (.+)$", text, re.M)
        return m.group(1).strip() if m else "?"
    return {"tls_protocol": field("Protocol version"), "cipher": field("Ciphersuite"),
            "group": field("Server Temp Key")}


def make_certificate(d):
    """One self-signed ECDSA P-256 certificate for 127.0.0.1 that every
    proxy serves: (cert, key, both in one file for HAProxy)."""
    os.makedirs(d, exist_ok=True)
    cert, key, both = (os.path.join(d, f) for f in ("cert.pem", "key.pem", "both.pem"))
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "7", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", key, "-out", cert], capture_output=True, check=True, timeout=30)
    with open(both, "w") as f:
        for part in (cert, key):
            with open(part) as g:
                f.write(g.read())
    return cert, key, both


class Bench:
    def __init__(self, args):
        self.a = args
        self.work = os.path.abspath(os.path.join(args.out, "work"))
        os.makedirs(self.work, exist_ok=True)
        self.results = {"cells": [], "latency": [], "memory": [], "churn": None, "nagle": [],
                        "compression": [], "discovery": [], "tls": [], "h2": []}
        self.certificate = None
        body = "x" * args.body_bytes
        self.backend_ports = [free_port(), free_port()]
        self.backends = []
        for i, port in enumerate(self.backend_ports, 1):
            d = os.path.join(self.work, f"backend{i}")
            os.makedirs(os.path.join(d, "tmp"), exist_ok=True)
            render("backend.nginx.conf.in", os.path.join(d, "nginx.conf"), NOFILE=args.nofile,
                   CONNS=args.nofile - 100, PORT=port, NAME=f"b{i}", BODY=body)
            p = Proc(["nginx", "-p", d, "-c", "nginx.conf"], args.load_cpu)
            wait_listening(port, p)
            self.backends.append(p)
        self.tower = Tower(args.portico, args.proxy_cpu, self.backend_ports)

    def stop(self):
        self.tower.stop()
        for b in self.backends:
            b.stop()

    def start(self, name, tower=None, b1=None, b2=None, front="http"):
        """Start proxy `name` fresh, in front of the two nginx replicas or
        the given ones, its clients speaking `front`: http (HTTP/1.1), tls
        (HTTP/1.1 over TLS) or h2c: (port, Proc or None)."""
        a = self.a
        if front == "tls" and self.certificate is None:
            self.certificate = make_certificate(os.path.join(self.work, "tls"))
        cert, key, both = self.certificate or (None, None, None)
        tower = tower or self.tower
        b1, b2 = b1 or self.backend_ports[0], b2 or self.backend_ports[1]
        if name == "direct":
            return b1, None
        port = free_port()
        d = os.path.join(self.work, name)
        os.makedirs(os.path.join(d, "tmp"), exist_ok=True)
        if name in ("portico", "portico-lookup"):
            # h2c needs no flag: Portico tells it by the connection's first bytes.
            listen = ["--tls-listen", f"127.0.0.1:{port}", "--tls-cert", cert, "--tls-key", key] \
                if front == "tls" else ["--listen", f"127.0.0.1:{port}"]
            argv = [a.portico, "ingress"] + listen + [
                "--tower", f"127.0.0.1:{tower.port}", "--route", f"/:{tower.service}",
                "--threads", str(a.workers), "--admin", "off", "--log-level", "warn",
                "--max-connections", str(a.nofile - 1000)]
            if name == "portico-lookup":
                argv += ["--discovery", "lookup"]
            p = Proc(argv, a.proxy_cpu)
        elif name == "nginx":
            render("proxy.nginx.conf.in", os.path.join(d, "nginx.conf"), NOFILE=a.nofile,
                   WORKERS=a.workers,
                   CONNS=a.nofile - 100, PORT=port, B1=b1, B2=b2,
                   LISTEN={"http": "", "tls": " ssl", "h2c": " http2"}[front],
                   # nginx before 1.23.4 leaves TLS 1.3 out of its default
                   # protocols; the others offer 1.2 and 1.3.
                   TLS=f"ssl_certificate {cert}; ssl_certificate_key {key}; "
                   "ssl_protocols TLSv1.2 TLSv1.3;" if front == "tls" else "")
            p = Proc(["nginx", "-p", d, "-c", "nginx.conf"], a.proxy_cpu)
        elif name == "haproxy":
            # HAProxy sizes its descriptors from maxconn (two per connection)
            # and refuses to start past the open-file limit.
            render("proxy.haproxy.cfg.in", os.path.join(d, "haproxy.cfg"), WORKERS=a.workers,
                   MAXCONN=self.haproxy_maxconn(), PORT=port, B1=b1, B2=b2,
                   BIND={"http": "", "tls": f" ssl crt {both}", "h2c": " proto h2"}[front])
            p = Proc(["haproxy", "-db", "-f", os.path.join(d, "haproxy.cfg")], a.proxy_cpu)
        else:
            raise ValueError(name)
        wait_listening(port, p)
        return port, p

    def haproxy_maxconn(self):
        return (self.a.nofile - 200) // 2 - 20

    def idle_capacity(self, name):
        """How many idle connections `name` can hold under this machine's
        open-file limit (HAProxy reserves a server socket per client)."""
        if name == "haproxy":
            return min(self.a.idle_conns, self.haproxy_maxconn() - 100)
        return self.a.idle_conns

    def cell(self, name, mode, conns):
        a = self.a
        port, proc = self.start(name)
        try:
            wrk(port, 1, a.warmup, False, a.load_cpu)
            pids = proc.pids() if proc else []
            tower_pids = self.tower.proc.pids()
            c0, t0 = cpu_seconds(pids), cpu_seconds(tower_pids)
            r = wrk(port, conns, a.duration, mode == "close", a.load_cpu)
            c1, t1 = cpu_seconds(pids), cpu_seconds(tower_pids)
        finally:
            if proc:
                proc.stop()
        ok = max(r["ok"], 1)
        user, kernel = ((c1[i] - c0[i]) * 1e6 / ok if proc else None for i in (0, 1))
        r.update({
            "proxy": name, "mode": mode, "conns": conns,
            "rps": r["ok"] / a.duration,
            "cpu_us_per_req": user + kernel if proc else None,
            "user_us_per_req": user,
            "kernel_us_per_req": kernel,
            "tower_cpu_us_per_req": (sum(t1) - sum(t0)) * 1e6 / ok
            if name == "portico-lookup" else None,
        })
        log(f"  {mode:9} c={conns:<5} {name:15} {r['rps']:9.0f} req/s  "
            f"cpu {fmt(r['cpu_us_per_req'])} us/req  p99 {fmt(r['p99_us'])} us  "
            f"errors {r['non2xx'] + r['socket_errors']}")
        return r

    def run_cells(self):
        a = self.a
        proxies = a.proxies
        for rnd in range(a.rounds):
            for mode in a.modes:
                for conns in a.conns:
                    k = rnd % len(proxies)
                    for name in proxies[k:] + proxies[:k]:
                        r = self.cell(name, mode, conns)
                        r["round"] = rnd
                        self.results["cells"].append(r)
            if a.lookup:
                for mode in a.modes:
                    r = self.cell("portico-lookup", mode, 50)
                    r["round"] = rnd
                    self.results["cells"].append(r)

    def front_cell(self, name, front, conns):
        """One proxy under keep-alive load from clients speaking `front`:
        wrk over https (tls) or h2load over h2c (h2c)."""
        a = self.a
        port, proc = self.start(name, front=front)
        try:
            if front == "tls":
                session = tls_session(port)
                wrk(port, 1, a.warmup, False, a.load_cpu, scheme="https")
            else:
                session = {}
                h2load(port, 1, 1, None, a.load_cpu)
            pids = proc.pids()
            c0 = cpu_seconds(pids)
            if front == "tls":
                r = wrk(port, conns, a.duration, False, a.load_cpu, scheme="https")
                r["seconds"] = max(1, round(a.duration))
            else:
                r = h2load(port, conns, a.h2_streams, a.duration, a.load_cpu)
            c1 = cpu_seconds(pids)
        finally:
            proc.stop()
        ok = max(r["ok"], 1)
        user, kernel = ((c1[i] - c0[i]) * 1e6 / ok for i in (0, 1))
        r.update(session)
        r.update({"proxy": name, "front": front, "conns": conns,
                  "streams": a.h2_streams if front == "h2c" else 1,
                  "rps": r["ok"] / r["seconds"], "cpu_us_per_req": user + kernel,
                  "user_us_per_req": user, "kernel_us_per_req": kernel})
        what = r.get("cipher") if front == "tls" else r.get("protocol")
        log(f"  {front:4} c={conns:<5} {name:10} {r['rps']:9.0f} req/s  "
            f"cpu {fmt(r['cpu_us_per_req'])} us/req ({what})  "
            f"errors {r['non2xx'] + r['socket_errors']}")
        return r

    def run_front(self, front, conns):
        """Every proxy but direct, rounds interleaved as the cells are."""
        proxies = [p for p in self.a.proxies if p != "direct"]
        rows = []
        for rnd in range(self.a.rounds):
            for c in conns:
                k = rnd % len(proxies)
                for name in proxies[k:] + proxies[:k]:
                    r = self.front_cell(name, front, c)
                    r["round"] = rnd
                    rows.append(r)
        return rows

    def run_latency(self):
        """Several interleaved samples per proxy: one sample's p99 rests on
        a few hundred requests and moves 2x with the machine's slow spells,
        which land on whichever proxy is running."""
        a = self.a
        proxies = a.proxies
        for rnd in range(a.latency_rounds):
            k = rnd % len(proxies)
            for name in proxies[k:] + proxies[:k]:
                port, proc = self.start(name)
                try:
                    wrk(port, 1, a.warmup, False, a.load_cpu)
                    out = subprocess.run(
                        ["taskset", "-c", a.load_cpu, a.loadgen, "rate", f"127.0.0.1:{port}",
                         str(a.rate), str(a.rate_conns), str(a.duration)],
                        capture_output=True, text=True, timeout=a.duration + 60).stdout
                    r = json.loads(out.strip().splitlines()[-1])
                finally:
                    if proc:
                        proc.stop()
                r["proxy"] = name
                r["round"] = rnd
                log(f"  latency at {a.rate} req/s {name:15} p50 {r['p50_us']} us  "
                    f"p99 {r['p99_us']} us  p99.9 {r['p999_us']} us  errors {r['errors']}")
                self.results["latency"].append(r)

    def run_memory(self):
        a = self.a
        for name in [p for p in a.proxies if p != "direct"]:
            port, proc = self.start(name)
            try:
                wrk(port, 50, a.warmup, False, a.load_cpu)
                time.sleep(0.5)
                base = rss_kib(proc.pids())
                gen = subprocess.Popen(
                    ["taskset", "-c", a.load_cpu, a.loadgen, "idle", f"127.0.0.1:{port}",
                     str(self.idle_capacity(name)), str(a.idle_hold)],
                    stdout=subprocess.PIPE, text=True)
                first = json.loads(gen.stdout.readline())
                held = 0
                end = time.time() + min(2.0, a.idle_hold)
                while time.time() < end:
                    held = max(held, rss_kib(proc.pids()))
                    time.sleep(0.1)
                last = json.loads(gen.stdout.readline())
                gen.wait(timeout=30)
            finally:
                proc.stop()
            opened = max(first["open"], 1)
            r = {"proxy": name, "rss_base_kib": base, "rss_held_kib": held,
                 "open": first["open"], "failed": first["failed"],
                 "kib_per_conn": (held - base) / opened,
                 "probe_p50_us": last["probe_p50_us"], "probe_max_us": last["probe_max_us"],
                 "probes": last["probes"], "probe_errors": last["probe_errors"],
                 "still_open": last["still_open"], "checked_after": last["checked_after"]}
            log(f"  memory {name:15} {r['open']} held (+{r['failed']} failed): "
                f"{r['kib_per_conn']:.1f} KiB/conn; new-connection request max "
                f"{r['probe_max_us']} us")
            self.results["memory"].append(r)

    def run_nagle(self):
        """One keep-alive connection to a Nagle backend, each proxy in turn."""
        a = self.a
        d = os.path.join(self.work, "nagle")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "index.html"), "w") as f:
            f.write("x" * a.body_bytes)
        port = free_port()
        backend = Proc([sys.executable, os.path.join(HERE, "conf", "nagle_backend.py"), str(port), d],
                       a.load_cpu)
        wait_listening(port, backend)
        tower = Tower(a.portico, a.proxy_cpu, [port], service="nagle")
        try:
            for name in a.proxies:
                proxy_port, proc = self.start(name, tower, port, port)
                try:
                    r = wrk(proxy_port, 1, a.duration, False, a.load_cpu)
                finally:
                    if proc:
                        proc.stop()
                r.update({"proxy": name, "rps": r["ok"] / a.duration})
                log(f"  nagle {name:15} {r['rps']:7.0f} req/s  p50 {fmt(r['p50_us'])} us  "
                    f"errors {r['non2xx'] + r['socket_errors']}")
                self.results["nagle"].append(r)
        finally:
            tower.stop()
            backend.stop()

    def start_compressing(self, name, tower, backend):
        """Portico with --compress, or nginx with gzip and Brotli, in front
        of the page's backend: (port, Proc)."""
        a = self.a
        port = free_port()
        d = os.path.join(self.work, f"{name}-compress")
        os.makedirs(os.path.join(d, "tmp"), exist_ok=True)
        if name == "portico":
            p = Proc([a.portico, "ingress", "--listen", f"127.0.0.1:{port}",
                      "--tower", f"127.0.0.1:{tower.port}", "--route", f"/:{tower.service}",
                      "--threads", "1", "--admin", "off", "--log-level", "warn", "--compress"],
                     a.proxy_cpu)
        else:
            if not os.path.exists(BROTLI_MODULE):
                raise RuntimeError(f"no {BROTLI_MODULE}: apt-get install "
                                   "libnginx-mod-http-brotli-filter (bench/run.sh does)")
            render("proxy.compress.nginx.conf.in", os.path.join(d, "nginx.conf"),
                   NOFILE=a.nofile, CONNS=a.nofile - 100, PORT=port, B1=backend,
                   BROTLI_MODULE=BROTLI_MODULE, GZIP_LEVEL=a.gzip_level,
                   BROTLI_LEVEL=a.brotli_level)
            p = Proc(["nginx", "-p", d, "-c", "nginx.conf"], a.proxy_cpu)
        wait_listening(port, p)
        return port, p

    def run_compression(self):
        """The page through each compressing proxy, one coding at a time."""
        a = self.a
        d = os.path.join(self.work, "site")
        root = os.path.join(d, "root")
        os.makedirs(os.path.join(d, "tmp"), exist_ok=True)
        os.makedirs(root, exist_ok=True)
        page = subprocess.run([sys.executable, os.path.join(HERE, "conf", "page.py")],
                              capture_output=True, check=True).stdout
        with open(os.path.join(root, "index.html"), "wb") as f:
            f.write(page)
        port = free_port()
        render("site.nginx.conf.in", os.path.join(d, "nginx.conf"), NOFILE=a.nofile,
               CONNS=a.nofile - 100, PORT=port, ROOT=root)
        backend = Proc(["nginx", "-p", d, "-c", "nginx.conf"], a.load_cpu)
        wait_listening(port, backend)
        tower = Tower(a.portico, a.proxy_cpu, [port], service="site")
        try:
            for name in [p for p in a.proxies if p in ("portico", "nginx")]:
                for coding in ("gzip", "br", "zstd", "identity"):
                    if name == "nginx" and coding == "zstd":
                        continue
                    proxy_port, proc = self.start_compressing(name, tower, port)
                    try:
                        wire = fetch_encoded(proxy_port, coding, page)
                        headers = [] if coding == "identity" else [f"Accept-Encoding: {coding}"]
                        wrk(proxy_port, 1, a.warmup, False, a.load_cpu, headers=headers)
                        pids = proc.pids()
                        c0 = cpu_seconds(pids)
                        r = wrk(proxy_port, a.compress_conns, a.duration, False, a.load_cpu,
                                headers=headers)
                        c1 = cpu_seconds(pids)
                    finally:
                        proc.stop()
                    ok = max(r["ok"], 1)
                    r.update(wire)
                    r.update({"proxy": name, "coding": coding, "conns": a.compress_conns,
                              "page_bytes": len(page),
                              "rps": r["ok"] / a.duration,
                              "cpu_us_per_req": (sum(c1) - sum(c0)) * 1e6 / ok})
                    log(f"  compression {name:8} {coding:8} {r['wire_bytes']:6} bytes "
                        f"({r['sent_as']}, {'intact' if r['intact'] else 'NOT INTACT'})  "
                        f"{r['rps']:7.0f} req/s  cpu {fmt(r['cpu_us_per_req'])} us/req  "
                        f"errors {r['non2xx'] + r['socket_errors']}")
                    self.results["compression"].append(r)
        finally:
            tower.stop()
            backend.stop()

    def run_churn(self):
        """Keep-alive load with and without a registration change every
        100 ms (the second replica deregistered, then registered again)."""
        a = self.a
        runs = {"steady": [], "churn": []}
        for _ in range(a.churn_pairs):
            for kind in ("steady", "churn"):
                stop = threading.Event()
                changes = [0]

                def churn():
                    b2 = self.backend_ports[1]
                    up = True
                    while not stop.wait(0.1):
                        verb = "DEREGISTER" if up else "REGISTER"
                        if up:
                            self.tower.paused.add(b2)
                        self.tower.send(f"{verb}|{SERVICE}|127.0.0.1|{b2}")
                        if not up:
                            self.tower.paused.discard(b2)
                        up = not up
                        changes[0] += 1

                t = threading.Thread(target=churn, daemon=True)
                if kind == "churn":
                    t.start()
                try:
                    r = self.cell("portico", "keepalive", 50)
                finally:
                    stop.set()
                    if kind == "churn":
                        t.join()
                    self.tower.send(f"REGISTER|{SERVICE}|127.0.0.1|{self.backend_ports[1]}")
                    self.tower.paused.discard(self.backend_ports[1])
                r["changes"] = changes[0]
                runs[kind].append(r)
        steady = statistics.median(r["rps"] for r in runs["steady"])
        churned = statistics.median(r["rps"] for r in runs["churn"])
        self.results["churn"] = {
            "steady_rps": steady, "churn_rps": churned,
            "cost": 1 - churned / steady if steady else None,
            "errors": sum(r["non2xx"] + r["socket_errors"] for r in runs["churn"]),
            "changes": sum(r["changes"] for r in runs["churn"]),
            "runs": runs,
        }
        log(f"  churn: {steady:.0f} -> {churned:.0f} req/s "
            f"({100 * self.results['churn']['cost']:.1f}% cost)")

    def run_discovery(self):
        """Discovery at scale (issue 21): per registry size, the CPU a
        registration change costs each watching ingress and the Tower, how
        soon a new replica is routed, and the Tower's CPU per heartbeat."""
        a = self.a
        rows = []
        for n in a.discovery_sizes:
            cell = DiscoveryCell(a, n)
            try:
                rows.append(cell.run())
            finally:
                cell.stop()
        self.results["discovery"] = rows


def cpu_ns(pid):
    """CPU nanoseconds process `pid` has run so far, over all its threads:
    schedstat counts in nanoseconds, where utime+stime's clock ticks (10 ms)
    would swallow a change costing a fraction of a millisecond."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def tcp_bytes_sent(port):
    """Bytes sent so far over the established TCP connections whose local
    port is `port` (the kernel's count, from ss): what a server wrote to
    its clients, whatever it wrote."""
    out = subprocess.run(["ss", "-Htin", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, timeout=10).stdout
    return sum(int(b) for b in re.findall(r"bytes_sent:(\d+)", out))


def get_json(port, path, timeout=60):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        body = r.read()
        if r.status != 200:
            raise RuntimeError(f"GET {path} on port {port} answered {r.status}: {body[:200]!r}")
        return json.loads(body)
    finally:
        c.close()


class TowerUdp:
    """A UDP client of the Tower keeping at most `window` requests
    unanswered: a burst past a socket buffer's worth would be dropped by
    the kernel and a registration lost without a word."""

    def __init__(self, port, window):
        self.window = window
        self.s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.s.connect(("127.0.0.1", port))
        self.s.settimeout(2)
        self.outstanding = 0
        self.lost = 0
        self.refused = []

    def send(self, msg):
        while self.outstanding >= self.window:
            self.recv_one()
        self.s.send(msg.encode())
        self.outstanding += 1

    def recv_one(self):
        try:
            reply = self.s.recv(65536).decode()
        except socket.timeout:
            # What went missing is found by comparing with the Tower's document.
            self.lost += self.outstanding
            self.outstanding = 0
            return
        self.outstanding -= 1
        if not reply.startswith("OK|"):
            self.refused.append(reply)

    def poll(self):
        """Read the replies already here, without waiting."""
        self.s.setblocking(False)
        try:
            while self.outstanding:
                reply = self.s.recv(65536).decode()
                self.outstanding -= 1
                if not reply.startswith("OK|"):
                    self.refused.append(reply)
        except BlockingIOError:
            pass
        finally:
            self.s.settimeout(2)

    def drain(self):
        while self.outstanding:
            self.recv_one()
        if self.refused:
            raise RuntimeError(f"the Tower refused {len(self.refused)} request(s), e.g. "
                               f"{self.refused[0]!r}")

    def close(self):
        self.s.close()


class NamedBackend:
    """A tiny HTTP/1.1 backend answering every GET with its own name."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            body = self.server.name.encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    def __init__(self, name):
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self.Handler)
        self.server.daemon_threads = True
        self.server.name = name
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


class Prober:
    """One kept-alive connection to an ingress, asking GET /probe/."""

    def __init__(self, port):
        self.port = port
        self.c = None

    def ask(self):
        for attempt in (0, 1):
            if self.c is None:
                self.c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                self.c.request("GET", "/probe/")
                r = self.c.getresponse()
                body = r.read().decode(errors="replace")
                return body if r.status == 200 else f"status {r.status}"
            except (OSError, http.client.HTTPException):
                # The ingress closed the idle connection: one new one.
                self.c.close()
                self.c = None
                if attempt:
                    raise
        return None

    def wait_for(self, name, within=60):
        deadline = time.monotonic() + within
        while self.ask() != name:
            if time.monotonic() > deadline:
                raise RuntimeError(f"ingress on {self.port} does not route to {name} "
                                   f"after {within} s")

    def wait_gone(self, name, within=60):
        """Until `name` has not answered four times in a row: with round
        robin over two replicas, one still in the table answers every
        other request."""
        deadline = time.monotonic() + within
        streak = 0
        while streak < 4:
            streak = streak + 1 if self.ask() != name else 0
            if time.monotonic() > deadline:
                raise RuntimeError(f"ingress on {self.port} still routes to {name} "
                                   f"after {within} s")

    def close(self):
        if self.c is not None:
            self.c.close()


def fleet_endpoint(i, j):
    """Replica j of service i: distinct addresses in 10.0.0.0/8."""
    return f"10.{(i >> 8) & 255}.{i & 255}.{j % 250 + 1}", 8000 + j // 250


def sleep_until(t):
    left = t - time.monotonic()
    if left > 0:
        time.sleep(left)


class DiscoveryCell:
    """One Tower holding `n` endpoints over n/10 services, watched by
    --discovery-ingresses ingresses; `probe` has two real replicas, A
    (registered throughout) and B (registered to measure)."""

    def __init__(self, a, n):
        self.a = a
        self.n = n
        self.rng = random.Random(21 + n)
        self.procs = []
        self.probers = []
        self.udp = None
        self.backends = [NamedBackend("A"), NamedBackend("B")]
        self.b_port = self.backends[1].port
        self.services = {f"svc-{i}": [fleet_endpoint(i, j) for j in range(10)]
                         for i in range(n // 10)}
        self.next_replica = {name: 10 for name in self.services}

    def stop(self):
        for p in self.probers:
            p.close()
        if self.udp:
            self.udp.close()
        for p in self.procs:
            p.stop()
        for b in self.backends:
            b.stop()

    def expected(self):
        return sum(len(v) for v in self.services.values()) + 1

    def start_tower(self):
        a = self.a
        self.tower_port = free_port()
        # A TTL of an hour: nothing expires and nothing needs a heartbeat
        # while the changes are measured.
        self.tower = Proc([a.portico, "tower", "--listen", f"127.0.0.1:{self.tower_port}",
                           "--ttl", "1h", "--max-entries", str(max(65_536, 2 * self.n)),
                           "--max-per-name", "1024", "--udp-rate-exempt", "127.0.0.0/8",
                           "--log-level", "warn"], a.discovery_cpus)
        self.procs.append(self.tower)
        wait_listening(self.tower_port, self.tower)
        self.udp = TowerUdp(self.tower_port, a.discovery_window)

    def tower_count(self):
        doc = get_json(self.tower_port, "/v1/services")
        return doc, sum(len(v) for v in doc["services"].values())

    def doc_bytes(self):
        return len(json.dumps(get_json(self.tower_port, "/v1/services"), separators=(",", ":")))

    def register_all(self):
        t0 = time.monotonic()
        self.udp.send(f"REGISTER|probe|127.0.0.1|{self.backends[0].port}")
        for name, eps in self.services.items():
            for ip, port in eps:
                self.udp.send(f"REGISTER|{name}|{ip}|{port}")
        self.udp.drain()
        for _ in range(3):
            doc, count = self.tower_count()
            if count == self.expected():
                break
            held = {(s, e["ip"], e["port"]) for s, eps in doc["services"].items() for e in eps}
            for name, eps in self.services.items():
                for ip, port in eps:
                    if (name, ip, port) not in held:
                        self.udp.send(f"REGISTER|{name}|{ip}|{port}")
            self.udp.drain()
        else:
            raise RuntimeError(f"the Tower holds {count} endpoints, not {self.expected()}")
        return time.monotonic() - t0

    def start_ingresses(self):
        a = self.a
        self.ingresses, self.admin_ports = [], []
        for _ in range(a.discovery_ingresses):
            port, admin = free_port(), free_port()
            p = Proc([a.portico, "ingress", "--listen", f"127.0.0.1:{port}",
                      "--tower", f"127.0.0.1:{self.tower_port}", "--discovery", "watch",
                      "--route", "/probe:probe", "--threads", "1",
                      "--admin", f"127.0.0.1:{admin}", "--log-level", "warn"], a.discovery_cpus)
            self.procs.append(p)
            self.ingresses.append(p)
            self.admin_ports.append(admin)
            wait_listening(port, p)
            self.probers.append(Prober(port))

    def ingress_count(self, admin):
        return sum(len(v) for v in get_json(admin, "/endpoints").values())

    def wait_synced(self, within=300):
        """Until every ingress's table holds what the Tower holds."""
        t0 = time.monotonic()
        want = self.expected()
        for admin in self.admin_ports:
            while (have := self.ingress_count(admin)) != want:
                if time.monotonic() - t0 > within:
                    raise RuntimeError(f"ingress (admin {admin}) has {have} endpoints, the "
                                       f"Tower {want}, after {within} s")
                time.sleep(0.2)
        return time.monotonic() - t0

    def cpu(self):
        """CPU ns of the Tower, then of each ingress, and last the bytes
        the Tower has sent its watchers."""
        return ([cpu_ns(self.tower.p.pid)] + [cpu_ns(p.p.pid) for p in self.ingresses] +
                [tcp_bytes_sent(self.tower_port)])

    def mark(self):
        """Register B and wait until every ingress routes to it: the
        ingresses apply changes in order, so each has then applied every
        change sent before it."""
        self.udp.send(f"REGISTER|probe|127.0.0.1|{self.b_port}")
        for p in self.probers:
            p.wait_for("B")
        self.udp.drain()

    def unmark(self):
        self.udp.send(f"DEREGISTER|probe|127.0.0.1|{self.b_port}")
        for p in self.probers:
            p.wait_gone("B")
        self.udp.drain()

    def random_change(self):
        name = self.rng.choice(list(self.services))
        eps = self.services[name]
        if len(eps) > 1 and self.rng.random() < 0.5:
            ip, port = eps.pop(self.rng.randrange(len(eps)))
            return f"DEREGISTER|{name}|{ip}|{port}"
        i = int(name.split("-")[1])
        ip, port = fleet_endpoint(i, self.next_replica[name])
        self.next_replica[name] += 1
        eps.append((ip, port))
        return f"REGISTER|{name}|{ip}|{port}"

    def window(self, changes):
        """CPU per process over `changes` changes sent --discovery-interval-ms
        apart (none: an idle window as long), ended by the marker change
        once every ingress has applied them all."""
        a = self.a
        gap = a.discovery_interval_ms / 1000
        c0, t0 = self.cpu(), time.monotonic()
        for k in range(changes):
            sleep_until(t0 + k * gap)
            self.udp.send(self.random_change())
            self.udp.poll()
        sleep_until(t0 + a.discovery_changes * gap)
        self.mark()
        c1 = self.cpu()
        elapsed = time.monotonic() - t0
        self.unmark()
        return [b - a_ for a_, b in zip(c0, c1)], elapsed

    def route_latency(self):
        """REGISTER B sent to B first answering through one ingress, kept
        alive; B then deregistered and gone from every ingress."""
        out = []
        for _ in range(self.a.discovery_route_tries):
            p = self.probers[0]
            t0 = time.perf_counter()
            self.udp.send(f"REGISTER|probe|127.0.0.1|{self.b_port}")
            p.wait_for("B")
            out.append((time.perf_counter() - t0) * 1000)
            for q in self.probers[1:]:
                q.wait_for("B")
            self.udp.drain()
            self.unmark()
        return out

    def heartbeats(self):
        """Every endpoint refreshed in turn at the rate of a fleet
        heartbeating every 10 s (a third of the default TTL), at least
        1,000 a second: Tower CPU per datagram, less an idle window."""
        a = self.a
        rate = max(1000, self.n // 10)
        seconds = a.discovery_heartbeat_seconds
        flat = [(name, ip, port) for name, eps in self.services.items() for ip, port in eps]
        c0, t0 = self.cpu(), time.monotonic()
        sent = 0
        while (now := time.monotonic()) < t0 + seconds:
            due = int((now - t0) * rate)
            while sent < due:
                name, ip, port = flat[sent % len(flat)]
                self.udp.send(f"REGISTER|{name}|{ip}|{port}")
                sent += 1
            self.udp.poll()
            time.sleep(0.005)
        self.udp.drain()
        c1, t1 = self.cpu(), time.monotonic()
        time.sleep(t1 - t0)
        c2 = self.cpu()
        busy = [b - a_ for a_, b in zip(c0, c1)]
        idle = [b - a_ for a_, b in zip(c1, c2)]
        net = [x - y for x, y in zip(busy, idle)][:-1]
        return {"heartbeat_rate": rate, "heartbeat_datagrams": sent,
                "heartbeat_seconds": t1 - t0,
                "heartbeat_tower_us_per_datagram": net[0] / 1000 / max(sent, 1),
                "heartbeat_ingress_us_per_datagram":
                    statistics.mean(net[1:]) / 1000 / max(sent, 1)}

    def run(self):
        a = self.a
        self.start_tower()
        register_s = self.register_all()
        self.start_ingresses()
        sync_s = self.wait_synced()
        doc_bytes = self.doc_bytes()
        busy, elapsed = self.window(a.discovery_changes)
        idles = [self.window(0)[0] for _ in range(a.discovery_idle_windows)]
        # The least idle window per process: an idle one can only gain
        # from chance (a blocking query's timeout, another helper's burst).
        idle = [min(w[i] for w in idles) for i in range(len(busy))]
        per_change = [(b - i) / 1e6 / a.discovery_changes for b, i in zip(busy, idle)]
        sent_per_change = per_change.pop() * 1e6
        routes = self.route_latency()
        row = {
            "endpoints": self.n, "services": len(self.services),
            "ingresses": a.discovery_ingresses, "changes": a.discovery_changes,
            "interval_ms": a.discovery_interval_ms, "window_s": elapsed,
            "register_s": register_s, "ingress_sync_s": sync_s,
            "tower_ms_per_change": per_change[0],
            "ingress_ms_per_change": statistics.mean(per_change[1:]),
            "ingress_ms_per_change_each": per_change[1:],
            "idle_tower_ms": idle[0] / 1e6,
            "idle_ingress_ms": statistics.mean(idle[1:-1]) / 1e6,
            "doc_bytes": doc_bytes,
            "tower_bytes_per_change": sent_per_change,
            # Under a blocking query a watcher that cannot keep up gets the
            # latest document, not one per change: below 1, the changes
            # were coalesced and the CPU per change is less than one costs.
            "docs_per_change": sent_per_change / doc_bytes / a.discovery_ingresses,
            "route_ms": statistics.median(routes), "route_ms_min": min(routes),
            "route_ms_max": max(routes), "route_tries": len(routes),
            "udp_lost": self.udp.lost,
        }
        row.update(self.heartbeats())
        self.wait_synced(within=60)
        _, count = self.tower_count()
        row["in_sync"] = count == self.expected()
        log(f"  discovery {self.n:>7} endpoints: ingress {row['ingress_ms_per_change']:.3f} ms/change, "
            f"Tower {row['tower_ms_per_change']:.3f} ms/change, routed in {row['route_ms']:.1f} ms "
            f"({row['route_ms_min']:.1f}-{row['route_ms_max']:.1f}), heartbeat "
            f"{row['heartbeat_tower_us_per_datagram']:.1f} us/datagram in the Tower; "
            f"Tower sent {row['tower_bytes_per_change'] / 1024:.1f} KiB/change "
            f"({row['docs_per_change']:.2f} documents per change per watcher); "
            f"registered in {register_s:.1f} s, ingresses in sync in {sync_s:.1f} s")
        return row


BROTLI_MODULE = "/usr/lib/nginx/modules/ngx_http_brotli_filter_module.so"


def fetch_encoded(port, coding, page):
    """One GET of the page asking for `coding` (none for "identity"): the
    bytes on the wire (head, framing and body), the coding it came in, and
    whether it decodes to the page (gzip by python3, br and zstd by curl)."""
    ask = "" if coding == "identity" else f"Accept-Encoding: {coding}\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET / HTTP/1.1\r\nHost: bench\r\n{ask}Connection: close\r\n\r\n".encode())
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    fields = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        k, _, v = line.partition(":")
        fields[k.strip().lower()] = v.strip()
    if fields.get("transfer-encoding", "").lower() == "chunked":
        data, rest = b"", body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size.split(b";")[0], 16)
            if n == 0:
                break
            data, rest = data + rest[:n], rest[n + 2:]
        body = data
    sent_as = fields.get("content-encoding", "identity")
    if sent_as == "gzip":
        intact = gzip.decompress(body) == page
    elif sent_as == "identity":
        intact = body == page
    else:
        out = subprocess.run(["curl", "-s", "--max-time", "10", "--compressed", "-H",
                              f"Accept-Encoding: {coding}", f"http://127.0.0.1:{port}/"],
                             capture_output=True, timeout=30).stdout
        intact = out == page
    return {"wire_bytes": len(raw), "body_bytes": len(body), "sent_as": sent_as,
            "intact": intact and sent_as == coding}


def fmt(v, digits=1):
    if v is None:
        return "-"
    return f"{v:.{digits}f}"


def versions(a):
    def first_line(argv):
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (p.stdout + p.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "portico": first_line([a.portico, "--version"]),
        "nginx": first_line(["nginx", "-v"]),
        "haproxy": first_line(["haproxy", "-v"]),
        "wrk": first_line(["wrk", "-v"]),
    }


def medians(cells):
    """One row per (proxy, mode, conns): the median over rounds."""
    groups = {}
    for c in cells:
        groups.setdefault((c["proxy"], c["mode"], c["conns"]), []).append(c)
    out = {}
    for k, rows in groups.items():
        def med(field):
            vals = [r[field] for r in rows if r.get(field) is not None]
            return statistics.median(vals) if vals else None
        out[k] = {f: med(f) for f in ("rps", "cpu_us_per_req", "user_us_per_req",
                                      "kernel_us_per_req", "tower_cpu_us_per_req",
                                      "p50_us", "p99_us")}
        out[k]["errors"] = sum(r["non2xx"] + r["socket_errors"] for r in rows)
    return out


def latency_medians(samples):
    """Per proxy, in first-seen order: the median of each percentile over
    the rounds, the p99 range, and the errors summed."""
    groups = {}
    for r in samples:
        groups.setdefault(r["proxy"], []).append(r)
    out = {}
    for name, rows in groups.items():
        out[name] = {f: statistics.median(r[f] for r in rows)
                     for f in ("p50_us", "p99_us", "p999_us", "max_us")}
        out[name].update(samples=len(rows), errors=sum(r["errors"] for r in rows),
                         p99_min=min(r["p99_us"] for r in rows),
                         p99_max=max(r["p99_us"] for r in rows))
    return out


def summary(res, args):
    m = medians(res["cells"])
    v = res["machine"]
    lines = [
        f"# Benchmark results, {v['date']}",
        "",
        f"Machine: {v['cores']} cores ({v['cpu']}), Linux {v['kernel']}. "
        f"{v['portico']}; {v['nginx']}; {v['haproxy']}; {v['wrk']}.",
        "",
        "Command: `" + res["command"] + "`",
        "",
        f"Proxy pinned to CPU {args.proxy_cpu}, {args.workers} worker(s) each; wrk, the load "
        "generator and "
        f"two nginx backend replicas on CPU {args.load_cpu}. {args.body_bytes}-byte responses. "
        f"{args.duration} s per cell, median of {args.rounds} round(s). "
        "CPU is the proxy's utime+stime over the run divided by the responses.",
        "",
    ]
    proxies = [p for p in args.proxies]
    for mode in args.modes if res["cells"] else []:
        lines += [f"## {'Keep-alive' if mode == 'keepalive' else 'A new connection per request'}", ""]
        head = "| connections | " + " | ".join(f"{p} req/s" for p in proxies) + " | " + \
            " | ".join(f"{p} CPU µs/req" for p in proxies if p != "direct") + \
            " | Portico CPU / nginx | Portico CPU / HAProxy |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for c in args.conns:
            row = [str(c)]
            row += [fmt(m.get((p, mode, c), {}).get("rps"), 0) for p in proxies]
            row += [fmt(m.get((p, mode, c), {}).get("cpu_us_per_req")) for p in proxies if p != "direct"]
            pc = m.get(("portico", mode, c), {}).get("cpu_us_per_req")
            nc = m.get(("nginx", mode, c), {}).get("cpu_us_per_req")
            hc = m.get(("haproxy", mode, c), {}).get("cpu_us_per_req")
            row.append(fmt(pc / nc, 2) if pc and nc else "-")
            row.append(fmt(pc / hc, 2) if pc and hc else "-")
            lines.append("| " + " | ".join(row) + " |")
        errs = {p: sum(m[k]["errors"] for k in m if k[0] == p and k[1] == mode) for p in proxies}
        lines += ["", "Errors (non-2xx + socket errors): " +
                  ", ".join(f"{p} {n}" for p, n in errs.items()), ""]
        lines += cpu_split(m, mode, args)
    if res["latency"]:
        lat = latency_medians(res["latency"])
        rounds = max(v["samples"] for v in lat.values())
        lines += [f"## Latency at a fixed {args.rate} req/s over {args.rate_conns} connections", "",
                  f"Medians of {rounds} interleaved sample(s) of {args.duration:g} s each; "
                  "the p99 range is the lowest and highest sample.", "",
                  "| proxy | p50 µs | p99 µs | p99 range µs | p99.9 µs | max µs | errors |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in lat.items():
            lines.append(f"| {name} | {r['p50_us']:.0f} | {r['p99_us']:.0f} | "
                         f"{r['p99_min']}-{r['p99_max']} | {r['p999_us']:.0f} | "
                         f"{r['max_us']:.0f} | {r['errors']} |")
        lines.append("")
    if res["memory"]:
        lines += [f"## {args.idle_conns} idle keep-alive connections", "",
                  "| proxy | held | RSS before MiB | RSS held MiB | KiB per connection | "
                  "new-connection request p50 / max µs | still answering after |",
                  "|---|---|---|---|---|---|---|"]
        for r in res["memory"]:
            lines.append(
                f"| {r['proxy']} | {r['open']} | {r['rss_base_kib'] / 1024:.1f} | "
                f"{r['rss_held_kib'] / 1024:.1f} | {r['kib_per_conn']:.1f} | "
                f"{r['probe_p50_us']} / {r['probe_max_us']} | {r['still_open']}/{r['checked_after']} |")
        lines.append("")
    if res["churn"]:
        c = res["churn"]
        lines += ["## Discovery churn", "",
                  f"Portico, keep-alive, 50 connections: {c['steady_rps']:.0f} req/s steady, "
                  f"{c['churn_rps']:.0f} req/s with a registration change every 100 ms "
                  f"({c['changes']} changes): a cost of {100 * c['cost']:.1f}% "
                  f"(medians of {args.churn_pairs} interleaved pairs), {c['errors']} errors.", ""]
    look = [(k, v) for k, v in m.items() if k[0] == "portico-lookup"]
    if look:
        lines += ["## The seed's design: one UDP LOOKUP per request", "",
                  "| mode | connections | req/s | ingress CPU µs/req | Tower CPU µs/req |",
                  "|---|---|---|---|---|"]
        for (p, mode, c), v in sorted(look):
            lines.append(f"| {mode} | {c} | {fmt(v['rps'], 0)} | {fmt(v['cpu_us_per_req'])} | "
                         f"{fmt(v['tower_cpu_us_per_req'])} |")
        lines.append("")
    for front in ("tls", "h2"):
        if res.get(front):
            lines += front_summary(res[front], front, args)
    if res.get("nagle"):
        lines += ["## A backend that writes head and body apart (python3 http.server)", "",
                  "One keep-alive connection (wrk -c1). Nagle holds the body until the head "
                  "is acknowledged; a proxy that delays that ACK adds its delayed-ACK timer "
                  "to every request on a reused backend connection (direct: wrk's own ACK is "
                  "the delayed one).", "",
                  "| proxy | req/s | p50 µs | p99 µs | errors |", "|---|---|---|---|---|"]
        for r in res["nagle"]:
            lines.append(f"| {r['proxy']} | {fmt(r['rps'], 0)} | {fmt(r['p50_us'], 0)} | "
                         f"{fmt(r['p99_us'], 0)} | {r['non2xx'] + r['socket_errors']} |")
        lines.append("")
    if res.get("compression"):
        lines += compression_summary(res, args)
    if res.get("discovery"):
        lines += discovery_summary(res, args)
    lines += ["## Targets (issue 20)", ""] + targets(res, args, m) + [""]
    return "\n".join(lines)


def front_medians(rows):
    """One row per (proxy, conns) of a tls or h2 cell: the median over
    rounds, the errors summed, and what each negotiated."""
    groups = {}
    for r in rows:
        groups.setdefault((r["proxy"], r["conns"]), []).append(r)
    out = {}
    for k, rs in groups.items():
        out[k] = {f: statistics.median(r[f] for r in rs)
                  for f in ("rps", "cpu_us_per_req", "user_us_per_req", "kernel_us_per_req")}
        out[k]["errors"] = sum(r["non2xx"] + r["socket_errors"] for r in rs)
        out[k]["requests"] = sum(r["requests"] for r in rs)
        out[k]["session"] = sorted({" ".join(str(r.get(f, "?")) for f in (
            ("tls_protocol", "cipher", "group") if r["front"] == "tls" else ("protocol",)))
            for r in rs})
    return out


def ratio(a, b, digits=2):
    return fmt(a / b, digits) if a and b else "-"


def front_summary(rows, front, args):
    m = front_medians(rows)
    proxies = list(dict.fromkeys(r["proxy"] for r in rows))
    conns = sorted({r["conns"] for r in rows})
    rounds = len({r["round"] for r in rows})
    if front == "tls":
        lines = ["## TLS, keep-alive (wrk over https)", "",
                 "Each proxy terminates TLS with the same self-signed ECDSA P-256 certificate "
                 "(openssl, in the run's work directory), offering TLS 1.2 and 1.3 (set for nginx, "
                 "whose 1.22 leaves 1.3 out by default), at its own defaults otherwise, and speaks "
                 "plain HTTP/1.1 to the same two nginx replicas. wrk keeps its connections "
                 "for the whole run: the handshakes (one per connection) are in the CPU but "
                 f"spread over every request. {args.duration:g} s per cell, median of "
                 f"{rounds} round(s)."]
    else:
        streams = rows[0]["streams"]
        lines = ["## HTTP/2 (h2load over h2c)", "",
                 f"h2load -t1 -m{streams}: HTTP/2 by prior knowledge without TLS (nginx "
                 "`listen ... http2`, HAProxy `bind ... proto h2`, Portico by the preface), "
                 f"{streams} concurrent streams on each connection, HTTP/1.1 to the same two "
                 f"nginx replicas. {args.duration:g} s per cell, median of {rounds} round(s)."]
    lines += ["CPU is the proxy's utime+stime over the run divided by the responses with "
              "status 2xx (user + kernel, each the median of its own, so they need not add up "
              "to the total).", ""]
    head = "| connections | " + " | ".join(f"{p} req/s" for p in proxies) + " | " + \
        " | ".join(f"{p} CPU µs/req (user + kernel)" for p in proxies) + \
        " | Portico CPU / nginx | Portico CPU / HAProxy | Portico req/s / nginx | " \
        "Portico req/s / HAProxy |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for c in conns:
        g = {p: m.get((p, c), {}) for p in proxies + ["portico", "nginx", "haproxy"]}
        row = [str(c)] + [fmt(g[p].get("rps"), 0) for p in proxies]
        row += [f"{fmt(g[p].get('cpu_us_per_req'))} ({fmt(g[p].get('user_us_per_req'))} + "
                f"{fmt(g[p].get('kernel_us_per_req'))})" if g[p] else "-" for p in proxies]
        pc, pr = g["portico"].get("cpu_us_per_req"), g["portico"].get("rps")
        row += [ratio(pc, g["nginx"].get("cpu_us_per_req")),
                ratio(pc, g["haproxy"].get("cpu_us_per_req")),
                ratio(pr, g["nginx"].get("rps")), ratio(pr, g["haproxy"].get("rps"))]
        lines.append("| " + " | ".join(row) + " |")
    what = "Negotiated with an OpenSSL client (openssl s_client, as wrk)" if front == "tls" \
        else "Protocol h2load spoke"
    lines += ["", what + ": " + "; ".join(
        f"{p} {', '.join(m[(p, conns[0])]['session'])}" for p in proxies) + ".", "",
        "Errors (non-2xx + socket errors, of all requests): " + ", ".join(
            f"{p} {sum(m[(p, c)]['errors'] for c in conns)} of "
            f"{sum(m[(p, c)]['requests'] for c in conns)}" for p in proxies), ""]
    return lines


def front_targets(res):
    """Issue 20 asks the tls and h2 cells for no regression; the ratios
    are given against its bar for the other cells (at most 1.0x)."""
    out = []
    for front, label in (("tls", "TLS keep-alive"), ("h2", "h2c")):
        m = front_medians(res.get(front) or [])
        for c in sorted({k[1] for k in m}):
            p, n, h = (m.get((x, c), {}) for x in ("portico", "nginx", "haproxy"))
            pc, nc, hc = (v.get("cpu_us_per_req") for v in (p, n, h))
            best = max(n.get("rps") or 0, h.get("rps") or 0)
            if pc and nc and hc and best:
                out.append(f"- {label} c={c} (no target but no regression; for reference, the "
                           f"other cells' bar is <= 1.0x): CPU {pc / nc:.2f}x nginx, "
                           f"{pc / hc:.2f}x HAProxy; req/s {p['rps'] / best:.2f}x the better "
                           "of the two")
    return out


def compression_summary(res, args):
    rows = res["compression"]
    base = {r["proxy"]: r["cpu_us_per_req"] for r in rows if r["coding"] == "identity"}
    page = rows[0].get("page_bytes", "?")
    lines = [f"## Compression: a {page}-byte HTML page (bench/conf/page.py)", "",
             f"Through Portico `--compress` and through nginx (`gzip on` and the Brotli filter), "
             f"gzip level {args.gzip_level}, Brotli {args.brotli_level} (256 KiB window), zstd "
             f"Portico's own (3); wrk -c{args.compress_conns} keep-alive, one Accept-Encoding "
             "at a time. Bytes on the wire: head, chunk framing and body of one response. CPU: "
             "the proxy's, per response; the extra is over the same proxy passing the page "
             "as it is. nginx's gzip is zlib and its Brotli the C library; Portico's are "
             "miniz_oxide (flate2) and the brotli crate, and its zstd is libzstd.", "",
             "| proxy | asked | sent as | bytes on the wire | body bytes | req/s | CPU µs/req | "
             "extra CPU µs/req | intact | errors |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        extra = r["cpu_us_per_req"] - base[r["proxy"]] if r["proxy"] in base else None
        lines.append(f"| {r['proxy']} | {r['coding']} | {r['sent_as']} | {r['wire_bytes']} | "
                     f"{r['body_bytes']} | {fmt(r['rps'], 0)} | {fmt(r['cpu_us_per_req'])} | "
                     f"{fmt(extra)} | {'yes' if r['intact'] else 'NO'} | "
                     f"{r['non2xx'] + r['socket_errors']} |")
    return lines + [""]


def discovery_summary(res, args):
    rows = res["discovery"]
    r0 = rows[0]
    lines = ["## Discovery at scale (issue 21)", "",
             f"One Tower (`--ttl 1h`: no heartbeat or expiry meanwhile) holding N endpoints "
             f"over N/10 services, {r0['ingresses']} ingresses (`--discovery watch`, one "
             f"thread each) watching it; Tower and ingresses on CPUs {args.discovery_cpus}. "
             f"{r0['changes']} registration changes {r0['interval_ms']:g} ms apart (a new "
             "replica or a deregistered one, on random services), ended by one marker change "
             "(replica B of `probe` registered) polled through every ingress until each routes "
             "to it, so that every change has been applied when the CPU is read. CPU is "
             "schedstat's (every thread, ns), less the same processes' CPU over an idle window "
             "as long without the changes but with the same marker (the least of "
             f"{args.discovery_idle_windows}), divided by the changes. Routed: from B's "
             "REGISTER sent to B's first answer through one ingress over a kept-alive "
             f"connection (median of {r0['route_tries']}, range). Heartbeats: every endpoint "
             "refreshed in turn at the rate of a fleet heartbeating every 10 s (at least "
             "1,000/s), the Tower's CPU per datagram less an idle window as long. KiB sent: "
             "what the Tower wrote to its watchers' TCP connections (ss's bytes_sent), less "
             "the idle window's, per change; over the size of the whole document and the "
             "watchers, it says how many documents a change cost: below 1, a watcher that "
             "could not keep up was sent the latest document for several changes at once, "
             "and the CPU per change is less than a change alone would cost.", "",
             "| endpoints | services | ingress CPU ms/change (mean of each) | "
             "Tower CPU ms/change (all watchers) | routed ms (range) | Tower KiB sent/change | "
             "documents/change/watcher | heartbeats/s | "
             "Tower µs/heartbeat | ingress µs/heartbeat | registered in s | ingresses in sync in s "
             "| table equal at the end |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['endpoints']:,} | {r['services']:,} | {r['ingress_ms_per_change']:.3f} | "
            f"{r['tower_ms_per_change']:.3f} | {r['route_ms']:.1f} "
            f"({r['route_ms_min']:.1f}-{r['route_ms_max']:.1f}) | "
            f"{r['tower_bytes_per_change'] / 1024:.1f} | {r['docs_per_change']:.2f} | "
            f"{r['heartbeat_rate']:,} | "
            f"{r['heartbeat_tower_us_per_datagram']:.1f} | "
            f"{r['heartbeat_ingress_us_per_datagram']:.1f} | {r['register_s']:.1f} | "
            f"{r['ingress_sync_s']:.1f} | {'yes' if r['in_sync'] else 'NO'} |")
    return lines + [""]


def discovery_targets(rows):
    """Issue 21's targets at 40,000 endpoints (or the largest size short of
    it), and flatness: the largest size within 2x the smallest's figure,
    or within the 40,000 target anyway."""
    if not rows:
        return []
    out = []
    at = [r for r in rows if r["endpoints"] == 40_000] or rows[-1:]
    r = at[0]
    n = f"{r['endpoints']:,} endpoints"
    checks = (("ingress CPU per change", "ingress_ms_per_change", 0.5, "ms"),
              ("Tower CPU per change, all watchers", "tower_ms_per_change", 1.0, "ms"),
              ("routed after REGISTER", "route_ms", 10.0, "ms"))
    for what, key, limit, unit in checks:
        out.append(f"- discovery {n}: {what} {r[key]:.3f} {unit} (target <= {limit:g}): "
                   f"{'met' if r[key] <= limit else 'NOT met'}")
    if len(rows) > 1:
        small, big = rows[0], rows[-1]
        for what, key, limit, unit in checks:
            ratio = big[key] / small[key] if small[key] > 0 else float("inf")
            ok = ratio <= 2 or big[key] <= limit
            out.append(f"- discovery flat, {what}: {big[key]:.3f} {unit} at "
                       f"{big['endpoints']:,} endpoints, {ratio:.1f}x the {small['endpoints']:,} "
                       f"figure (target <= 2x, or within {limit:g} {unit}): "
                       f"{'met' if ok else 'NOT met'}")
    return out


def kernel_floor(m, mode, c):
    """The least kernel time per request any of the three proxies needed
    in this cell, over nginx's whole CPU time: a proxy that makes the same
    system calls and sends the same segments cannot go below it, however
    little user time it spends."""
    nc = m.get(("nginx", mode, c), {}).get("cpu_us_per_req")
    ks = [m.get((p, mode, c), {}).get("kernel_us_per_req") for p in ("portico", "nginx", "haproxy")]
    ks = [k for k in ks if k is not None]
    return min(ks) / nc if ks and nc else None


def cpu_split(m, mode, args):
    """CPU per request split into user and kernel time: the part a proxy's
    own code decides, and the part the kernel spends on its sockets."""
    proxies = [p for p in args.proxies if p != "direct" and any(
        k[0] == p and k[1] == mode and v.get("kernel_us_per_req") is not None for k, v in m.items())]
    if not proxies:
        # Results from before the split was recorded.
        return []
    head = "| connections | " + " | ".join(f"{p} user / kernel µs" for p in proxies) + \
        " | least kernel / nginx CPU |"
    lines = ["User and kernel CPU µs per request (utime and stime), and the least kernel time of "
             "the three proxies over nginx's whole CPU time: a CPU ratio to nginx below it "
             "cannot be had by spending less user time.", "",
             head, "|" + "---|" * (head.count("|") - 1)]
    for c in args.conns:
        row = [str(c)]
        for p in proxies:
            v = m.get((p, mode, c), {})
            row.append(f"{fmt(v.get('user_us_per_req'))} / {fmt(v.get('kernel_us_per_req'))}")
        floor = kernel_floor(m, mode, c)
        row.append(fmt(floor, 2) if floor else "-")
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def targets(res, args, m):
    """Issue 20's targets: CPU at most both proxies' in every cell, user
    time at most nginx's at 50 connections, req/s at least both's from 50
    up, and a saturated tail no longer than nginx's."""
    out = []
    for mode in args.modes:
        for c in args.conns:
            cell = {p: m.get((p, mode, c), {}) for p in ("portico", "nginx", "haproxy")}
            pc, nc, hc = (cell[p].get("cpu_us_per_req") for p in ("portico", "nginx", "haproxy"))
            if pc and nc and hc:
                ok = pc <= nc and pc <= hc
                floor = kernel_floor(m, mode, c)
                why = ""
                if not ok and floor and floor > 1.0:
                    why = (f"; the least kernel time of the three proxies is already "
                           f"{floor:.2f}x nginx's CPU")
                out.append(f"- CPU {mode} c={c}: {pc / nc:.2f}x nginx, {pc / hc:.2f}x HAProxy "
                           f"(target <= 1x both): {'met' if ok else 'NOT met'}{why}")
            pu, nu = cell["portico"].get("user_us_per_req"), cell["nginx"].get("user_us_per_req")
            if c == 50 and pu and nu:
                out.append(f"- user time {mode} c={c}: {pu:.1f} µs, nginx {nu:.1f} µs "
                           f"(target <= nginx's): {'met' if pu <= nu else 'NOT met'}")
            if c >= 50:
                pr = cell["portico"].get("rps")
                best = max(cell[p].get("rps") or 0 for p in ("nginx", "haproxy"))
                if pr and best:
                    out.append(f"- req/s {mode} c={c}: {pr / best:.2f}x the better of nginx and "
                               f"HAProxy: {'met' if pr >= best else 'NOT met'}")
            pp, np_ = cell["portico"].get("p99_us"), cell["nginx"].get("p99_us")
            if mode == "keepalive" and c >= 500 and pp and np_:
                out.append(f"- p99 {mode} c={c} (saturated): Portico {pp / 1000:.1f} ms, nginx "
                           f"{np_ / 1000:.1f} ms (target <= nginx's): "
                           f"{'met' if pp <= np_ else 'NOT met'}")
    lat = latency_medians(res["latency"])
    if "portico" in lat and "nginx" in lat:
        p, n = lat["portico"]["p99_us"], lat["nginx"]["p99_us"]
        out.append(f"- p99 at {args.rate} req/s (medians of {lat['portico']['samples']}): "
                   f"Portico {p:.0f} µs, nginx {n:.0f} µs: "
                   f"{'met' if p <= n else 'NOT met'}")
    for r in res["memory"]:
        if r["proxy"] == "portico":
            out.append(f"- {r['open']} idle connections: {r['kib_per_conn']:.1f} KiB each "
                       f"(target <= 2): {'met' if r['kib_per_conn'] <= 2 else 'NOT met'}; "
                       f"new-connection request max {r['probe_max_us'] / 1000:.1f} ms (target < 100): "
                       f"{'met' if r['probe_max_us'] < 100_000 and r['probe_errors'] == 0 else 'NOT met'}")
    if res["churn"]:
        cost = res["churn"]["cost"]
        out.append(f"- churn: {100 * cost:.1f}% of throughput (target < 5%): "
                   f"{'met' if cost < 0.05 else 'NOT met'}")
    return out + front_targets(res) + discovery_targets(res.get("discovery") or [])


def tick(v):
    """A short axis label: 72k, 4.5, 120."""
    if v >= 10_000:
        return f"{v / 1000:.0f}k"
    if v >= 1000:
        return f"{v / 1000:.1f}k"
    return f"{v:.3g}"


COLORS = {"portico": "#2b6cb0", "nginx": "#38a169", "haproxy": "#dd6b20",
          "direct": "#718096", "portico-lookup": "#90cdf4",
          "ingress": "#2b6cb0", "Tower": "#805ad5", "routed": "#d53f8c"}


def chart(res, args):
    """Four panels of grouped bars, as a standalone SVG."""
    m = medians(res["cells"])
    disco = res.get("discovery") or []
    fronts = [(f, front_medians(res.get(f) or [])) for f in ("tls", "h2")]
    fronts = [(f, fm) for f, fm in fronts if fm]
    W, H = 1200, 1200 if disco else 980
    front_y = H + 50
    H += 230 if fronts else 0
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
             f'font-family="sans-serif" font-size="12">',
             f'<rect width="{W}" height="{H}" fill="white"/>',
             f'<text x="20" y="28" font-size="18">Portico vs nginx vs HAProxy, '
             f'{res["machine"]["date"]}, {res["machine"]["cores"]} cores, proxy on one core</text>']

    def panel(x, y, w, h, title, groups, series, unit, lower=None):
        """`lower`: per series, a part of each bar (kernel time) drawn
        darker at its foot."""
        parts.append(f'<text x="{x}" y="{y - 8}" font-size="14">{title}</text>')
        vals = [v for _, vs in series for v in vs if v]
        top = max(vals) * 1.15 if vals else 1
        parts.append(f'<line x1="{x}" y1="{y + h}" x2="{x + w}" y2="{y + h}" stroke="#333"/>')
        for i in range(5):
            gy = y + h - h * i / 4
            parts.append(f'<line x1="{x}" y1="{gy}" x2="{x + w}" y2="{gy}" stroke="#eee"/>')
            parts.append(f'<text x="{x - 4}" y="{gy + 4}" text-anchor="end" fill="#555">'
                         f'{tick(top * i / 4)}</text>')
        gw = w / max(len(groups), 1)
        bw = gw * 0.8 / max(len(series), 1)
        for gi, g in enumerate(groups):
            gx = x + gi * gw + gw * 0.1
            parts.append(f'<text x="{gx + gw * 0.4}" y="{y + h + 16}" text-anchor="middle">{g}</text>')
            for si, (name, vs) in enumerate(series):
                v = vs[gi]
                if not v:
                    continue
                bh = h * v / top
                parts.append(f'<rect x="{gx + si * bw:.1f}" y="{y + h - bh:.1f}" width="{bw - 1:.1f}" '
                             f'height="{bh:.1f}" fill="{COLORS.get(name, "#999")}">'
                             f'<title>{name} {g}: {v:.4g} {unit}</title></rect>')
                low = lower[si][gi] if lower else None
                if low:
                    lh = h * min(low, v) / top
                    parts.append(f'<rect x="{gx + si * bw:.1f}" y="{y + h - lh:.1f}" '
                                 f'width="{bw - 1:.1f}" height="{lh:.1f}" fill="black" '
                                 f'fill-opacity="0.3"><title>{name} {g}: {low:.4g} {unit} '
                                 f'of it kernel time</title></rect>')
        for si, (name, _) in enumerate(series):
            lx = x + w + 8 if w < 600 else x + w - 130
            ly = y + 6 + si * 15
            parts.append(f'<rect x="{lx}" y="{ly - 9}" width="10" height="10" '
                         f'fill="{COLORS.get(name, "#999")}"/><text x="{lx + 14}" y="{ly}">{name}</text>')

    cells = [(mode, c) for mode in args.modes for c in args.conns]
    groups = [f"{'ka' if mode == 'keepalive' else 'new'} {c}" for mode, c in cells]
    panel(70, 80, 1100, 170, "Requests per second (higher is better; ka = keep-alive, "
          "new = a connection per request)", groups,
          [(p, [m.get((p, mo, c), {}).get("rps") for mo, c in cells]) for p in args.proxies], "req/s")
    cpu_proxies = [p for p in args.proxies if p != "direct"]
    panel(70, 320, 1100, 170, "Proxy CPU µs per request (lower is better; the darker foot of "
          "each bar is kernel time)", groups,
          [(p, [m.get((p, mo, c), {}).get("cpu_us_per_req") for mo, c in cells])
           for p in cpu_proxies], "µs",
          lower=[[m.get((p, mo, c), {}).get("kernel_us_per_req") for mo, c in cells]
                 for p in cpu_proxies])
    lat = latency_medians(res["latency"])
    panel(70, 570, 440, 170, f"Latency µs at a fixed {args.rate} req/s, medians (lower is better)",
          ["p50", "p99", "p99.9"],
          [(name, [r["p50_us"], r["p99_us"], r["p999_us"]]) for name, r in lat.items()], "µs")
    mem = res["memory"]
    panel(650, 570, 440, 170, f"KiB per idle connection, {args.idle_conns} held (lower is better)",
          ["KiB/conn"], [(r["proxy"], [r["kib_per_conn"]]) for r in mem], "KiB")
    if res["churn"]:
        c = res["churn"]
        panel(70, 800, 440, 150, "Portico req/s, keep-alive 50: steady vs a change every 100 ms",
              ["steady", "churn"], [("portico", [c["steady_rps"], c["churn_rps"]])], "req/s")
    look = {k: v for k, v in m.items() if k[0] == "portico-lookup"}
    if look:
        lmodes = sorted(look)
        panel(650, 800, 440, 150, "CPU µs/req at 50 connections: watch vs the seed's LOOKUP per request",
              [f"{'ka' if k[1] == 'keepalive' else 'new'}" for k in lmodes],
              [("portico", [m.get(("portico", k[1], k[2]), {}).get("cpu_us_per_req") for k in lmodes]),
               ("portico-lookup", [(look[k]["cpu_us_per_req"] or 0) + (look[k]["tower_cpu_us_per_req"] or 0)
                                   for k in lmodes])], "µs")
    if disco:
        sizes = [tick(r["endpoints"]) for r in disco]
        # Two panels: a routing time in the hundreds of ms would flatten
        # CPU bars of a few ms on a shared scale.
        panel(70, 1030, 440, 150, f"Discovery: CPU ms per registration change, by endpoints "
              f"({disco[0]['ingresses']} ingresses watching)", sizes,
              # Less an idle window, a cost within noise can come out below zero.
              [("ingress", [max(0, r["ingress_ms_per_change"]) for r in disco]),
               ("Tower", [max(0, r["tower_ms_per_change"]) for r in disco])], "ms")
        panel(650, 1030, 440, 150, "Discovery: ms from a REGISTER to the replica routed",
              sizes, [("routed", [r["route_ms"] for r in disco])], "ms")
    if fronts:
        keys = [(f, c) for f, fm in fronts for c in sorted({k[1] for k in fm})]
        fm = dict(fronts)
        names = list(dict.fromkeys(k[0] for _, v in fronts for k in v))
        groups = [f"{'TLS' if f == 'tls' else 'h2c'} {c}" for f, c in keys]

        def series(field):
            return [(p, [fm[f].get((p, c), {}).get(field) for f, c in keys]) for p in names]
        panel(70, front_y, 440, 150, "Req/s, TLS keep-alive (wrk) and h2c (h2load) (higher is better)",
              groups, series("rps"), "req/s")
        panel(650, front_y, 440, 150, "Proxy CPU µs/req, TLS and h2c (lower is better; darker: kernel)",
              groups, series("cpu_us_per_req"), "µs",
              lower=[vs for _, vs in series("kernel_us_per_req")])
    parts.append("</svg>")
    return "\n".join(parts)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for the results")
    ap.add_argument("--portico")
    ap.add_argument("--loadgen")
    ap.add_argument("--report", action="store_true",
                    help="only rewrite summary.md and chart.svg from OUT/results.json")
    ap.add_argument("--proxies", default="portico,nginx,haproxy,direct")
    ap.add_argument("--modes", default="keepalive,close")
    ap.add_argument("--conns", default="1,50,500,2000")
    ap.add_argument("--duration", type=float, default=5)
    ap.add_argument("--warmup", type=float, default=1)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--rate", type=int, default=10000, help="fixed rate for the latency test")
    ap.add_argument("--rate-conns", type=int, default=50)
    ap.add_argument("--latency-rounds", type=int, default=5,
                    help="interleaved fixed-rate samples per proxy; the report gives medians")
    ap.add_argument("--idle-conns", type=int, default=10000)
    ap.add_argument("--idle-hold", type=float, default=3)
    # Four: on this 2-core VM one pair moves by 5% on its own, and the
    # target is a cost under 5%.
    ap.add_argument("--churn-pairs", type=int, default=4,
                    help="interleaved steady/churn pairs; the report gives medians")
    ap.add_argument("--body-bytes", type=int, default=1024)
    ap.add_argument("--compress-conns", type=int, default=50,
                    help="keep-alive connections of the compression cell")
    # Portico's levels (crates/portico/src/ingress/compress.rs), given to nginx.
    ap.add_argument("--gzip-level", type=int, default=3)
    ap.add_argument("--brotli-level", type=int, default=4)
    ap.add_argument("--workers", type=int, default=1,
                    help="worker threads or processes of each proxy under test (Portico "
                         "--threads, nginx worker_processes, HAProxy nbthread); with more than "
                         "one, give --proxy-cpu and --load-cpu a range such as 0-1")
    ap.add_argument("--proxy-cpu", default="0")
    ap.add_argument("--load-cpu", default="1")
    ap.add_argument("--discovery-sizes", default="1000,10000,40000,100000",
                    help="endpoints in the Tower, one discovery cell each (over a tenth as "
                         "many services)")
    ap.add_argument("--discovery-ingresses", type=int, default=4,
                    help="ingresses watching the Tower in each discovery cell")
    ap.add_argument("--discovery-changes", type=int, default=100)
    ap.add_argument("--discovery-interval-ms", type=float, default=20,
                    help="time between two registration changes")
    ap.add_argument("--discovery-idle-windows", type=int, default=3,
                    help="idle windows measured; the least is taken from the changes' CPU")
    ap.add_argument("--discovery-route-tries", type=int, default=10,
                    help="REGISTERs timed until routed; the report gives the median")
    ap.add_argument("--discovery-heartbeat-seconds", type=float, default=3)
    ap.add_argument("--discovery-window", type=int, default=128,
                    help="UDP requests to the Tower left unanswered at most")
    ap.add_argument("--discovery-cpus", default=f"0-{(os.cpu_count() or 1) - 1}",
                    help="CPUs the Tower and ingresses of the discovery cells may run on")
    ap.add_argument("--tls-conns", default="50",
                    help="connection counts of the TLS keep-alive cell (wrk over https)")
    ap.add_argument("--h2-conns", default="50",
                    help="connection counts of the h2 cell (h2load over h2c)")
    ap.add_argument("--h2-streams", type=int, default=10,
                    help="concurrent streams per connection in the h2 cell (h2load -m)")
    ap.add_argument("--skip", default="",
                    help="comma list of: cells,latency,memory,tls,h2,nagle,compression,churn,"
                         "lookup,discovery")
    a = ap.parse_args()
    if a.report:
        with open(os.path.join(a.out, "results.json")) as f:
            res = json.load(f)
        for k, v in res.get("settings", {}).items():
            setattr(a, k, v)
        write_reports(res, a)
        return
    skip = set(filter(None, a.skip.split(",")))
    if not a.portico or (not a.loadgen and not {"latency", "memory"} <= skip):
        ap.error("--portico and --loadgen are needed to run (bench/run.sh passes them)")
    a.proxies = a.proxies.split(",")
    a.modes = a.modes.split(",")
    a.conns = [int(c) for c in a.conns.split(",")]
    a.discovery_sizes = [int(n) for n in a.discovery_sizes.split(",")]
    a.tls_conns = [int(c) for c in a.tls_conns.split(",")]
    a.h2_conns = [int(c) for c in a.h2_conns.split(",")]
    a.lookup = "lookup" not in skip
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    a.nofile = hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    need = max(a.conns + a.tls_conns + a.h2_conns + [a.idle_conns]) + 500
    if hard < need:
        sys.exit(f"the open-file limit is {hard}; this run needs {need} (lower --conns/--idle-conns)")
    os.makedirs(a.out, exist_ok=True)
    b = Bench(a)
    res = b.results
    res["machine"] = versions(a)
    res["command"] = os.environ.get("BENCH_COMMAND") or " ".join(["bench/bench.py"] + sys.argv[1:])
    res["settings"] = {k: getattr(a, k) for k in (
        "proxies", "modes", "conns", "duration", "rounds", "rate", "rate_conns", "latency_rounds",
        "workers",
        "idle_conns",
        "churn_pairs", "body_bytes", "proxy_cpu", "load_cpu", "compress_conns", "gzip_level",
        "brotli_level", "discovery_sizes", "discovery_ingresses", "discovery_changes",
        "discovery_interval_ms", "discovery_idle_windows", "discovery_route_tries",
        "discovery_heartbeat_seconds", "discovery_cpus", "tls_conns", "h2_conns", "h2_streams")}
    try:
        if "cells" not in skip:
            log("cells:")
            b.run_cells()
        if "latency" not in skip:
            log("latency:")
            b.run_latency()
        if "memory" not in skip:
            log("memory:")
            b.run_memory()
        if "tls" not in skip:
            log("tls (wrk over https, keep-alive):")
            res["tls"] = b.run_front("tls", a.tls_conns)
        if "h2" not in skip:
            log(f"h2 (h2load over h2c, {a.h2_streams} streams per connection):")
            res["h2"] = b.run_front("h2c", a.h2_conns)
        if "nagle" not in skip:
            log("nagle:")
            b.run_nagle()
        if "compression" not in skip:
            log("compression:")
            b.run_compression()
        if "churn" not in skip and "portico" in a.proxies:
            log("churn:")
            b.run_churn()
        if "discovery" not in skip:
            log("discovery:")
            b.run_discovery()
    finally:
        b.stop()
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    write_reports(res, a)


def write_reports(res, a):
    text = summary(res, a)
    with open(os.path.join(a.out, "summary.md"), "w") as f:
        f.write(text)
    with open(os.path.join(a.out, "chart.svg"), "w") as f:
        f.write(chart(res, a))
    print(text)


if __name__ == "__main__":
    main()
