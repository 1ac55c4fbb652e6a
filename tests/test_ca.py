"""Tests for the certificate authority section of authsome (ECDSA P-256, DER, X.509, TLS)."""

import base64
import hashlib
import os
import re
import shutil
import socket
import ssl
import stat
import subprocess
import threading
import time

import pytest

import authsome

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl command not found")

# RFC 6979 appendix A.2.5: the P-256 key pair and the SHA-256 signatures of "sample" and "test".
RFC_PRIVATE_KEY = 0xC9AFA9D845BA75166B5C215767B1D6934E50C3DB36E89B127B8A622B120F6721
RFC_PUBLIC_X = 0x60FED4BA255A9D31C961EB74C6356D68C049B8923B61FA6CE669622E60F29FB6
RFC_PUBLIC_Y = 0x7903FE1008B8BC99A41AE9E95628BC64F2F1B20C2D7E9F5177A3C294D4462299
RFC_VECTORS = [
    (
        b"sample",
        0xA6E3C57DD01ABE90086538398355DD4C3B17AA873382B0F24D6129493D8AAD60,
        0xEFD48B2AACB6A8FD1140DD9CD45E81D69D2C877B56AAF991C34D0EA84EAF3716,
        0xF7CB1C942D657C41D436C7A1B6E29F65F3E900DBB9AFF4064DC4AB2F843ACDA8,
    ),
    (
        b"test",
        0xD16B6AE827F17175E040871A1C7EC3500192C4C92677336EC2537ACAEE0008E0,
        0xF1ABB023518351CD71D881567B1EA663ED3EFCF6C5132B354F28D3B0B7D38367,
        0x019F4113742A2B14BD25926B49C649155F267E60D3814B4C0CC84250E46F0083,
    ),
]


@pytest.fixture
def workdir(tmp_path):
    path = tmp_path / "run"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def ca(workdir):
    return authsome.CertificateAuthority(str(workdir))


@pytest.fixture
def ca_file(ca, tmp_path):
    path = tmp_path / "ca.pem"
    path.write_bytes(ca.ca_cert_pem)
    return path


def _openssl(*args):
    return subprocess.run(
        [OPENSSL, *args], capture_output=True, text=True, timeout=30, check=False
    )


def _client_context(ca):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=ca.ca_cert_pem.decode("ascii"))
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context


