"""Tests of ``authsome login`` for API-key providers.

Four ways in:

- the one-shot form on 127.0.0.1, driven over HTTP with ``http.client`` and in headless
  Chromium through selenium;
- ``--stdin``;
- the hidden ``getpass`` prompt, on a real pseudo-terminal made with ``pty``;
- no terminal at all, which must fail cleanly.

Every login runs ``authsome.py`` as a child process. ``DISPLAY=:0`` selects the form, and
``BROWSER=true`` turns the child's attempt to open a browser into a no-op. The test reads the
one-time URL from the child's stderr. Nothing here talks to any address but 127.0.0.1, and
Chromium runs with a host resolver rule that resolves no host name at all.
"""

import errno
import fcntl
import html
import http.client
import json
import os
import pty
import re
import select
import socket
import subprocess
import sys
import termios
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple
from urllib.parse import urlencode, urlsplit

import pytest

from conftest import AUTHSOME, IN_CI, assert_no_secret, assert_no_secret_in_tree, run_cli

URL_RE = re.compile(r"http://127\.0\.0\.1:(\d+)/\?token=([A-Za-z0-9_-]+)")

OPENAI_HINT = "OpenAI keys start with sk- followed by at least 20 letters, digits, - or _."
OPENAI_KEY = "sk-T3stKeyForAuthsomeLogin_0123456789"
OPENAI_BAD_KEY = "not-an-openai-key-4d9e"
G2_KEY = "g2-login-test-key-5b81c0e7"

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

# A user-defined provider for the browser tests. It has a key pattern and, unlike the bundled
# entries, no docs_url, so the page Chromium renders contains no link to any real host.
FORMTEST = {
    "name": "formtest",
    "display_name": "Form Test",
    "auth_type": "api_key",
    "api_url": "api.formtest.example",
    "api_key": {
        "header_name": "Authorization",
        "header_prefix": "Bearer",
        "key_pattern": "^ft-[a-z0-9]{16,}$",
        "key_pattern_hint": "Form Test keys start with ft- and 16 or more lowercase letters or digits.",
    },
}
FORMTEST_KEY = "ft-0123456789abcdefghij"


# ============================================================================================
# helpers
# ============================================================================================


def free_port() -> int:
    """Return a loopback port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_closed(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def status_of(home, provider: str, connection: Optional[str] = None) -> str:
    args = ["get", provider, "--field", "status"]
    if connection:
        args += ["--connection", connection]
    result = run_cli(args, home.env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def stored_key(home, provider: str, connection: Optional[str] = None) -> str:
    args = ["get", provider, "--show-secret", "--field", "api_key"]
    if connection:
        args += ["--connection", connection]
    result = run_cli(args, home.env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "get printed no key; stderr: %r" % result.stderr
    return result.stdout.strip()


def login_stdin(home, provider: str, key: str, *extra: str) -> subprocess.CompletedProcess:
    return run_cli(["login", provider, "--stdin", *extra], home.env, input=key + "\n")


def add_formtest_provider(home) -> None:
    folder = home.path / "providers"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    (folder / "formtest.json").write_text(json.dumps(FORMTEST))


class LoginProcess:
    """A child process running ``authsome.py login PROVIDER`` on the form path.

    Threads collect its stdout and stderr.
    """

    def __init__(self, home, provider: str, *extra: str, env: Optional[Dict[str, str]] = None):
        child_env = dict(home.env, DISPLAY=":0", BROWSER="true")
        child_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, str(AUTHSOME), "login", provider, *extra],
            env=child_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._stdout = bytearray()
        self._stderr = bytearray()
        self._readers = [
            threading.Thread(target=self._drain, args=(self.proc.stdout, self._stdout), daemon=True),
            threading.Thread(target=self._drain, args=(self.proc.stderr, self._stderr), daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        self.port = 0
        self.token = ""

    @staticmethod
    def _drain(stream, sink: bytearray) -> None:
        for chunk in iter(lambda: stream.read1(4096), b""):
            sink.extend(chunk)

    @property
    def stdout(self) -> str:
        return bytes(self._stdout).decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        return bytes(self._stderr).decode("utf-8", "replace")

    @property
    def url(self) -> str:
        return "http://127.0.0.1:%d/?token=%s" % (self.port, self.token)

    def wait_for_url(self, timeout: float = 20.0) -> "LoginProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = URL_RE.search(self.stderr)
            if match:
                self.port, self.token = int(match.group(1)), match.group(2)
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        pytest.fail("login printed no form URL (exit code %r)\nstdout: %s\nstderr: %s"
                    % (self.proc.poll(), self.stdout, self.stderr))

    def finish(self, timeout: float = 20.0) -> int:
        code = self.proc.wait(timeout)
        for reader in self._readers:
            reader.join(5)
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.finish()


@pytest.fixture
def login_form(home):
    """Return a factory that starts a login and waits for its URL.

    Call it as ``login_form(provider, *extra, env=None)``. Teardown kills what is still running.
    """
    started: List[LoginProcess] = []

    def start(provider: str, *extra: str, env: Optional[Dict[str, str]] = None) -> LoginProcess:
        process = LoginProcess(home, provider, *extra, env=env)
        started.append(process)
        return process.wait_for_url()

    yield start

    for process in started:
        process.stop()


def http_request(port: int, method: str, target: str, fields: Optional[Dict[str, str]] = None,
                 host: Optional[str] = None) -> Tuple[int, http.client.HTTPMessage, str]:
    """Send one request to the form server. A ``host`` replaces the default Host header."""
    body = urlencode(fields).encode() if fields is not None else None
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.putrequest(method, target, skip_host=host is not None, skip_accept_encoding=True)
        if host is not None:
            connection.putheader("Host", host)
        if body is not None:
            connection.putheader("Content-Type", "application/x-www-form-urlencoded")
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, response.headers, response.read().decode("utf-8")
    finally:
        connection.close()


def page_text(page: str) -> str:
    """Return the page's text with tags removed and entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", " ", page))


