"""End-to-end tests of `authsome run`: real clients, real TLS, a local stand-in for api.g2.com.

The stand-in's certificate comes from the test CA, which authsome trusts through SSL_CERT_FILE;
`--connect-to` sends api.g2.com to the stand-in's loopback port without any DNS lookup.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import AUTHSOME, assert_no_secret, assert_no_secret_in_tree, run_cli

G2_KEY = "g2-test-key-7f3a9c1e5b"
PLACEHOLDER = "authsome-proxy-managed"

# Each client fetches URL and prints the response body; the child also records its environment.
PYTHON_CLIENTS = {
    "urllib": "import urllib.request, sys\n"
              "print(urllib.request.urlopen(sys.argv[1], timeout=20).read().decode())\n",
    "requests": "import requests, sys\n"
                "print(requests.get(sys.argv[1], timeout=20).text)\n",
    "httpx": "import httpx, sys\n"
             "print(httpx.get(sys.argv[1], timeout=20).text)\n",
}

ENV_DUMP = ("import json, os, sys\n"
            "open(sys.argv[1], 'w').write(json.dumps(dict(os.environ)))\n")

# Opens a CONNECT tunnel by hand and reports the issuer of the certificate seen at the far end.
TUNNEL_PEER = """
import base64, json, os, socket, ssl, sys
from urllib.parse import urlsplit
proxy = urlsplit(os.environ["HTTPS_PROXY"])
sock = socket.create_connection((proxy.hostname, proxy.port), timeout=20)
auth = base64.b64encode(("%s:%s" % (proxy.username, proxy.password)).encode()).decode()
sock.sendall(("CONNECT %s:443 HTTP/1.1\\r\\nHost: %s:443\\r\\nProxy-Authorization: Basic %s\\r\\n\\r\\n"
              % (sys.argv[1], sys.argv[1], auth)).encode())
head = b""
while b"\\r\\n\\r\\n" not in head:
    head += sock.recv(1)
context = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
tls = context.wrap_socket(sock, server_hostname=sys.argv[1])
issuer = dict(item[0] for item in tls.getpeercert()["issuer"])
print(json.dumps({"status": head.split(b" ")[1].decode(), "issuer": issuer.get("commonName")}))
"""


def login_g2(home, key=G2_KEY, connection=None):
    args = ["login", "g2", "--stdin"] + (["--connection", connection] if connection else [])
    result = run_cli(args, home.env, input=key)
    assert result.returncode == 0, result.stderr


def run_env(home, test_ca, **extra):
    env = dict(home.env)
    env["SSL_CERT_FILE"] = str(test_ca.ca_pem_path)
    env.update(extra)
    return env


def authsome_run(env, origins, command, options=(), timeout=60):
    connect = []
    for origin in origins:
        for name in origin.names:
            connect += ["--connect-to", origin.connect_to(name)]
    args = [sys.executable, str(AUTHSOME), "--verbose", "run"] + connect + list(options) + ["--"]
    return subprocess.run(args + list(command), env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def client_command(client, tmp_path, url):
    if client == "curl":
        return ["curl", "-sS", "--fail-with-body", "--max-time", "20", url]
    script = tmp_path / ("client_%s.py" % client)
    script.write_text(PYTHON_CLIENTS[client])
    return [sys.executable, str(script), url]


def quiet_handler(exchange):
    """Respond without echoing the request, so the key cannot come back in the body."""
    return 200, [("Content-Type", "application/json")], b'{"ok": true}\n'


def authorization_values(request):
    return request.header_values("Authorization")


@pytest.mark.parametrize("client", ["curl", "urllib", "requests", "httpx"])
def test_client_gets_key_injected(client, clients, home, test_ca, origin, tmp_path):
    if client != "urllib":
        clients.require(client)
    login_g2(home)
    g2 = origin(["api.g2.com"], handler=quiet_handler)
    other = origin(["other.test"])
    env_file = tmp_path / "child-env.json"
    env_script = tmp_path / "env_dump.py"
    env_script.write_text(ENV_DUMP)
    tunnel_script = tmp_path / "tunnel_peer.py"
    tunnel_script.write_text(TUNNEL_PEER)
    fetch = " ".join(client_command(client, tmp_path, "https://api.g2.com/v1/ping?x=1"))
    fetch_other = " ".join(client_command(client, tmp_path, "https://other.test/plain"))
    shell = "%s && echo && %s && echo && %s %s %s && %s %s other.test" % (
        fetch, fetch_other, sys.executable, env_script, env_file, sys.executable, tunnel_script)

    result = authsome_run(run_env(home, test_ca), [g2, other], ["sh", "-c", shell])

    assert result.returncode == 0, result.stderr
    received = g2.wait_for_requests(1)
    assert authorization_values(received[0]) == ["Token " + G2_KEY]
    assert received[0].target == "/v1/ping?x=1"
    assert other.requests[0].header("Authorization") is None
    tunnel = json.loads(result.stdout.strip().splitlines()[-1])
    assert tunnel["status"] == "200"
    assert tunnel["issuer"] == "authsome test CA"  # the origin's own certificate, untouched
    child_env = json.loads(env_file.read_text())
    assert child_env["G2_API_TOKEN"] == PLACEHOLDER
    assert_no_secret(G2_KEY, json.dumps(child_env), result.stdout, result.stderr)
    assert_no_secret_in_tree(home.path, G2_KEY)


def test_tunnel_shows_origin_certificate(home, test_ca, origin, tmp_path):
    login_g2(home)
    other = origin(["other.test"])
    script = tmp_path / "tunnel_peer.py"
    script.write_text(TUNNEL_PEER)
    g2_script = tmp_path / "g2_peer.py"
    g2_script.write_text(TUNNEL_PEER)
    g2 = origin(["api.g2.com"])

    result = authsome_run(run_env(home, test_ca), [other, g2],
                          ["sh", "-c", "%s %s other.test && %s %s api.g2.com"
                           % (sys.executable, script, sys.executable, g2_script)])

    assert result.returncode == 0, result.stderr
    other_peer, g2_peer = [json.loads(line) for line in result.stdout.strip().splitlines()]
    ca_subject = subprocess.run(["openssl", "x509", "-noout", "-subject", "-nameopt", "multiline",
                                 "-in", str(test_ca.ca_pem_path)], capture_output=True,
                                text=True).stdout
    assert other_peer["issuer"] in ca_subject
    assert g2_peer["issuer"].startswith("authsome run CA")


def test_client_header_replaced_not_duplicated(home, test_ca, origin, tmp_path):
    login_g2(home)
    g2 = origin(["api.g2.com"])
    command = ["curl", "-sS", "--max-time", "20", "-H", "authorization: Token fake",
               "-H", "X-Other: %s" % PLACEHOLDER, "https://api.g2.com/v1/me?token=%s" % PLACEHOLDER]

    result = authsome_run(run_env(home, test_ca), [g2], command)

    assert result.returncode == 0, result.stderr
    request = g2.wait_for_requests(1)[0]
    assert authorization_values(request) == ["Token " + G2_KEY]
    assert request.header("X-Other") == PLACEHOLDER
    assert request.target == "/v1/me?token=%s" % PLACEHOLDER


def test_proxy_rejects_missing_token(home, test_ca, origin, tmp_path):
    login_g2(home)
    g2 = origin(["api.g2.com"])
    script = tmp_path / "no_token.py"
    script.write_text(
        "import os, socket\n"
        "from urllib.parse import urlsplit\n"
        "proxy = urlsplit(os.environ['HTTPS_PROXY'])\n"
        "sock = socket.create_connection((proxy.hostname, proxy.port), timeout=10)\n"
        "sock.sendall(b'CONNECT api.g2.com:443 HTTP/1.1\\r\\nHost: api.g2.com:443\\r\\n\\r\\n')\n"
        "print(sock.recv(200).split(b'\\r\\n')[0].decode())\n")

    result = authsome_run(run_env(home, test_ca), [g2], [sys.executable, str(script)])

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "HTTP/1.1 407 Proxy Authentication Required"
    assert g2.requests == []


def test_child_environment_variables(home, test_ca, tmp_path):
    login_g2(home)
    env_file = tmp_path / "env.json"
    script = tmp_path / "env_dump.py"
    script.write_text(ENV_DUMP)
    parent = run_env(home, test_ca, NO_PROXY="internal.example,.g2.com", no_proxy="g2.com",
                     AUTHSOME_MASTER_KEY="", G2_API_TOKEN="inherited-value",
                     AUTHSOME_NEW_PASSPHRASE="new-passphrase-value",
                     AUTHSOME_PASSPHRASE="unused-passphrase-value")

    result = authsome_run(parent, [], [sys.executable, str(script), str(env_file)])

    assert result.returncode == 0, result.stderr
    env = json.loads(env_file.read_text())
    assert env["G2_API_TOKEN"] == PLACEHOLDER
    assert env["NO_PROXY"].split(",") == ["internal.example", "localhost", "127.0.0.1", "::1"]
    assert env["no_proxy"] == env["NO_PROXY"]
    assert "dropped" in result.stderr
    assert ".g2.com" in result.stderr
    assert env["NODE_USE_ENV_PROXY"] == "1"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        assert env[name].startswith("http://authsome:")
        assert "@127.0.0.1:" in env[name]
    bundle = open(env["SSL_CERT_FILE"]).read() if os.path.exists(env["SSL_CERT_FILE"]) else None
    assert bundle is None  # the run's temp folder is removed when the run ends
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO", "AWS_CA_BUNDLE",
                 "PIP_CERT", "NPM_CONFIG_CAFILE"):
        assert env[name] == env["SSL_CERT_FILE"]
    assert env["NODE_EXTRA_CA_CERTS"] != env["SSL_CERT_FILE"]
    assert "AUTHSOME_MASTER_KEY" not in env
    assert "AUTHSOME_PASSPHRASE" not in env
    assert "AUTHSOME_NEW_PASSPHRASE" not in env
    for name in ("NIX_SSL_CERT_FILE", "HTTPLIB2_CA_CERTS", "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",
                 "CLOUDSDK_CORE_CUSTOM_CA_CERTS_FILE"):
        assert env[name] == env["SSL_CERT_FILE"]


def test_ca_bundle_contents(home, test_ca, tmp_path):
    login_g2(home)
    script = tmp_path / "bundle.py"
    script.write_text(
        "import os, json, stat\n"
        "bundle = open(os.environ['SSL_CERT_FILE']).read()\n"
        "run_ca = open(os.environ['NODE_EXTRA_CA_CERTS']).read()\n"
        "folder = os.path.dirname(os.environ['SSL_CERT_FILE'])\n"
        "print(json.dumps({'bundle': bundle, 'run_ca': run_ca,\n"
        "  'folder_mode': stat.S_IMODE(os.stat(folder).st_mode),\n"
        "  'file_modes': [stat.S_IMODE(os.stat(os.path.join(folder, n)).st_mode)\n"
        "                 for n in os.listdir(folder)]}))\n")

    parent = run_env(home, test_ca, NODE_EXTRA_CA_CERTS=str(test_ca.ca_pem_path))
    result = authsome_run(parent, [], [sys.executable, str(script)])

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    test_ca_pem = test_ca.ca_pem_path.read_text().strip()
    assert report["run_ca"].startswith(test_ca_pem)  # the parent's extra CAs stay for Node
    assert report["run_ca"].count("BEGIN CERTIFICATE") == 2
    assert report["run_ca"].split(test_ca_pem)[1].strip() in report["bundle"]
    assert test_ca.ca_pem_path.read_text().strip() in report["bundle"]
    assert report["bundle"].count("BEGIN CERTIFICATE") > 3  # system roots are included
    assert report["folder_mode"] == 0o700
    assert set(report["file_modes"]) == {0o600}


def test_exit_code_passed_through(home):
    assert run_cli(["run", "--", "sh", "-c", "exit 7"], home.env).returncode == 7
    assert run_cli(["run", "--", "true"], home.env).returncode == 0


def test_exit_code_after_signal(home):
    result = run_cli(["run", "--", "sh", "-c", "kill -TERM $$"], home.env)
    assert result.returncode == 128 + signal.SIGTERM


def test_command_not_found(home):
    result = run_cli(["run", "--", "definitely-not-a-command-xyz"], home.env)
    assert result.returncode == 127
    assert result.stderr.strip() == "error: command not found: definitely-not-a-command-xyz"


def test_run_without_command(home):
    result = run_cli(["run"], home.env)
    assert result.returncode == 2
    assert result.stderr.startswith("error: nothing to run")


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGQUIT"])
def test_signal_forwarded_once(signame, home, tmp_path):
    record = tmp_path / "signals.txt"
    script = tmp_path / "child.py"
    script.write_text(
        "import signal, sys, time\n"
        "received = []\n"
        "def handler(signum, frame):\n"
        "    received.append(signum)\n"
        "signal.signal(signal.%s, handler)\n"
        "print('ready', flush=True)\n"
        "deadline = time.time() + 3\n"
        "while time.time() < deadline and not received:\n"
        "    time.sleep(0.01)\n"
        "time.sleep(0.5)\n"
        "open(sys.argv[1], 'w').write(','.join(map(str, received)))\n"
        "sys.exit(5)\n" % signame)
    process = subprocess.Popen([sys.executable, str(AUTHSOME), "run", "--", sys.executable,
                                str(script), str(record)], env=home.env, stdout=subprocess.PIPE,
                               stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    assert process.stdout.readline().strip() == "ready"

    process.send_signal(getattr(signal, signame))

    assert process.wait(timeout=20) == 5
    assert record.read_text() == str(int(getattr(signal, signame)))


def test_run_ends_with_child_despite_idle_connection(home, test_ca, origin, tmp_path):
    login_g2(home)
    g2 = origin(["api.g2.com"])
    script = tmp_path / "leave_open.py"
    script.write_text(
        "import http.client, os, ssl, sys\n"
        "from urllib.parse import urlsplit\n"
        "proxy = urlsplit(os.environ['HTTPS_PROXY'])\n"
        "conn = http.client.HTTPSConnection(proxy.hostname, proxy.port, context=ssl.create_default_context())\n"
        "import base64\n"
        "auth = base64.b64encode(('%s:%s' % (proxy.username, proxy.password)).encode()).decode()\n"
        "conn.set_tunnel('api.g2.com', 443, headers={'Proxy-Authorization': 'Basic ' + auth})\n"
        "conn.request('GET', '/keep')\n"
        "conn.getresponse().read()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    null = os.open(os.devnull, os.O_RDWR)\n"
        "    for fd in (0, 1, 2):\n"
        "        os.dup2(null, fd)\n"
        "    import time; time.sleep(30); os._exit(0)\n"
        "os._exit(0)\n")
    started = time.monotonic()

    result = authsome_run(run_env(home, test_ca), [g2], [sys.executable, str(script)])

    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 10
    assert len(g2.requests) == 1


def test_login_during_run_is_used(home, test_ca, origin, tmp_path):
    g2 = origin(["api.g2.com"])
    script = tmp_path / "login_then_fetch.sh"
    script.write_text('printf %%s "%s" | %s %s login g2 --stdin >/dev/null && curl -sS --max-time 20 https://api.g2.com/after\n'
                      % (G2_KEY, sys.executable, AUTHSOME))

    result = authsome_run(run_env(home, test_ca), [g2], ["sh", str(script)])

    assert result.returncode == 0, result.stderr
    assert authorization_values(g2.wait_for_requests(1)[0]) == ["Token " + G2_KEY]


def test_run_connection_override(home, test_ca, origin):
    login_g2(home, "personal-key-123", connection="personal")
    login_g2(home, "team-key-456", connection="team")
    g2 = origin(["api.g2.com"])
    fetch = ["curl", "-sS", "--max-time", "20", "https://api.g2.com/which"]

    first = authsome_run(run_env(home, test_ca), [g2], fetch)
    second = authsome_run(run_env(home, test_ca), [g2], fetch, options=["--connection", "g2=team"])

    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    requests = g2.wait_for_requests(2)
    assert authorization_values(requests[0]) == ["Token personal-key-123"]
    assert authorization_values(requests[1]) == ["Token team-key-456"]


def test_upstream_untrusted_certificate_gives_502(home, test_ca, origin, tmp_path):
    login_g2(home)
    g2 = origin(["api.g2.com"])
    env = dict(home.env)  # the stand-in's CA is not trusted upstream
    env["SSL_CERT_FILE"] = "/nonexistent/ca.pem"
    command = ["curl", "-sS", "--max-time", "20", "-w", "%{http_code}", "https://api.g2.com/x"]

    result = authsome_run(env, [g2], command)

    assert result.stdout.endswith("502")
    assert "certificate verification failed" in result.stdout
    assert g2.requests == []
    assert_no_secret(G2_KEY, result.stdout, result.stderr)


def test_audit_log_records_injection(home, test_ca, origin):
    login_g2(home)
    g2 = origin(["api.g2.com"])

    result = authsome_run(run_env(home, test_ca), [g2],
                          ["curl", "-sS", "--max-time", "20", "https://api.g2.com/v1/audit?secret=1"])

    assert result.returncode == 0, result.stderr
    entries = [json.loads(line) for line in (home.path / "audit.log").read_text().splitlines()]
    injected = [entry for entry in entries if entry["event"] == "inject"]
    assert injected[-1]["provider"] == "g2"
    assert injected[-1]["path"] == "/v1/audit"
    assert injected[-1]["host"] == "api.g2.com"
    assert "GET api.g2.com:443 /v1/audit 200 injected g2/default" in result.stderr
    assert_no_secret_in_tree(home.path, G2_KEY)


def test_connect_to_from_environment(home, test_ca, origin):
    login_g2(home)
    g2 = origin(["api.g2.com"], handler=quiet_handler)
    env = run_env(home, test_ca, AUTHSOME_CONNECT_TO="unused.test:443=127.0.0.1:9,%s"
                  % g2.connect_to())

    result = authsome_run(env, [], ["curl", "-sS", "--max-time", "20", "https://api.g2.com/env"])

    assert result.returncode == 0, result.stderr
    assert authorization_values(g2.wait_for_requests(1)[0]) == ["Token " + G2_KEY]


def test_connect_to_rejects_malformed_entry(home):
    result = run_cli(["run", "--connect-to", "api.g2.com:443", "--", "true"], home.env)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: invalid --connect-to 'api.g2.com:443': expected "
                                     "HOST:PORT=HOST2:PORT2")
