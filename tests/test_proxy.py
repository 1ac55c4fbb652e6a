"""End-to-end tests of the `authsome run` proxy at the HTTP/1.1 level.

One `authsome --verbose run` serves most tests of this module (the `lab` fixture). Its child
writes its environment to a file and then waits for its standard input to close. Each test
runs clients with exactly the environment a real agent gets (HTTPS_PROXY with the per-run
token, the run's CA bundle, NODE_OPTIONS, ...), or sends raw bytes to the proxy address from
that environment.

The origins are loopback stand-ins: `api.g2.com` (the bundled g2 provider), `other.test` (no
credential, so a blind tunnel), a custom provider `lab` at `https://[::1]:PORT`, and two hosts
that fail: `untrusted.test` presents a certificate from an untrusted CA and `refused.test`
rejects connections. A plain-HTTP server plays the `http://` origins. Runs with special
limits (timeouts, connection cap) start their own short-lived proxy.
"""

import base64
import hashlib
import json
import os
import select
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from conftest import AUTHSOME, Origin, TestCA, assert_no_secret, ipv6_loopback_available, run_cli

G2_KEY = "g2-proxy-key-5d1e8c2a9f"
LAB_KEY = "lab-proxy-key-0b7c4e6d13"
KEYS = (G2_KEY, LAB_KEY)
PLACEHOLDER = "authsome-proxy-managed"
MIB = 1024 * 1024

# The child of every run: publish the environment, then wait until standard input closes.
CHILD = """
import json, os, sys
path = sys.argv[1]
with open(path + ".tmp", "w") as handle:
    json.dump(dict(os.environ), handle)
os.replace(path + ".tmp", path)
sys.stdin.read()
"""

REMOVED_VARIABLES = ("DISPLAY", "WAYLAND_DISPLAY", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
                     "ALL_PROXY", "http_proxy", "https_proxy", "no_proxy", "all_proxy",
                     "NODE_OPTIONS")


# =============================================================================================
# a small HTTP/1.1 reader for the client side of tests
# =============================================================================================


class Reply:
    def __init__(self, status, version, headers, raw_head):
        self.status = status
        self.version = version
        self.headers = headers
        self.raw_head = raw_head
        self.body = b""
        self.interim = []

    def header(self, name):
        values = [value for key, value in self.headers if key.lower() == name.lower()]
        return values[-1] if values else None

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return "<Reply %d %r>" % (self.status, self.body[:80])


class Wire:
    """Buffered reads of HTTP/1.1 messages from a socket (plain or TLS)."""

    def __init__(self, sock, timeout=15.0):
        self.sock = sock
        self.buffer = b""
        sock.settimeout(timeout)

    def send(self, data):
        self.sock.sendall(data)

    def _more(self):
        data = self.sock.recv(256 * 1024)
        if not data:
            raise EOFError("connection closed; %d bytes unread" % len(self.buffer))
        self.buffer += data

    def read_until(self, marker):
        while marker not in self.buffer:
            self._more()
        end = self.buffer.index(marker) + len(marker)
        data, self.buffer = self.buffer[:end], self.buffer[end:]
        return data

    def read_exact(self, size):
        while len(self.buffer) < size:
            self._more()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def read_to_eof(self):
        while True:
            try:
                self._more()
            except EOFError:
                data, self.buffer = self.buffer, b""
                return data

    def read_head(self):
        raw = self.read_until(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")[:-2]
        version, status = lines[0].split(" ")[:2]
        headers = [tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:]]
        return Reply(int(status), version, headers, raw)

    def read_response(self, method="GET"):
        reply = self.read_head()
        interim = []
        while 100 <= reply.status < 200 and reply.status != 101:
            interim.append(reply)
            reply = self.read_head()
        reply.interim = interim
        if method == "HEAD" or reply.status in (101, 204, 304):
            return reply
        if (reply.header("Transfer-Encoding") or "").lower().endswith("chunked"):
            reply.body = self._read_chunked()
        elif reply.header("Content-Length") is not None:
            reply.body = self.read_exact(int(reply.header("Content-Length")))
        else:
            reply.body = self.read_to_eof()
        return reply

    def _read_chunked(self):
        parts = []
        while True:
            size = int(self.read_until(b"\r\n").split(b";")[0], 16)
            if size == 0:
                while self.read_until(b"\r\n") != b"\r\n":
                    pass
                return b"".join(parts)
            parts.append(self.read_exact(size))
            assert self.read_exact(2) == b"\r\n"

    def closed_within(self, seconds):
        """Whether the peer closes (EOF or reset) within `seconds`, with nothing else sent."""
        self.sock.settimeout(seconds)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return False
        except (ConnectionResetError, ssl.SSLError):
            return True
        assert data == b"", "unexpected bytes %r" % data[:80]
        return True


def request_bytes(method, target, host="api.g2.com", headers=(), body=b"", version="HTTP/1.1"):
    lines = ["%s %s %s" % (method, target, version)]
    if host is not None:
        lines.append("Host: %s" % host)
    lines += ["%s: %s" % pair for pair in headers]
    if body and not any(name.lower() in ("content-length", "transfer-encoding") for name, _ in headers):
        lines.append("Content-Length: %d" % len(body))
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunked(data, size):
    out = [b"%x\r\n%s\r\n" % (len(data[i:i + size]), data[i:i + size]) for i in range(0, len(data), size)]
    return b"".join(out) + b"0\r\n\r\n"


# =============================================================================================
# stand-in servers
# =============================================================================================


class Recorder:
    """State shared between the origin handlers and the tests."""

    def __init__(self):
        self.sse_sent = []
        self.drop_next = set()  # origin connection ids whose next request gets no response
        self.lock = threading.Lock()


def digest(data):
    return hashlib.sha256(data).hexdigest()


def respond_expect(exchange, recorder):
    # Respond at once, without reading the body: /expect-417, /expect-401.
    status = int(exchange.request.path.rsplit("-", 1)[1])
    body = b"no body wanted\n" * (100000 if exchange.request.header("X-Big-Answer") else 1)
    exchange.respond(status, [("Content-Type", "text/plain")], body)


def respond_with_length(exchange, recorder):
    headers = [("Content-Length", "1234")] if exchange.request.method == "HEAD" else []
    exchange.respond(200, headers, b"x" * 1234)


def respond_204(exchange, recorder):
    exchange.send_head(204, [("X-Note", "nothing")])


def respond_304(exchange, recorder):
    exchange.send_head(304, [("ETag", '"v1"'), ("Content-Length", "99")])


