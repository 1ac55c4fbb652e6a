"""Unit tests of the HTTP/1.1 wire functions and the route table (no sockets).

These cover the parsing and framing decisions the proxy makes before it moves any byte:
request and response heads, body framing (RFC 9112 section 6.3), chunk-size lines, request path
normalization, credential routing and host:port splitting.
"""

import re

import pytest

import authsome
from authsome import (
    ProtocolError,
    Route,
    RouteTable,
    normalize_request_path,
    parse_api_url,
    parse_chunk_size,
    parse_request_head,
    parse_response_head,
    request_framing,
    response_framing,
    split_host_port,
)


def request(*header_lines, start=b"GET /v1/x HTTP/1.1"):
    return parse_request_head(b"\r\n".join((start,) + header_lines) + b"\r\n\r\n")


def response(*header_lines, start=b"HTTP/1.1 200 OK"):
    return parse_response_head(b"\r\n".join((start,) + header_lines) + b"\r\n\r\n")


def protocol_error(function, *args, **kwargs):
    with pytest.raises(ProtocolError) as caught:
        function(*args, **kwargs)
    return caught.value


# ---------------------------------------------------------------------------------------------
# request heads
# ---------------------------------------------------------------------------------------------


def test_request_head_keeps_order():
    head = request(b"Host: api.g2.com", b"X-Custom-Case: One", b"accept:  text/plain \t")
    assert head.method == "GET"
    assert head.target == "/v1/x"
    assert head.version == "HTTP/1.1"
    assert head.headers == [["Host", "api.g2.com"], ["X-Custom-Case", "One"], ["accept", "text/plain"]]
    assert head.get("ACCEPT") == "text/plain"
    assert head.serialize() == (b"GET /v1/x HTTP/1.1\r\nHost: api.g2.com\r\nX-Custom-Case: One\r\n"
                                b"accept: text/plain\r\n\r\n")


def test_request_head_bare_lf():
    head = parse_request_head(b"GET / HTTP/1.0\nHost: a\n\n")
    assert head.version == "HTTP/1.0"
    assert head.get("host") == "a"


def test_request_head_obs_text():
    head = request(b"X-Name: caf\xe9\tbar")
    assert head.get("x-name") == "caf\xe9\tbar"


def test_request_head_connection_tokens():
    head = request(b"Connection: keep-alive, Upgrade", b"connection: X-Foo")
    assert head.has_token("Connection", "upgrade")
    assert head.has_token("connection", "x-foo")
    assert not head.has_token("Connection", "close")


def test_remove_drops_every_case_variant():
    head = request(b"Authorization: a", b"authorization: b", b"AUTHORIZATION: c", b"X: y")
    head.remove("Authorization")
    assert head.headers == [["X", "y"]]


@pytest.mark.parametrize("start", [
    b"GET /a b HTTP/1.1",          # space inside the target
    b"GET  / HTTP/1.1",            # two spaces
    b"GET / HTTP/1.1 ",            # trailing space
    b"GET /",                      # HTTP/0.9 style
    b"G(T / HTTP/1.1",             # method is not a token
    b"GET /\x7f HTTP/1.1",         # DEL inside the target
    b"GET /\x80 HTTP/1.1",         # non-ASCII target
    b"GET / http/1.1",             # version is case-sensitive
    b"",
])
def test_malformed_request_lines_are_400(start):
    assert protocol_error(parse_request_head, start + b"\r\nHost: a\r\n\r\n").status == 400


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/3", b"HTTP/1.2"])
def test_unsupported_versions_are_505(version):
    assert protocol_error(parse_request_head, b"GET / " + version + b"\r\n\r\n").status == 505


def test_obs_fold_is_rejected():
    error = protocol_error(request, b"X-Long: first", b" continued")
    assert error.status == 400
    assert "folding" in error.reason
    assert protocol_error(request, b"X-Long: first", b"\tcontinued").status == 400


@pytest.mark.parametrize("line", [
    b"Host : api.g2.com",      # whitespace between name and colon (RFC 9112 section 5.1)
    b" Host: api.g2.com",      # leading whitespace on the first header is a fold
    b": no-name",
    b"No colon here",
    b"X(Bad): 1",
    b"X\x00: 1",
    b"X\xe9: 1",
])
def test_bad_header_names_are_400(line):
    assert protocol_error(request, line).status == 400


