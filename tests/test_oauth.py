"""Tests of the OAuth2 section: logins, refresh at use, revocation.

A stand-in authorization server, `FakeProvider`, is served over HTTPS by the harness's `origin`
on 127.0.0.1 with a certificate from `test_ca`. It checks every parameter it receives, enforces
PKCE S256, rotates refresh tokens and rejects a reused one. It also serves the provider's API at
api.acme-oauth.test, where it accepts only a currently valid Bearer token. authsome trusts it
through SSL_CERT_FILE; the provider file in the test home points every endpoint at it.

The browser step of the authorization code flow is played by the test: it reads the URL that
`authsome login` prints on stderr, requests the stand-in's authorization endpoint, and follows the
redirect to the loopback callback. Device-flow polling runs in-process with a fake clock.
"""

import base64
import errno
import fcntl
import hashlib
import http.client
import io
import json
import os
import re
import pty
import secrets
import select
import socket
import subprocess
import sys
import termios
import threading
import time
from urllib.parse import parse_qs, parse_qsl, unquote_plus, urlencode, urlsplit

import pytest

import authsome
from conftest import AUTHSOME, assert_no_secret, assert_no_secret_in_tree, run_cli

CLIENT_ID = "acme-client-7c2f"
CLIENT_SECRET = "acme-secret-b81d4e0f9a+/x"  # '+' and '/' exercise the Basic form-encoding
API_HOST = "api.acme-oauth.test"
ABSENT = object()  # an expires_in the stand-in leaves out of its reply


# ============================================================================================
# The stand-in authorization server and API
# ============================================================================================

