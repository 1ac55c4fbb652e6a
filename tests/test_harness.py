"""Tests of the shared harness in conftest.py: the test CA, the Origin server and the helpers.

The clients here are the standard library's ``ssl`` and ``http.client`` (plus curl where it
exists), trusting only the test CA and dialling the origin's loopback address directly.
"""

import json
import socket
import ssl
import subprocess
import threading

import pytest

from conftest import (
    AUTHSOME,
    REPO,
    assert_no_secret,
    assert_no_secret_in_tree,
)


def open_tls(origin, context, server_hostname):
    raw = socket.create_connection(origin.address, timeout=10)
    return context.wrap_socket(raw, server_hostname=server_hostname)


def read_response_head(tls):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(4096)
        assert chunk, "connection closed before the end of the response head"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head.decode("latin-1"), rest


def read_exactly(tls, size, already=b""):
    data = already
    while len(data) < size:
        chunk = tls.recv(size - len(data))
        assert chunk, "connection closed after %d of %d bytes" % (len(data), size)
        data += chunk
    return data


def test_repo_paths():
    assert (REPO / "tests" / "conftest.py").is_file()
    assert AUTHSOME == REPO / "authsome.py"


def test_origin_echoes_get_request(origin, test_ca):
    server = origin()
    connection = server.http_connection(test_ca.client_context())

    connection.putrequest("GET", "/v1/items?page=2", skip_accept_encoding=True)
    connection.putheader("X-Custom-Case", "One")
    connection.putheader("accept", "application/json")
    connection.endheaders()
    response = connection.getresponse()
    document = json.loads(response.read())
    connection.close()

    assert response.status == 200
    assert response.getheader("Content-Type") == "application/json"
    assert document["method"] == "GET"
    assert document["path"] == "/v1/items?page=2"
    assert document["body_length"] == 0
    assert document["headers"] == [["Host", "api.g2.com"], ["X-Custom-Case", "One"], ["accept", "application/json"]]

    [request] = server.requests
    assert request.method == "GET"
    assert request.path == "/v1/items"
    assert request.headers == [("Host", "api.g2.com"), ("X-Custom-Case", "One"), ("accept", "application/json")]
    assert request.header("x-custom-case") == "One"
    assert request.sni == "api.g2.com"
    assert server.sni_names == ["api.g2.com"]
    assert server.connections[0].alpn is None  # the client context offers no ALPN protocol


def test_origin_keeps_connection_alive(origin, test_ca):
    server = origin()
    connection = server.http_connection(test_ca.client_context())

    for path in ("/first", "/second"):
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        assert response.status == 200
    connection.close()

    assert [request.path for request in server.requests] == ["/first", "/second"]
    assert [request.connection_id for request in server.requests] == [0, 0]
    assert len(server.connections) == 1


def test_origin_reads_chunked_request_body(origin, test_ca):
    server = origin()
    connection = server.http_connection(test_ca.client_context())

    connection.request("POST", "/upload", body=iter([b"hello ", b"chunked ", b"world"]), encode_chunked=True,
                       headers={"Transfer-Encoding": "chunked"})
    response = connection.getresponse()
    document = json.loads(response.read())
    connection.close()

    assert document["body_length"] == len(b"hello chunked world")
    [request] = server.requests
    assert request.header("Transfer-Encoding") == "chunked"
    assert request.body == b"hello chunked world"


def test_origin_streams_chunked_response(origin, test_ca):
    first_chunk_seen = threading.Event()

    def stream(exchange):
        exchange.send_head(200, [("Content-Type", "text/event-stream"), ("Transfer-Encoding", "chunked")])
        exchange.write_chunk(b"data: one\n\n")
        # The second event waits until the client has the first, which proves no buffering.
        assert first_chunk_seen.wait(10), "client never saw the first event"
        exchange.write_chunk(b"data: two\n\n")
        exchange.end_chunks()

    server = origin(handler=stream)
    connection = server.http_connection(test_ca.client_context())
    connection.request("GET", "/events")
    response = connection.getresponse()

    assert response.read1(64) == b"data: one\n\n"
    first_chunk_seen.set()
    assert response.read() == b"data: two\n\n"
    connection.close()
    assert server.handler_errors == []