@pytest.mark.parametrize("value", [b"a\x00b", b"a\x01b", b"a\x1bb", b"a\x7fb", b"a\x0bb"])
def test_control_characters_in_values_are_400(value):
    assert protocol_error(request, b"X-Value: " + value).status == 400


def test_bare_cr_is_400():
    assert protocol_error(parse_request_head, b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n").status == 400


# ---------------------------------------------------------------------------------------------
# request body framing
# ---------------------------------------------------------------------------------------------


def test_request_framing_default_empty():
    assert request_framing(request(b"Host: a")) == ("length", 0)


@pytest.mark.parametrize("lines, expected", [
    ((b"Content-Length: 5",), ("length", 5)),
    ((b"Content-Length: 5, 5",), ("length", 5)),
    ((b"Content-Length: 5", b"content-length: 5"), ("length", 5)),
    ((b"Content-Length: 0",), ("length", 0)),
    ((b"Transfer-Encoding: chunked",), ("chunked", None)),
    ((b"Transfer-Encoding: gzip, Chunked",), ("chunked", None)),
    ((b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked"), ("chunked", None)),
])
def test_request_framing(lines, expected):
    assert request_framing(request(*lines)) == expected


@pytest.mark.parametrize("lines", [
    (b"Content-Length: 5", b"Transfer-Encoding: chunked"),       # CL + TE: smuggling shape
    (b"Transfer-Encoding: chunked", b"Content-Length: 0"),
    (b"Content-Length: 5", b"Content-Length: 6"),               # differing lengths
    (b"Content-Length: 5, 6",),
    (b"Content-Length: -1",),
    (b"Content-Length: +5",),
    (b"Content-Length: 0x10",),
    (b"Content-Length: 1e3",),
    (b"Content-Length:",),
    (b"Content-Length: 99999999999999999999",),
    (b"Transfer-Encoding: chunked, gzip",),                       # chunked must come last
    (b"Transfer-Encoding: identity",),
])
def test_bad_request_framing_is_400(lines):
    assert protocol_error(request_framing, request(*lines)).status == 400


# ---------------------------------------------------------------------------------------------
# response heads and framing
# ---------------------------------------------------------------------------------------------


def test_response_head_fields():
    head = response(b"Content-Type: text/plain", start=b"HTTP/1.1 404 Not Found")
    assert head.status == 404
    assert head.version == "HTTP/1.1"
    assert head.start[2] == "Not Found"
    assert response(start=b"HTTP/1.1 200 ").start[2] == ""
    assert response(start=b"HTTP/1.0 200").status == 200  # the reason phrase may be missing


@pytest.mark.parametrize("start", [b"HTTP/1.1 2000 OK", b"HTTP/1.1 20 OK", b"HTTP/2 200 OK",
                                   b"ICY 200 OK", b"HTTP/1.1 OK", b"HTTP/1.1 600 Nope"])
def test_malformed_status_lines_are_502(start):
    assert protocol_error(response, b"X: y", start=start).status == 502


@pytest.mark.parametrize("method, start, lines, expected", [
    ("HEAD", b"HTTP/1.1 200 OK", (b"Content-Length: 1234",), ("none", 0)),
    ("HEAD", b"HTTP/1.1 200 OK", (b"Transfer-Encoding: chunked",), ("none", 0)),
    ("GET", b"HTTP/1.1 204 No Content", (b"Content-Length: 10",), ("none", 0)),
    ("GET", b"HTTP/1.1 304 Not Modified", (b"Content-Length: 10",), ("none", 0)),
    ("POST", b"HTTP/1.1 100 Continue", (), ("none", 0)),
    ("GET", b"HTTP/1.1 103 Early Hints", (b"Link: </a.css>",), ("none", 0)),
    ("GET", b"HTTP/1.1 101 Switching Protocols", (b"Upgrade: websocket",), ("none", 0)),
    ("GET", b"HTTP/1.1 200 OK", (b"Content-Length: 12",), ("length", 12)),
    ("GET", b"HTTP/1.1 200 OK", (b"Content-Length: 0",), ("length", 0)),
    ("GET", b"HTTP/1.1 200 OK", (b"Transfer-Encoding: chunked",), ("chunked", None)),
    # Transfer-Encoding overrides Content-Length in a response (RFC 9112 section 6.3 rule 3).
    ("GET", b"HTTP/1.1 200 OK", (b"Transfer-Encoding: chunked", b"Content-Length: 5"),
     ("chunked", None)),
    ("GET", b"HTTP/1.1 200 OK", (), ("close", None)),
    ("GET", b"HTTP/1.0 200 OK", (b"Content-Type: text/event-stream",), ("close", None)),
    ("GET", b"HTTP/1.1 500 Internal Server Error", (), ("close", None)),
    # A final coding other than chunked: the body ends when the server closes (rule 4).
    ("GET", b"HTTP/1.1 200 OK", (b"Transfer-Encoding: gzip",), ("close", None)),
])
def test_response_framing(method, start, lines, expected):
    assert response_framing(method, response(*lines, start=start)) == expected


@pytest.mark.parametrize("lines", [
    (b"Content-Length: 5", b"Content-Length: 6"),
    (b"Content-Length: abc",),
])
def test_bad_response_lengths_are_502(lines):
    error = protocol_error(response_framing, "GET", response(*lines))
    assert error.status == 502
    assert error.reason.startswith("upstream ")


# ---------------------------------------------------------------------------------------------
# chunk sizes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("line, size", [
    (b"0\r\n", 0), (b"1a\r\n", 26), (b"1A\r\n", 26), (b"00010\r\n", 16),
    (b"5;name=value\r\n", 5), (b"5 ; name=\"quoted\"\r\n", 5), (b"ff\n", 255),
])
def test_chunk_sizes(line, size):
    assert parse_chunk_size(line) == size


@pytest.mark.parametrize("line", [
    b"\r\n", b"zz\r\n", b"-1\r\n", b"+1\r\n", b"0x10\r\n", b"1 2\r\n", b";ext\r\n",
    b"1000000000000000\r\n",  # 16 hex digits: larger than any body the proxy relays
    b"\xff\r\n",
])
def test_bad_chunk_sizes_are_400(line):
    assert protocol_error(parse_chunk_size, line).status == 400


# ---------------------------------------------------------------------------------------------
# request paths
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target, path", [
    ("/v1/x?token=1", "/v1/x"),
    ("/v1/x#frag", "/v1/x"),
    ("/a/./b/../c", "/a/c"),
    ("/a/b/..", "/a/"),
    ("/a/b/.", "/a/b/"),
    ("/../../etc", "/etc"),
    ("/..", "/"),
    ("", "/"),
    ("/client/v4/%2e%2e/v40", "/client/v40"),
    ("/client/v4/%2E%2e/%2e/x", "/client/x"),
    ("/client/v4/.%2E/v40/zones", "/client/v40/zones"),
    ("https://api.g2.com/v1/../v2?x", "/v2"),
    ("https://api.g2.com", "/"),
    ("/a%2fb", "/a%2fb"),  # an encoded slash stays one segment
])
def test_normalize_request_path(target, path):
    assert normalize_request_path(target) == path