class FakeProvider:
    """An OAuth2 authorization server and API that records and checks every request.

    Each broken rule is appended to `problems` (and gets an error response), so a test ends
    with `assert provider.problems == []`.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.base = None

        # What the stand-in expects and how it responds; tests change these before a login.
        self.client_id = CLIENT_ID
        self.client_secret = CLIENT_SECRET
        self.auth_method = "client_secret_post"
        self.pkce = True
        self.scope = "read write"
        self.extra_params = {}
        self.json_bodies = False  # device_token_request "json": device and token bodies are JSON
        self.deny = None  # (error, description) sent to the callback instead of a code
        self.expires_in = 3600
        self.refresh_expires_in = None  # expires_in of refresh replies (default: expires_in)
        self.reply_format = "json"
        self.granted_scope = None  # scope in the token reply (None: the requested one)
        self.reply_override = None  # (status, document) sent by the token endpoint instead
        self.refresh_delay = 0.0
        self.device_script = []
        self.device_interval = 5
        self.device_lifetime = 900
        self.slow_down_interval = None
        self.revoke_status = 200
        self.metadata = {}  # path -> document
        self.registered = {}  # client_id -> registration request

        # What the stand-in received and issued.
        self.problems = []
        self.codes = {}
        self.access_tokens = set()
        self.refresh_tokens = set()
        self.issued = []  # every token issued, to look for in outputs
        self.grants = []  # grant_type of every token request, in order
        self.refresh_reuse = 0
        self.revocations = []
        self.registrations = []
        self.well_known_requests = []
        self.api_tokens = []  # the Bearer token of every API request

    # -- helpers -------------------------------------------------------------------------

    def url(self, path):
        return self.base + path

    def problem(self, text):
        with self.lock:
            self.problems.append(text)

    def mint(self):
        """Issue and remember a valid (access token, refresh token) pair."""
        access = "at-" + secrets.token_hex(12)
        refresh = "rt-" + secrets.token_hex(12)
        with self.lock:
            self.access_tokens.add(access)
            self.refresh_tokens.add(refresh)
            self.issued += [access, refresh]
        return access, refresh

    def secrets_issued(self):
        with self.lock:
            return list(self.issued) + [self.client_secret]

    @staticmethod
    def body_fields(exchange):
        body = exchange.read_body().decode()
        content_type = exchange.request.header("Content-Type") or ""
        if content_type.startswith("application/json"):
            return dict(json.loads(body)), "json"
        return dict(parse_qsl(body, keep_blank_values=True)), "form"

    def check_client(self, exchange, fields):
        """Check the client authentication of a token, device or revocation request."""
        header = exchange.request.header("Authorization")
        if self.auth_method == "client_secret_basic":
            if not header or not header.startswith("Basic "):
                return self.problem("no Basic client authentication")
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
            if (unquote_plus(user), unquote_plus(password)) != (self.client_id, self.client_secret):
                self.problem("wrong Basic client credentials")
            if "client_secret" in fields:
                self.problem("client_secret in the body with Basic authentication")
            return None
        if header:
            self.problem("Authorization header with %s" % self.auth_method)
        if fields.get("client_id") != self.client_id and fields.get("client_id") not in self.registered:
            self.problem("wrong client_id %r" % fields.get("client_id"))
        if self.auth_method == "client_secret_post":
            if fields.get("client_secret") != self.client_secret:
                self.problem("wrong or missing client_secret")
        elif "client_secret" in fields:
            self.problem("client_secret sent by a public client")
        return None

    def check_body_format(self, fields_format, where):
        expected = "json" if self.json_bodies else "form"
        if fields_format != expected:
            self.problem("%s body was %s, expected %s" % (where, fields_format, expected))

    def token_reply(self, exchange, status, document):
        if self.reply_format == "form":
            body = urlencode({key: value for key, value in document.items() if value is not None})
            return exchange.respond(status, [("Content-Type", "application/x-www-form-urlencoded")],
                                    body.encode())
        return exchange.respond_json(status, document)

    def tokens(self, exchange, scope, expires_in):
        if self.reply_override is not None:
            status, document = self.reply_override
            return exchange.respond_json(status, document)
        access, refresh = self.mint()
        document = {"access_token": access, "token_type": "bearer", "refresh_token": refresh,
                    "scope": self.granted_scope if self.granted_scope is not None else scope}
        if self.granted_scope is ABSENT:
            del document["scope"]
        if expires_in is not ABSENT:
            document["expires_in"] = expires_in
        return self.token_reply(exchange, 200, document)

    # -- endpoints -----------------------------------------------------------------------

    def handle(self, exchange):
        request = exchange.request
        host = (request.header("Host") or "").split(":")[0]
        if host == API_HOST:
            return self.api(exchange)
        routes = {("GET", "/authorize"): self.authorize, ("POST", "/token"): self.token,
                  ("POST", "/device/code"): self.device_code, ("POST", "/revoke"): self.revoke,
                  ("POST", "/register"): self.register}
        handler = routes.get((request.method, request.path))
        if handler is not None:
            return handler(exchange)
        if request.path in self.metadata:
            with self.lock:
                self.well_known_requests.append(request.path)
            return exchange.respond_json(200, self.metadata[request.path])
        if "/.well-known/" in request.path:
            with self.lock:
                self.well_known_requests.append(request.path)
        return exchange.respond(404, [("Content-Type", "text/plain")], b"not found\n")

    def authorize(self, exchange):
        query = {name: values[0] for name, values in parse_qs(urlsplit(exchange.request.target).query).items()}
        redirect_uri = query.get("redirect_uri", "")
        checks = [
            (query.get("response_type") == "code", "response_type"),
            (query.get("client_id") == self.client_id or query.get("client_id") in self.registered,
             "client_id"),
            (re.fullmatch(r"http://127\.0\.0\.1:\d+/callback", redirect_uri) is not None,
             "redirect_uri"),
            (len(query.get("state", "")) >= 16, "state"),
            (query.get("scope", "") == self.scope, "scope %r" % query.get("scope")),
        ]
        if self.pkce:
            checks += [(query.get("code_challenge_method") == "S256", "code_challenge_method"),
                       (len(query.get("code_challenge", "")) == 43, "code_challenge")]
        else:
            checks += [("code_challenge" not in query, "code_challenge sent with pkce false")]
        for name, value in self.extra_params.items():
            checks.append((query.get(name) == value, "extra parameter %s" % name))
        failed = [name for ok, name in checks if not ok]
        if failed:
            self.problem("authorize: " + ", ".join(failed))
            return exchange.respond(400, [("Content-Type", "text/plain")], b"bad request\n")
        if self.deny:
            reply = {"error": self.deny[0], "error_description": self.deny[1], "state": query["state"]}
        else:
            code = "code-" + secrets.token_hex(8)
            with self.lock:
                self.codes[code] = {"challenge": query.get("code_challenge"),
                                    "redirect_uri": redirect_uri, "scope": query.get("scope", "")}
            reply = {"code": code, "state": query["state"]}
        location = redirect_uri + "?" + urlencode(reply)
        return exchange.respond(302, [("Location", location)], b"")

    def token(self, exchange):
        fields, body_format = self.body_fields(exchange)
        grant = fields.get("grant_type")
        with self.lock:
            self.grants.append(grant)
        self.check_client(exchange, fields)
        if grant == "authorization_code":
            return self.exchange_code(exchange, fields)
        if grant == "refresh_token":
            return self.refresh(exchange, fields)
        if grant == "urn:ietf:params:oauth:grant-type:device_code":
            self.check_body_format(body_format, "device token request")
            return self.poll_device(exchange, fields)
        self.problem("unknown grant_type %r" % grant)
        return exchange.respond_json(400, {"error": "unsupported_grant_type"})

    def exchange_code(self, exchange, fields):
        with self.lock:
            issued = self.codes.pop(fields.get("code"), None)
        if issued is None:
            self.problem("unknown or reused code")
            return exchange.respond_json(400, {"error": "invalid_grant"})
        if fields.get("redirect_uri") != issued["redirect_uri"]:
            self.problem("redirect_uri differs from the authorization request")
        verifier = fields.get("code_verifier")
        if self.pkce:
            digest = hashlib.sha256((verifier or "").encode()).digest()
            if not verifier or base64.urlsafe_b64encode(digest).rstrip(b"=").decode() != issued["challenge"]:
                self.problem("PKCE verifier does not match the S256 challenge")
                return exchange.respond_json(400, {"error": "invalid_grant",
                                                   "error_description": "PKCE verification failed"})
        elif verifier is not None:
            self.problem("code_verifier sent with pkce false")
        return self.tokens(exchange, issued["scope"], self.expires_in)

    def refresh(self, exchange, fields):
        token = fields.get("refresh_token")
        if self.refresh_delay:
            time.sleep(self.refresh_delay)  # widens the window in which a second refresher would race
        with self.lock:
            valid = token in self.refresh_tokens
            self.refresh_tokens.discard(token)  # rotation: each refresh token works once
            if not valid:
                self.refresh_reuse += 1
        if not valid:
            return exchange.respond_json(400, {"error": "invalid_grant",
                                               "error_description": "refresh token revoked or reused"})
        expires_in = self.refresh_expires_in if self.refresh_expires_in is not None else self.expires_in
        return self.tokens(exchange, self.scope, expires_in)

    def device_code(self, exchange):
        fields, body_format = self.body_fields(exchange)
        self.check_body_format(body_format, "device authorization request")
        self.check_client(exchange, fields)
        if fields.get("scope", "") != self.scope:
            self.problem("device scope %r" % fields.get("scope"))
        return exchange.respond_json(200, {
            "device_code": "dc-" + secrets.token_hex(8), "user_code": "WDJB-MJHT",
            "verification_uri": self.url("/device"),
            "verification_uri_complete": self.url("/device?user_code=WDJB-MJHT"),
            "expires_in": self.device_lifetime, "interval": self.device_interval})

    def poll_device(self, exchange, fields):
        if not fields.get("device_code", "").startswith("dc-"):
            self.problem("device_code missing")
        with self.lock:
            step = self.device_script.pop(0) if self.device_script else "authorization_pending"
        if step == "ok":
            return self.tokens(exchange, self.scope, self.expires_in)
        reply = {"error": step}
        if step == "slow_down" and self.slow_down_interval is not None:
            reply["interval"] = self.slow_down_interval
        return exchange.respond_json(400, reply)

    def revoke(self, exchange):
        fields, _ = self.body_fields(exchange)
        self.check_client(exchange, fields)
        with self.lock:
            self.revocations.append((fields.get("token_type_hint"), fields.get("token")))
        return exchange.respond(self.revoke_status, [("Content-Type", "application/json")], b"{}")

    def register(self, exchange):
        document = json.loads(exchange.read_body().decode())
        redirect_uris = document.get("redirect_uris") or []
        if (len(redirect_uris) != 1
                or not re.fullmatch(r"http://127\.0\.0\.1:\d+/callback", redirect_uris[0])):
            self.problem("registration redirect_uris %r" % redirect_uris)
        if document.get("token_endpoint_auth_method") != "none":
            self.problem("registration token_endpoint_auth_method")
        if not {"authorization_code", "refresh_token"} <= set(document.get("grant_types") or []):
            self.problem("registration grant_types")
        client_id = "dyn-" + secrets.token_hex(6)
        with self.lock:
            self.registered[client_id] = document
            self.registrations.append(document)
        return exchange.respond_json(201, {"client_id": client_id, "redirect_uris": redirect_uris,
                                           "token_endpoint_auth_method": "none"})

    def api(self, exchange):
        header = exchange.request.header("Authorization") or ""
        token = header[len("Bearer "):] if header.startswith("Bearer ") else None
        with self.lock:
            self.api_tokens.append(token)
            valid = token in self.access_tokens
        if not valid:
            return exchange.respond(401, [("Content-Type", "text/plain")], b"bad token\n")
        return exchange.respond(200, [("Content-Type", "text/plain")], b"api ok\n")


# ============================================================================================
# Fixtures and helpers
# ============================================================================================

@pytest.fixture
def provider(origin):
    fake = FakeProvider()
    server = origin(names=["127.0.0.1", API_HOST], handler=fake.handle)
    fake.base = "https://127.0.0.1:%d" % server.port
    fake.origin = server
    return fake


def provider_definition(fake, **oauth):
    block = {"authorization_url": fake.url("/authorize"), "token_url": fake.url("/token"),
             "revocation_url": fake.url("/revoke"), "scopes": ["read", "write"], "pkce": True,
             "token_endpoint_auth_method": "client_secret_post"}
    block.update(oauth)
    return {"name": "acme", "display_name": "Acme", "auth_type": "oauth2", "flow": "pkce",
            "api_url": API_HOST, "oauth": {key: value for key, value in block.items() if value is not None},
            "export": {"ACME_ACCESS_TOKEN": "ACCESS_TOKEN"}}


def write_provider(home, definition):
    folder = home.path / "providers"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(home.path, 0o700)
    (folder / "acme.json").write_text(json.dumps(definition))


def cli_env(home, test_ca, graphical=False):
    env = dict(home.env)
    env["SSL_CERT_FILE"] = str(test_ca.ca_pem_path)
    if graphical:
        env["DISPLAY"] = ":0"
        env["BROWSER"] = "true"  # webbrowser runs `true URL`: the test plays the browser
    return env


@pytest.fixture
def in_process(home, test_ca, monkeypatch):
    """Point this process at the test home and the test CA for direct calls into authsome."""
    for name in list(os.environ):
        if name.startswith("AUTHSOME_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AUTHSOME_HOME", str(home.path))
    monkeypatch.setenv("SSL_CERT_FILE", str(test_ca.ca_pem_path))
    return home


def load_provider(home):
    return authsome.load_catalog(str(home.path)).get("acme")


def vault_document(home):
    return authsome.Vault(str(home.path)).load()


def stored_record(home, connection="default"):
    return authsome.find_record(vault_document(home), "acme", connection)


def store_login(home, fake, expires_at, access=None, refresh=None, client_secret=CLIENT_SECRET):
    """Put a token record and its client into the vault, as a login would have."""
    if access is None:
        access, refresh = fake.mint()
    record = {"provider": "acme", "connection": "default", "auth_type": "oauth2",
              "access_token": access, "refresh_token": refresh, "token_type": "bearer",
              "expires_at": expires_at, "scopes": ["read", "write"], "status": "connected",
              "created_at": authsome.iso_time(), "updated_at": authsome.iso_time(),
              "base_url": None, "client_id": CLIENT_ID}

    def mutate(document):
        authsome.put_record(document, record)
        document["clients"]["acme"] = {"client_id": CLIENT_ID, "client_secret": client_secret,
                                       "token_endpoint_auth_method": fake.auth_method}

    os.makedirs(str(home.path), mode=0o700, exist_ok=True)
    authsome.Vault(str(home.path)).update(mutate)
    return access, refresh


class LoginProcess:
    """`authsome login` running in the background, with its stderr read line by line."""

    def __init__(self, env, args, stdin_text=None):
        self.proc = subprocess.Popen(
            [sys.executable, str(AUTHSOME), "login", *args], env=env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if stdin_text is not None:
            self.proc.stdin.write(stdin_text)
        self.proc.stdin.close()
        self.lines = []
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stderr:
            with self.changed:
                self.lines.append(line)
                self.changed.notify_all()

    def wait_for_line(self, pattern, timeout=30):
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for line in self.lines:
                    match = re.search(pattern, line)
                    if match:
                        return match
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self.reader.is_alive()):
                    raise AssertionError("no line matching %r in stderr: %s" % (pattern, "".join(self.lines)))
                self.changed.wait(min(left, 0.2))

    def authorize_url(self):
        return self.wait_for_line(r"^\s+(https://\S+/authorize\?\S+)$").group(1)

    def finish(self, timeout=30):
        stdout = self.proc.stdout.read()
        self.proc.wait(timeout)
        self.reader.join(5)
        return self.proc.returncode, stdout, "".join(self.lines)


def ask_authorization(url, test_ca):
    """Play the browser at the authorization endpoint; return (status, Location)."""
    parts = urlsplit(url)
    connection = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=10,
                                             context=test_ca.client_context())
    connection.request("GET", "%s?%s" % (parts.path, parts.query))
    response = connection.getresponse()
    response.read()
    connection.close()
    return response.status, response.getheader("Location")


def open_callback(location):
    """Follow the redirect to the loopback callback; return (status, page)."""
    parts = urlsplit(location)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    connection.request("GET", "%s?%s" % (parts.path, parts.query))
    response = connection.getresponse()
    page = response.read().decode()
    connection.close()
    return response.status, page


def browser_login(env, test_ca, args, stdin_text=None):
    """Run `authsome login` through the browser step; return (returncode, stdout, stderr)."""
    login = LoginProcess(env, args, stdin_text)
    status, location = ask_authorization(login.authorize_url(), test_ca)
    assert status == 302, "the stand-in rejected the authorization request"
    callback_status, page = open_callback(location)
    assert callback_status == 200, page
    return login.finish()


def assert_no_secrets(fake, home, *texts):
    audit_log = home.path / "audit.log"
    audit_text = audit_log.read_text() if audit_log.exists() else ""
    for secret in fake.secrets_issued():
        assert_no_secret(secret, audit_text, *texts)
        assert_no_secret_in_tree(home.path, secret)


class FakeClock:
    def __init__(self):
        self.now = 1_700_000_000.0
        self.sleeps = []

    def time(self):
        return self.now

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.now += seconds


def device_login(home, script, clock=None, **options):
    """Run the device flow in-process against the stand-in with a fake clock."""
    clock = clock or FakeClock()
    err = io.StringIO()
    provider = load_provider(home)
    try:
        record = authsome.oauth_login(str(home.path), provider, "default", flow="device_code",
                                      client_id=CLIENT_ID, secret_mode="stdin",
                                      stdin=io.StringIO(CLIENT_SECRET + "\n"), err=err,
                                      clock=clock.time, sleep=clock.sleep, **options)
    finally:
        device_login.err = err.getvalue()
    return record, clock


def device_provider(home, fake, **oauth):
    oauth.setdefault("device_authorization_url", fake.url("/device/code"))
    write_provider(home, provider_definition(fake, **oauth))


# ============================================================================================
# Bundled providers
# ============================================================================================

BUNDLED_OAUTH = sorted(provider.name for provider in authsome.load_catalog("/nonexistent-home")
                       if provider.auth_type == "oauth2")


@pytest.mark.parametrize("name", BUNDLED_OAUTH)
def test_bundled_oauth_provider_flows(name, monkeypatch):
    provider = authsome.load_catalog("/nonexistent-home").get(name)
    endpoints = authsome.resolve_oauth_endpoints(provider, provider.oauth.get("base_url"))
    monkeypatch.setattr(authsome, "has_graphical_session", lambda: True)
    with_display = authsome.choose_oauth_flow(provider, None, endpoints)
    monkeypatch.setattr(authsome, "has_graphical_session", lambda: False)
    headless = authsome.choose_oauth_flow(provider, None, endpoints)

    assert with_display == provider.flow
    if provider.flow == "pkce" and endpoints["device_authorization_url"]:
        assert headless == "device_code"
    else:
        assert headless == provider.flow
    for field in ("authorization_url", "token_url", "revocation_url", "device_authorization_url",
                  "registration_endpoint"):
        assert endpoints[field] is None or authsome.is_endpoint_url(endpoints[field]), field
    if provider.flow != "dcr_pkce":
        assert endpoints["token_url"]


# ============================================================================================
# Authorization code + PKCE through the CLI
# ============================================================================================

def test_pkce_login_stores_token(home, test_ca, provider):
    write_provider(home, provider_definition(provider))
    env = cli_env(home, test_ca, graphical=True)

    code, stdout, stderr = browser_login(env, test_ca, ["acme", "--client-id", CLIENT_ID, "--stdin"],
                                         CLIENT_SECRET + "\n")

    assert code == 0, stderr
    assert provider.problems == []
    assert provider.grants == ["authorization_code"]
    assert "Logged in to Acme (connection default)." in stdout
    shown = json.loads(run_cli(["get", "acme", "--json"], env).stdout)
    assert shown["status"] == "connected"
    assert shown["auth_type"] == "oauth2"
    assert shown["scopes"] == ["read", "write"]
    assert shown["access_token"] == shown["refresh_token"] == "***"
    assert shown["token_type"] == "bearer"
    assert abs(shown["expires_at"] - (time.time() + 3600)) < 60
    for field in ("provider", "connection", "created_at", "updated_at", "base_url"):
        assert field in shown
    access = run_cli(["get", "acme", "--field", "access_token", "--show-secret"], env).stdout.strip()
    assert access == provider.issued[0]
    client = vault_document(home)["clients"]["acme"]
    assert (client["client_id"], client["client_secret"]) == (CLIENT_ID, CLIENT_SECRET)
    assert_no_secrets(provider, home, stdout, stderr, shown and json.dumps(shown))


def test_pkce_login_reuses_stored_client(home, test_ca, provider):
    write_provider(home, provider_definition(provider))
    env = cli_env(home, test_ca, graphical=True)
    first = browser_login(env, test_ca, ["acme", "--client-id", CLIENT_ID, "--stdin"], CLIENT_SECRET)
    assert first[0] == 0, first[2]

    # No --client-id, no --stdin and no terminal: the stored client ID and secret are used.
    port = closed_port()
    code, stdout, stderr = browser_login(env, test_ca, ["acme", "--force", "--port", str(port)])

    assert code == 0, stderr
    assert "redirect_uri=http%%3A%%2F%%2F127.0.0.1%%3A%d%%2Fcallback" % port in stderr
    assert provider.problems == []
    assert provider.grants == ["authorization_code", "authorization_code"]
    assert_no_secrets(provider, home, stdout, stderr, first[1], first[2])


def test_pkce_false_basic_auth_extra_params(home, test_ca, provider):
    """The Notion / Reddit / X style: Basic client auth, no PKCE, extra authorize parameters."""
    provider.pkce = False
    provider.auth_method = "client_secret_basic"
    provider.extra_params = {"duration": "permanent"}
    provider.scope = "identity history"
    write_provider(home, provider_definition(provider, pkce=False, token_endpoint_auth_method="client_secret_basic",
                                             extra_authorize_params={"duration": "permanent"}))
    env = cli_env(home, test_ca, graphical=True)

    code, stdout, stderr = browser_login(env, test_ca, ["acme", "--client-id", CLIENT_ID, "--stdin",
                                                        "--scopes", "identity,history"], CLIENT_SECRET)

    assert code == 0, stderr
    assert provider.problems == []
    assert stored_record(home)["scopes"] == ["identity", "history"]
    assert_no_secrets(provider, home, stdout, stderr)


def test_callback_state_mismatch_rejected(home, test_ca, provider):
    write_provider(home, provider_definition(provider))
    env = cli_env(home, test_ca, graphical=True)
    login = LoginProcess(env, ["acme", "--client-id", CLIENT_ID, "--stdin"], CLIENT_SECRET)
    status, location = ask_authorization(login.authorize_url(), test_ca)
    forged = re.sub(r"state=[^&]+", "state=forged-state-value-0000", location)

    callback_status, page = open_callback(forged)
    code, stdout, stderr = login.finish()

    assert callback_status == 400
    assert code == 4
    assert "state that does not match" in stderr
    assert stderr.strip().splitlines()[-1].startswith("error: ")
    assert provider.grants == []  # the code was never exchanged
    assert run_cli(["get", "acme", "--field", "status"], env).stdout.strip() == "not_connected"


def test_provider_error_reported_one_line(home, test_ca, provider):
    provider.deny = ("access_denied", "The user\nsaid no")
    write_provider(home, provider_definition(provider))
    env = cli_env(home, test_ca, graphical=True)
    login = LoginProcess(env, ["acme", "--client-id", CLIENT_ID, "--stdin"], CLIENT_SECRET)
    status, location = ask_authorization(login.authorize_url(), test_ca)

    callback_status, page = open_callback(location)
    code, stdout, stderr = login.finish()

    assert callback_status == 400
    assert code == 4
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: the provider rejected the authorization: access_denied (The user said "
                      "no); nothing was stored"]
    assert vault_document(home)["credentials"] == {}


def test_token_endpoint_error_stores_nothing(home, test_ca, provider):
    provider.reply_override = (200, {"error": "invalid_grant", "error_description": "code expired"})
    write_provider(home, provider_definition(provider))
    env = cli_env(home, test_ca, graphical=True)

    code, stdout, stderr = browser_login(env, test_ca, ["acme", "--client-id", CLIENT_ID, "--stdin"],
                                         CLIENT_SECRET)

    assert code == 4
    assert "rejected the request: invalid_grant (code expired)" in stderr
    document = vault_document(home)
    assert document["credentials"] == {}
    assert document["clients"] == {}


def test_callback_port_busy(home, test_ca, provider):
    write_provider(home, provider_definition(provider))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]

        result = run_cli(["login", "acme", "--client-id", CLIENT_ID, "--stdin", "--port", port],
                         cli_env(home, test_ca), input=CLIENT_SECRET)

    assert result.returncode == 4
    assert "port %d on 127.0.0.1 is busy" % port in result.stderr


def test_login_without_client_id_and_terminal(home, test_ca, provider):
    write_provider(home, provider_definition(provider))

    result = run_cli(["login", "acme"], cli_env(home, test_ca))

    assert result.returncode == 4
    assert "--client-id" in result.stderr
    assert "Traceback" not in result.stderr


# ============================================================================================
# Device authorization grant
# ============================================================================================

def test_device_flow_pending_and_slow_down(in_process, provider):
    device_provider(in_process, provider)
    provider.device_script = ["authorization_pending", "slow_down", "authorization_pending", "ok"]
    provider.slow_down_interval = 2  # smaller than the current interval: must not shrink it

    record, clock = device_login(in_process, None)

    assert provider.problems == []
    assert clock.sleeps == [5, 5, 10, 10]  # +5 s after slow_down, never back to 2 s
    assert record["access_token"] == provider.issued[0]
    assert stored_record(in_process)["refresh_token"] == provider.issued[1]
    assert "WDJB-MJHT" in device_login.err
    assert provider.url("/device") in device_login.err
    assert_no_secrets(provider, in_process, device_login.err)


@pytest.mark.parametrize("error, message", [("expired_token", "device code expired"),
                                            ("access_denied", "denied")])
def test_device_flow_refusals(in_process, provider, error, message):
    device_provider(in_process, provider)
    provider.device_script = ["authorization_pending", error]

    with pytest.raises(authsome.LoginError, match=message) as raised:
        device_login(in_process, None)

    assert raised.value.code == 4
    assert vault_document(in_process)["credentials"] == {}


def test_device_flow_gives_up_at_expiry(in_process, provider):
    device_provider(in_process, provider)
    provider.device_lifetime = 20
    provider.device_script = []  # pending forever

    with pytest.raises(authsome.LoginError, match="device code expired"):
        device_login(in_process, None)

    assert provider.grants.count("urn:ietf:params:oauth:grant-type:device_code") == 3


def test_device_flow_json_bodies(in_process, provider):
    """The Postiz style: device_token_request json."""
    provider.json_bodies = True
    device_provider(in_process, provider, device_token_request="json")
    provider.device_script = ["ok"]

    record, clock = device_login(in_process, None)

    assert provider.problems == []
    assert record["status"] == "connected"


def test_device_flow_default_without_display(home, test_ca, provider):
    device_provider(home, provider)
    provider.device_interval = 1
    provider.device_script = ["authorization_pending", "ok"]

    result = run_cli(["login", "acme", "--client-id", CLIENT_ID, "--stdin"], cli_env(home, test_ca),
                     input=CLIENT_SECRET)

    assert result.returncode == 0, result.stderr
    assert provider.problems == []
    assert "enter the code WDJB-MJHT" in result.stderr
    assert_no_secrets(provider, home, result.stdout, result.stderr)


def read_until(master, marker, timeout=20.0):
    """Read a pseudo-terminal's output until `marker` appears (None: until it closes)."""
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (marker is None or marker not in data):
        ready, _, _ = select.select([master], [], [], 0.1)
        if not ready:
            continue
        try:
            chunk = os.read(master, 4096)
        except OSError as exc:
            if exc.errno != errno.EIO:  # EIO: every slave descriptor is closed
                raise
            chunk = b""
        if not chunk:
            break
        data += chunk
    if marker is not None and marker not in data:
        pytest.fail("terminal never showed %r; it showed %r" % (marker, data))
    return data


