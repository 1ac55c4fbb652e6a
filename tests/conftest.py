"""Shared pytest harness for authsome.

Provides:

- ``REPO`` and ``AUTHSOME`` paths, with the repository root on ``sys.path`` so that
  ``import authsome`` works in tests.
- ``test_ca``: a session-wide test certificate authority made with the ``openssl`` command
  (ECDSA P-256) that issues server certificates for DNS names and IP addresses.
- ``Origin`` and the ``origin`` fixture factory: a threaded HTTPS/1.1 server on loopback that
  serves as a provider's API in tests. It is written on raw sockets so that tests control the framing
  of every response byte, and it records each request and the TLS SNI name of each connection.
- ``home``: a fresh ``AUTHSOME_HOME`` path and a clean environment for the CLI.
- ``run_cli``, ``assert_no_secret`` and ``assert_no_secret_in_tree``.
- ``clients``: which HTTP clients exist on this machine. In CI (``CI=true``) a missing curl,
  requests or httpx fails the test instead of skipping it.

Every server here listens on 127.0.0.1 or ::1 only. Tests reach ``api.g2.com`` by dialling the
origin's loopback address while verifying the certificate for the name, never through DNS.
"""

import base64
import http.client
import importlib.util
import ipaddress
import json
import logging
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import pytest

REPO = Path(__file__).resolve().parent.parent
AUTHSOME = REPO / "authsome.py"

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

logger = logging.getLogger("authsome_tests")

IN_CI = os.environ.get("CI") == "true"


def ipv6_loopback_available() -> bool:
    """Return True when a socket can bind to ::1 on this machine."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


# ============================================================================================
# Test certificate authority (openssl command)
# ============================================================================================

_CA_CONFIG = """\
[req]
distinguished_name = dn
prompt = no

[dn]
CN = authsome test CA