def respond_events(exchange, recorder):
    # Without TCP_NODELAY the stand-in's own small writes wait for a delayed ACK.
    exchange.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    exchange.send_head(200, [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache"),
                             ("Transfer-Encoding", "chunked")])
    for index in range(5):
        if index:
            time.sleep(0.2)
        with recorder.lock:
            recorder.sse_sent.append(time.time())
        exchange.write_chunk(b"id: %d\ndata: event %d\n\n" % (index, index))
    exchange.end_chunks()


def respond_events_until_close(exchange, recorder):
    exchange.send_head(200, [("Content-Type", "text/event-stream")])
    for index in range(3):
        exchange.write(b"data: close-delimited %d\n\n" % index)
        time.sleep(0.05)
    exchange.close_after = True


def respond_until_close(exchange, recorder):
    exchange.send_head(200, [("Content-Type", "application/octet-stream")])
    exchange.write(b"A" * 300000)
    exchange.write(b"the end")
    exchange.close_after = True


def respond_chunked(exchange, recorder):
    exchange.send_head(200, [("Transfer-Encoding", "chunked")])
    for part in (b"first ", b"second ", b"third"):
        exchange.write_chunk(part)
    exchange.end_chunks()


def respond_then_close_silently(exchange, recorder):
    # The origin closes the connection after the response without a "Connection: close",
    # like an origin whose keep-alive timeout just passed.
    exchange.respond(200, [], b"served on connection %d" % exchange.request.connection_id)
    exchange.close_after = True


def respond_then_drop_next(exchange, recorder):
    with recorder.lock:
        recorder.drop_next.add(exchange.request.connection_id)
    exchange.respond(200, [], b"the next request on this connection is dropped")


def respond_500(exchange, recorder):
    exchange.respond(500, [("Content-Type", "text/plain")], b"origin failure\n")


def respond_then_reset(exchange, recorder):
    exchange.send_head(200, [("Content-Length", "100000")])
    exchange.write(b"partial" * 100)
    time.sleep(0.2)  # let the proxy read what was sent: a reset discards unread data
    sock, _ = exchange.take_over()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def respond_git_refs(exchange, recorder):
    status, headers, body = git_advertisement()
    exchange.respond(status, headers, body)


def respond_digest(exchange, recorder):
    """Respond with the request line facts and the SHA-256 of the body (never its headers)."""
    request = exchange.request
    body = exchange.read_body()
    exchange.respond_json(200, {"method": request.method, "target": request.target,
                                "length": len(body), "sha256": digest(body),
                                "connection": request.connection_id, "version": request.version})


ROUTES = {
    "/drop-next": respond_then_drop_next,
    "/expect-401": respond_expect,
    "/expect-417": respond_expect,
    "/head": respond_with_length,
    "/with-length": respond_with_length,
    "/204": respond_204,
    "/304": respond_304,
    "/sse": respond_events,
    "/sse-close": respond_events_until_close,
    "/close-delimited": respond_until_close,
    "/chunked-response": respond_chunked,
    "/close-silently": respond_then_close_silently,
    "/ws": lambda exchange, recorder: websocket(exchange),
    "/500": respond_500,
    "/reset": respond_then_reset,
    "/repo.git/info/refs": respond_git_refs,
}


def make_handler(recorder):
    def handler(exchange):
        request = exchange.request
        with recorder.lock:
            drop = request.connection_id in recorder.drop_next
            recorder.drop_next.discard(request.connection_id)
        if drop:
            # Close without a response, as if the origin's keep-alive timeout had passed
            # just as this request was on its way.
            exchange.take_over()
            return
        ROUTES.get(request.path, respond_digest)(exchange, recorder)

    return handler


def websocket(exchange):
    request = exchange.request
    assert (request.header("Upgrade") or "").lower() == "websocket"
    exchange.send_head(101, [("Upgrade", "websocket"), ("Connection", "Upgrade"),
                             ("Sec-WebSocket-Accept", "dummy")])
    sock, leftover = exchange.take_over()
    sock.settimeout(15)
    sock.sendall(b"server-hello;")
    pending = leftover
    while True:
        while b";" in pending:
            message, _, pending = pending.partition(b";")
            if message.startswith(b"bulk:"):
                size = int(message[5:])
                received = bulk_exchange(sock, b"B" * size, size - len(pending))
                if pending + received != b"b" * size:
                    return None
                pending = b""
                sock.settimeout(15)
            else:
                sock.sendall(b"echo:" + message.upper() + b";")
        data = sock.recv(65536)
        if not data:
            return None
        pending += data


def bulk_exchange(sock, payload, expected, timeout=30.0):
    """Send `payload` while receiving `expected` bytes, in one thread: an SSLSocket must not be
    read and written by two threads at once."""
    sock.setblocking(False)
    received = bytearray()
    sent = 0
    deadline = time.monotonic() + timeout
    while sent < len(payload) or len(received) < expected:
        assert time.monotonic() < deadline, "bulk exchange stalled"
        if sent < len(payload):
            try:
                sent += sock.send(payload[sent:sent + 16384])
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                pass
        try:
            data = sock.recv(65536)
            if not data:
                raise EOFError("closed after %d of %d bytes" % (len(received), expected))
            received += data
            continue
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            pass
        select.select([sock], [sock] if sent < len(payload) else [], [], 0.5)
    return bytes(received)


def git_advertisement():
    sha = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
    lines = [b"# service=git-upload-pack\n", None,
             ("%s HEAD\0multi_ack symref=HEAD:refs/heads/main\n" % sha).encode(),
             ("%s refs/heads/main\n" % sha).encode(), None]
    body = b"".join(b"0000" if line is None else b"%04x%s" % (len(line) + 4, line) for line in lines)
    return 200, [("Content-Type", "application/x-git-upload-pack-advertisement"),
                 ("Cache-Control", "no-cache")], body


class PlainServer:
    """A plain-TCP HTTP/1.1 server on 127.0.0.1 that records each request head."""

    def __init__(self):
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.requests = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        wire = Wire(conn)
        try:
            while True:
                raw = wire.read_until(b"\r\n\r\n")
                lines = raw.decode("latin-1").split("\r\n")[:-2]
                headers = [tuple(part.strip() for part in line.split(":", 1)) for line in lines[1:]]
                length = int(dict((k.lower(), v) for k, v in headers).get("content-length", "0"))
                body = wire.read_exact(length)
                self.requests.append({"line": lines[0], "headers": headers, "body": body})
                payload = b"plain ok"
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload))
        except (EOFError, OSError):
            pass
        finally:
            conn.close()

    def close(self):
        self.listener.close()