def test_client_id_and_secret_prompts(home, test_ca, provider):
    device_provider(home, provider)
    provider.device_interval = 1
    provider.device_script = ["ok"]
    master, slave = pty.openpty()

    def take_terminal():
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)  # so that /dev/tty is this pseudo-terminal

    try:
        process = subprocess.Popen([sys.executable, str(AUTHSOME), "login", "acme"],
                                   env=cli_env(home, test_ca), stdin=slave, stdout=slave,
                                   stderr=slave, start_new_session=True, preexec_fn=take_terminal)
    finally:
        os.close(slave)
    try:
        output = read_until(master, b"Acme OAuth client ID: ")
        os.write(master, CLIENT_ID.encode() + b"\r")
        output += read_until(master, b"public client): ")
        os.write(master, CLIENT_SECRET.encode() + b"\r")
        output += read_until(master, None)
        assert process.wait(20) == 0, output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)

    assert CLIENT_ID.encode() in output  # the client ID is echoed; it is not a secret
    assert provider.problems == []
    assert_no_secrets(provider, home, output)


# ============================================================================================
# Token response shapes
# ============================================================================================

@pytest.mark.parametrize("reply_format, expires_in, lifetime", [
    ("json", 3600, 3600), ("json", "3600", 3600), ("json", None, None), ("json", ABSENT, None),
    ("form", 7200, 7200), ("form", ABSENT, None),
])
def test_token_response_shapes(in_process, provider, reply_format, expires_in, lifetime):
    device_provider(in_process, provider)
    provider.device_script = ["ok"]
    provider.reply_format = reply_format
    provider.expires_in = expires_in
    started = time.time()

    device_login(in_process, None)

    record = stored_record(in_process)
    assert record["access_token"] == provider.issued[0]
    assert record["refresh_token"] == provider.issued[1]
    if lifetime is None:
        assert record["expires_at"] is None
    else:
        assert started + lifetime - 5 <= record["expires_at"] <= time.time() + lifetime + 5