[ca_extensions]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
"""

# Extensions that strict verifiers (OpenSSL X509_STRICT, Python 3.13's default context) expect
# on a server certificate: a subjectAltName, serverAuth, an authorityKeyIdentifier, no CA bit.
_LEAF_EXTENSIONS = """\
[leaf_extensions]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
subjectAltName = {san}
"""


def _subject_alt_names(names: Sequence[str]) -> str:
    entries = []
    for name in names:
        try:
            ipaddress.ip_address(name)
        except ValueError:
            entries.append("DNS:" + name)
        else:
            entries.append("IP:" + name)
    return ", ".join(entries)


def _openssl(*args: str) -> None:
    result = subprocess.run(
        ["openssl", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0:
        raise RuntimeError(
            "openssl %s failed with exit code %d: %s" % (args[0], result.returncode, result.stderr.strip())
        )


class TestCA:
    """A certificate authority for test servers, kept in one folder.

    ``ca_pem_path`` is the CA certificate to trust. ``issue(names)`` returns the paths of a
    certificate and its private key for the given DNS names and IP addresses; the first name is
    also the subject CN. Certificates for the same names are issued once and reused.
    """

    __test__ = False  # a helper class, not a test class for pytest to collect

    def __init__(self, folder: Path):
        self.folder = folder
        self.ca_key_path = folder / "ca.key"
        self.ca_pem_path = folder / "ca.pem"
        self._lock = threading.Lock()
        self._issued: Dict[Tuple[str, ...], Tuple[Path, Path]] = {}
        self._create_ca()

    def _create_ca(self) -> None:
        config = self.folder / "ca.cnf"
        config.write_text(_CA_CONFIG)

        _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(self.ca_key_path))
        _openssl(
            "req", "-new", "-x509", "-sha256", "-days", "30",
            "-key", str(self.ca_key_path),
            "-config", str(config), "-extensions", "ca_extensions",
            "-set_serial", str(secrets.randbits(63)),
            "-out", str(self.ca_pem_path),
        )

    def issue(self, names: Sequence[str]) -> Tuple[Path, Path]:
        """Issue (or reuse) a server certificate; return ``(cert_path, key_path)``."""
        if not names:
            raise ValueError("issue() needs at least one DNS name or IP address")

        key = tuple(names)
        with self._lock:
            if key not in self._issued:
                self._issued[key] = self._issue_new(names, index=len(self._issued))
            return self._issued[key]

    def _issue_new(self, names: Sequence[str], index: int) -> Tuple[Path, Path]:
        stem = self.folder / ("leaf%d" % index)
        key_path = stem.with_suffix(".key")
        csr_path = stem.with_suffix(".csr")
        cert_path = stem.with_suffix(".pem")
        extensions_path = stem.with_suffix(".ext")
        extensions_path.write_text(_LEAF_EXTENSIONS.format(san=_subject_alt_names(names)))

        _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(key_path))
        _openssl("req", "-new", "-key", str(key_path), "-subj", "/CN=" + names[0], "-out", str(csr_path))
        _openssl(
            "x509", "-req", "-sha256", "-days", "30",
            "-in", str(csr_path),
            "-CA", str(self.ca_pem_path), "-CAkey", str(self.ca_key_path),
            "-set_serial", str(secrets.randbits(63)),
            "-extfile", str(extensions_path), "-extensions", "leaf_extensions",
            "-out", str(cert_path),
        )
        return cert_path, key_path

    def client_context(self, strict: bool = True) -> ssl.SSLContext:
        """Return a client ``SSLContext`` that trusts only this CA.

        With ``strict``, ``VERIFY_X509_STRICT`` is on, as in Python 3.13's default context, so
        the same checks run on every Python version.
        """
        context = ssl.create_default_context(cafile=str(self.ca_pem_path))
        if strict:
            context.verify_flags |= ssl.VERIFY_X509_STRICT
        return context


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory) -> TestCA:
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is required to make the test CA; run tests/bootstrap.sh")
    return TestCA(tmp_path_factory.mktemp("test_ca"))


# ============================================================================================
# Origin: a stand-in HTTPS/1.1 server
# ============================================================================================

MAX_HEAD_BYTES = 64 * 1024


class BadRequest(Exception):
    """A request that breaks HTTP/1.1 framing. The origin responds 400 and closes the connection."""


class Request:
    """One request as the origin received it.

    ``headers`` is the list of ``(name, value)`` pairs in the order and case received. ``body``
    is the decoded body (chunked framing removed); it stays ``b""`` until the handler or the
    server reads it. ``connection_id`` and ``sni`` identify the TLS connection it came on.
    """

    def __init__(self, method: str, target: str, version: str, headers: List[Tuple[str, str]],
                 connection_id: int, sni: Optional[str]):
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.body = b""
        self.trailers: List[Tuple[str, str]] = []
        self.connection_id = connection_id
        self.sni = sni

    @property
    def path(self) -> str:
        """The target without its query string."""
        return self.target.split("?", 1)[0]

    def header(self, name: str) -> Optional[str]:
        """Return the first value of a header, compared case-insensitively, or None."""
        values = self.header_values(name)
        return values[0] if values else None

    def header_values(self, name: str) -> List[str]:
        """Return every value of a header, in order, compared case-insensitively."""
        lowered_name = name.lower()
        return [value for key, value in self.headers if key.lower() == lowered_name]

    def __repr__(self) -> str:
        return "<Request %s %s conn=%d body=%d bytes>" % (self.method, self.target, self.connection_id, len(self.body))


class _BufferedSocket:
    """Read helpers over a socket that keep unread bytes, for framing and for hand-over."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            return False
        self.buffer += data
        return True

    def read_until(self, delimiter: bytes, limit: int) -> Optional[bytes]:
        """Return bytes up to and including ``delimiter``; None on EOF before any byte."""
        while True:
            position = self.buffer.find(delimiter)
            if position >= 0:
                end = position + len(delimiter)
                data, self.buffer = self.buffer[:end], self.buffer[end:]
                return data
            if len(self.buffer) > limit:
                raise BadRequest("line or head longer than %d bytes" % limit)
            if not self._fill():
                if self.buffer:
                    raise BadRequest("connection closed in the middle of a line or head")
                return None

    def read_exact(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if not self._fill():
                raise BadRequest("connection closed %d bytes before the end of the body" % (size - len(self.buffer)))
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def read_line(self, limit: int = 8192) -> bytes:
        line = self.read_until(b"\r\n", limit)
        if line is None:
            raise BadRequest("connection closed where a line was expected")
        return line[:-2]


def _parse_header_lines(lines: Sequence[bytes]) -> List[Tuple[str, str]]:
    headers = []
    for raw in lines:
        if raw[:1] in (b" ", b"\t"):
            raise BadRequest("obsolete line folding in headers")
        name, colon, value = raw.partition(b":")
        if not colon or not name or name != name.strip():
            raise BadRequest("invalid header line %r" % raw[:80])
        headers.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
    return headers


def _parse_head(head: bytes) -> Tuple[str, str, str, List[Tuple[str, str]]]:
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise BadRequest("invalid request line %r" % lines[0][:80])
    method, target, version = (part.decode("latin-1") for part in parts)
    return method, target, version, _parse_header_lines(lines[1:])


class Exchange:
    """One request and the means to respond to it, passed to an origin handler.

    A handler may respond in one call with ``respond()``, or write the response itself:
    ``send_head()`` then ``write()`` for raw bytes (use ``close_after = True`` for a body that
    ends when the connection closes), or ``write_chunk()`` and ``end_chunks()`` for a chunked
    body. ``write()`` sends at once, so a handler can stream by writing and sleeping.
    ``read_body()`` reads the request body; when the request carries ``Expect: 100-continue``
    it first sends ``100 Continue`` unless the handler already answered. ``take_over()`` hands
    the raw TLS socket to the handler (after a 101, for example); the server closes it when the
    handler returns.
    """

    def __init__(self, origin: "Origin", connection: "_Connection", request: Request):
        self.origin = origin
        self.request = request
        self.close_after = False
        self._connection = connection
        self._body_read = False
        self._continue_sent = False
        self._head_sent = False
        self._taken_over = False

    # -- request body --------------------------------------------------------------------

    @property
    def expects_continue(self) -> bool:
        return (self.request.header("Expect") or "").lower() == "100-continue"

    def send_continue(self) -> None:
        if not self._continue_sent:
            self._continue_sent = True
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def read_body(self) -> bytes:
        """Read the whole request body (Content-Length or chunked) and record it."""
        if self._body_read:
            return self.request.body

        if self.expects_continue and not self._head_sent:
            self.send_continue()

        reader = self._connection.reader
        transfer_encoding = (self.request.header("Transfer-Encoding") or "").lower()
        length_values = self.request.header_values("Content-Length")

        if transfer_encoding:
            if transfer_encoding != "chunked":
                raise BadRequest("unsupported Transfer-Encoding %r" % transfer_encoding)
            body, trailers = self._read_chunked(reader)
            self.request.trailers = trailers
        elif length_values:
            if len(set(length_values)) != 1 or not length_values[0].isdigit():
                raise BadRequest("invalid Content-Length %r" % length_values)
            body = reader.read_exact(int(length_values[0]))
        else:
            body = b""

        self.request.body = body
        self._body_read = True
        return body

    @staticmethod
    def _read_chunked(reader: _BufferedSocket) -> Tuple[bytes, List[Tuple[str, str]]]:
        chunks = []
        while True:
            size_line = reader.read_line()
            size_text = size_line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise BadRequest("invalid chunk size line %r" % size_line[:80]) from None
            if size == 0:
                break
            chunks.append(reader.read_exact(size))
            if reader.read_exact(2) != b"\r\n":
                raise BadRequest("chunk data not followed by CRLF")

        trailer_lines = []
        while True:
            line = reader.read_line()
            if not line:
                break
            trailer_lines.append(line)
        return b"".join(chunks), _parse_header_lines(trailer_lines)

    @property
    def body(self) -> bytes:
        return self.read_body()

    # -- response ------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Send raw bytes to the client at once."""
        self._connection.sock.sendall(data)

    def send_head(self, status: int, headers: Sequence[Tuple[str, str]] = (), reason: Optional[str] = None) -> None:
        """Send a status line and headers exactly as given (no header is added)."""
        if reason is None:
            reason = http.client.responses.get(status, "Unknown")
        lines = ["HTTP/1.1 %d %s" % (status, reason)]
        lines.extend("%s: %s" % (name, value) for name, value in headers)
        self._head_sent = status >= 200 or self._head_sent
        self.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def respond(self, status: int = 200, headers: Sequence[Tuple[str, str]] = (), body: bytes = b"",
                reason: Optional[str] = None) -> None:
        """Send a complete response, adding Content-Length unless the headers frame the body."""
        headers = list(headers)
        names = {name.lower() for name, _ in headers}
        if "content-length" not in names and "transfer-encoding" not in names and status not in (204, 304) \
                and status >= 200:
            headers.append(("Content-Length", str(len(body))))
        self.send_head(status, headers, reason)
        if self.request.method != "HEAD" and body:
            self.write(body)

    def write_chunk(self, data: bytes) -> None:
        if data:
            self.write(b"%x\r\n%s\r\n" % (len(data), data))

    def end_chunks(self, trailers: Sequence[Tuple[str, str]] = ()) -> None:
        lines = "".join("%s: %s\r\n" % pair for pair in trailers)
        self.write(b"0\r\n" + lines.encode("latin-1") + b"\r\n")

    def respond_json(self, status: int, document, headers: Sequence[Tuple[str, str]] = ()) -> None:
        body = json.dumps(document).encode()
        self.respond(status, [("Content-Type", "application/json"), *headers], body)

    # -- connection hand-over ------------------------------------------------------------

    def take_over(self) -> Tuple[ssl.SSLSocket, bytes]:
        """Return the TLS socket and any bytes already read past the request head.

        The origin stops reading requests from this connection and closes it when the
        handler returns.
        """
        self._taken_over = True
        leftover, self._connection.reader.buffer = self._connection.reader.buffer, b""
        return self._connection.sock, leftover

    @property
    def sock(self) -> ssl.SSLSocket:
        return self._connection.sock


Handler = Callable[[Exchange], object]


def echo_handler(exchange: Exchange) -> None:
    """Default handler: reply 200 with a JSON description of the request."""
    body = exchange.read_body()
    request = exchange.request
    exchange.respond_json(200, {
        "method": request.method,
        "path": request.target,
        "headers": [[name, value] for name, value in request.headers],
        "body_length": len(body),
        "sni": request.sni,
    })


class _Connection:
    def __init__(self, sock: ssl.SSLSocket, connection_id: int, sni: Optional[str]):
        self.sock = sock
        self.connection_id = connection_id
        self.sni = sni
        self.reader = _BufferedSocket(sock)


class ConnectionInfo(NamedTuple):
    """The TLS facts of one accepted connection."""
    connection_id: int
    sni: Optional[str]
    alpn: Optional[str]
    tls_version: Optional[str]


class Origin:
    """A threaded HTTPS/1.1 server on a loopback address that serves as a provider's API in tests.

    ``handler(exchange)`` answers each request (see ``Exchange``); it may instead return a
    ``(status, headers, body)`` tuple for the server to send. The default handler echoes the
    request as JSON. ``requests`` lists every request received, ``connections`` the SNI name,
    negotiated ALPN protocol and TLS version of every connection, in arrival order. Both lists
    are appended under a lock; read them after the client has its response.

    Connections are kept alive between requests (HTTP/1.1 rules) until the client closes, the
    idle timeout passes, or ``stop()`` runs. ``handler_errors`` holds exceptions raised by
    handlers, other than the client going away.
    """

    def __init__(self, cert_path: Path, key_path: Path, names: Sequence[str] = ("api.g2.com",),
                 handler: Optional[Handler] = None, host: str = "127.0.0.1",
                 alpn: Optional[Sequence[str]] = ("http/1.1",), idle_timeout: float = 30.0):
        self.names = list(names)
        self.host = host
        self.handler: Handler = handler or echo_handler
        self.idle_timeout = idle_timeout
        self.requests: List[Request] = []
        self.connections: List[ConnectionInfo] = []
        self.handler_errors: List[BaseException] = []

        self._lock = threading.Lock()
        self._threads: List[threading.Thread] = []
        self._open_sockets: set = set()
        self._sni_by_socket: Dict[int, Optional[str]] = {}
        self._stopping = threading.Event()

        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(cert_path), str(key_path))
        if alpn:
            self.context.set_alpn_protocols(list(alpn))
        self.context.sni_callback = self._record_sni

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self._listener.listen(64)
        self.port: int = self._listener.getsockname()[1]
        self._accept_thread: Optional[threading.Thread] = None

    # -- addresses -----------------------------------------------------------------------

    @property
    def address(self) -> Tuple[str, int]:
        return self.host, self.port

    @property
    def name(self) -> str:
        """The first name on the certificate, the one tests use by default."""
        return self.names[0]

    def _bracketed_host(self) -> str:
        return "[%s]" % self.host if ":" in self.host else self.host

    def url(self, path: str = "/", name: Optional[str] = None, port: int = 443) -> str:
        """Return ``https://NAME[:PORT]PATH``, the URL a client asks for before --connect-to."""
        name = name or self.name
        netloc = name if port == 443 else "%s:%d" % (name, port)
        return "https://%s%s" % (netloc, path)

    def connect_to(self, name: Optional[str] = None, port: int = 443) -> str:
        """Return the authsome ``--connect-to`` value ``NAME:PORT=HOST:ORIGINPORT``."""
        return "%s:%d=%s:%d" % (name or self.name, port, self._bracketed_host(), self.port)

    def curl_connect_to(self, name: Optional[str] = None, port: int = 443) -> str:
        """Return curl's ``--connect-to`` value ``NAME:PORT:HOST:ORIGINPORT``."""
        return "%s:%d:%s:%d" % (name or self.name, port, self._bracketed_host(), self.port)

    def http_connection(self, context: ssl.SSLContext, name: Optional[str] = None,
                        timeout: float = 10.0) -> http.client.HTTPSConnection:
        """Return an ``http.client`` connection that dials this origin and verifies ``name``."""
        return PinnedHTTPSConnection(name or self.name, self.address, context=context, timeout=timeout)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> "Origin":
        self._accept_thread = threading.Thread(target=self._accept_loop, name="origin-accept", daemon=True)
        self._accept_thread.start()
        return self

    def stop(self) -> None:
        """Close the listener and every open connection, then wait briefly for the threads."""
        self._stopping.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept() at once on Linux
        except OSError:
            pass
        self._listener.close()

        # Shutting a socket down wakes the thread blocked reading it, which then closes it.
        with self._lock:
            sockets = list(self._open_sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        deadline = time.monotonic() + 5
        for thread in [self._accept_thread, *self._threads]:
            if thread is not None:
                thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> "Origin":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- recorded state ------------------------------------------------------------------

    @property
    def sni_names(self) -> List[Optional[str]]:
        with self._lock:
            return [info.sni for info in self.connections]

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> List[Request]:
        """Wait until at least ``count`` requests arrived; return a copy of the list."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if len(self.requests) >= count:
                    return list(self.requests)
            if time.monotonic() > deadline:
                raise AssertionError("origin got %d requests, expected %d within %.1f s"
                                     % (len(self.requests), count, timeout))
            time.sleep(0.01)

    # -- server internals ----------------------------------------------------------------

    def _record_sni(self, ssl_socket, server_name, context) -> None:
        with self._lock:
            self._sni_by_socket[id(ssl_socket)] = server_name

    def _accept_loop(self) -> None:
        # stop() shuts the listener down, which wakes accept() on Linux. The short timeout is
        # the fallback where it does not, so the loop still sees stop() within 0.2 s.
        self._listener.settimeout(0.2)
        while not self._stopping.is_set():
            try:
                raw, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve_connection, args=(raw,), name="origin-connection",
                                      daemon=True)
            with self._lock:
                self._threads.append(thread)
                self._open_sockets.add(raw)
            thread.start()

    def _serve_connection(self, raw: socket.socket) -> None:
        raw.settimeout(self.idle_timeout)
        tls = None
        try:
            tls = self.context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            with self._lock:
                self._open_sockets.add(tls)
            tls.do_handshake()
            connection = self._register_connection(tls)
            self._serve_requests(connection)
        except (OSError, ssl.SSLError, socket.timeout):
            pass  # the client went away, failed the handshake, or stop() closed the socket
        finally:
            with self._lock:
                self._open_sockets.discard(raw)
                self._open_sockets.discard(tls)
                if tls is not None:
                    self._sni_by_socket.pop(id(tls), None)
            for sock in (tls, raw):
                if sock is not None:
                    try:
                        sock.close()
                    except OSError:
                        pass

    def _register_connection(self, tls: ssl.SSLSocket) -> _Connection:
        with self._lock:
            connection_id = len(self.connections)
            sni = self._sni_by_socket.pop(id(tls), None)
            self.connections.append(ConnectionInfo(connection_id, sni, tls.selected_alpn_protocol(), tls.version()))
        return _Connection(tls, connection_id, sni)

    def _serve_requests(self, connection: _Connection) -> None:
        while not self._stopping.is_set():
            try:
                head = connection.reader.read_until(b"\r\n\r\n", MAX_HEAD_BYTES)
                if head is None:
                    return
                method, target, version, headers = _parse_head(head)
            except BadRequest as error:
                self._reject(connection, error)
                return

            request = Request(method, target, version, headers, connection.connection_id, connection.sni)
            with self._lock:
                self.requests.append(request)

            exchange = Exchange(self, connection, request)
            try:
                self._run_handler(exchange)
                if exchange._taken_over:
                    return
                if not exchange._body_read:
                    if exchange.expects_continue and not exchange._continue_sent:
                        return  # the client may never send the body it was not invited to send
                    exchange.read_body()  # keep the connection in step for the next request
            except BadRequest as error:
                self._reject(connection, error)
                return

            if exchange.close_after or not self._keep_alive(request):
                return

    def _run_handler(self, exchange: Exchange) -> None:
        try:
            result = self.handler(exchange)
        except (OSError, BadRequest):
            raise
        except Exception as error:
            logger.exception("origin handler failed on %s %s", exchange.request.method, exchange.request.target)
            with self._lock:
                self.handler_errors.append(error)
            if not exchange._head_sent:
                exchange.respond(500, [("Connection", "close")], b"origin handler failed\n")
            exchange.close_after = True
            return

        if result is not None:
            status, headers, body = result
            exchange.respond(status, headers, body)

    @staticmethod
    def _keep_alive(request: Request) -> bool:
        tokens = {token.strip().lower() for value in request.header_values("Connection") for token in value.split(",")}
        if request.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens

    def _reject(self, connection: _Connection, error: BadRequest) -> None:
        body = ("bad request: %s\n" % error).encode()
        message = b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        try:
            connection.sock.sendall(message)
        except OSError:
            pass


class PinnedHTTPSConnection(http.client.HTTPSConnection):
    """An ``http.client.HTTPSConnection`` for ``host`` that dials a fixed address instead of
    resolving the name, like curl's ``--connect-to``; the certificate is still checked for
    ``host``, and ``host`` is sent as SNI and in the Host header."""

    def __init__(self, host: str, dial_address: Tuple[str, int], context: ssl.SSLContext, timeout: float = 10.0):
        super().__init__(host, 443, context=context, timeout=timeout)
        self._dial_address = dial_address
        self._tls_context = context

    def connect(self) -> None:
        raw = socket.create_connection(self._dial_address, self.timeout)
        self.sock = self._tls_context.wrap_socket(raw, server_hostname=self.host)


@pytest.fixture
def origin(test_ca):
    """Factory fixture: ``origin(names=["api.g2.com"], handler=None, host="127.0.0.1", ...)``.

    Returns a started ``Origin`` with a certificate from ``test_ca`` for ``names``; every
    origin made in a test is stopped when the test ends. ``host="::1"`` skips the test when
    this machine has no IPv6 loopback.
    """
    started: List[Origin] = []

    def make(names: Sequence[str] = ("api.g2.com",), handler: Optional[Handler] = None,
             host: str = "127.0.0.1", **options) -> Origin:
        if ":" in host and not ipv6_loopback_available():
            pytest.skip("no IPv6 loopback (::1) on this machine")
        cert_path, key_path = test_ca.issue(list(names))
        server = Origin(cert_path, key_path, names=names, handler=handler, host=host, **options)
        started.append(server)
        return server.start()

    yield make

    for server in started:
        server.stop()


# ============================================================================================
# CLI helpers
# ============================================================================================

# Variables that would leak the developer's own setup into a test run.
_REMOVED_VARIABLES = (
    "DISPLAY", "WAYLAND_DISPLAY",
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY",
    "http_proxy", "https_proxy", "no_proxy", "all_proxy",
)


class Home(NamedTuple):
    """A fresh authsome home: ``path`` (not yet created) and the ``env`` to run the CLI with."""
    path: Path
    env: Dict[str, str]


@pytest.fixture
def home(tmp_path) -> Home:
    """Return a fresh ``AUTHSOME_HOME`` path and a clean environment that points at it.

    The environment is a copy of ``os.environ`` without a graphical session, without proxy
    settings and without any ``AUTHSOME_*`` variable (so no master key or passphrase) except
    ``AUTHSOME_HOME``.
    """
    path = tmp_path / "authsome-home"
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in _REMOVED_VARIABLES and not name.startswith("AUTHSOME_")
    }
    env["AUTHSOME_HOME"] = str(path)
    return Home(path, env)


def run_cli(args: Sequence, env: Dict[str, str], input: Optional[str] = None,
            timeout: float = 30) -> subprocess.CompletedProcess:
    """Run ``python authsome.py ARGS`` and return the result with text stdout and stderr.

    Without ``input`` the child's standard input is /dev/null, so it never waits on a terminal.
    """
    return subprocess.run(
        [sys.executable, str(AUTHSOME), *(str(arg) for arg in args)],
        env=env,
        input=input,
        stdin=subprocess.DEVNULL if input is None else None,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _secret_forms(secret) -> List[bytes]:
    """Return the secret as bytes plus its base64 and hex encodings."""
    raw = secret.encode() if isinstance(secret, str) else bytes(secret)
    if not raw:
        raise ValueError("the secret to look for is empty")
    return [raw, base64.b64encode(raw), base64.urlsafe_b64encode(raw).rstrip(b"="), raw.hex().encode()]


def assert_no_secret(secret, *texts) -> None:
    """Fail if any text (str or bytes) contains the secret, in plain, base64 or hex form."""
    forms = _secret_forms(secret)
    for index, text in enumerate(texts):
        if text is None:
            continue
        data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else bytes(text)
        for form in forms:
            position = data.find(form)
            assert position < 0, "text #%d contains the secret (as %r) at offset %d" % (index, form[:6] + b"...", position)


def assert_no_secret_in_tree(folder, secret) -> None:
    """Fail if any file under ``folder`` (hidden ones included) contains the secret."""
    forms = _secret_forms(secret)
    for path in sorted(Path(folder).rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        data = path.read_bytes()
        for form in forms:
            assert form not in data, "file %s contains the secret (as %r)" % (path, form[:6] + b"...")


# ============================================================================================
# HTTP clients on this machine
# ============================================================================================

# Clients that CI must have: a test that needs one fails in CI instead of skipping.
REQUIRED_IN_CI = frozenset({"curl", "requests", "httpx"})

_COMMAND_CLIENTS = ("curl", "node", "git", "wget", "openssl", "chromium", "chromedriver")
_MODULE_CLIENTS = ("requests", "httpx", "selenium")


class Clients:
    """The HTTP clients found on this machine.

    An attribute named after a command (``curl``, ``node``, ...) is its path or None. An
    attribute named after a Python module (``requests``, ``httpx``, ``selenium``) is True or
    None.
    ``require(name)`` returns the path (or True) and skips the test when the client is absent,
    except that in CI a client in ``REQUIRED_IN_CI`` fails the test.
    """

    def __init__(self):
        self.found: Dict[str, object] = {}
        for command in _COMMAND_CLIENTS:
            self.found[command] = shutil.which(command)
        for module in _MODULE_CLIENTS:
            self.found[module] = importlib.util.find_spec(module) is not None

    def __getattr__(self, name: str):
        found = self.__dict__.get("found", {})
        if name in found:
            return found[name] or None
        raise AttributeError(name)

    def require(self, name: str):
        if name not in self.found:
            raise ValueError("unknown client %r; known: %s" % (name, ", ".join(sorted(self.found))))
        value = self.found[name]
        if value:
            return value
        message = "%s is not installed (tests/bootstrap.sh installs it)" % name
        if IN_CI and name in REQUIRED_IN_CI:
            pytest.fail(message + "; CI requires it")
        pytest.skip(message)

    def node_version(self) -> Optional[Tuple[int, ...]]:
        """Return Node.js's version as a tuple of ints, or None without Node.js."""
        if not self.node:
            return None
        output = subprocess.run([self.node, "--version"], capture_output=True, text=True, timeout=30).stdout
        return tuple(int(part) for part in output.strip().lstrip("v").split(".") if part.isdigit())


@pytest.fixture(scope="session")
def clients() -> Clients:
    return Clients()
