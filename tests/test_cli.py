"""Tests of the command line.

They cover every command in human and --json output, the exit codes of the error paths, export
quoting, the audit log and `doctor --clients`. The last test walks through the G2 page of the user
documentation, running its commands exactly as written there.
"""

import json
import os
import pty
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import authsome
from conftest import AUTHSOME, assert_no_secret, assert_no_secret_in_tree, run_cli

G2_KEY = "g2-cli-test-key-5d8e2a"
G2_TEAM_KEY = "g2-team-key-0b7c41"
G2_PERSONAL_KEY = "g2-personal-key-93fa6d"
G2_ROTATED_KEY = "g2-rotated-key-61c2e8"
# A key with every character a shell treats specially inside and outside quotes.
AWKWARD_KEY = "a'b $HOME \"c\" `id` \\e;f|g&h*"
GITHUB_ACCESS = "gho_access0123456789abcdef"
GITHUB_REFRESH = "ghr_refresh0123456789abcdef"
PASSPHRASE = "correct horse battery staple"

COMMANDS = ["login", "get", "logout", "revoke", "remove", "list", "inspect", "register",
            "set-default", "export", "whoami", "log", "init", "passphrase", "doctor", "run"]


# ============================================================================================
# helpers
# ============================================================================================


def cli(home, *args, input=None, env=None):
    return run_cli(list(args), env or home.env, input=input)


def cli_json(home, *args, input=None, env=None, code=0):
    """Run a command with --json; check the exit code and return the parsed stdout."""
    result = cli(home, *args, "--json", input=input, env=env)
    assert result.returncode == code, result.stderr
    return json.loads(result.stdout)


def detached(home, *args, env=None):
    """Run a command in a new session, so it has no terminal to prompt on."""
    return subprocess.run([sys.executable, str(AUTHSOME), *args], env=env or home.env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
                          start_new_session=True)


def login(home, key=G2_KEY, provider="g2", connection=None, extra=()):
    args = ["login", provider, "--stdin"] + (["--connection", connection] if connection else [])
    result = cli(home, *args, *extra, input=key + "\n")
    assert result.returncode == 0, result.stderr
    return result