# =============================================================================================
# authsome runs
# =============================================================================================


class Run:
    """One `authsome --verbose run` whose child publishes its environment and waits."""

    def __init__(self, folder, env, connect_to=(), timeout=20):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.stdout_path = folder / "stdout.txt"
        self.stderr_path = folder / "stderr.txt"
        env_file = folder / "child-env.json"
        child = folder / "child.py"
        child.write_text(CHILD)
        args = [sys.executable, str(AUTHSOME), "--verbose", "run"]
        for entry in connect_to:
            args += ["--connect-to", entry]
        args += ["--", sys.executable, str(child), str(env_file)]
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(args, env=env, stdin=subprocess.PIPE, stdout=out, stderr=err)
        deadline = time.monotonic() + timeout
        while not env_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("authsome run did not start: %s" % self.stderr_path.read_text())
            time.sleep(0.02)
        self.env = json.loads(env_file.read_text())
        proxy = urlsplit(self.env["HTTPS_PROXY"])
        self.address = (proxy.hostname, proxy.port)
        self.auth = "Basic " + base64.b64encode(
            ("%s:%s" % (proxy.username, proxy.password)).encode()).decode()
        self.context = ssl.create_default_context(cafile=self.env["SSL_CERT_FILE"])
        self.context.verify_flags |= ssl.VERIFY_X509_STRICT

    # -- clients ---------------------------------------------------------------------------

    def connect(self, timeout=15.0):
        return socket.create_connection(self.address, timeout=timeout)

    def wire(self, timeout=15.0):
        return Wire(self.connect(timeout), timeout)

    def connect_head(self, authority):
        return ("CONNECT %s HTTP/1.1\r\nHost: %s\r\nProxy-Authorization: %s\r\n\r\n"
                % (authority, authority, self.auth)).encode()

    def tunnel(self, host="api.g2.com", port=443, timeout=15.0):
        """CONNECT through the proxy and start TLS; returns a Wire on the TLS socket."""
        authority = "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)
        sock = self.connect(timeout)
        sock.sendall(self.connect_head(authority))
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            byte = sock.recv(1)
            assert byte, "proxy closed the connection after CONNECT: %r" % head
            head += byte
        assert head.startswith(b"HTTP/1.1 200"), head
        tls = self.context.wrap_socket(sock, server_hostname=host)
        return Wire(tls, timeout)

    def fetch(self, method, target, host="api.g2.com", headers=(), body=b""):
        wire = self.tunnel(host)
        wire.send(request_bytes(method, target, host, headers, body))
        reply = wire.read_response(method)
        wire.sock.close()
        return reply

    def run(self, command, timeout=30, **options):
        return subprocess.run(command, env=self.env, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL, **options)

    # -- end -------------------------------------------------------------------------------

    def stop(self):
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=20)
        return self.stdout_path.read_text(), self.stderr_path.read_text()


def base_env(home):
    env = {name: value for name, value in os.environ.items()
           if name not in REMOVED_VARIABLES and not name.startswith("AUTHSOME_")}
    env["AUTHSOME_HOME"] = str(home)
    return env


def closed_port():
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


class Lab:
    pass


@pytest.fixture(scope="module")
def lab(tmp_path_factory, test_ca):
    folder = tmp_path_factory.mktemp("proxy-lab")
    lab = Lab()
    lab.recorder = Recorder()
    handler = make_handler(lab.recorder)
    servers = []

    def start_origin(names, host="127.0.0.1", ca=test_ca):
        cert, key = ca.issue(list(names))
        server = Origin(cert, key, names=names, handler=handler, host=host).start()
        servers.append(server)
        return server

    lab.g2 = start_origin(["api.g2.com"])
    lab.other = start_origin(["other.test"])
    stranger = TestCA(tmp_path_factory.mktemp("untrusted-ca"))
    lab.untrusted = start_origin(["untrusted.test"], ca=stranger)
    lab.v6 = start_origin(["::1"], host="::1") if ipv6_loopback_available() else None
    lab.plain = PlainServer()
    lab.home = folder / "home"
    lab.env = base_env(lab.home)
    lab.env["SSL_CERT_FILE"] = str(test_ca.ca_pem_path)  # the proxy trusts the stand-ins' CA

    api_urls = ["untrusted.test", "refused.test"]
    if lab.v6:
        api_urls.insert(0, "https://[::1]:%d" % lab.v6.port)
    (lab.home / "providers").mkdir(parents=True)
    (lab.home / "providers" / "lab.json").write_text(json.dumps({
        "name": "lab", "display_name": "Lab", "auth_type": "api_key", "api_url": api_urls,
        "api_key": {"header_name": "X-Lab-Key", "header_prefix": None},
        "export": {"LAB_KEY": "API_KEY"}}))
    for provider, key in (("g2", G2_KEY), ("lab", LAB_KEY)):
        result = run_cli(["login", provider, "--stdin"], lab.env, input=key)
        assert result.returncode == 0, result.stderr

    lab.connect_to = [
        lab.g2.connect_to("api.g2.com"), lab.other.connect_to("other.test"),
        lab.untrusted.connect_to("untrusted.test"), "refused.test:443=127.0.0.1:%d" % closed_port(),
        "api.g2.com:80=127.0.0.1:%d" % lab.plain.port, "plain.test:80=127.0.0.1:%d" % lab.plain.port,
    ]
    lab.folder = folder
    lab.run = Run(folder / "run", lab.env, lab.connect_to)
    yield lab
    lab.run.stop()
    for server in servers:
        server.stop()
    lab.plain.close()


@pytest.fixture
def run(lab):
    return lab.run


def requests_for(origin, path):
    return [request for request in list(origin.requests) if request.path == path]