@pytest.mark.parametrize("granted, scopes", [("read", ["read"]), ("read,write", ["read", "write"]),
                                             (ABSENT, ["read", "write"])])
def test_granted_scopes_recorded(in_process, provider, granted, scopes):
    device_provider(in_process, provider)
    provider.device_script = ["ok"]
    provider.granted_scope = granted  # without a scope in the reply, the requested ones hold

    device_login(in_process, None)

    assert stored_record(in_process)["scopes"] == scopes


def test_error_in_200_token_reply_stores_nothing(in_process, provider):
    device_provider(in_process, provider)
    provider.device_script = ["ok"]
    provider.reply_override = (200, {"error": "invalid_client", "error_description": "bad secret"})

    with pytest.raises(authsome.LoginError, match="invalid_client"):
        device_login(in_process, None)

    assert vault_document(in_process)["credentials"] == {}


# ============================================================================================
# Dynamic client registration
# ============================================================================================

@pytest.mark.parametrize("metadata", ["rfc8414", "openid", "explicit"])
def test_dcr_login(home, test_ca, provider, metadata):
    provider.auth_method = "none"
    provider.scope = ""
    endpoints = {"authorization_endpoint": provider.url("/authorize"),
                 "token_endpoint": provider.url("/token"),
                 "registration_endpoint": provider.url("/register"),
                 "revocation_endpoint": provider.url("/revoke"), "issuer": provider.url("/mcp")}
    if metadata == "rfc8414":
        provider.metadata["/.well-known/oauth-authorization-server/mcp"] = endpoints
    elif metadata == "openid":
        provider.metadata["/mcp/.well-known/openid-configuration"] = endpoints
    definition = provider_definition(provider, scopes=[], token_endpoint_auth_method="none",
                                     base_url=provider.url("/mcp"))
    definition["flow"] = "dcr_pkce"
    if metadata == "explicit":  # the notion-mcp style: every endpoint named, no discovery
        definition["registration"] = {"registration_endpoint": provider.url("/register")}
    else:
        for field in ("authorization_url", "token_url", "revocation_url"):
            del definition["oauth"][field]
    write_provider(home, definition)
    env = cli_env(home, test_ca, graphical=True)

    first = browser_login(env, test_ca, ["acme"])
    second = browser_login(env, test_ca, ["acme", "--force"])

    assert first[0] == 0, first[2]
    assert second[0] == 0, second[2]
    assert provider.problems == []
    assert len(provider.registrations) == 1  # the registered client is stored and reused
    client = vault_document(home)["clients"]["acme"]
    assert client["registered"] and client["client_id"] in provider.registered
    if metadata == "explicit":
        assert provider.well_known_requests == []
    elif metadata == "openid":
        assert provider.well_known_requests == ["/.well-known/oauth-authorization-server/mcp",
                                                "/mcp/.well-known/openid-configuration"]
    # The discovered revocation endpoint is used at logout.
    logout = run_cli(["logout", "acme"], env)
    assert logout.returncode == 0, logout.stderr
    assert [hint for hint, _ in provider.revocations] == ["refresh_token", "access_token"]