def assert_error(result, code, *fragments):
    """Check that the command failed with `code` and one `error: ...` line on stderr that
    contains each of `fragments`."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in result.stderr


def connections_of(home, provider="g2"):
    rows = {row["name"]: row for row in cli_json(home, "list")}
    return {item["connection"]: item for item in rows[provider]["connections"]}


def table(stdout):
    """Split `list` output into rows of cells (the header included)."""
    return [line.split() for line in stdout.splitlines() if line and not line.startswith("*")]


def write_provider(home, name, data):
    folder = home.path / "providers"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ("%s.json" % name)
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def quote_provider():
    """A user provider without key_pattern and without an export block (env_var only)."""
    return {"name": "quotetest", "display_name": "Quote Test", "auth_type": "api_key",
            "api_url": "api.quote.test",
            "api_key": {"header_name": "X-Api-Key", "header_prefix": None,
                        "env_var": "QUOTE_TEST_KEY"}}


def put_oauth_record(home, monkeypatch, provider="github", expires_in=3600.0):
    """Store an OAuth-style record (access and refresh token) straight into the vault.

    An expired record gets no refresh token, so that no command tries to refresh it at the
    real provider."""
    monkeypatch.delenv("AUTHSOME_MASTER_KEY", raising=False)
    stamp = authsome.iso_time()
    record = {"provider": provider, "connection": "default", "auth_type": "oauth2",
              "access_token": GITHUB_ACCESS, "token_type": "Bearer",
              "expires_at": time.time() + expires_in,
              "status": "connected", "created_at": stamp, "updated_at": stamp}
    if expires_in > 0:
        record["refresh_token"] = GITHUB_REFRESH
    authsome.Vault(str(home.path)).update(lambda document: authsome.put_record(document, record))
    return record


def sh(home, script, env=None, cwd=None, input=None):
    """Run `script` with sh, where `authsome` is a shell function calling this authsome.py."""
    prelude = 'authsome() { "%s" "%s" "$@"; }\n' % (sys.executable, AUTHSOME)
    return subprocess.run(["sh", "-c", prelude + script], env=env or home.env, cwd=cwd,
                          input=input, stdin=None if input is not None else subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60)


def run_on_terminal(args, env):
    """Run a command with stdout on a pseudo-terminal; return what it printed there."""
    master, slave = pty.openpty()
    process = subprocess.Popen([sys.executable, str(AUTHSOME), *args], env=env,
                               stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO once the child closed its side
            break
        if not data:
            break
        chunks.append(data)
    process.wait(timeout=30)
    os.close(master)
    return b"".join(chunks).decode()


# ============================================================================================
# help, global options, usage errors
# ============================================================================================


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_example(home, command):
    result = cli(home, command, "--help")
    assert result.returncode == 0, result.stderr
    examples = [line for line in result.stdout.splitlines() if line.startswith("example: ")]
    assert len(examples) == 1, result.stdout
    assert "authsome %s " % command in examples[0] + " "


def test_top_level_help_and_version(home):
    result = cli(home, "--help")
    assert result.returncode == 0
    assert "example: authsome" in result.stdout
    for command in COMMANDS:
        assert command in result.stdout
    for args in (["--version"], ["list", "--version"]):
        result = cli(home, *args)
        assert result.returncode == 0
        assert result.stdout.strip() == "authsome %s" % authsome.__version__


def test_global_options_before_and_after_command(home):
    login(home)
    before = cli(home, "--json", "list")
    after = cli(home, "list", "--json")
    assert before.returncode == after.returncode == 0
    assert json.loads(before.stdout) == json.loads(after.stdout)

    for args in (["--no-color", "list"], ["list", "--no-color"], ["--verbose", "list"],
                 ["list", "--verbose"], ["--json", "--no-color", "get", "g2"],
                 ["get", "g2", "--json", "--verbose", "--no-color"]):
        result = cli(home, *args)
        assert result.returncode == 0, (args, result.stderr)
    no_color_env = dict(home.env, NO_COLOR="1")
    assert cli(home, "list", env=no_color_env).returncode == 0


def test_color_terminal_only(home):
    login(home)
    env = dict(home.env, TERM="xterm")
    env.pop("NO_COLOR", None)
    assert "\x1b[" in run_on_terminal(["list"], env)
    assert "\x1b[" not in run_on_terminal(["list", "--no-color"], env)
    assert "\x1b[" not in run_on_terminal(["--no-color", "doctor"], env)
    assert "\x1b[" not in run_on_terminal(["list"], dict(env, NO_COLOR="1"))
    assert "\x1b[" not in cli(home, "list").stdout  # not a terminal


@pytest.mark.parametrize("args", [
    ["get"],                                   # missing provider
    ["bogus-command"],                         # unknown command
    ["get", "g2", "--bogus-option"],           # unknown option
    ["export", "g2", "--format", "yaml"],      # bad choice
    ["log", "-n", "many"],                     # not a number
    ["log", "-n", "-1"],                       # out of range
    ["set-default", "g2"],                     # missing connection
])
def test_usage_errors(home, args):
    result = cli(home, *args)
    assert_error(result, 2)
    assert "usage:" not in result.stderr

    result = cli(home, *args, "--json")
    assert result.returncode == 2
    document = json.loads(result.stdout)
    assert document["exit_code"] == 2
    assert document["error"]


def test_unexpected_error_is_one_line(home, monkeypatch, capsys):
    monkeypatch.setenv("AUTHSOME_HOME", str(home.path))

    def broken(ctx):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(authsome, "list_providers", broken)
    assert authsome.main(["list"]) == 1
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: unexpected RuntimeError: simulated bug")
    assert "--verbose" in lines[0]

    assert authsome.main(["list", "--verbose"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_no_command_prints_help(home):
    result = cli(home)
    assert result.returncode == 2
    assert "example:" in result.stderr


# ============================================================================================
# login, get, logout, revoke, remove
# ============================================================================================


def test_login_stdin_human_and_json(home):
    result = login(home)
    assert "Logged in to G2" in result.stdout
    assert_no_secret(G2_KEY, result.stdout, result.stderr)

    document = cli_json(home, "login", "g2", "--stdin", "--connection", "team",
                        input=G2_TEAM_KEY + "\n")
    assert document["provider"] == "g2"
    assert document["connection"] == "team"
    assert document["status"] == "connected"
    assert document["changed"] is True

    again = cli_json(home, "login", "g2", "--stdin", input="g2-unused-key-000000\n")
    assert again["changed"] is False
    assert "already connected" in again["message"]
    stored_key = cli(home, "get", "g2", "--field", "api_key", "--show-secret")
    assert stored_key.stdout == G2_KEY + "\n"

    rotated = cli_json(home, "login", "g2", "--stdin", "--force", input=G2_ROTATED_KEY + "\n")
    assert rotated["changed"] is True
    stored_key = cli(home, "get", "g2", "--field", "api_key", "--show-secret")
    assert stored_key.stdout == G2_ROTATED_KEY + "\n"


def test_login_errors(home):
    assert_error(cli(home, "login", "g3", "--stdin", input="x"), 3, "g3", "did you mean g2?")
    assert_error(cli(home, "login", "openai", "--stdin", input="not-an-openai-key\n"), 4,
                 "sk-")
    assert_error(cli(home, "login", "g2", "--stdin", "--connection", "bad name", input="k"), 2,
                 "connection")


def test_get_human_and_json(home):
    login(home)
    result = cli(home, "get", "g2")
    assert result.returncode == 0, result.stderr
    fields = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert fields["api_key"] == "***"
    assert fields["status"] == "connected"
    assert fields["connection"] == "default"
    assert_no_secret(G2_KEY, result.stdout, result.stderr)

    document = cli_json(home, "get", "g2")
    assert document["api_key"] == "***"
    assert document["provider"] == "g2"
    assert cli_json(home, "get", "g2", "--show-secret")["api_key"] == G2_KEY
    assert cli_json(home, "get", "g2", "--field", "status") == "connected"

    status = cli(home, "get", "g2", "--field", "status")
    assert status.stdout == "connected\n"
    assert status.stderr == ""
    assert_error(cli(home, "get", "g2", "--field", "colour"), 2, "colour")


def test_get_errors(home):
    login(home)
    unknown = cli(home, "get", "g3")
    assert_error(unknown, 3, "unknown provider 'g3'", "did you mean g2?")
    document = json.loads(cli(home, "get", "g3", "--json").stdout)
    assert document["exit_code"] == 3
    assert "did you mean g2?" in document["error"]

    assert_error(cli(home, "get", "g2", "--connection", "nope"), 3, "nope")
    assert_error(cli(home, "get", "openai"), 5, "not connected", "authsome login openai")
    assert cli(home, "get", "openai", "--field", "status").stdout == "not_connected\n"


def test_logout_human_and_json(home):
    login(home)
    login(home, G2_TEAM_KEY, connection="team")
    result = cli(home, "logout", "g2", "--connection", "team")
    assert result.returncode == 0, result.stderr
    assert "Removed g2 (connection team)" in result.stdout
    assert set(connections_of(home)) == {"default"}

    document = cli_json(home, "logout", "g2")
    assert document == {"provider": "g2", "connection": "default", "removed": True}
    assert_error(cli(home, "get", "g2"), 5, "not connected")
    assert_error(cli(home, "logout", "g2"), 5, "not connected")
    assert_error(cli(home, "logout", "nosuchprovider"), 3, "unknown provider")


def test_revoke_human_and_json(home):
    login(home)
    login(home, G2_TEAM_KEY, connection="team")
    result = cli(home, "revoke", "g2")
    assert result.returncode == 0, result.stderr
    assert "default, team" in result.stdout
    assert connections_of(home) == {}

    login(home)
    document = cli_json(home, "revoke", "g2")
    assert document["removed_connections"] == ["default"]
    assert cli_json(home, "revoke", "g2")["removed_connections"] == []
    assert_error(cli(home, "revoke", "g3"), 3, "did you mean g2?")


def test_remove_human_and_json(home):
    login(home)
    definition = cli_json(home, "inspect", "g2")
    path = write_provider(home, "g2", dict(definition, display_name="G2 custom"))
    result = cli(home, "remove", "g2")
    assert result.returncode == 0, result.stderr
    assert "Deleted %s" % path in result.stdout
    assert not path.exists()
    assert connections_of(home) == {}

    login(home)
    document = cli_json(home, "remove", "g2")
    assert document["removed_connections"] == ["default"]
    assert document["removed_definition"] is None


def test_remove_deletes_broken_user_definition(home):
    path = write_provider(home, "brokenone", {"name": "brokenone", "auth_type": "api_key"})
    document = cli_json(home, "remove", "brokenone")
    assert document["removed_definition"] == str(path)
    assert not path.exists()


# ============================================================================================
# list, inspect, register, set-default
# ============================================================================================


def test_list_human_columns(home, monkeypatch):
    login(home)
    login(home, G2_TEAM_KEY, connection="team")
    record = put_oauth_record(home, monkeypatch)
    result = cli(home, "list")
    assert result.returncode == 0, result.stderr
    rows = table(result.stdout)
    assert rows[0] == ["PROVIDER", "SOURCE", "TYPE", "CONNECTION", "STATUS", "EXPIRES"]
    by_key = {(row[0], row[3].rstrip("*")): row for row in rows[1:]}
    assert by_key[("g2", "default")] == ["g2", "bundled", "api_key", "default*", "connected",
                                         "never"]
    assert by_key[("g2", "team")] == ["g2", "bundled", "api_key", "team", "connected", "never"]
    assert by_key[("github", "default")][4:] == ["connected",
                                                 authsome.iso_time(record["expires_at"])]
    assert by_key[("openai", "-")] == ["openai", "bundled", "api_key", "-", "not_connected", "-"]
    assert "* default connection" in result.stdout
    assert_no_secret(G2_KEY, result.stdout)
    assert_no_secret(GITHUB_ACCESS, result.stdout)


def test_list_json(home, monkeypatch):
    login(home)
    put_oauth_record(home, monkeypatch, provider="linear", expires_in=-60)
    rows = {row["name"]: row for row in cli_json(home, "list")}
    assert rows["g2"]["source"] == "bundled"
    assert rows["g2"]["auth_type"] == "api_key"
    assert rows["g2"]["connections"] == [{"connection": "default", "status": "connected",
                                          "default": True, "expires_at": None}]
    assert rows["linear"]["connections"][0]["status"] == "expired"
    assert rows["openai"]["connections"] == []
    assert len(rows) >= 80


def test_bad_provider_file_is_reported_and_skipped(home):
    login(home)
    write_provider(home, "quotetest", quote_provider())
    bad = write_provider(home, "broken", {"name": "broken", "auth_type": "api_key",
                                          "api_url": "ftp://files.example.test"})
    not_json = write_provider(home, "notjson", "{ this is not json")
    result = cli(home, "list")
    assert result.returncode == 0
    warnings = result.stderr.splitlines()
    assert len(warnings) == 2, result.stderr
    broken_line = next(line for line in warnings if str(bad) in line)
    assert broken_line.startswith("warning: skipped invalid provider file %s" % bad)
    assert "field api_url" in broken_line
    assert "https://" in broken_line
    assert any(str(not_json) in line and "not valid JSON" in line for line in warnings)
    names = [row[0] for row in table(result.stdout)[1:]]
    assert "g2" in names
    assert "quotetest" in names
    assert "broken" not in names

    rows = {row["name"]: row for row in cli_json(home, "list")}
    assert rows["quotetest"]["source"] == "custom"
    assert rows["g2"]["connections"][0]["status"] == "connected"
    assert cli(home, "get", "g2", "--field", "status").stdout == "connected\n"


def test_inspect_human_and_json(home):
    result = cli(home, "inspect", "g2")
    assert result.returncode == 0, result.stderr
    definition = json.loads(result.stdout)
    assert definition["name"] == "g2"
    assert definition["api_key"]["header_prefix"] == "Token"
    assert definition["export"] == {"G2_API_TOKEN": "API_KEY"}
    assert authsome.validate_provider(definition, "inspect output") == definition
    assert cli_json(home, "inspect", "g2") == definition
    assert_error(cli(home, "inspect", "g3"), 3, "did you mean g2?")


def test_register_human_and_json(home, tmp_path):
    source = tmp_path / "quotetest.json"
    source.write_text(json.dumps(quote_provider()))
    result = cli(home, "register", source)
    assert result.returncode == 0, result.stderr
    installed = home.path / "providers" / "quotetest.json"
    assert "Registered quotetest at %s" % installed in result.stdout
    assert json.loads(installed.read_text()) == quote_provider()
    rows = {row["name"]: row for row in cli_json(home, "list")}
    assert rows["quotetest"]["source"] == "custom"

    assert_error(cli(home, "register", source), 2, "--force")
    document = cli_json(home, "register", source, "--force")
    assert document == {"provider": "quotetest", "path": str(installed)}

    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"name": "Bad Name", "auth_type": "api_key"}))
    assert_error(cli(home, "register", broken), 2, str(broken), "field name", "must match")
    assert_error(cli(home, "register", tmp_path / "missing.json"), 2, "missing.json")


def test_set_default_human_and_json(home):
    login(home, G2_PERSONAL_KEY, connection="personal")
    login(home, G2_TEAM_KEY, connection="team")
    assert connections_of(home)["personal"]["default"] is True  # the first one made
    result = cli(home, "set-default", "g2", "team")
    assert result.returncode == 0, result.stderr
    assert "Default connection of g2 is now team" in result.stdout
    assert connections_of(home)["team"]["default"] is True
    assert cli(home, "get", "g2", "--field", "connection").stdout == "team\n"

    assert cli_json(home, "set-default", "g2", "personal") == {"provider": "g2",
                                                               "default": "personal"}
    assert_error(cli(home, "set-default", "g2", "nope"), 3, "nope")
    assert_error(cli(home, "set-default", "g3", "team"), 3, "did you mean g2?")


# ============================================================================================
# export
# ============================================================================================


def test_export_formats(home):
    login(home)
    env_format = cli(home, "export", "g2", "--format", "env")
    assert env_format.returncode == 0
    assert env_format.stdout == "G2_API_TOKEN=%s\n" % G2_KEY
    assert env_format.stderr.startswith("warning: ")
    assert "authsome run" in env_format.stderr

    default_format = cli(home, "export", "g2")
    assert default_format.stdout == env_format.stdout

    shell_format = cli(home, "export", "g2", "--format", "shell")
    assert shell_format.stdout == "export G2_API_TOKEN=%s\n" % G2_KEY

    json_format = cli(home, "export", "g2", "--format", "json")
    assert json.loads(json_format.stdout) == {"G2_API_TOKEN": G2_KEY}
    assert "warning: " in json_format.stderr

    global_json = cli(home, "export", "g2", "--json")
    assert json.loads(global_json.stdout) == {"G2_API_TOKEN": G2_KEY}
    assert "warning: " in global_json.stderr


def test_export_eval_in_shell(home):
    login(home)
    result = sh(home, 'eval "$(authsome export g2 --format env)"\necho $G2_API_TOKEN\n')
    assert result.returncode == 0, result.stderr
    assert result.stdout == G2_KEY + "\n"
    assert "warning: " in result.stderr


def test_export_quotes_awkward_values(home, tmp_path):
    source = tmp_path / "quotetest.json"
    source.write_text(json.dumps(quote_provider()))
    assert cli(home, "register", source).returncode == 0
    login(home, AWKWARD_KEY, provider="quotetest")
    assert cli(home, "get", "quotetest", "--field", "api_key", "--show-secret").stdout \
        == AWKWARD_KEY + "\n"

    env_format = sh(home, 'eval "$(authsome export quotetest --format env)"\n'
                          'printf "%s" "$QUOTE_TEST_KEY"\n')
    assert env_format.returncode == 0, env_format.stderr
    assert env_format.stdout == AWKWARD_KEY

    # The shell format exports, so a child process of the shell inherits the value too.
    shell_format = sh(home, 'eval "$(authsome export quotetest --format shell)"\n'
                            'sh -c \'printf "%s" "$QUOTE_TEST_KEY"\'\n')
    assert shell_format.returncode == 0, shell_format.stderr
    assert shell_format.stdout == AWKWARD_KEY


def test_export_never_exports_refresh_token(home, monkeypatch):
    login(home)
    put_oauth_record(home, monkeypatch)
    github_only = cli(home, "export", "github", "--format", "shell")
    assert github_only.returncode == 0, github_only.stderr
    assert "GITHUB_ACCESS_TOKEN=%s" % GITHUB_ACCESS in github_only.stdout
    assert "GH_TOKEN=%s" % GITHUB_ACCESS in github_only.stdout
    everything = cli(home, "export", "--format", "json")
    variables = json.loads(everything.stdout)
    assert variables == {"G2_API_TOKEN": G2_KEY, "GITHUB_ACCESS_TOKEN": GITHUB_ACCESS,
                         "GH_TOKEN": GITHUB_ACCESS}
    for result in (github_only, everything, cli(home, "export", "github", "--json"),
                   cli(home, "get", "github", "--json")):
        assert_no_secret(GITHUB_REFRESH, result.stdout, result.stderr)
    assert cli_json(home, "get", "github")["refresh_token"] == "***"


def test_export_errors(home, monkeypatch):
    assert_error(cli(home, "export", "g3"), 3, "did you mean g2?")
    assert_error(cli(home, "export", "g2"), 5, "not connected", "authsome login g2")
    put_oauth_record(home, monkeypatch, provider="linear", expires_in=-60)
    assert_error(cli(home, "export", "linear"), 5, "expired")
    assert_error(cli(home, "export", "--connection", "team"), 2, "needs a provider")
    login(home)
    assert_error(cli(home, "export", "g2", "--connection", "nope"), 3, "nope")
    nothing = cli(home, "export", "openai", "--json")
    assert nothing.returncode == 5
    assert json.loads(nothing.stdout)["exit_code"] == 5


# ============================================================================================
# whoami, log, audit
# ============================================================================================


def test_whoami_human_and_json(home):
    login(home)
    result = cli(home, "whoami")
    assert result.returncode == 0, result.stderr
    fields = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert fields["home"] == str(home.path)
    assert fields["key_protection"] == "key_file"
    assert fields["connections"] == "1"
    document = cli_json(home, "whoami")
    assert document["vault"] == str(home.path / "vault.bin")
    assert document["version"] == authsome.__version__


def test_log_human_and_json(home):
    login(home)
    login(home, G2_TEAM_KEY, connection="team")
    assert cli(home, "logout", "g2", "--connection", "team").returncode == 0
    entries = cli_json(home, "log")
    assert [entry["event"] for entry in entries] == ["login", "login", "logout"]
    assert entries[0]["provider"] == "g2"
    assert entries[0]["connection"] == "default"
    assert [entry["event"] for entry in cli_json(home, "log", "-n", "1")] == ["logout"]

    result = cli(home, "log", "-n", "2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert "login" in lines[0]
    assert "g2/team" in lines[0]
    assert "logout" in lines[1]
    assert "g2/team" in lines[1]
    assert cli_json(home, "log", "-n", "0") == entries


def test_audit_log_never_holds_the_secret(home, tmp_path):
    source = tmp_path / "quotetest.json"
    source.write_text(json.dumps(quote_provider()))
    login(home)
    login(home, G2_TEAM_KEY, connection="team")
    login(home, G2_ROTATED_KEY, extra=["--force"])
    for args in (["set-default", "g2", "team"], ["export", "g2"], ["get", "g2", "--show-secret"],
                 ["logout", "g2", "--connection", "team"], ["register", source],
                 ["revoke", "g2"]):
        assert cli(home, *args).returncode == 0, args
    login(home)
    assert cli(home, "remove", "g2").returncode == 0

    audit_text = (home.path / "audit.log").read_text()
    events = [json.loads(line)["event"] for line in audit_text.splitlines()]
    for event in ("login", "set_default", "export", "logout", "register", "revoke", "remove"):
        assert event in events
    log_outputs = [cli(home, "log").stdout, cli(home, "log", "--json").stdout]
    for key in (G2_KEY, G2_TEAM_KEY, G2_ROTATED_KEY):
        assert_no_secret(key, audit_text, *log_outputs)
        assert_no_secret_in_tree(home.path, key)


def test_audit_log_rotates_by_size(home):
    home.path.mkdir(mode=0o700)
    entry_size = len(json.dumps({"time": authsome.iso_time(), "event": "test", "provider": "g2",
                                 "outcome": "x" * 400})) + 1
    count = authsome.AUDIT_MAX_BYTES // entry_size + 50
    for _ in range(count):
        authsome.audit(str(home.path), "test", provider="g2", outcome="x" * 400)
    rotated = home.path / "audit.log.1"
    assert rotated.exists()
    assert rotated.stat().st_size > authsome.AUDIT_MAX_BYTES
    assert (home.path / "audit.log").stat().st_size < authsome.AUDIT_MAX_BYTES
    assert oct(rotated.stat().st_mode & 0o777) == oct(0o600)
    assert len(cli_json(home, "log", "-n", "5")) == 5


# ============================================================================================
# init, passphrase, locked vault
# ============================================================================================


def test_init_human_and_json(home, tmp_path):
    result = cli(home, "init")
    assert result.returncode == 0, result.stderr
    assert "key_file" in result.stdout
    assert_error(cli(home, "init"), 2, "already exists")

    other = dict(home.env, AUTHSOME_HOME=str(tmp_path / "second-home"))
    assert cli_json(home, "init", env=other)["key_protection"] == "key_file"


def test_init_passphrase_and_locked_vault(home):
    with_new = dict(home.env, AUTHSOME_NEW_PASSPHRASE=PASSPHRASE)
    document = cli_json(home, "init", "--passphrase", env=with_new)
    assert document["key_protection"] == "passphrase"
    assert not (home.path / "vault.key").exists()

    unlocked = dict(home.env, AUTHSOME_PASSPHRASE=PASSPHRASE)
    assert cli(home, "login", "g2", "--stdin", input=G2_KEY, env=unlocked).returncode == 0
    assert cli(home, "get", "g2", "--field", "status", env=unlocked).stdout == "connected\n"

    locked = detached(home, "get", "g2")
    assert_error(locked, 7, "locked by a passphrase", "AUTHSOME_PASSPHRASE")
    locked_json = detached(home, "list", "--json")
    assert locked_json.returncode == 7
    assert json.loads(locked_json.stdout)["exit_code"] == 7
    wrong = dict(home.env, AUTHSOME_PASSPHRASE="not the passphrase")
    assert_error(detached(home, "get", "g2", env=wrong), 7, "wrong passphrase")


def test_init_passphrase_without_terminal(home):
    assert_error(detached(home, "init", "--passphrase"), 2, "AUTHSOME_NEW_PASSPHRASE")
    assert not (home.path / "vault.bin").exists()


def test_passphrase_set_change_remove(home):
    login(home)
    with_new = dict(home.env, AUTHSOME_NEW_PASSPHRASE=PASSPHRASE)
    result = cli(home, "passphrase", env=with_new)
    assert result.returncode == 0, result.stderr
    assert "passphrase" in result.stdout

    changed = dict(home.env, AUTHSOME_PASSPHRASE=PASSPHRASE, AUTHSOME_NEW_PASSPHRASE="second one")
    assert cli_json(home, "passphrase", env=changed)["key_protection"] == "passphrase"
    assert_error(detached(home, "get", "g2", env=dict(home.env, AUTHSOME_PASSPHRASE=PASSPHRASE)),
                 7, "wrong passphrase")

    second = dict(home.env, AUTHSOME_PASSPHRASE="second one")
    assert cli_json(home, "passphrase", "--remove", env=second)["key_protection"] == "key_file"
    assert cli(home, "get", "g2", "--field", "api_key", "--show-secret").stdout == G2_KEY + "\n"
    assert_error(cli(home, "passphrase", "--remove"), 2, "no passphrase")
    assert [entry["outcome"] for entry in cli_json(home, "log")
            if entry["event"] == "passphrase"] == ["set", "set", "removed"]


# ============================================================================================
# doctor
# ============================================================================================


def test_doctor_human_and_json(home):
    login(home)
    result = cli(home, "doctor")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4
    assert all(line.startswith("ok") for line in lines)
    report = cli_json(home, "doctor")
    assert report["ok"] is True
    assert [check["check"] for check in report["checks"]] == [
        "home folder", "file modes", "vault", "provider definitions"]
    assert "clients" not in report


def test_doctor_reports_problems(home):
    login(home)
    bad = write_provider(home, "broken", {"name": "broken", "auth_type": "magic"})
    os.chmod(home.path / "audit.log", 0o644)
    result = cli(home, "doctor")
    assert result.returncode == 1
    failures = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    definitions = next(line for line in failures if "provider definitions" in line)
    assert str(bad) in definitions
    assert "field auth_type" in definitions
    modes = next(line for line in failures if "file modes" in line)
    assert str(home.path / "audit.log") in modes
    assert "chmod 600" in modes
    report = cli_json(home, "doctor", code=1)
    assert report["ok"] is False


def test_doctor_clients(home, clients, tmp_path):
    clients.require("curl")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = dict(home.env, TMPDIR=str(scratch))
    result = cli(home, "doctor", "--clients", env=env)
    assert result.returncode in (0, 1), result.stderr
    assert "clients (" in result.stdout
    curl_line = next(line for line in result.stdout.splitlines() if line.strip().startswith("ok")
                     and " curl " in line)
    assert "went through the proxy: yes; trusted the CA: yes; received the credential: yes" \
        in curl_line

    report = cli_json(home, "doctor", "--clients", env=env, code=result.returncode)
    verdicts = {item["client"]: item for item in report["clients"]}
    for name in ("curl", "urllib"):
        assert verdicts[name]["through_proxy"] is True
        assert verdicts[name]["trusted_ca"] is True
        assert verdicts[name]["credential"] is True
        assert verdicts[name]["ok"] is True
        assert verdicts[name]["fix"] is None
    for name in ("requests", "httpx"):
        if clients.found[name]:
            assert verdicts[name]["ok"] is True, verdicts[name]
    for item in report["clients"]:
        assert item["ok"] or item["fix"], item
    assert report["ok"] == all(item["ok"] for item in report["checks"] + report["clients"])
    expected = {"curl", "urllib", "node", "git", "wget", "requests", "httpx"}
    assert set(verdicts) == {name for name in expected if name == "urllib" or clients.found[name]}

    # The throwaway home, CA and credential are removed, and the user's home is untouched.
    assert list(scratch.iterdir()) == []
    assert cli_json(home, "log") == []
    assert sorted(os.listdir(home.path)) == ["providers"]


def test_doctor_clients_selected_and_failing(home, clients, tmp_path, test_ca):
    clients.require("curl")
    curl_home = tmp_path / "curl-home"
    curl_home.mkdir()
    # A cacert setting in ~/.curlrc replaces the bundle that `authsome run` points curl at.
    (curl_home / ".curlrc").write_text('cacert = "%s"\n' % test_ca.ca_pem_path)
    env = dict(home.env, CURL_HOME=str(curl_home))
    report = cli_json(home, "doctor", "--clients", "curl,urllib", env=env, code=1)
    verdicts = {item["client"]: item for item in report["clients"]}
    assert list(verdicts) == ["curl", "urllib"]
    assert verdicts["urllib"]["ok"] is True
    curl = verdicts["curl"]
    assert curl["ok"] is False
    assert curl["through_proxy"] is True
    assert curl["trusted_ca"] is False
    assert curl["credential"] is None
    assert curl["fix"] == authsome.DOCTOR_FIXES["ca"]["curl"]
    assert curl["detail"].startswith("curl: (60) ")

    human = cli(home, "doctor", "--clients", "curl", env=env)
    assert human.returncode == 1
    assert "trusted the CA: no; received the credential: not tested" in human.stdout
    assert "fix: " + authsome.DOCTOR_FIXES["ca"]["curl"] in human.stdout

    assert_error(cli(home, "doctor", "--clients", "lynx"), 2, "lynx", "curl,urllib")


def test_doctor_client_verdicts():
    through = {"requests": ["CONNECT %s:443" % authsome.DOCTOR_HOST], "stderr": ""}
    ok = authsome.judge_client("curl", "8.0", through, {"curl": True})
    assert ok["ok"]
    assert ok["fix"] is None

    refused = dict(through, stderr="SSL certificate problem")
    untrusted = authsome.judge_client("curl", "8.0", refused, {})
    assert (untrusted["through_proxy"], untrusted["trusted_ca"], untrusted["credential"]) == (
        True, False, None)
    assert untrusted["fix"] == authsome.DOCTOR_FIXES["ca"]["curl"]
    assert untrusted["detail"] == "SSL certificate problem"

    bare = authsome.judge_client("curl", "8.0", through, {"curl": False})
    assert bare["fix"] == authsome.DOCTOR_FIXES["credential"]

    bypassed = authsome.judge_client("node", "v20.0.0", {"requests": [], "stderr": "ENOTFOUND"}, {})
    assert (bypassed["through_proxy"], bypassed["trusted_ca"]) == (False, None)
    assert bypassed["fix"].startswith("Node ignores HTTPS_PROXY before v24: ")


# ============================================================================================
# the G2 provider page, as written
# ============================================================================================

MY_AGENT = "import os\nprint(os.environ['G2_API_TOKEN'])\n"


def test_g2_page_walkthrough(home, tmp_path):
    """Run the commands of the G2 provider page in order, exactly as written there, except
    `login ... --stdin` in place of the browser form and python3 in place of python. The page writes
    ~/.authsome, so the home here is the default one under a scratch HOME."""
    user_home = tmp_path / "user"
    user_home.mkdir()
    env = {name: value for name, value in home.env.items() if name != "AUTHSOME_HOME"}
    env["HOME"] = str(user_home)
    authsome_home = user_home / ".authsome"
    workdir = tmp_path / "project"
    workdir.mkdir()
    (workdir / "my_agent.py").write_text(MY_AGENT)

    def page(script, input=None):
        result = sh(home, script, env=env, cwd=workdir, input=input)
        assert "Traceback" not in result.stderr
        return result

    # Log in.
    assert page("authsome login g2 --stdin", input=G2_KEY + "\n").returncode == 0
    assert authsome_home.is_dir()
    verify = page("authsome get g2 --field status")
    assert (verify.returncode, verify.stdout, verify.stderr) == (0, "connected\n", "")

    # Use the key: under the proxy, then in the environment.
    proxied = page("authsome run -- python3 my_agent.py")
    assert proxied.returncode == 0, proxied.stderr
    assert proxied.stdout == "authsome-proxy-managed\n"
    assert_no_secret(G2_KEY, proxied.stdout, proxied.stderr)

    exported = page('eval "$(authsome export g2 --format env)"\necho $G2_API_TOKEN\n')
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout == G2_KEY + "\n"

    # Multiple keys.
    assert page("authsome login g2 --connection personal --stdin",
                input=G2_PERSONAL_KEY + "\n").returncode == 0
    assert page("authsome login g2 --connection team --stdin",
                input=G2_TEAM_KEY + "\n").returncode == 0
    rows = {row["name"]: row for row in json.loads(page("authsome list --json").stdout)}
    assert {item["connection"]: item["status"] for item in rows["g2"]["connections"]} == {
        "default": "connected", "personal": "connected", "team": "connected"}
    team = page("authsome get g2 --connection team --field api_key --show-secret")
    assert team.stdout == G2_TEAM_KEY + "\n"

    # Rotate or remove the key.
    assert page("authsome login g2 --force --stdin", input=G2_ROTATED_KEY + "\n").returncode == 0
    rotated = page("authsome get g2 --field api_key --show-secret")
    assert rotated.stdout == G2_ROTATED_KEY + "\n"
    assert page("authsome logout g2").returncode == 0
    # The other connections remain, so the removed one is an unknown connection now.
    default_after_logout = page("authsome get g2 --connection default")
    assert default_after_logout.returncode == 3
    rows = {row["name"]: row for row in json.loads(page("authsome list --json").stdout)}
    assert {item["connection"] for item in rows["g2"]["connections"]} == {"personal", "team"}
    assert page("authsome remove g2").returncode == 0
    assert page("authsome get g2 --field status").stdout == "not_connected\n"

    # Override the bundled definition.
    override = page("authsome inspect g2 > ~/.authsome/providers/g2.json")
    assert (override.returncode, override.stderr) == (0, "")
    definition_path = authsome_home / "providers" / "g2.json"
    definition = json.loads(definition_path.read_text())
    assert definition["name"] == "g2"
    assert definition["api_url"] == "api.g2.com"
    definition["display_name"] = "G2 (edited)"
    definition_path.write_text(json.dumps(definition, indent=2))
    listed = page("authsome list   # source now shows \"custom\" for g2")
    assert listed.returncode == 0
    assert listed.stderr == ""
    g2_row = next(row for row in table(listed.stdout) if row[0] == "g2")
    assert g2_row[1] == "custom"
    rows = {row["name"]: row for row in json.loads(page("authsome list --json").stdout)}
    assert rows["g2"]["display_name"] == "G2 (edited)"

    for key in (G2_KEY, G2_PERSONAL_KEY, G2_TEAM_KEY, G2_ROTATED_KEY):
        assert_no_secret_in_tree(authsome_home, key)


def test_init_rejects_empty_new_passphrase(home):
    env = dict(home.env, AUTHSOME_NEW_PASSPHRASE="")
    result = run_cli(["init", "--passphrase"], env)
    assert result.returncode == 2
    assert result.stderr.strip() == ("error: AUTHSOME_NEW_PASSPHRASE is set but empty; a "
                                     "passphrase must not be empty")
    assert not (home.path / "vault.bin").exists()