def _ipv6_loopback_available():
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def _handshake(server_context, client_context, address, server_hostname):
    """Run one TLS connection on a loopback address and return (payload, client ALPN)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family) as listener:
        listener.bind((address, 0))
        listener.listen(1)
        port = listener.getsockname()[1]

        def serve():
            connection, _ = listener.accept()
            connection.settimeout(10)
            try:
                with server_context.wrap_socket(connection, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                connection.close()

        server = threading.Thread(target=serve, daemon=True)
        server.start()
        try:
            with socket.create_connection((address, port), timeout=10) as raw:
                with client_context.wrap_socket(raw, server_hostname=server_hostname) as tls:
                    return tls.recv(2), tls.selected_alpn_protocol()
        finally:
            server.join(10)


def _decoded_forms(data):
    """Return the raw file bytes plus the DER inside every PEM block it contains."""
    forms = [data]
    for body in re.findall(rb"-----BEGIN [A-Z ]+-----(.*?)-----END", data, re.S):
        forms.append(base64.b64decode(b"".join(body.split())))
    return forms


# ECDSA P-256


def test_p256_public_key_rfc6979_vector():
    assert authsome.p256_public_key(RFC_PRIVATE_KEY) == (RFC_PUBLIC_X, RFC_PUBLIC_Y)


@pytest.mark.parametrize("message, k, r, s", RFC_VECTORS)
def test_rfc6979_nonce_and_signature(message, k, r, s):
    digest = hashlib.sha256(message).digest()

    assert next(authsome.rfc6979_nonces(RFC_PRIVATE_KEY, digest)) == k
    assert authsome.p256_sign(RFC_PRIVATE_KEY, digest) == (r, s)
    assert authsome.p256_verify((RFC_PUBLIC_X, RFC_PUBLIC_Y), digest, r, s)


def test_p256_sign_verify_round_trip():
    private_key, public_key = authsome.p256_keypair()
    digest = hashlib.sha256(b"round trip").digest()
    r, s = authsome.p256_sign(private_key, digest)

    assert authsome.p256_verify(public_key, digest, r, s)
    assert not authsome.p256_verify(public_key, hashlib.sha256(b"other").digest(), r, s)
    assert not authsome.p256_verify(public_key, digest, r, (s + 1) % authsome.P256_N)
    assert not authsome.p256_verify(public_key, digest, 0, s)


def test_p256_verify_rejects_off_curve_key():
    digest = hashlib.sha256(b"sample").digest()
    r, s = RFC_VECTORS[0][2], RFC_VECTORS[0][3]

    assert not authsome.p256_verify((RFC_PUBLIC_X, RFC_PUBLIC_Y + 1), digest, r, s)


def test_p256_keypair_is_random_and_in_range():
    first, first_public = authsome.p256_keypair()
    second, _ = authsome.p256_keypair()

    assert first != second
    assert 1 <= first < authsome.P256_N
    assert authsome.p256_public_key(first) == first_public


def test_ecdsa_der_signature_encoding():
    _, _, r, s = RFC_VECTORS[0]
    encoded = authsome.ecdsa_der_signature(r, s)

    # Both values have the top bit set, so each INTEGER needs a leading zero octet.
    assert encoded[:2] == b"\x30\x46"
    assert encoded[2:5] == b"\x02\x21\x00"
    assert encoded[5:37] == r.to_bytes(32, "big")
    assert encoded[37:40] == b"\x02\x21\x00"
    assert encoded[40:] == s.to_bytes(32, "big")


# DER helpers


@pytest.mark.parametrize(
    "value, expected",
    [
        (0, "020100"),
        (127, "02017f"),
        (128, "02020080"),
        (256, "02020100"),
        (2 ** 159 - 1, "0214" + "7f" + "ff" * 19),
    ],
)
def test_der_integer(value, expected):
    assert authsome.der_integer(value).hex() == expected


def test_der_integer_rejects_negative():
    with pytest.raises(ValueError):
        authsome.der_integer(-1)


def test_der_long_form_length():
    encoded = authsome.der_octet_string(b"\x00" * 300)

    assert encoded[:4] == b"\x04\x82\x01\x2c"
    assert len(encoded) == 304


@pytest.mark.parametrize(
    "oid, expected",
    [
        ("1.2.840.10045.2.1", "06072a8648ce3d0201"),
        ("2.5.29.19", "0603551d13"),
        ("1.3.6.1.5.5.7.3.1", "06082b06010505070301"),
    ],
)
def test_der_oid(oid, expected):
    assert authsome.der_oid(oid).hex() == expected


def test_der_scalar_types():
    assert authsome.der_boolean(True).hex() == "0101ff"
    assert authsome.der_boolean(False).hex() == "010100"
    assert authsome.der_bit_string(b"\x80", 7).hex() == "03020780"
    assert authsome.der_utf8_string("é").hex() == "0c02c3a9"
    assert authsome.der_context(0, b"\x02\x01\x02").hex() == "a003020102"
    assert authsome.der_context(2, b"ab", constructed=False).hex() == "82026162"


def test_der_set_sorts_elements():
    assert authsome.der_set(b"\x02\x01\x02", b"\x02\x01\x01").hex() == "3106020101020102"


def test_der_time_switches_to_generalized_in_2050():
    utc = authsome.datetime.timezone.utc
    before = authsome.datetime.datetime(2049, 12, 31, 23, 59, 59, tzinfo=utc)
    after = authsome.datetime.datetime(2050, 1, 1, 0, 0, 0, tzinfo=utc)

    assert authsome.der_time(before) == b"\x17\x0d491231235959Z"
    assert authsome.der_time(after) == b"\x18\x0f20500101000000Z"


# Certificates


def test_ca_cert_pem_matches_der(ca):
    assert ssl.DER_cert_to_PEM_cert(ca.ca_cert_der).encode("ascii") == ca.ca_cert_pem


def test_ca_construction_writes_only_leaf_key(ca, workdir):
    assert sorted(os.listdir(workdir)) == ["leaf-key.pem"]


def test_each_ca_is_fresh(tmp_path):
    first_dir = tmp_path / "first"
    second_dir = tmp_path / "second"
    first_dir.mkdir(mode=0o700)
    second_dir.mkdir(mode=0o700)
    first = authsome.CertificateAuthority(str(first_dir))
    second = authsome.CertificateAuthority(str(second_dir))

    assert first.ca_cert_der != second.ca_cert_der
    assert first._ca_key != second._ca_key


@needs_openssl
def test_openssl_shows_ca_extensions(ca_file):
    result = _openssl("x509", "-in", str(ca_file), "-noout", "-text")
    text = result.stdout

    assert result.returncode == 0, result.stderr
    assert "Version: 3 (0x2)" in text
    assert re.search(r"Subject: CN ?= ?authsome run CA [0-9a-f]{16}\n", text)
    assert "Signature Algorithm: ecdsa-with-SHA256" in text
    assert "NIST CURVE: P-256" in text
    assert "X509v3 Basic Constraints: critical\n                CA:TRUE" in text
    assert "X509v3 Key Usage: critical\n                Certificate Sign, CRL Sign" in text
    assert "X509v3 Subject Key Identifier" in text


@needs_openssl
def test_openssl_shows_leaf_extensions(ca):
    cert_path, _ = ca.leaf_files("api.g2.com")
    result = _openssl("x509", "-in", cert_path, "-noout", "-text")
    text = result.stdout

    assert result.returncode == 0, result.stderr
    assert re.search(r"Subject: CN ?= ?api\.g2\.com\n", text)
    assert "X509v3 Basic Constraints: critical\n                CA:FALSE" in text
    assert "X509v3 Key Usage: critical\n                Digital Signature\n" in text
    assert "X509v3 Extended Key Usage: \n                TLS Web Server Authentication" in text
    assert "X509v3 Subject Alternative Name: \n                DNS:api.g2.com\n" in text
    assert "X509v3 Authority Key Identifier" in text
    assert "X509v3 Subject Key Identifier" in text
    assert "Certificate Sign" not in text


@needs_openssl
def test_leaf_authority_key_id_matches_ca(ca, ca_file):
    cert_path, _ = ca.leaf_files("api.g2.com")
    ca_text = _openssl("x509", "-in", str(ca_file), "-noout", "-text").stdout
    leaf_text = _openssl("x509", "-in", cert_path, "-noout", "-text").stdout
    ca_key_id = re.search(r"Subject Key Identifier: *\n *([0-9A-F:]+)", ca_text).group(1)
    leaf_key_id = re.search(r"Subject Key Identifier: *\n *([0-9A-F:]+)", leaf_text).group(1)
    authority = re.search(r"Authority Key Identifier: *\n *(?:keyid:)?([0-9A-F:]+)", leaf_text)

    assert authority.group(1) == ca_key_id
    assert leaf_key_id != ca_key_id


@needs_openssl
@pytest.mark.parametrize(
    "host, check",
    [
        ("api.g2.com", ["-verify_hostname", "api.g2.com"]),
        ("::1", ["-verify_ip", "::1"]),
        ("[::1]", ["-verify_ip", "::1"]),
        ("127.0.0.1", ["-verify_ip", "127.0.0.1"]),
    ],
)
def test_openssl_strict_verify_leaf(ca, ca_file, host, check):
    cert_path, _ = ca.leaf_files(host)
    result = _openssl(
        "verify", "-x509_strict", "-purpose", "sslserver", *check, "-CAfile", str(ca_file), cert_path
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(": OK")


@needs_openssl
@pytest.mark.parametrize(
    "host, san",
    [
        ("::1", "IP Address:0:0:0:0:0:0:0:1"),
        ("127.0.0.1", "IP Address:127.0.0.1"),
    ],
)
def test_ip_leaf_has_ip_san(ca, host, san):
    cert_path, _ = ca.leaf_files(host)
    text = _openssl("x509", "-in", cert_path, "-noout", "-text").stdout

    assert "X509v3 Subject Alternative Name: \n                %s\n" % san in text
    assert "DNS:" not in text


@needs_openssl
def test_openssl_rejects_other_hostname(ca, ca_file):
    cert_path, _ = ca.leaf_files("api.g2.com")
    result = _openssl(
        "verify", "-x509_strict", "-verify_hostname", "other.example", "-CAfile", str(ca_file), cert_path
    )

    assert result.returncode != 0


@needs_openssl
def test_common_name_truncated_to_64(ca):
    host = "a" * 60 + "." + "b" * 20 + ".example"
    cert_path, _ = ca.leaf_files(host)
    text = _openssl("x509", "-in", cert_path, "-noout", "-text").stdout

    assert re.search(r"Subject: CN ?= ?%s\n" % re.escape(host[:64]), text)
    assert "DNS:%s\n" % host in text


@needs_openssl
def test_leaf_key_matches_certificate(ca):
    cert_path, key_path = ca.leaf_files("api.g2.com")
    from_key = _openssl("pkey", "-in", key_path, "-pubout")
    from_cert = _openssl("x509", "-in", cert_path, "-noout", "-pubkey")

    assert from_key.returncode == 0, from_key.stderr
    assert from_key.stdout == from_cert.stdout


@needs_openssl
def test_validity_window(ca):
    cert_path, _ = ca.leaf_files("api.g2.com")
    now = time.time()
    result = _openssl("x509", "-in", cert_path, "-noout", "-startdate", "-enddate")
    dates = dict(line.split("=", 1) for line in result.stdout.splitlines())
    not_before = ssl.cert_time_to_seconds(dates["notBefore"])
    not_after = ssl.cert_time_to_seconds(dates["notAfter"])

    assert abs(not_before - (now - 3600)) < 120
    assert abs(not_after - (now + 30 * 86400)) < 120


# leaf_files


def test_leaf_files_cached(ca):
    first = ca.leaf_files("api.g2.com")
    with open(first[0], "rb") as file:
        content = file.read()
    second = ca.leaf_files("API.G2.com.")

    assert second == first
    with open(first[0], "rb") as file:
        assert file.read() == content


def test_leaf_files_bracketed_ipv6_same_as_bare(ca):
    assert ca.leaf_files("[::1]") == ca.leaf_files("::1")
    assert ca.leaf_files("0:0:0:0:0:0:0:1") == ca.leaf_files("::1")


def test_leaf_files_share_one_key(ca):
    first_cert, first_key = ca.leaf_files("api.g2.com")
    second_cert, second_key = ca.leaf_files("other.example")

    assert first_cert != second_cert
    assert first_key == second_key


def test_leaf_file_name_hides_host(ca):
    cert_path, key_path = ca.leaf_files("odd/../name")

    assert re.fullmatch(r"leaf-[0-9a-f]{32}\.pem", os.path.basename(cert_path))
    assert os.path.basename(key_path) == "leaf-key.pem"
    assert os.path.dirname(cert_path) == ca.workdir


@pytest.mark.parametrize("host", ["", ".", "[]", "has space", "tab\there", "bücher.example"])
def test_leaf_files_rejects_invalid_host(ca, host):
    with pytest.raises(ValueError):
        ca.leaf_files(host)


def test_leaf_files_thread_safe(ca, workdir):
    barrier = threading.Barrier(16)
    results = []

    def issue():
        barrier.wait()
        results.append(ca.leaf_files("api.g2.com"))

    threads = [threading.Thread(target=issue) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert len(results) == 16
    assert len(set(results)) == 1
    assert len(os.listdir(workdir)) == 2


def test_workdir_files_mode_0600(ca, workdir):
    ca.leaf_files("api.g2.com")
    ca.leaf_files("::1")
    names = os.listdir(workdir)

    assert len(names) == 3
    for name in names:
        assert stat.S_IMODE(os.stat(os.path.join(workdir, name)).st_mode) == 0o600, name


def test_ca_key_never_written(ca, workdir):
    ca.leaf_files("api.g2.com")
    ca.leaf_files("127.0.0.1")
    ca.server_context("::1")
    # The private attribute is read only to know which bytes must not appear on disk.
    raw_key = ca._ca_key.to_bytes(32, "big")
    hex_key = raw_key.hex().encode("ascii")

    for name in os.listdir(workdir):
        with open(os.path.join(workdir, name), "rb") as file:
            data = file.read()
        for form in _decoded_forms(data):
            assert raw_key not in form, name
            assert hex_key not in form.lower(), name


# TLS


def test_server_context_cached(ca):
    context = ca.server_context("api.g2.com")

    assert ca.server_context("API.g2.com") is context
    assert ca.server_context("other.example") is not context
    assert context.protocol == ssl.PROTOCOL_TLS_SERVER


def test_tls_handshake_dns_name(ca):
    client = _client_context(ca)

    assert client.check_hostname
    assert client.verify_mode == ssl.CERT_REQUIRED
    assert client.verify_flags & ssl.VERIFY_X509_STRICT
    payload, alpn = _handshake(ca.server_context("api.g2.com"), client, "127.0.0.1", "api.g2.com")
    assert payload == b"ok"
    assert alpn == "http/1.1"


def test_tls_handshake_default_client_context(ca):
    # create_default_context() adds VERIFY_X509_STRICT by itself from Python 3.13 on.
    client = ssl.create_default_context(cadata=ca.ca_cert_pem.decode("ascii"))

    payload, _ = _handshake(ca.server_context("api.g2.com"), client, "127.0.0.1", "api.g2.com")
    assert payload == b"ok"


def test_tls_handshake_ipv4_literal(ca):
    client = _client_context(ca)

    payload, _ = _handshake(ca.server_context("127.0.0.1"), client, "127.0.0.1", "127.0.0.1")
    assert payload == b"ok"


@pytest.mark.skipif(not _ipv6_loopback_available(), reason="IPv6 loopback ::1 not available")
def test_tls_handshake_ipv6_literal(ca):
    client = _client_context(ca)

    payload, alpn = _handshake(ca.server_context("[::1]"), client, "::1", "::1")
    assert payload == b"ok"
    assert alpn == "http/1.1"


def test_tls_handshake_wrong_name_fails(ca):
    client = _client_context(ca)

    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(ca.server_context("api.g2.com"), client, "127.0.0.1", "other.example")


def test_tls_handshake_unknown_ca_fails(ca, tmp_path):
    other_dir = tmp_path / "other"
    other_dir.mkdir(mode=0o700)
    other = authsome.CertificateAuthority(str(other_dir))
    client = _client_context(other)

    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(ca.server_context("api.g2.com"), client, "127.0.0.1", "api.g2.com")


def test_server_offers_only_http11(ca):
    client = _client_context(ca)
    client.set_alpn_protocols(["h2"])

    # CPython's server ALPN callback returns SSL_TLSEXT_ERR_NOACK when no protocol matches,
    # so the handshake goes on without ALPN.
    payload, alpn = _handshake(ca.server_context("api.g2.com"), client, "127.0.0.1", "api.g2.com")
    assert payload == b"ok"
    assert alpn is None