# ============================================================================================
# Refresh at use
# ============================================================================================

def run_fetch(env, fake, url="https://%s/data" % API_HOST):
    fetch = "import urllib.request, sys; print(urllib.request.urlopen(sys.argv[1], timeout=20).read().decode())"
    return subprocess.Popen(
        [sys.executable, str(AUTHSOME), "run", "--connect-to",
         "%s:443=127.0.0.1:%d" % (API_HOST, fake.origin.port), "--", sys.executable, "-c", fetch, url],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_five_runs_after_expiry_refresh_once(home, test_ca, provider):
    write_provider(home, provider_definition(provider))
    store_login(home, provider, expires_at=int(time.time()) - 1)
    provider.refresh_delay = 0.5
    env = cli_env(home, test_ca)

    runs = [run_fetch(env, provider) for _ in range(5)]
    results = [(run.wait(60), run.stdout.read(), run.stderr.read()) for run in runs]

    for code, stdout, stderr in results:
        assert code == 0, stderr
        assert stdout.strip() == "api ok"
    assert provider.grants == ["refresh_token"]
    assert provider.refresh_reuse == 0
    new_access, new_refresh = provider.issued[2], provider.issued[3]
    assert provider.api_tokens == [new_access] * 5
    record = stored_record(home)
    assert (record["access_token"], record["refresh_token"]) == (new_access, new_refresh)
    assert oct(os.stat(str(home.path / "locks")).st_mode & 0o777) == "0o700"
    assert oct(os.stat(str(home.path / "locks" / "acme.default.lock")).st_mode & 0o777) == "0o600"
    assert_no_secrets(provider, home, *[text for result in results for text in result[1:]])


def test_run_crosses_expiry_and_keeps_working(home, test_ca, provider, tmp_path):
    write_provider(home, provider_definition(provider))
    # 308 s left: no refresh for the first request; 5-minute margin reached 8 s later.
    expires_at = int(time.time()) + 308
    first_access, _ = store_login(home, provider, expires_at=expires_at)
    provider.refresh_expires_in = 3600
    script = tmp_path / "fetch_across.py"
    script.write_text(
        "import sys, time, urllib.request\n"
        "def fetch():\n"
        "    print(urllib.request.urlopen(sys.argv[1], timeout=20).read().decode().strip())\n"
        "fetch()\n"
        "time.sleep(max(0, float(sys.argv[2]) - 299 - time.time()))\n"
        "fetch()\n"
        "fetch()\n")
    command = [sys.executable, str(AUTHSOME), "run", "--connect-to",
               "%s:443=127.0.0.1:%d" % (API_HOST, provider.origin.port), "--",
               sys.executable, str(script), "https://%s/data" % API_HOST, str(expires_at)]

    result = subprocess.run(command, env=cli_env(home, test_ca), capture_output=True, text=True,
                            timeout=60, stdin=subprocess.DEVNULL)

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["api", "ok"] * 3
    assert provider.grants == ["refresh_token"]
    second_access = provider.issued[2]
    assert provider.api_tokens == [first_access, second_access, second_access]
    assert_no_secrets(provider, home, result.stdout, result.stderr)


class CountingVault:
    path = "/nonexistent/vault.bin"

    def __init__(self):
        self.loads = 0

    def load(self):
        self.loads += 1
        raise AssertionError("the refresher read the vault")


def test_proxy_refresher_is_cheap_for_fresh_tokens(tmp_path):
    refresher = authsome.token_refresher(str(tmp_path), CountingVault())
    provider = authsome.Provider({
        "name": "acme", "auth_type": "oauth2", "flow": "pkce", "api_url": API_HOST,
        "oauth": {"authorization_url": "https://127.0.0.1:1/a", "token_url": "https://127.0.0.1:1/t"}},
        "custom")
    record = {"provider": "acme", "connection": "default", "auth_type": "oauth2",
              "access_token": "at-fresh", "refresh_token": "rt-fresh",
              "expires_at": time.time() + 3600}

    for _ in range(1000):
        assert refresher(provider, record) is record

    assert not (tmp_path / "locks").exists()


def test_proxy_refresher_refreshes_once_then_uses_its_copy(in_process, provider):
    write_provider(in_process, provider_definition(provider))
    store_login(in_process, provider, expires_at=int(time.time()) + 30)
    loads = []

    class Counted(authsome.Vault):
        def load(self):
            loads.append(1)
            return super().load()

    vault = Counted(str(in_process.path))
    refresher = authsome.token_refresher(str(in_process.path), vault)
    acme = load_provider(in_process)
    old = stored_record(in_process)

    records = [refresher(acme, old) for _ in range(50)]

    assert provider.grants == ["refresh_token"]
    assert len(loads) == 1  # the re-read under the lock; later requests use the new record
    assert {record["access_token"] for record in records} == {provider.issued[2]}


def test_get_refreshes_near_expiry_and_rotates(home, test_ca, provider):
    write_provider(home, provider_definition(provider))
    old_access, old_refresh = store_login(home, provider, expires_at=int(time.time()) + 60)
    env = cli_env(home, test_ca)

    first = run_cli(["get", "acme", "--field", "access_token", "--show-secret"], env)
    second = run_cli(["get", "acme", "--field", "access_token", "--show-secret"], env)

    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == second.stdout.strip() == provider.issued[2]
    assert provider.grants == ["refresh_token"]
    assert stored_record(home)["refresh_token"] == provider.issued[3]
    assert old_refresh not in provider.refresh_tokens
    entries = [json.loads(line) for line in (home.path / "audit.log").read_text().splitlines()]
    assert [entry["outcome"] for entry in entries if entry["event"] == "refresh"] == ["refreshed"]


def test_export_refreshes_expired_token(home, test_ca, provider):
    write_provider(home, provider_definition(provider))
    store_login(home, provider, expires_at=int(time.time()) - 10)

    result = run_cli(["export", "acme", "--format", "json"], cli_env(home, test_ca))

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"ACME_ACCESS_TOKEN": provider.issued[2]}