# ---------------------------------------------------------------------------------------------
# routing
# ---------------------------------------------------------------------------------------------


def route(provider, entry):
    def fail(rule):
        raise AssertionError(rule)
    return parse_api_url(entry, provider, fail)


def table(*routes, oauth=()):
    return RouteTable(list(routes), oauth)


def provider_of(result):
    chosen, _reason = result
    return chosen.provider if chosen else None


def test_segment_boundary_prefix():
    routes = table(route("cloudflare", "https://api.cloudflare.com/client/v4"))
    resolve = lambda path: provider_of(routes.resolve("api.cloudflare.com", 443, path))
    assert resolve("/client/v4") == "cloudflare"
    assert resolve("/client/v4/") == "cloudflare"
    assert resolve("/client/v4/zones?page=2") == "cloudflare"
    assert resolve("/client/v4?x=1") == "cloudflare"
    assert resolve("/client/v40") is None
    assert resolve("/client/v40/zones") is None
    assert resolve("/client/v4x") is None
    assert resolve("/client") is None
    assert resolve("/Client/v4") is None  # paths are case-sensitive
    # Dot segments and %2e cannot walk out of the prefix and back in, or into it.
    assert resolve("/client/v4/../v40") is None
    assert resolve("/client/v4/%2e%2e/v40") is None
    assert resolve("/client/v40/../v4/zones") == "cloudflare"
    assert routes.resolve("api.cloudflare.com", 443, "/client/v40")[1] == "no route"


