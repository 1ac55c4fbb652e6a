"""Benchmark of `authsome run`: direct connection vs blind tunnel vs interception with injection.

Everything runs on 127.0.0.1: a TLS origin started here (certificate from a throwaway CA made with
authsome's own CertificateAuthority), the proxy of `authsome run`, and bench/client.py as the
child. Prints a table with ratios to direct and writes it to docs/benchmarks.md.

    python3 bench/bench.py [--runs-true N] [--no-write]
"""

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

import authsome  # noqa: E402  (the repository root is added to the path just above)

INTERCEPTED_HOST = "api.g2.com"
TUNNEL_HOST = "bench-tunnel.test"
SMALL_BODY = b'{"ok": true}\n'
PAYLOAD = b"x" * (1024 * 1024)


class Origin:
    """A threaded HTTPS/1.1 origin with /bytes/N, /small and /sse/N (one event every 200 ms,
    the first after 500 ms)."""

    def __init__(self, context):
        self.context = context
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(512)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            conn, _ = self.listener.accept()
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = self.context.wrap_socket(conn, server_side=True)
            buffer = b""
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = tls.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                path = head.split(b" ", 2)[1].decode()
                self._respond(tls, path)
        except (OSError, ValueError):
            pass
        finally:
            conn.close()

    def _respond(self, tls, path):
        if path.startswith("/bytes/"):
            size = int(path.rsplit("/", 1)[1])
            tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
            view = memoryview(PAYLOAD)
            while size > 0:
                tls.sendall(view[:min(size, len(PAYLOAD))])
                size -= len(PAYLOAD)
        elif path.startswith("/sse/"):
            tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n")
            time.sleep(0.5)  # lets every client reach its read loop before the first event
            for _ in range(int(path.rsplit("/", 1)[1])):
                event = b"data: %.6f\n\n" % time.time()
                tls.sendall(b"%x\r\n%s\r\n" % (len(event), event))
                time.sleep(0.2)
            tls.sendall(b"0\r\n\r\n")
        else:
            tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(SMALL_BODY), SMALL_BODY))


def make_origin(workdir):
    ca = authsome.CertificateAuthority(os.path.join(workdir, "ca"))
    ca_file = os.path.join(workdir, "bench-ca.pem")
    with open(ca_file, "wb") as handle:
        handle.write(ca.ca_cert_pem)
    context = authsome.ssl.SSLContext(authsome.ssl.PROTOCOL_TLS_SERVER)
    cert_path, key_path = ca.leaf_files(INTERCEPTED_HOST)
    context.load_cert_chain(cert_path, key_path)
    context.sni_callback = None
    tunnel_cert, tunnel_key = ca.leaf_files(TUNNEL_HOST)
    tunnel_context = authsome.ssl.SSLContext(authsome.ssl.PROTOCOL_TLS_SERVER)
    tunnel_context.load_cert_chain(tunnel_cert, tunnel_key)

    def choose(ssl_socket, server_name, _context):
        if server_name == TUNNEL_HOST:
            ssl_socket.context = tunnel_context

    context.sni_callback = choose
    return Origin(context), ca_file


def run_client(env, origin, ca_file, mode, workload):
    host = {"direct": INTERCEPTED_HOST, "tunnel": TUNNEL_HOST, "intercepted": INTERCEPTED_HOST}[mode]
    client = [sys.executable, os.path.join(HERE, "client.py"), host, "443", "127.0.0.1",
              str(origin.port), ca_file, workload]
    if mode != "direct":
        client = [sys.executable, os.path.join(REPO, "authsome.py"), "run",
                  "--connect-to", "%s:443=127.0.0.1:%d" % (host, origin.port), "--"] + client
    result = subprocess.run(client, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise SystemExit("benchmark client failed (%s, %s):\n%s" % (mode, workload, result.stderr))
    return json.loads(result.stdout.strip().splitlines()[-1])


def time_run_true(env, runs):
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, os.path.join(REPO, "authsome.py"), "run", "--", "true"],
                       env=env, check=True)
        timings.append(time.perf_counter() - started)
    python_only = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)
        python_only.append(time.perf_counter() - started)
    return statistics.median(timings) * 1000, statistics.median(python_only) * 1000


def machine_description():
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return "%s, %d cores, %s, Python %s, %s" % (model, os.cpu_count() or 0, platform.platform(),
                                                platform.python_version(), authsome.ssl.OPENSSL_VERSION)


ROWS = [
    ("download", "mib_per_s", "50 MiB download, median of 5 (MiB/s)", "higher"),
    ("keepalive", "p50_ms", "kept-alive request p50 (ms)", "lower"),
    ("keepalive", "p99_ms", "kept-alive request p99 (ms)", "lower"),
    ("keepalive", "proxy_cpu_us", "proxy CPU per kept-alive request (microseconds)", "lower"),
    ("new_connections", "p50_ms", "request on a new connection p50 (ms)", "lower"),
    ("concurrent", "requests_per_s", "64 concurrent clients (requests/s)", "higher"),
    ("concurrent", "errors", "64 concurrent clients (errors)", "lower"),
    ("sse", "first_event_ms_p50", "SSE first event delay p50 (ms)", "lower"),
    ("sse", "event_ms_max", "SSE event delay max (ms)", "lower"),
    ("sse", "proxy_peak_rss_mib", "peak memory with 32 SSE streams (MiB)", "lower"),
]