def assert_no_external_resource(page: str) -> None:
    """Check that only plain links name another site, and nothing the page loads or posts to does."""
    assert not re.search(r"<(script|link|img|iframe|object|embed|video|audio|source|base)\b", page, re.I)
    assert not re.search(r"\bsrcset\s*=|\bsrc\s*=|url\s*\(|@import", page, re.I)
    for action in re.findall(r"\baction\s*=\s*\"([^\"]*)\"", page, re.I):
        assert not urlsplit(action).netloc, action
    outside_links = re.sub(r"<a\s[^>]*>.*?</a>", "", page, flags=re.I | re.S)
    assert not re.search(r"(https?:)?//", outside_links), outside_links


# ============================================================================================
# the form over HTTP
# ============================================================================================


def test_form_needs_token(home, login_form):
    login = login_form("g2", "--port", str(free_port()))
    for target in ("/", "/?token=", "/?token=wrong" + login.token[5:]):
        status, _, page = http_request(login.port, "GET", target)
        assert status == 403, target
        assert login.token not in page
        assert 'type="password"' not in page
    assert login.proc.poll() is None
    status, _, _ = http_request(login.port, "GET", "/?token=" + login.token)
    assert status == 200


def test_form_page(home, login_form):
    login = login_form("g2", "--port", str(free_port()))
    status, headers, page = http_request(login.port, "GET", "/?token=" + login.token)
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    inputs = re.findall(r"<input\b[^>]*>", page)
    keys = [tag for tag in inputs if 'type="password"' in tag]
    assert len(keys) == 1, inputs
    assert re.search(r'autocomplete="(off|new-password)"', keys[0]), keys[0]
    assert 'value="' not in keys[0]
    csp = headers["Content-Security-Policy"]
    assert csp, headers
    directives = [part.strip() for part in csp.split(";")]
    assert "default-src 'none'" in directives, csp
    assert "http" not in csp
    assert_no_external_resource(page)
    assert headers["Cache-Control"] == "no-store"


def test_form_post_token(home, login_form):
    login = login_form("g2", "--port", str(free_port()))
    status, _, page = http_request(login.port, "POST", "/submit", {"key": G2_KEY})
    assert status == 403
    wrong_token = ("A" if login.token[0] != "A" else "B") + login.token[1:]
    status, _, _ = http_request(login.port, "POST", "/submit", {"token": wrong_token, "key": G2_KEY})
    assert status == 403
    assert G2_KEY not in page
    assert status_of(home, "g2") == "not_connected"
    assert login.proc.poll() is None
    status, _, _ = http_request(login.port, "GET", "/?token=" + login.token)
    assert status == 200