def test_failed_refresh_keeps_valid_token(home, test_ca, provider):
    write_provider(home, provider_definition(provider))
    access, _ = store_login(home, provider, expires_at=int(time.time()) + 100,
                            access="at-still-valid-1234", refresh="rt-unknown-to-server-5678")

    result = run_cli(["export", "acme", "--format", "json"], cli_env(home, test_ca))

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"ACME_ACCESS_TOKEN": access}
    assert "warning: refreshing the acme token (connection default) failed" in result.stderr
    assert "keeping the current access token" in result.stderr
    assert stored_record(home)["access_token"] == access
    assert_no_secret("rt-unknown-to-server-5678", result.stderr, result.stdout)


def test_failed_refresh_after_expiry(home, test_ca, provider):
    write_provider(home, provider_definition(provider))
    store_login(home, provider, expires_at=int(time.time()) - 10, access="at-expired-1234",
                refresh="rt-unknown-to-server-5678")
    env = cli_env(home, test_ca)

    result = run_cli(["export", "acme"], env)
    status = run_cli(["get", "acme", "--field", "status"], env)

    assert result.returncode == 6
    assert result.stderr.strip().splitlines()[-1].endswith("run: authsome login acme")
    assert "invalid_grant" in result.stderr
    assert status.stdout.strip() == "invalid"  # the provider rejected the refresh token
    assert_no_secret("rt-unknown-to-server-5678", result.stderr, status.stderr)
    assert_no_secret("at-expired-1234", result.stderr, status.stderr)