def test_regex_is_a_full_match():
    routes = table(route("github", r"regex:^([a-z0-9-]+\.)*githubusercontent\.com$"),
                   route("plain", r"regex:api\.plain\.test"))
    assert provider_of(routes.resolve("raw.githubusercontent.com", 443, "/x")) == "github"
    assert provider_of(routes.resolve("githubusercontent.com", 443, "/x")) == "github"
    assert provider_of(routes.resolve("githubusercontent.com.evil.test", 443, "/x")) is None
    assert provider_of(routes.resolve("evilgithubusercontent.com", 443, "/x")) is None
    assert provider_of(routes.resolve("api.plain.test", 443, "/")) == "plain"
    # Without anchors the pattern must still match the whole host.
    assert provider_of(routes.resolve("xapi.plain.test", 443, "/")) is None
    assert provider_of(routes.resolve("api.plain.test.evil", 443, "/")) is None
    assert provider_of(routes.resolve("raw.githubusercontent.com", 8443, "/x")) is None


def test_most_specific_prefix_wins():
    routes = table(route("broad", "https://api.multi.test"),
                   route("narrow", "https://api.multi.test/v2"),
                   route("narrowest", "https://api.multi.test/v2/admin"))
    resolve = lambda path: provider_of(routes.resolve("api.multi.test", 443, path))
    assert resolve("/v1/x") == "broad"
    assert resolve("/v2/x") == "narrow"
    assert resolve("/v2/admin/users") == "narrowest"
    assert resolve("/v2/administrator") == "narrow"


def test_exact_beats_regex():
    routes = table(route("wild", r"regex:^([a-z]+\.)*g2\.com$"), route("g2", "api.g2.com"))
    assert provider_of(routes.resolve("api.g2.com", 443, "/v1")) == "g2"
    assert provider_of(routes.resolve("data.g2.com", 443, "/v1")) == "wild"


def test_prefix_miss_falls_back_regex():
    routes = table(route("wild", r"regex:^([a-z]+\.)*multi\.test$"),
                   route("narrow", "https://api.multi.test/v2"))
    assert provider_of(routes.resolve("api.multi.test", 443, "/v2/x")) == "narrow"
    assert provider_of(routes.resolve("api.multi.test", 443, "/v1/x")) == "wild"


def test_tie_between_two_providers_injects_nothing():
    routes = table(route("first", "api.shared.test"), route("second", "https://api.shared.test"))
    chosen, reason = routes.resolve("api.shared.test", 443, "/x")
    assert chosen is None
    assert reason == "tie between first, second"
    regexes = table(route("first", r"regex:.*\.shared\.test"), route("second", r"regex:api\..*"))
    chosen, reason = regexes.resolve("api.shared.test", 443, "/x")
    assert chosen is None
    assert reason.startswith("tie")
    # One provider listing the same host twice is not a tie.
    same = table(route("only", "api.shared.test"), route("only", r"regex:api\.shared\.test"))
    assert provider_of(same.resolve("api.shared.test", 443, "/")) == "only"


def test_oauth_endpoint_is_left_alone():
    routes = table(route("g2", "api.g2.com"), oauth={("api.g2.com", "/oauth/token")})
    for path in ("/oauth/token", "/oauth/token/", "/oauth/token?grant_type=x",
                 "/v1/../oauth/token", "/oauth/%2e/token"):
        assert routes.resolve("api.g2.com", 443, path) == (None, "oauth endpoint"), path
    assert provider_of(routes.resolve("api.g2.com", 443, "/oauth/tokens")) == "g2"
    assert provider_of(routes.resolve("api.g2.com", 443, "/oauth")) == "g2"


def test_host_case_and_trailing_dot():
    routes = table(route("g2", "api.g2.com"))
    for host in ("api.g2.com", "API.G2.COM", "Api.G2.Com.", "api.g2.com."):
        assert provider_of(routes.resolve(host, 443, "/")) == "g2", host
        assert routes.intercepts(host, 443), host
    assert provider_of(table(route("g2", "API.G2.com.")).resolve("api.g2.com", 443, "/")) == "g2"


@pytest.mark.parametrize("host, port", [
    ("xapi.g2.com", 443), ("api.g2.com.example.net", 443), ("g2.com", 443), ("api.g2.co", 443),
    ("api-g2.com", 443), ("api.g2.com", 8443), ("api.g2.com", 80), ("apixg2.com", 443),
    ("api.g2.com..", 443),
])
def test_near_misses_get_nothing(host, port):
    routes = table(route("g2", "api.g2.com"))
    assert routes.resolve(host, port, "/v1") == (None, "no route")
    assert not routes.intercepts(host, port)