def test_form_bad_key(home, login_form):
    login = login_form("openai", "--port", str(free_port()))
    status, headers, page = http_request(
        login.port, "POST", "/submit", {"token": login.token, "key": OPENAI_BAD_KEY})
    assert status == 400
    assert OPENAI_HINT in page_text(page)
    assert OPENAI_BAD_KEY not in page
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert status_of(home, "openai") == "not_connected"

    # The server is still up and takes a good key after the bad one.
    assert login.proc.poll() is None
    status, _, page = http_request(login.port, "GET", "/?token=" + login.token)
    assert status == 200
    status, _, page = http_request(login.port, "POST", "/submit", {"token": login.token, "key": OPENAI_KEY})
    assert status == 200
    assert login.finish() == 0
    assert stored_key(home, "openai") == OPENAI_KEY
    assert_no_secret(OPENAI_BAD_KEY, login.stdout, login.stderr)


def test_form_good_key(home, login_form):
    login = login_form("openai", "--port", str(free_port()))
    status, _, page = http_request(login.port, "POST", "/submit", {"token": login.token, "key": OPENAI_KEY})
    assert status == 200
    assert "saved" in page_text(page).lower()
    assert OPENAI_KEY not in page
    assert login.finish() == 0, login.stderr
    assert status_of(home, "openai") == "connected"
    assert stored_key(home, "openai") == OPENAI_KEY
    assert port_closed(login.port)
    assert_no_secret(OPENAI_KEY, login.stdout, login.stderr)
    assert_no_secret_in_tree(home.path, OPENAI_KEY)
    assert "Logged in to OpenAI" in login.stdout


def test_form_host(home, login_form):
    login = login_form("g2", "--port", str(free_port()))
    for host in ("evil.example:%d" % login.port, "127.0.0.1.nip.example:%d" % login.port,
                 "127.0.0.1:%d" % (login.port + 1), "127.0.0.1", ""):
        status, _, page = http_request(login.port, "GET", "/?token=" + login.token, host=host)
        assert 400 <= status < 500, host
        assert login.token not in page, host
        fields = {"token": login.token, "key": G2_KEY}
        status, _, _ = http_request(login.port, "POST", "/submit", fields, host=host)
        assert 400 <= status < 500, host
    assert status_of(home, "g2") == "not_connected"
    assert login.proc.poll() is None

    status, _, _ = http_request(login.port, "GET", "/?token=" + login.token, host="localhost:%d" % login.port)
    assert status == 200
    status, _, _ = http_request(login.port, "POST", "/submit", {"token": login.token, "key": G2_KEY},
                                host="localhost:%d" % login.port)
    assert status == 200
    assert login.finish() == 0
    assert stored_key(home, "g2") == G2_KEY
    assert_no_secret(G2_KEY, login.stdout, login.stderr)


def test_form_vault_error(home, login_form):
    # The vault breaks while the form is open. The page shows the error, and the login exits
    # with the vault's exit code and a one-line error instead of a traceback and a silent wait.
    assert login_stdin(home, "openai", OPENAI_KEY).returncode == 0
    login = login_form("g2", "--port", str(free_port()))
    (home.path / "vault.bin").write_bytes(b"not a vault\n")
    status, _, page = http_request(login.port, "POST", "/submit", {"token": login.token, "key": G2_KEY})
    assert status == 500
    assert "damaged" in page_text(page)
    assert login.finish() == 7
    lines = login.stderr.splitlines()
    assert lines[-1].startswith("error: "), login.stderr
    assert "damaged" in lines[-1], login.stderr
    assert "Traceback" not in login.stderr
    assert_no_secret(G2_KEY, login.stdout, login.stderr, page)
    assert port_closed(login.port)


def test_form_busy_port(home, login_form):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        busy_port = busy.getsockname()[1]
        login = login_form("g2", "--port", str(busy_port))
        assert login.port != busy_port
        notice = [line for line in login.stderr.splitlines() if "busy" in line]
        assert notice, login.stderr
        assert str(busy_port) in notice[0]
        assert str(login.port) in notice[0]
        status, _, _ = http_request(login.port, "GET", "/?token=" + login.token)
        assert status == 200


def test_form_env_port(home, login_form):
    port = free_port()
    login = login_form("g2", env={"AUTHSOME_LOGIN_PORT": str(port)})
    assert login.port == port
    assert "busy" not in login.stderr