def test_expired_without_refresh_token(home, test_ca, provider):
    write_provider(home, provider_definition(provider))
    store_login(home, provider, expires_at=int(time.time()) - 10, access="at-expired-1234", refresh=None)

    result = run_cli(["get", "acme"], cli_env(home, test_ca))

    assert result.returncode == 5
    assert "no refresh token; run: authsome login acme" in result.stderr
    assert provider.grants == []


def test_refresh_with_basic_auth_and_form_reply(in_process, provider):
    provider.auth_method = "client_secret_basic"
    provider.reply_format = "form"
    write_provider(in_process, provider_definition(provider, token_endpoint_auth_method="client_secret_basic"))
    store_login(in_process, provider, expires_at=int(time.time()) + 10)
    err = io.StringIO()

    record = authsome.refresh_at_use(str(in_process.path), authsome.Vault(str(in_process.path)),
                                     load_provider(in_process), stored_record(in_process), err)

    assert provider.problems == []
    assert record["access_token"] == provider.issued[2]
    assert err.getvalue() == ""


# ============================================================================================
# Logout and revocation
# ============================================================================================

def test_logout_revokes_tokens(home, test_ca, provider):
    write_provider(home, provider_definition(provider))
    access, refresh = store_login(home, provider, expires_at=int(time.time()) + 3600)

    result = run_cli(["logout", "acme"], cli_env(home, test_ca))

    assert result.returncode == 0, result.stderr
    assert provider.problems == []
    assert provider.revocations == [("refresh_token", refresh), ("access_token", access)]
    assert stored_record(home) is None
    assert_no_secrets(provider, home, result.stdout, result.stderr)