def test_origin_close_delimited_response(origin, test_ca):
    def no_length(exchange):
        exchange.send_head(200, [("Content-Type", "text/plain")])
        exchange.write(b"until ")
        exchange.write(b"close")
        exchange.close_after = True

    server = origin(handler=no_length)
    connection = server.http_connection(test_ca.client_context())
    connection.request("GET", "/")
    response = connection.getresponse()

    assert response.getheader("Content-Length") is None
    assert response.read() == b"until close"
    connection.close()


def test_origin_sends_100_continue(origin, test_ca):
    server = origin()
    tls = open_tls(server, test_ca.client_context(), "api.g2.com")
    tls.sendall(b"PUT /blob HTTP/1.1\r\nHost: api.g2.com\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")

    head, rest = read_response_head(tls)
    assert head == "HTTP/1.1 100 Continue"
    assert rest == b""

    tls.sendall(b"data")
    head, rest = read_response_head(tls)
    tls.close()

    assert head.startswith("HTTP/1.1 200 OK\r\n")
    assert server.requests[0].body == b"data"


def test_origin_take_over_after_101(origin, test_ca):
    def upgrade(exchange):
        exchange.send_head(101, [("Upgrade", "websocket"), ("Connection", "Upgrade")])
        sock, leftover = exchange.take_over()
        data = leftover
        while len(data) < 4:
            data += sock.recv(4 - len(data))
        sock.sendall(data.upper())

    server = origin(handler=upgrade)
    tls = open_tls(server, test_ca.client_context(), "api.g2.com")
    tls.sendall(b"GET /ws HTTP/1.1\r\nHost: api.g2.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nab")

    head, rest = read_response_head(tls)
    assert head.startswith("HTTP/1.1 101 Switching Protocols\r\n")
    tls.sendall(b"cd")
    assert read_exactly(tls, 4, rest) == b"ABCD"
    tls.close()


def test_origin_rejects_malformed_request(origin, test_ca):
    server = origin()
    tls = open_tls(server, test_ca.client_context(), "api.g2.com")
    tls.sendall(b"NOT A REQUEST\r\n\r\n")

    head, _ = read_response_head(tls)
    tls.close()
    assert head.startswith("HTTP/1.1 400 Bad Request\r\n")


def test_certificate_names_are_checked(origin, test_ca):
    server = origin()

    with pytest.raises(ssl.SSLCertVerificationError):
        open_tls(server, test_ca.client_context(), "other.example")

    with pytest.raises(ssl.SSLCertVerificationError):
        open_tls(server, ssl.create_default_context(), "api.g2.com")


def test_origin_on_ipv6_with_ip_name(origin, test_ca):
    server = origin(names=["::1"], host="::1")
    connection = server.http_connection(test_ca.client_context(), name="::1")
    connection.request("GET", "/v6")
    response = connection.getresponse()
    response.read()
    connection.close()

    assert response.status == 200
    assert server.sni_names == [None]  # clients send no SNI for an IP address


def test_curl_reaches_origin_with_connect_to(origin, test_ca, clients):
    curl = clients.require("curl")
    server = origin()

    result = subprocess.run(
        [curl, "--silent", "--show-error", "--noproxy", "*",
         "--cacert", str(test_ca.ca_pem_path),
         "--connect-to", server.curl_connect_to(),
         "--header", "X-Token: abc", server.url("/curl")],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["path"] == "/curl"
    assert server.requests[0].header("X-Token") == "abc"
    assert server.sni_names == ["api.g2.com"]
    assert server.connections[0].alpn == "http/1.1"


def test_home_env_is_clean(home):
    assert not home.path.exists()
    assert home.env["AUTHSOME_HOME"] == str(home.path)
    for name in ("DISPLAY", "WAYLAND_DISPLAY", "AUTHSOME_MASTER_KEY", "AUTHSOME_PASSPHRASE",
                 "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"):
        assert name not in home.env


def test_secret_checks_find_encoded_forms(tmp_path):
    secret = "g2-test-secret-4f1c"
    assert_no_secret(secret, "nothing here", b"nor here", None)

    with pytest.raises(AssertionError):
        assert_no_secret(secret, "ok", "leak: " + secret)

    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "file").write_bytes(secret.encode().hex().encode())
    with pytest.raises(AssertionError):
        assert_no_secret_in_tree(tmp_path, secret)