def wait_for_request(origin, path, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        found = requests_for(origin, path)
        if found:
            return found[-1]
        assert time.monotonic() < deadline, "origin never got %s" % path
        time.sleep(0.01)


# =============================================================================================
# request bodies
# =============================================================================================


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_request_body_reaches_origin_exactly(framing, lab, run):
    body = os.urandom(5 * MIB)
    path = "/upload-%s" % framing
    wire = run.tunnel()
    if framing == "length":
        wire.send(request_bytes("PUT", path, body=body))
    else:
        # Uneven chunk sizes, written in pieces that split chunk headers across reads.
        encoded = chunked(body, 70001)
        wire.send(request_bytes("PUT", path, headers=[("Transfer-Encoding", "chunked")]))
        for start in range(0, len(encoded), 99991):
            wire.send(encoded[start:start + 99991])
    reply = wire.read_response()
    assert reply.status == 200
    assert reply.json()["length"] == len(body)
    assert reply.json()["sha256"] == digest(body)
    request = wait_for_request(lab.g2, path)
    assert request.header_values("Authorization") == ["Token " + G2_KEY]
    # The next request on the same connection still works: the body was framed exactly.
    wire.send(request_bytes("GET", "/after-" + framing))
    assert wire.read_response().status == 200


@pytest.mark.parametrize("mode", ["expect", "chunked"])
def test_curl_upload(mode, lab, run, clients, tmp_path):
    clients.require("curl")
    body = os.urandom(5 * MIB)
    upload = tmp_path / "upload.bin"
    upload.write_bytes(body)
    path = "/upload-curl-" + mode
    if mode == "expect":  # curl -T sends Expect: 100-continue for a large file
        command = ["curl", "-sS", "--max-time", "30", "-T", str(upload), "https://api.g2.com" + path]
    else:
        command = ["curl", "-sS", "--max-time", "30", "-H", "Transfer-Encoding: chunked",
                   "-H", "Expect:", "--data-binary", "@%s" % upload, "https://api.g2.com" + path]
    result = run.run(command)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["sha256"] == digest(body)
    request = wait_for_request(lab.g2, path)
    if mode == "expect":
        assert request.header("Expect") == "100-continue"
    else:
        assert request.header("Transfer-Encoding") == "chunked"
    assert request.header_values("Authorization") == ["Token " + G2_KEY]


def test_small_chunked_body_with_trailers(lab, run):
    wire = run.tunnel()
    wire.send(request_bytes("POST", "/trailers", headers=[("Transfer-Encoding", "chunked"),
                                                           ("Trailer", "X-Checksum")]))
    wire.send(b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: abc\r\n\r\n")
    reply = wire.read_response()
    assert reply.json()["sha256"] == digest(b"hello world")
    request = wait_for_request(lab.g2, "/trailers")
    assert request.trailers == [("X-Checksum", "abc")]


# =============================================================================================
# Expect: 100-continue
# =============================================================================================


def test_expect_continue_relayed_before_body(lab, run):
    body = os.urandom(200000)
    wire = run.tunnel()
    wire.send(request_bytes("POST", "/upload-expect", headers=[
        ("Expect", "100-continue"), ("Content-Length", str(len(body)))]))
    interim = wire.read_head()  # arrives although no body byte was sent
    assert interim.status == 100
    wire.send(body)
    reply = wire.read_response()
    assert reply.status == 200
    assert reply.json()["sha256"] == digest(body)
    wire.send(request_bytes("GET", "/after-expect"))
    assert wire.read_response().status == 200


@pytest.mark.parametrize("status", [417, 401])
def test_expect_early_final_response(status, lab, run):
    wire = run.tunnel()
    started = time.monotonic()
    wire.send(request_bytes("POST", "/expect-%d" % status, headers=[
        ("Expect", "100-continue"), ("Content-Length", "1000000")]))
    reply = wire.read_response()
    elapsed = time.monotonic() - started
    assert reply.status == status
    assert reply.body == b"no body wanted\n"
    assert elapsed < 0.9, "the early response waited %.2f s" % elapsed
    assert reply.header("Connection") == "close"  # the unsent body makes the connection unusable
    assert wire.closed_within(5)


def test_early_response_during_body_upload(lab, run):
    """A client that sends its body without waiting for 100 still gets the early 401 whole,
    because the proxy reads the bytes in flight before it closes, so no reset cuts the response."""
    request = request_bytes("POST", "/expect-401", headers=[("Expect", "100-continue"),
                                                             ("X-Big-Answer", "1")],
                            body=b"z" * (2 * MIB))
    for _ in range(3):
        wire = run.tunnel()
        wire.sock.setblocking(False)
        sent, until = 0, time.monotonic() + 0.4
        while time.monotonic() < until:  # keep sending; read nothing yet
            try:
                sent += wire.sock.send(request[sent:sent + 16384])
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
                time.sleep(0.01)
            except (ssl.SSLError, OSError):
                break  # the proxy has already closed its side after the response
        assert sent > 16384
        wire.sock.settimeout(10)
        reply = wire.read_response()
        assert reply.status == 401
        assert reply.body == b"no body wanted\n" * 100000
        wire.sock.close()


# =============================================================================================
# responses without a body, close-delimited responses, HTTP/1.0
# =============================================================================================


def test_bodyless_responses_keep_framing(lab, run):
    wire = run.tunnel()
    wire.send(request_bytes("HEAD", "/head"))
    head = wire.read_response("HEAD")
    assert head.status == 200
    assert head.header("Content-Length") == "1234"
    assert head.body == b""
    wire.send(request_bytes("GET", "/204"))
    assert wire.read_response().status == 204
    wire.send(request_bytes("GET", "/304", headers=[("If-None-Match", '"v1"')]))
    not_modified = wire.read_response()
    assert not_modified.status == 304
    assert not_modified.header("ETag") == '"v1"'
    wire.send(request_bytes("GET", "/with-length"))
    full = wire.read_response()
    assert full.status == 200
    assert full.body == b"x" * 1234
    assert wire.buffer == b""


def test_close_delimited_response(lab, run):
    wire = run.tunnel()
    wire.send(request_bytes("GET", "/close-delimited"))
    reply = wire.read_response()
    assert reply.status == 200
    assert reply.body == b"A" * 300000 + b"the end"


def test_close_delimited_response_with_curl(lab, run, clients):
    clients.require("curl")
    result = run.run(["curl", "-sS", "--max-time", "20", "https://api.g2.com/close-delimited"])
    assert result.returncode == 0, result.stderr  # needs a TLS close_notify before the close
    assert result.stdout == "A" * 300000 + "the end"


def test_http10_client_gets_unchunked_response(lab, run):
    wire = run.tunnel()
    wire.send(b"GET /chunked-response HTTP/1.0\r\n\r\n")  # no Host header: valid in HTTP/1.0
    reply = wire.read_response()
    assert reply.status == 200
    assert reply.header("Transfer-Encoding") is None
    assert reply.body == b"first second third"


def test_http10_keep_alive(lab, run):
    wire = run.tunnel()
    for index in range(2):
        wire.send(b"GET /ten-%d HTTP/1.0\r\nHost: api.g2.com\r\nConnection: keep-alive\r\n\r\n" % index)
        reply = wire.read_response()
        assert reply.status == 200
        assert reply.header("Connection").lower() == "keep-alive"
    wire.send(b"GET /ten-close HTTP/1.0\r\nHost: api.g2.com\r\n\r\n")
    assert wire.read_response().status == 200
    assert wire.closed_within(5)


# =============================================================================================
# streaming: server-sent events and WebSocket
# =============================================================================================

SSE_CLIENT = """
import http.client, json, os, ssl, sys, time
from urllib.parse import urlsplit
proxy = urlsplit(os.environ["HTTPS_PROXY"])
context = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
conn = http.client.HTTPSConnection(proxy.hostname, proxy.port, context=context, timeout=20)
import base64
auth = base64.b64encode(("%s:%s" % (proxy.username, proxy.password)).encode()).decode()
conn.set_tunnel("api.g2.com", 443, headers={"Proxy-Authorization": "Basic " + auth})
conn.request("GET", "/sse", headers={"Accept": "text/event-stream"})
response = conn.getresponse()
arrivals = []
while True:
    line = response.readline()
    if not line:
        break
    if line.startswith(b"data:"):
        arrivals.append([time.time(), line.decode().strip()])
print(json.dumps(arrivals))
"""


def test_server_sent_events_arrive_as_sent(lab, run, tmp_path):
    script = tmp_path / "sse_client.py"
    script.write_text(SSE_CLIENT)
    with lab.recorder.lock:
        lab.recorder.sse_sent.clear()
    result = run.run([sys.executable, str(script)])
    assert result.returncode == 0, result.stderr
    arrivals = json.loads(result.stdout)
    sent = list(lab.recorder.sse_sent)
    assert [text for _, text in arrivals] == ["data: event %d" % index for index in range(5)]
    delays = [arrived - sent_at for (arrived, _), sent_at in zip(arrivals, sent)]
    print("SSE per-event delay (ms):", ", ".join("%.1f" % (delay * 1000) for delay in delays))
    for index, delay in enumerate(delays):
        assert delay < 0.1, "event %d arrived %.0f ms after it was sent" % (index, delay * 1000)
        if index + 1 < len(sent):
            assert arrivals[index][0] < sent[index + 1], "event %d came with the next one" % index


def test_close_delimited_event_stream(lab, run):
    wire = run.tunnel()
    wire.send(request_bytes("GET", "/sse-close"))
    reply = wire.read_response()
    assert reply.body == b"".join(b"data: close-delimited %d\n\n" % index for index in range(3))


def test_websocket_upgrade_two_way_relay(lab, run):
    wire = run.tunnel()
    wire.send(request_bytes("GET", "/ws", headers=[
        ("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Version", "13"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")]))
    reply = wire.read_head()
    assert reply.status == 101
    assert reply.header("Upgrade") == "websocket"
    assert wire.read_exact(len(b"server-hello;")) == b"server-hello;"
    for word in (b"one", b"two", b"three"):
        wire.send(word + b";")
        assert wire.read_until(b";") == b"echo:" + word.upper() + b";"
    # Both directions at full speed at once: 4 MiB each way through one TLS socket per side.
    size = 4 * MIB
    wire.send(b"bulk:%d;" % size)
    received = bulk_exchange(wire.sock, b"b" * size, size - len(wire.buffer))
    assert wire.buffer + received == b"B" * size
    wire.buffer = b""
    wire.sock.settimeout(15)
    wire.send(b"after;")
    assert wire.read_until(b";") == b"echo:AFTER;"
    request = wait_for_request(lab.g2, "/ws")
    assert request.header_values("Authorization") == ["Token " + G2_KEY]


# =============================================================================================
# connection reuse
# =============================================================================================


def test_keep_alive_reuses_one_upstream_connection(lab, run):
    wire = run.tunnel()
    connections = set()
    for index in range(5):
        wire.send(request_bytes("GET", "/keep/%d" % index))
        reply = wire.read_response()
        assert reply.status == 200
        connections.add(reply.json()["connection"])
    assert len(connections) == 1


def test_pipelined_requests(lab, run):
    wire = run.tunnel()
    body = b"pipelined body"
    wire.send(request_bytes("GET", "/pipe/1") + request_bytes("POST", "/pipe/2", body=body)
              + request_bytes("HEAD", "/head") + request_bytes("GET", "/pipe/4"))
    first, second = wire.read_response(), wire.read_response()
    third, fourth = wire.read_response("HEAD"), wire.read_response()
    assert first.json()["target"] == "/pipe/1"
    assert second.json()["target"] == "/pipe/2"
    assert second.json()["sha256"] == digest(body)
    assert third.status == 200
    assert third.body == b""
    assert fourth.json()["target"] == "/pipe/4"


def test_origin_idle_close_noticed(lab, run):
    wire = run.tunnel()
    for index in range(10):
        wire.send(request_bytes("GET", "/close-silently"))
        reply = wire.read_response()
        assert reply.status == 200, (index, reply)
        if index % 2:
            time.sleep(0.05)


def test_stale_upstream_request_retried(lab, run):
    wire = run.tunnel()
    for method in ("GET", "HEAD", "DELETE"):
        wire.send(request_bytes("GET", "/drop-next"))
        assert wire.read_response().status == 200
        wire.send(request_bytes(method, "/after-drop"))  # the origin closes without a response
        reply = wire.read_response(method)
        assert reply.status == 200, reply
    # A request whose body was already streamed cannot be repeated: the client gets a 502.
    wire.send(request_bytes("GET", "/drop-next"))
    assert wire.read_response().status == 200
    wire.send(request_bytes("POST", "/after-drop", body=b"once only"))
    reply = wire.read_response()
    assert reply.status == 502
    assert reply.body.startswith(b"authsome: could not reach api.g2.com:443: ")
    assert sum(1 for request in requests_for(lab.g2, "/after-drop") if request.method == "POST") == 1


# =============================================================================================
# absolute-form requests, plain http, IPv6
# =============================================================================================


def test_plain_http_is_forwarded_without_credential(lab, run):
    before = len(lab.plain.requests)
    for host in ("api.g2.com", "plain.test"):
        wire = run.wire()
        wire.send(request_bytes("POST", "http://%s/plain/path?q=%s" % (host, PLACEHOLDER), host,
                                headers=[("Proxy-Authorization", run.auth),
                                         ("Proxy-Connection", "keep-alive")], body=b"data"))
        reply = wire.read_response()
        assert reply.status == 200
        assert reply.body == b"plain ok"
    forwarded = lab.plain.requests[before:]
    assert [request["line"] for request in forwarded] == [
        "POST /plain/path?q=%s HTTP/1.1" % PLACEHOLDER] * 2
    for request in forwarded:
        names = [name.lower() for name, _ in request["headers"]]
        assert "authorization" not in names
        assert "proxy-authorization" not in names
        assert "proxy-connection" not in names
        assert request["body"] == b"data"


def test_plain_http_with_curl(lab, run, clients):
    clients.require("curl")
    before = len(lab.plain.requests)
    result = run.run(["curl", "-sS", "--max-time", "20", "http://api.g2.com/curl-plain"])
    assert result.returncode == 0, result.stderr
    assert result.stdout == "plain ok"
    [request] = lab.plain.requests[before:]
    assert "authorization" not in [name.lower() for name, _ in request["headers"]]


def test_absolute_https_without_connect(lab, run):
    wire = run.wire()
    wire.send(request_bytes("GET", "https://api.g2.com/v1/absolute?x=1", "api.g2.com",
                            headers=[("Proxy-Authorization", run.auth)]))
    reply = wire.read_response()
    assert reply.status == 200
    assert reply.json()["target"] == "/v1/absolute?x=1"
    request = wait_for_request(lab.g2, "/v1/absolute")
    assert request.header_values("Authorization") == ["Token " + G2_KEY]
    assert request.sni == "api.g2.com"  # TLS to the origin, verified for the name
    assert request.header("Proxy-Authorization") is None


def test_absolute_https_untrusted_502(lab, run):
    wire = run.wire()
    wire.send(request_bytes("GET", "https://untrusted.test/x", "untrusted.test",
                            headers=[("Proxy-Authorization", run.auth)]))
    reply = wire.read_response()
    assert reply.status == 502
    assert b"certificate verification failed" in reply.body
    assert lab.untrusted.requests == []


def test_ipv6_literal_connect(lab, run):
    if lab.v6 is None:
        pytest.skip("no IPv6 loopback (::1) on this machine")
    wire = run.tunnel("::1", lab.v6.port)  # verifies an IP subjectAltName on the leaf
    wire.send(request_bytes("GET", "/v6", "[::1]:%d" % lab.v6.port))
    reply = wire.read_response()
    assert reply.status == 200
    request = wait_for_request(lab.v6, "/v6")
    assert request.header_values("X-Lab-Key") == [LAB_KEY]
    assert request.header("Authorization") is None
    assert request.sni is None  # no SNI for an IP address


def test_ipv6_literal_with_curl(lab, run, clients):
    clients.require("curl")
    if lab.v6 is None:
        pytest.skip("no IPv6 loopback (::1) on this machine")
    assert "::1" not in run.env["NO_PROXY"].split(",")  # a brokered address is never bypassed
    url = "https://[::1]:%d/v6-curl" % lab.v6.port
    result = run.run(["curl", "-sS", "--max-time", "20", url])
    assert result.returncode == 0, result.stderr
    assert wait_for_request(lab.v6, "/v6-curl").header_values("X-Lab-Key") == [LAB_KEY]


# =============================================================================================
# what gets injected
# =============================================================================================


def test_misdirected_host_is_421(lab, run):
    for headers, target in (([], "/misdirected"),
                            ([], "https://other.test/misdirected")):
        wire = run.tunnel()
        wire.send(request_bytes("GET", target, "other.test", headers=headers))
        reply = wire.read_response()
        assert reply.status == 421
        assert_no_secret(G2_KEY, reply.raw_head, reply.body)
    wire = run.tunnel()
    wire.send(b"GET /two-hosts HTTP/1.1\r\nHost: api.g2.com\r\nHost: other.test\r\n\r\n")
    assert wire.read_response().status == 400
    assert requests_for(lab.g2, "/misdirected") == requests_for(lab.other, "/misdirected") == []
    assert requests_for(lab.g2, "/two-hosts") == []


def test_placeholder_elsewhere_is_forwarded_unchanged(lab, run):
    body = ("token=%s" % PLACEHOLDER).encode()
    reply = run.fetch("POST", "/v1/echo?api_key=%s" % PLACEHOLDER, headers=[
        ("authorization", "Bearer " + PLACEHOLDER), ("AUTHORIZATION", "again"),
        ("X-Api-Token", PLACEHOLDER), ("Content-Type", "application/x-www-form-urlencoded")],
        body=body)
    assert reply.json()["sha256"] == digest(body)
    request = wait_for_request(lab.g2, "/v1/echo")
    assert request.target == "/v1/echo?api_key=%s" % PLACEHOLDER
    assert request.header_values("Authorization") == ["Token " + G2_KEY]
    assert request.header("X-Api-Token") == PLACEHOLDER
    assert request.header("Content-Type") == "application/x-www-form-urlencoded"


def test_blind_tunnel_gets_nothing(lab, run):
    reply = run.fetch("GET", "/blind", host="other.test", headers=[("Authorization", "mine")])
    assert reply.status == 200
    assert wait_for_request(lab.other, "/blind").header_values("Authorization") == ["mine"]


# =============================================================================================
# limits and malformed input
# =============================================================================================


def test_header_cap_is_431(lab, run):
    big = [("X-Big", "v" * 70000)]
    wire = run.tunnel()
    wire.send(request_bytes("GET", "/big", headers=big))
    assert wire.read_response().status == 431
    first = run.wire()
    first.send(run.connect_head("api.g2.com:443")[:-2] + b"X-Big: " + b"v" * 70000 + b"\r\n\r\n")
    assert first.read_response().status == 431
    assert requests_for(lab.g2, "/big") == []


@pytest.mark.parametrize("raw", [
    b"GET /a b HTTP/1.1\r\nHost: api.g2.com\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: api.g2.com\r\nBad Header: 1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: api.g2.com\r\nX: a\r\n b\r\n\r\n",
    b"POST /cl HTTP/1.1\r\nHost: api.g2.com\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    b"POST /clte HTTP/1.1\r\nHost: api.g2.com\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /badchunk HTTP/1.1\r\nHost: api.g2.com\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    b"POST /badchunk2 HTTP/1.1\r\nHost: api.g2.com\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloEXTRA\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",
], ids=["space-in-target", "space-in-name", "obs-fold", "two-lengths", "length-and-chunked",
        "bad-chunk-size", "chunk-too-long", "no-host", "binary"])
def test_malformed_requests_are_400(raw, lab, run):
    wire = run.tunnel()
    wire.send(raw)
    reply = wire.read_response()
    assert reply.status == 400, reply
    assert wire.closed_within(5)


def test_malformed_first_request_is_400(lab, run):
    for raw in (b"CONNECT api.g2.com:443 HTTP/1.1 extra\r\n\r\n", b"hello\r\n\r\n",
                b"GET /relative HTTP/1.1\r\nProxy-Authorization: %s\r\n\r\n" % run.auth.encode(),
                b"CONNECT [::1:443 HTTP/1.1\r\nProxy-Authorization: %s\r\n\r\n" % run.auth.encode()):
        wire = run.wire()
        wire.send(raw)
        assert wire.read_response().status == 400, raw


def test_misbehaving_clients_do_not_disturb_others(lab, run):
    failures = []
    done = threading.Event()

    def well_behaved():
        try:
            wire = run.tunnel()
            for index in range(40):
                wire.send(request_bytes("POST", "/steady/%d" % index, body=b"s" * 5000))
                reply = wire.read_response()
                assert reply.status == 200
                assert reply.json()["length"] == 5000
                time.sleep(0.01)
        except Exception as exc:  # reported below
            failures.append(repr(exc))
        finally:
            done.set()

    def misbehave(kind):
        try:
            sock = run.connect(5)
            if kind == "garbage":
                sock.sendall(os.urandom(3000))
            elif kind == "half-head":
                sock.sendall(run.connect_head("api.g2.com:443")[:30])
            elif kind == "half-tls":
                sock.sendall(run.connect_head("api.g2.com:443"))
                time.sleep(0.05)
                sock.sendall(b"\x16\x03\x01\x00\xff\x01\x00")
            elif kind == "bad-tls":
                sock.sendall(run.connect_head("api.g2.com:443"))
                time.sleep(0.05)
                sock.sendall(os.urandom(500))
            elif kind == "half-body":
                wire = run.tunnel(timeout=5)
                wire.send(request_bytes("POST", "/half", headers=[("Content-Length", "100000")])
                          + b"only a little")
                sock = wire.sock
            elif kind == "reset":
                wire = run.tunnel(timeout=5)
                wire.send(request_bytes("GET", "/ws", headers=[("Upgrade", "websocket"),
                                                               ("Connection", "Upgrade")]))
                sock = wire.sock
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            time.sleep(0.05)
            sock.close()
        except OSError:
            pass

    worker = threading.Thread(target=well_behaved)
    worker.start()
    kinds = ["garbage", "half-head", "half-tls", "bad-tls", "half-body", "reset"]
    rounds = 0
    while not done.is_set() and rounds < 8:
        threads = [threading.Thread(target=misbehave, args=(kind,)) for kind in kinds]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        rounds += 1
    worker.join(30)
    assert failures == []
    assert run.fetch("GET", "/still-alive").status == 200
    assert run.process.poll() is None


# =============================================================================================
# failures never show the key
# =============================================================================================


def test_failures_never_show_the_key(lab, run):
    pages = []
    # The origin refuses the connection.
    refused = run.fetch("GET", "/v1/x", host="refused.test")
    assert refused.status == 502
    assert b"refused" in refused.body.lower()
    pages.append(refused)

    # The origin presents a certificate from a CA that the proxy does not trust.
    untrusted = run.fetch("GET", "/v1/x", host="untrusted.test")
    assert untrusted.status == 502
    assert b"certificate verification failed" in untrusted.body
    pages.append(untrusted)

    # The origin responds 500.
    failed = run.fetch("GET", "/500")
    assert failed.status == 500
    assert failed.body == b"origin failure\n"

    # The origin resets the connection in the middle of the response.
    wire = run.tunnel()
    wire.send(request_bytes("GET", "/reset"))
    head = wire.read_head()
    assert head.status == 200
    with pytest.raises((EOFError, ConnectionResetError, ssl.SSLError)):
        wire.read_exact(100000)

    # The client sends garbage, in a tunnel and as its first request.
    for wire in (run.tunnel(), run.wire()):
        wire.send(b"\x00\x01garbage " + PLACEHOLDER.encode() + b"\r\n\r\n")
        pages.append(wire.read_response())

    for page in pages:
        for key in KEYS:
            assert_no_secret(key, page.raw_head, page.body)
    assert lab.untrusted.requests == []
    assert run.fetch("GET", "/after-failures").status == 200


# =============================================================================================
# real clients
# =============================================================================================

NODE_HTTPS = """
const https = require('https');
function get(path, options, done) {
  https.get('https://api.g2.com' + path, options, (res) => {
    let body = '';
    res.on('data', (chunk) => { body += chunk; });
    res.on('end', () => done(res.statusCode, body));
  }).on('error', (err) => { console.error('https failed: ' + err.message); process.exit(3); });
}
// The global agent, then a private agent (agent: false makes a new https.Agent).
get('/node-https', {}, (status, body) => {
  get('/node-https-own-agent', {agent: false}, (second) => {
    console.log(JSON.stringify({status: status, body: JSON.parse(body), second: second}));
  });
});
"""

NODE_FETCH = """
(async () => {
  const headers = new Headers({'X-Made-Before-Fetch': 'yes'});  // loads undici before fetch
  const first = await fetch('https://api.g2.com/node-fetch', {method: 'POST', body: 'fetch body', headers});
  const second = await fetch('https://api.g2.com/node-fetch-2');
  console.log(JSON.stringify({status: first.status, body: await first.json(), second: second.status}));
})().catch((err) => { console.error('fetch failed: ' + err.message + ' ' + (err.cause && err.cause.message)); process.exit(3); });
"""

NODE_HTTP = """
const http = require('http');
http.get('http://plain.test/node-http', (res) => {
  let body = '';
  res.on('data', (chunk) => { body += chunk; });
  res.on('end', () => { console.log(body); });
}).on('error', (err) => { console.error('http failed: ' + err.message); process.exit(3); });
"""


def require_node_preload(run, clients):
    """Return the node command; fail when the run has no preload, since Node would then
    resolve the test names itself instead of asking the proxy."""
    node = clients.require("node")
    assert "node-preload.js" in run.env.get("NODE_OPTIONS", ""), run.env.get("NODE_OPTIONS")
    return node


@pytest.mark.parametrize("script, path", [(NODE_HTTPS, "/node-https"), (NODE_FETCH, "/node-fetch")],
                         ids=["https", "fetch"])
def test_node_https_and_fetch(script, path, lab, run, clients, tmp_path):
    node = require_node_preload(run, clients)
    program = tmp_path / "client.js"
    program.write_text(script)
    result = run.run([node, str(program)])
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["status"] == 200
    request = wait_for_request(lab.g2, path)
    assert request.header_values("Authorization") == ["Token " + G2_KEY]
    assert reply["second"] == 200
    if path == "/node-https":
        second = wait_for_request(lab.g2, "/node-https-own-agent")
        assert second.header_values("Authorization") == ["Token " + G2_KEY]
    if path == "/node-fetch":
        assert reply["body"]["sha256"] == digest(b"fetch body")
        assert request.header("X-Made-Before-Fetch") == "yes"


def test_node_plain_http(lab, run, clients, tmp_path):
    node = require_node_preload(run, clients)
    program = tmp_path / "client.js"
    program.write_text(NODE_HTTP)
    before = len(lab.plain.requests)
    result = run.run([node, str(program)])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "plain ok"
    assert [request["line"] for request in lab.plain.requests[before:]] == ["GET /node-http HTTP/1.1"]


def test_node_keeps_user_node_options(lab, clients, tmp_path):
    node = clients.require("node")
    marker = tmp_path / "user-preload.js"
    marker.write_text("globalThis.userPreloadRan = true;\n")
    env = dict(lab.env)
    env["NODE_OPTIONS"] = "--require %s --max-old-space-size=200" % marker
    extra = Run(tmp_path / "run", env, lab.connect_to)
    try:
        assert extra.env["NODE_OPTIONS"].startswith("--require %s --max-old-space-size=200 " % marker)
        require_node_preload(extra, clients)
        program = tmp_path / "client.js"
        program.write_text("console.log(globalThis.userPreloadRan === true);\n" + NODE_HTTPS)
        result = extra.run([node, str(program)])
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[0] == "true"
    finally:
        extra.stop()


def test_git_ls_remote(lab, run, clients):
    git = clients.require("git")
    result = run.run([git, "ls-remote", "https://api.g2.com/repo.git"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["4b825dc642cb6eb9a060e54bf8d69288fbee4904", "HEAD",
                                     "4b825dc642cb6eb9a060e54bf8d69288fbee4904", "refs/heads/main"]
    request = wait_for_request(lab.g2, "/repo.git/info/refs")
    assert request.header_values("Authorization") == ["Token " + G2_KEY]


def test_wget(lab, run, clients):
    wget = clients.require("wget")
    result = run.run([wget, "-q", "-O", "-", "https://api.g2.com/wget"])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["target"] == "/wget"
    assert wait_for_request(lab.g2, "/wget").header_values("Authorization") == ["Token " + G2_KEY]


# =============================================================================================
# timeouts and the connection cap (their own runs)
# =============================================================================================


def test_slow_headers_and_idle_timeouts(lab, tmp_path):
    env = dict(lab.env, AUTHSOME_PROXY_HEADER_TIMEOUT="1", AUTHSOME_PROXY_IDLE_TIMEOUT="1")
    quick = Run(tmp_path / "run", env, lab.connect_to)
    try:
        results = {}

        def slow_head():
            wire = quick.tunnel()
            started = time.monotonic()
            # One thread both trickles and reads: an SSLSocket must not be used from two
            # threads at once. Between bytes, wait 0.1 s for the proxy's response.
            try:
                for byte in request_bytes("GET", "/slow"):
                    wire.send(bytes([byte]))
                    if select.select([wire.sock], [], [], 0.1)[0]:
                        break
            except OSError:
                pass
            results["slow"] = (wire.read_response().status, time.monotonic() - started)

        def idle_keep_alive():
            wire = quick.tunnel()
            wire.send(request_bytes("GET", "/idle"))
            assert wire.read_response().status == 200
            started = time.monotonic()
            results["idle"] = (wire.closed_within(5), time.monotonic() - started)

        def silent_client():
            wire = quick.wire()
            started = time.monotonic()
            results["silent"] = (wire.closed_within(5), time.monotonic() - started)

        def no_tls_hello():
            sock = quick.connect()
            sock.sendall(quick.connect_head("api.g2.com:443"))
            wire = Wire(sock)
            assert wire.read_head().status == 200
            started = time.monotonic()
            results["no-hello"] = (wire.closed_within(5), time.monotonic() - started)

        threads = [threading.Thread(target=task) for task in (slow_head, idle_keep_alive,
                                                               silent_client, no_tls_hello)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(15)
        status, elapsed = results["slow"]
        assert status == 408
        assert elapsed < 4  # header timeout 1 s, plus slack for a loaded CI machine
        for name in ("idle", "silent", "no-hello"):
            closed, elapsed = results[name]
            assert closed
            assert 0.5 < elapsed < 4, (name, results[name])
        assert quick.fetch("GET", "/after-timeouts").status == 200  # the proxy still serves
    finally:
        quick.stop()


def test_connection_cap(lab, tmp_path):
    env = dict(lab.env, AUTHSOME_PROXY_MAX_CONNECTIONS="3")
    capped = Run(tmp_path / "run", env, lab.connect_to)
    try:
        held = [capped.tunnel() for _ in range(3)]
        for wire in held:
            wire.send(request_bytes("GET", "/held"))
            assert wire.read_response().status == 200
        extra = capped.wire()
        extra.send(capped.connect_head("api.g2.com:443"))
        reply = extra.read_response()
        assert reply.status == 503
        assert b"too many" in reply.body
        held.pop().sock.close()
        deadline = time.monotonic() + 5
        while True:
            try:
                assert capped.fetch("GET", "/after-cap").status == 200
                break
            except (AssertionError, OSError, EOFError):
                assert time.monotonic() < deadline, "the freed slot was never reused"
                time.sleep(0.05)
    finally:
        capped.stop()
        for wire in held:
            wire.sock.close()


# =============================================================================================
# the end: no output or audit entry contains a key (keep this test last)
# =============================================================================================


def test_no_key_in_output_or_audit(lab):
    stdout, stderr = lab.run.stop()
    for key in KEYS:
        assert_no_secret(key, stdout, stderr)
        assert_no_secret(key, (lab.home / "audit.log").read_bytes())
    # --verbose logged one line per request, failures included.
    assert "GET api.g2.com:443 /500 500 injected g2/default" in stderr
    assert "refused.test:443 /v1/x 502" in stderr
    assert "untrusted.test:443 /v1/x 502" in stderr
    entries = [json.loads(line) for line in (lab.home / "audit.log").read_text().splitlines()]
    assert any(entry.get("path") == "/reset" for entry in entries)