def test_explicit_port_and_ip_literals():
    routes = table(route("local", "https://[::1]:8443/api"), route("v4", "https://127.0.0.1:9443"),
                   route("portful", "api.port.test:8443"))
    assert provider_of(routes.resolve("::1", 8443, "/api/x")) == "local"
    assert provider_of(routes.resolve("[::1]", 8443, "/api/x")) == "local"
    assert provider_of(routes.resolve("::1", 443, "/api/x")) is None
    assert provider_of(routes.resolve("127.0.0.1", 9443, "/")) == "v4"
    assert provider_of(routes.resolve("api.port.test", 8443, "/")) == "portful"
    assert provider_of(routes.resolve("api.port.test", 443, "/")) is None


@pytest.mark.parametrize("entry, host, port", [
    ("https://[::1]:8443", "::1", 8443),
    ("https://[::1]", "::1", 443),
    ("https://[2001:DB8::1]:9000/v1", "2001:db8::1", 9000),
    ("https://127.0.0.1:9443", "127.0.0.1", 9443),
    ("[::1]:8443", "::1", 8443),
    ("[::1]", "::1", 443),
    ("127.0.0.1:8443", "127.0.0.1", 8443),
])
def test_ip_literals_are_valid_api_urls(entry, host, port):
    authsome.validate_provider({"name": "local", "auth_type": "api_key", "api_url": entry}, "test")
    parsed = route("local", entry)
    assert (parsed.host, parsed.port) == (host, port)


@pytest.mark.parametrize("entry", ["http://api.g2.com", "https://api.g2.com/v1?x=1",
                                   "api g2.com", "[::1", "[::1]:port", "[not-an-ip]:443"])
def test_invalid_api_urls(entry):
    with pytest.raises(authsome.ProviderError):
        authsome.validate_provider({"name": "bad", "auth_type": "api_key", "api_url": entry}, "t")


def test_route_table_lists_exact_routes():
    routes = table(route("a", "a.test"), route("b", "https://b.test/x"), route("c", r"regex:c\.test"))
    assert sorted(found.host for found in routes.exact_routes()) == ["a.test", "b.test"]
    assert [found.provider for found in routes.regex] == ["c"]


# ---------------------------------------------------------------------------------------------
# authorities
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("authority, default, expected", [
    ("api.g2.com", 443, ("api.g2.com", 443)),
    ("api.g2.com:8443", 443, ("api.g2.com", 8443)),
    ("API.G2.COM.:80", 443, ("api.g2.com", 80)),
    ("127.0.0.1:9", 443, ("127.0.0.1", 9)),
    ("[::1]:8443", 443, ("::1", 8443)),
    ("[::1]", 80, ("::1", 80)),
    ("[2001:DB8::1]:443", 80, ("2001:db8::1", 443)),
    ("::1", 443, ("::1", 443)),  # a bare IPv6 literal has no port
    (" api.g2.com:443 ", 80, ("api.g2.com", 443)),
])
def test_split_host_port(authority, default, expected):
    assert split_host_port(authority, default) == expected


@pytest.mark.parametrize("authority", [
    "[::1", "[::1]8443", "host:0", "host:65536", "host:-1", "host:+80",
    "host:8x", "", ":443", "bad host:443", "[fe80::1%eth0]:443", "user@host:443", "host/x:443",
])
def test_split_host_port_rejects(authority):
    assert protocol_error(split_host_port, authority, 443).status == 400


@pytest.mark.parametrize("host, port, text", [
    ("api.g2.com", 443, "api.g2.com:443"), ("::1", 8443, "[::1]:8443"),
    ("127.0.0.1", 80, "127.0.0.1:80"),
])
def test_format_authority_round_trips(host, port, text):
    assert authsome.format_authority(host, port) == text
    assert split_host_port(text, 1) == (host, port)


def test_simple_response_is_framed_and_closes():
    data = authsome.simple_response(502, "Bad Gateway", "authsome: could not reach x\n")
    head, _, body = data.partition(b"\r\n\r\n")
    parsed = parse_response_head(head + b"\r\n\r\n")
    assert parsed.status == 502
    assert response_framing("GET", parsed) == ("length", len(body))
    assert parsed.has_token("Connection", "close")
    assert re.match(rb"^authsome: could not reach x\n$", body)
