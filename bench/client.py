"""Benchmark client: measures one workload against the origin, directly or through the proxy.

Run by bench.py, either on its own (direct) or as the child of `authsome run` (through the
proxy found in $HTTPS_PROXY). Prints one JSON document with the measurements.
"""

import base64
import json
import os
import socket
import ssl
import statistics
import sys
import threading
import time
from urllib.parse import urlsplit


class Target:
    """How to reach the origin: its name and port, its address, and the proxy if there is one."""

    def __init__(self, name, port, dial_host, dial_port, ca_file):
        self.name = name
        self.port = port
        self.dial = (dial_host, dial_port)
        proxy = os.environ.get("HTTPS_PROXY")
        self.proxy = urlsplit(proxy) if proxy else None
        # Under `authsome run`, SSL_CERT_FILE is the run's bundle: the run CA plus the origin's.
        self.context = ssl.create_default_context(
            cafile=os.environ["SSL_CERT_FILE"] if self.proxy else ca_file)

    def connect(self):
        if self.proxy is None:
            raw = socket.create_connection(self.dial, timeout=60)
        else:
            raw = socket.create_connection((self.proxy.hostname, self.proxy.port), timeout=60)
            token = base64.b64encode(("%s:%s" % (self.proxy.username, self.proxy.password)).encode())
            raw.sendall(b"CONNECT %s:%d HTTP/1.1\r\nHost: %s:%d\r\nProxy-Authorization: Basic %s\r\n\r\n"
                        % (self.name.encode(), self.port, self.name.encode(), self.port, token))
            head = b""
            while b"\r\n\r\n" not in head:
                data = raw.recv(4096)
                if not data:
                    raise ConnectionError("proxy closed the connection")
                head += data
            if not head.startswith(b"HTTP/1.1 200"):
                raise ConnectionError(head.split(b"\r\n")[0].decode())
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return Connection(self.context.wrap_socket(raw, server_hostname=self.name), self.name)


class Connection:
    """A kept-alive HTTPS/1.1 connection that reads Content-Length responses."""

    def __init__(self, sock, host):
        self.sock = sock
        self.host = host
        self.buffer = bytearray()

    def request(self, path):
        self.sock.sendall(b"GET %s HTTP/1.1\r\nHost: %s\r\nAuthorization: Token placeholder\r\n\r\n"
                          % (path.encode(), self.host.encode()))
        return self.read_response()

    def read_response(self):
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        end = self.buffer.index(b"\r\n\r\n") + 4
        head = bytes(self.buffer[:end])
        del self.buffer[:end]
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        received = len(self.buffer)
        if received >= length:
            del self.buffer[:length]
            return status, length
        self.buffer.clear()
        view = memoryview(bytearray(1024 * 1024))
        while received < length:
            count = self.sock.recv_into(view, min(len(view), length - received))
            if not count:
                raise ConnectionError("connection closed inside a body")
            received += count
        return status, length

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed")
        self.buffer += data

    def close(self):
        self.sock.close()


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def download(target, size, rounds=5):
    """Median speed of `rounds` downloads of `size` bytes, each on a new connection."""
    speeds = []
    for _ in range(rounds):
        connection = target.connect()
        started = time.perf_counter()
        status, length = connection.request("/bytes/%d" % size)
        elapsed = time.perf_counter() - started
        connection.close()
        assert status == 200
        assert length == size
        speeds.append(size / (1024 * 1024) / elapsed)
    return {"mib_per_s": statistics.median(speeds)}


def proxy_cpu_seconds():
    """CPU time (user + system) used so far by the parent process, from /proc; None if absent."""
    try:
        with open("/proc/%d/stat" % os.getppid()) as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def keepalive(target, count):
    connection = target.connect()
    connection.request("/small")  # warm-up
    timings = []
    cpu_before = proxy_cpu_seconds()
    for _ in range(count):
        started = time.perf_counter()
        status, _ = connection.request("/small")
        timings.append(time.perf_counter() - started)
        assert status == 200
    cpu_after = proxy_cpu_seconds()
    connection.close()
    result = {"p50_ms": percentile(timings, 0.5) * 1000, "p99_ms": percentile(timings, 0.99) * 1000}
    if target.proxy is not None and cpu_before is not None:
        result["proxy_cpu_us"] = (cpu_after - cpu_before) / count * 1e6
    return result


def new_connections(target, count):
    timings = []
    for _ in range(count):
        started = time.perf_counter()
        connection = target.connect()
        status, _ = connection.request("/small")
        timings.append(time.perf_counter() - started)
        connection.close()
        assert status == 200
    return {"p50_ms": percentile(timings, 0.5) * 1000}


def concurrent(target, clients, seconds):
    done, errors = [0], [0]
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def worker():
        try:
            connection = target.connect()
        except OSError:
            with lock:
                errors[0] += 1
            return
        count = 0
        try:
            while time.perf_counter() < deadline:
                status, _ = connection.request("/small")
                if status != 200:
                    with lock:
                        errors[0] += 1
                count += 1
        except (OSError, ConnectionError):
            with lock:
                errors[0] += 1
        finally:
            connection.close()
            with lock:
                done[0] += count

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"requests_per_s": done[0] / (time.perf_counter() - started), "errors": errors[0]}


def proxy_rss_kib():
    """Peak resident memory of the parent process (the authsome proxy), from /proc."""
    try:
        with open("/proc/%d/status" % os.getppid()) as handle:
            fields = dict(line.split(":", 1) for line in handle if ":" in line)
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])
    except (OSError, KeyError, ValueError):
        return None, None


def server_sent_events(target, streams, events):
    """Hold `streams` SSE streams open; report first-event delay and the proxy's memory."""
    delays, lock = [], threading.Lock()
    opened = threading.Barrier(streams + 1)

    def reader():
        connection = target.connect()
        connection.sock.sendall(b"GET /sse/%d HTTP/1.1\r\nHost: %s\r\n\r\n" % (events, target.name.encode()))
        opened.wait()
        buffer = b""
        seen = 0
        while seen < events:
            data = connection.sock.recv(65536)
            if not data:
                break
            arrival = time.time()
            buffer += data
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                for line in event.split(b"\n"):
                    if line.startswith(b"data: "):
                        sent = float(line[6:])
                        with lock:
                            delays.append((seen, arrival - sent))
                        seen += 1
        connection.close()

    threads = [threading.Thread(target=reader) for _ in range(streams)]
    for thread in threads:
        thread.start()
    opened.wait()
    time.sleep(0.5 + 0.2 * events / 2)  # mid-stream: every stream is open and has had events
    rss, peak = proxy_rss_kib()
    for thread in threads:
        thread.join()
    first = [delay for index, delay in delays if index == 0]
    every = [delay for _, delay in delays]
    return {"first_event_ms_p50": statistics.median(first) * 1000,
            "event_ms_p50": statistics.median(every) * 1000,
            "event_ms_max": max(every) * 1000,
            "proxy_rss_mib": rss / 1024 if rss else None,
            "proxy_peak_rss_mib": peak / 1024 if peak else None}


def main():
    name, port, dial_host, dial_port, ca_file, workload = sys.argv[1:7]
    target = Target(name, int(port), dial_host, int(dial_port), ca_file)
    if workload == "download":
        result = download(target, 50 * 1024 * 1024)
    elif workload == "keepalive":
        result = keepalive(target, 1000)
    elif workload == "new_connections":
        result = new_connections(target, 200)
    elif workload == "concurrent":
        result = concurrent(target, 64, 5.0)
    elif workload == "sse":
        result = server_sent_events(target, 32, 10)
    else:
        raise SystemExit("unknown workload %r" % workload)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