# ============================================================================================
# --stdin
# ============================================================================================


def test_stdin_good(home):
    result = login_stdin(home, "openai", OPENAI_KEY)
    assert result.returncode == 0, result.stderr
    assert status_of(home, "openai") == "connected"
    assert stored_key(home, "openai") == OPENAI_KEY
    assert_no_secret(OPENAI_KEY, result.stdout, result.stderr)


def test_stdin_bad_key(home):
    result = login_stdin(home, "openai", OPENAI_BAD_KEY)
    assert result.returncode == 4
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert OPENAI_HINT in lines[0]
    assert "Traceback" not in result.stderr
    assert_no_secret(OPENAI_BAD_KEY, result.stdout, result.stderr)
    assert status_of(home, "openai") == "not_connected"


def test_stdin_connected(home):
    assert login_stdin(home, "g2", G2_KEY).returncode == 0
    result = login_stdin(home, "g2", "g2-another-key-1234")
    assert result.returncode == 0, result.stderr
    assert "already connected" in result.stdout + result.stderr
    assert stored_key(home, "g2") == G2_KEY


def test_stdin_force(home):
    assert login_stdin(home, "g2", G2_KEY).returncode == 0
    result = login_stdin(home, "g2", "g2-rotated-key-9876", "--force")
    assert result.returncode == 0, result.stderr
    assert stored_key(home, "g2") == "g2-rotated-key-9876"


def test_stdin_connections(home):
    assert login_stdin(home, "g2", "g2-personal-key-1111", "--connection", "personal").returncode == 0
    assert login_stdin(home, "g2", "g2-team-key-2222", "--connection", "team").returncode == 0
    result = run_cli(["list", "--json"], home.env)
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    connections = {item["connection"]: item["status"] for item in rows["g2"]["connections"]}
    assert connections == {"personal": "connected", "team": "connected"}
    assert stored_key(home, "g2", "personal") == "g2-personal-key-1111"
    assert stored_key(home, "g2", "team") == "g2-team-key-2222"


# ============================================================================================
# terminal prompt
# ============================================================================================


def test_no_terminal(home):
    result = subprocess.run(
        [sys.executable, str(AUTHSOME), "login", "g2", "--no-browser"],
        env=home.env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        start_new_session=True,
    )
    assert result.returncode == 4
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "--stdin" in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert status_of(home, "g2") == "not_connected"


def read_terminal(master: int, until: Optional[bytes], timeout: float = 20.0) -> bytes:
    """Read the terminal's output until ``until`` appears, or to the end when ``until`` is None."""
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if until is not None and until in data:
            return data
        ready, _, _ = select.select([master], [], [], 0.1)
        if not ready:
            continue
        try:
            chunk = os.read(master, 4096)
        except OSError as exc:
            if exc.errno != errno.EIO:  # EIO means every slave descriptor is closed
                raise
            chunk = b""
        if not chunk:
            break
        data += chunk
    if until is not None:
        pytest.fail("terminal never showed %r; it showed %r" % (until, data))
    return data


def test_prompt_pty(home):
    master, slave = pty.openpty()

    def take_terminal():
        # Runs in the child after setsid(): the pseudo-terminal on fd 0 becomes the session's
        # controlling terminal, which is what /dev/tty (and so getpass) opens.
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    try:
        proc = subprocess.Popen(
            [sys.executable, str(AUTHSOME), "login", "g2", "--no-browser"],
            env=home.env,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            preexec_fn=take_terminal,
        )
    finally:
        os.close(slave)
    try:
        terminal_output = read_terminal(master, b"(input hidden): ")
        os.write(master, G2_KEY.encode() + b"\r")
        terminal_output += read_terminal(master, None)
        assert proc.wait(20) == 0, terminal_output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    assert_no_secret(G2_KEY, terminal_output)
    assert b"Logged in to G2" in terminal_output
    assert stored_key(home, "g2") == G2_KEY


# ============================================================================================
# the form in headless Chromium
# ============================================================================================