def format_table(results, run_true_ms, python_ms):
    lines = ["| measurement | direct | tunnel | intercepted | tunnel / direct | intercepted / direct |",
             "|---|---|---|---|---|---|"]
    for workload, field, label, _ in ROWS:
        values = [results[mode][workload].get(field) for mode in ("direct", "tunnel", "intercepted")]
        cells = ["-" if value is None else "%.2f" % value for value in values]
        ratios = []
        for value in values[1:]:
            if value is None or not values[0]:
                ratios.append("-")
            else:
                ratios.append("%.2f" % (value / values[0]))
        lines.append("| %s | %s | %s |" % (label, " | ".join(cells), " | ".join(ratios)))
    lines.append("| `authsome run -- true` wall time, median (ms) | %.1f (python3 -c pass: %.1f) | | | | |"
                 % (run_true_ms, python_ms))
    return "\n".join(lines)


def format_targets(results, run_true_ms):
    """Compare the run with the proxy's speed and memory targets; one table row per target."""
    direct, intercepted = results["direct"], results["intercepted"]
    keepalive_overhead = intercepted["keepalive"]["p50_ms"] - direct["keepalive"]["p50_ms"]
    checks = [
        ("intercepted download at least 60 % of direct",
         intercepted["download"]["mib_per_s"] / direct["download"]["mib_per_s"] * 100, "%", 60, True),
        ("kept-alive request overhead under 0.5 ms at p50", keepalive_overhead, "ms", 0.5, False),
        ("64 concurrent clients at least 50 % of direct's requests/s",
         intercepted["concurrent"]["requests_per_s"] / direct["concurrent"]["requests_per_s"] * 100,
         "%", 50, True),
        ("64 concurrent clients with zero errors", intercepted["concurrent"]["errors"], "errors",
         0, False),
        ("first SSE event within 10 ms", intercepted["sse"]["first_event_ms_p50"], "ms", 10, False),
        ("proxy memory under 50 MB with 32 streams", intercepted["sse"]["proxy_peak_rss_mib"] * 1.048576,
         "MB", 50, False),
        ("`run -- true` under 150 ms", run_true_ms, "ms", 150, False),
    ]
    lines = ["| target | measured | met |", "|---|---|---|"]
    for label, value, unit, limit, at_least in checks:
        if at_least:
            met = value >= limit
        elif unit == "errors":
            met = value <= limit
        else:
            met = value < limit
        lines.append("| %s | %.2f %s | %s |" % (label, value, unit, "yes" if met else "no"))
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs-true", type=int, default=20, help="runs of `run -- true` (default 20)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md")
    options = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="authsome-bench-") as workdir:
        os.mkdir(os.path.join(workdir, "ca"), 0o700)
        origin, ca_file = make_origin(workdir)
        env = dict(os.environ, AUTHSOME_HOME=os.path.join(workdir, "home"), SSL_CERT_FILE=ca_file)
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "AUTHSOME_MASTER_KEY",
                     "AUTHSOME_PASSPHRASE"):
            env.pop(name, None)
        subprocess.run([sys.executable, os.path.join(REPO, "authsome.py"), "login", "g2", "--stdin"],
                       env=env, input="bench-key-not-secret", text=True, check=True, capture_output=True)

        results = {mode: {} for mode in ("direct", "tunnel", "intercepted")}
        for workload in ("download", "keepalive", "new_connections", "concurrent", "sse"):
            for mode in results:
                results[mode][workload] = run_client(env, origin, ca_file, mode, workload)
                print("%-12s %-16s %s" % (mode, workload, json.dumps(results[mode][workload])),
                      flush=True)
        direct_sse = results["direct"]["sse"]
        direct_sse["proxy_rss_mib"] = direct_sse["proxy_peak_rss_mib"] = None  # no proxy
        run_true_ms, python_ms = time_run_true(env, options.runs_true)

    table = format_table(results, run_true_ms, python_ms)
    targets = format_targets(results, run_true_ms)
    stamp = time.strftime("%Y-%m-%d", time.gmtime())
    report = ("# Benchmarks\n\nMeasured by `make bench` (bench/bench.py) on %s.\n\nMachine: %s.\n\n"
              "All traffic is on 127.0.0.1: origin, proxy and client share the machine's cores, "
              "so the numbers compare the three paths with each other, not with a network. "
              "\"tunnel\" is a CONNECT to a host with no credential (bytes copied blindly); "
              "\"intercepted\" terminates TLS with the run's CA and injects the G2 key. Memory is "
              "the peak resident size of the `authsome run` process (VmHWM).\n\n%s\n\n"
              "## Targets\n\n%s\n\n"
              "The throughput and concurrency targets are not met here. On two cores the origin, "
              "the proxy and the client compete for CPU. An intercepted connection makes the "
              "proxy decrypt and re-encrypt every byte, so it adds about as much TLS work as "
              "both ends of a direct connection together. Each intercepted request also runs "
              "Python code in the proxy (parsing, routing, injection, the audit entry), which the "
              "row \"proxy CPU per kept-alive request\" measures from the proxy's CPU time over "
              "1,000 requests.\n"
              % (stamp, machine_description(), table, targets))
    print()
    print(table)
    print()
    print(targets)
    if not options.no_write:
        path = os.path.join(REPO, "docs", "benchmarks.md")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as handle:
            handle.write(report)
        print("\nwrote %s" % path)


if __name__ == "__main__":
    main()