def closed_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("failure", ["unreachable", "503"])
def test_logout_removes_locally_when_revocation_fails(home, test_ca, provider, failure):
    revocation = provider.url("/revoke")
    if failure == "unreachable":
        revocation = "https://127.0.0.1:%d/revoke" % closed_port()
    provider.revoke_status = 503
    write_provider(home, provider_definition(provider, revocation_url=revocation))
    store_login(home, provider, expires_at=int(time.time()) + 3600)

    result = run_cli(["logout", "acme"], cli_env(home, test_ca))

    assert result.returncode == 0, result.stderr
    assert "warning:" in result.stderr
    assert "removed anyway" in result.stderr
    assert stored_record(home) is None
    assert_no_secrets(provider, home, result.stdout, result.stderr)


def test_revoke_removes_connections_and_client(home, test_ca, provider):
    write_provider(home, provider_definition(provider))
    store_login(home, provider, expires_at=int(time.time()) + 3600)

    result = run_cli(["revoke", "acme"], cli_env(home, test_ca))

    assert result.returncode == 0, result.stderr
    assert len(provider.revocations) == 2
    document = vault_document(home)
    assert "acme" not in document["credentials"]
    assert "acme" not in document["clients"]


def post_client_form(form_url, fields):
    """Play the browser at the OAuth client form: load it, then post `fields` with its token."""
    parts = urlsplit(form_url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    connection.request("GET", "%s?%s" % (parts.path, parts.query))
    page = connection.getresponse().read().decode()
    token = dict(item.split("=", 1) for item in parts.query.split("&"))["token"]
    body = urlencode(dict(fields, token=token))
    connection.request("POST", "/submit", body=body,
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    response = connection.getresponse()
    answer = response.read().decode()
    connection.close()
    return page, response.status, answer


def test_browser_form_collects_client(home, test_ca, provider):
    write_provider(home, provider_definition(provider))
    env = cli_env(home, test_ca, graphical=True)
    login = LoginProcess(env, ["acme"])
    form_url = login.wait_for_line(r"^\s+(http://127\.0\.0\.1:\d+/\?token=\S+)$").group(1)

    page, status, answer = post_client_form(form_url, {"client_id": "bad id",
                                                       "client_secret": CLIENT_SECRET})
    assert 'name="client_id"' in page
    assert 'type="password" id="client_secret"' in page
    assert status == 400
    assert "client ID is empty, too long, or contains spaces" in answer
    page, status, answer = post_client_form(form_url, {"client_id": CLIENT_ID,
                                                       "client_secret": CLIENT_SECRET})
    assert status == 200, answer
    location_status, location = ask_authorization(login.authorize_url(), test_ca)
    assert location_status == 302
    assert open_callback(location)[0] == 200
    code, stdout, stderr = login.finish()

    assert code == 0, stderr
    assert provider.problems == []
    client = vault_document(home)["clients"]["acme"]
    assert (client["client_id"], client["client_secret"]) == (CLIENT_ID, CLIENT_SECRET)
    assert_no_secrets(provider, home, stdout, stderr)