@pytest.fixture(scope="module")
def chrome(tmp_path_factory):
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium")
    if missing:
        message = "missing for the browser tests: %s" % ", ".join(missing)
        if IN_CI:
            pytest.fail(message + "; CI requires them")
        pytest.skip(message)

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        "--user-data-dir=%s" % tmp_path_factory.mktemp("chromium-profile"),
        # Make every host name lookup fail with "not found" instead of resolving it. The rule does not
        # cover IP literals, which assert_local_only checks in the request log.
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def network_urls(driver) -> List[Tuple[str, str]]:
    """Return ``(url, documentURL)`` of every request logged since the last call."""
    found = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            params = message["params"]
            found.append((params["request"]["url"], params.get("documentURL", "")))
    return found


def assert_local_only(requests: Sequence[Tuple[str, str]], port: int) -> None:
    """Check that the form's pages requested only the form server, and no request left 127.0.0.1."""
    origin = "http://127.0.0.1:%d/" % port
    own = [url for url, document in requests if document.startswith(origin)]
    assert own, requests
    for url in own:
        assert url.startswith(origin) or url.startswith("data:"), url
    for url, _ in requests:
        parts = urlsplit(url)
        if parts.scheme in ("http", "https", "ws", "wss", "ftp"):
            assert parts.hostname == "127.0.0.1", url


def wait_until(driver, script: str, timeout: float = 15.0):
    """Wait until ``script`` returns a true value.

    Errors raised while a page is being replaced (stale or detached nodes, a closed script
    context) count as "not yet".
    """
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1, ignored_exceptions=(WebDriverException,)).until(
        lambda d: d.execute_script(script), "timed out waiting for: " + script)


def page_has(driver, text: str, timeout: float = 15.0) -> None:
    wait_until(driver, "return document.readyState === 'complete' && document.body !== null"
                       " && document.body.innerText.includes(%s)" % json.dumps(text), timeout)


def submit(driver) -> None:
    """Click the form's button and wait until the next page has loaded."""
    from selenium.webdriver.common.by import By

    driver.execute_script("window.authsomeOldPage = true")
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    wait_until(driver, "return window.authsomeOldPage !== true && document.readyState === 'complete'")


def fill_form(driver, url: str, key: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(url)
    field = driver.find_element(By.CSS_SELECTOR, "input[name=key]")
    assert field.get_attribute("type") == "password"
    assert field.get_attribute("autocomplete") in ("off", "new-password")
    field.send_keys(key)
    submit(driver)


def test_browser_login(home, login_form, chrome):
    add_formtest_provider(home)
    login = login_form("formtest", "--port", str(free_port()))
    network_urls(chrome)
    fill_form(chrome, login.url, FORMTEST_KEY)
    page_has(chrome, "saved")
    assert login.finish() == 0, login.stderr
    assert stored_key(home, "formtest") == FORMTEST_KEY
    assert FORMTEST_KEY not in chrome.page_source
    assert_no_secret(FORMTEST_KEY, login.stdout, login.stderr)
    assert_local_only(network_urls(chrome), login.port)


def test_browser_bad_key(home, login_form, chrome):
    add_formtest_provider(home)
    login = login_form("formtest", "--port", str(free_port()))
    network_urls(chrome)
    fill_form(chrome, login.url, "ft-SHORT")
    page_has(chrome, FORMTEST["api_key"]["key_pattern_hint"])
    assert status_of(home, "formtest") == "not_connected"
    assert login.proc.poll() is None
    assert_local_only(network_urls(chrome), login.port)

    # The page with the error still works: a good key typed there is accepted.
    from selenium.webdriver.common.by import By
    field = chrome.find_element(By.CSS_SELECTOR, "input[name=key]")
    assert field.get_attribute("type") == "password"
    assert field.get_attribute("value") == ""
    field.send_keys(FORMTEST_KEY)
    submit(chrome)
    page_has(chrome, "saved")
    assert login.finish() == 0, login.stderr
    assert stored_key(home, "formtest") == FORMTEST_KEY


def test_browser_no_token(home, login_form, chrome):
    from selenium.webdriver.common.by import By

    add_formtest_provider(home)
    login = login_form("formtest", "--port", str(free_port()))
    network_urls(chrome)
    chrome.get("http://127.0.0.1:%d/" % login.port)
    page_has(chrome, "one-time link")
    assert not chrome.find_elements(By.CSS_SELECTOR, "input[type=password]")
    assert login.token not in chrome.page_source
    assert login.proc.poll() is None
    assert_local_only(network_urls(chrome), login.port)
