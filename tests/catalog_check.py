#!/usr/bin/env python3
"""Check the bundled provider catalog (providers.json) for authsome.

Usage: python3 check_providers.py [PATH]   (PATH defaults to ./providers.json)

Standard library only, CPython 3.9+. Checks the file layout, the provider count, the
names and the fields each auth_type requires. Every `regex:` host pattern must compile,
be anchored and escape its dots. It must full-match the provider's real hosts and no
near-miss host built from the provider's domain, such as `googleapis.com.example.net`
or `evil-googleapis.com`. Exit status: 0 when every check passes, 1 when any fails
(one line per failure), 2 for a bad argument or an unreadable file.
"""

import json
import re
import sys
from urllib.parse import urlsplit

EXPECTED_COUNT = 86
EXPECTED_FORMAT = "authsome-providers"
EXPECTED_VERSION = 1

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
ENV_NAME_RE = re.compile(r"^[A-Z_][A-Z0-9_]*$")
HTTP_TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
HOST_LABEL = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
HOST_RE = re.compile(r"^" + HOST_LABEL + r"(?:\." + HOST_LABEL + r")+$")

CATEGORIES = {"app", "llm", "mcp"}
FLOWS_BY_AUTH_TYPE = {
    "api_key": {"api_key"},
    "oauth2": {"pkce", "device_code", "dcr_pkce"},
}
EXPORT_SOURCE_BY_AUTH_TYPE = {"api_key": "API_KEY", "oauth2": "ACCESS_TOKEN"}

TOP_LEVEL_FIELDS = {"format", "version", "providers"}
PROVIDER_FIELDS = {
    "name", "display_name", "auth_type", "flow", "category", "api_url", "docs_url",
    "api_key", "oauth", "registration", "export",
}
REQUIRED_PROVIDER_FIELDS = {"name", "display_name", "auth_type", "flow", "category", "api_url", "export"}
API_KEY_FIELDS = {"header_name", "header_prefix", "env_var", "key_pattern", "key_pattern_hint"}
REQUIRED_API_KEY_FIELDS = {"header_name", "header_prefix", "env_var"}
OAUTH_FIELDS = {
    "authorization_url", "token_url", "revocation_url", "device_authorization_url", "scopes",
    "pkce", "base_url", "token_endpoint_auth_method", "extra_authorize_params",
    "device_token_request",
}
REQUIRED_OAUTH_FIELDS = {"authorization_url", "token_url", "scopes", "pkce", "token_endpoint_auth_method"}
OAUTH_URL_FIELDS = ("authorization_url", "token_url", "revocation_url", "device_authorization_url")
TOKEN_ENDPOINT_AUTH_METHODS = {"client_secret_post", "client_secret_basic", "none"}
DEVICE_TOKEN_REQUEST_FORMATS = {"json", "form"}

# Hosts that each regex provider really serves. Every `regex:` entry must full-match all
# of them. A regex provider missing here fails the check, so a new pattern needs a row.
REAL_HOSTS = {
    "github": ["raw.githubusercontent.com", "objects.githubusercontent.com", "githubusercontent.com"],
    "google": [
        "www.googleapis.com", "oauth2.googleapis.com", "sheets.googleapis.com",
        "us-central1-aiplatform.googleapis.com", "googleapis.com",
    ],
    "linear": ["api.linear.app", "linear.app"],
}


class Report:
    """Collects failures as `SOURCE: PROVIDER: FIELD: problem` lines."""

    def __init__(self, source):
        self.source = source
        self.failures = []

    def fail(self, provider, field, problem):
        self.failures.append("{}: {}: {}: {}".format(self.source, provider, field, problem))


def normalize_host(host):
    """Lower-case a host name and drop one trailing dot.

    The bundled patterns assume the proxy matches hosts in this normalized form.
    """
    host = host.lower()
    if host.endswith("."):
        host = host[:-1]
    return host


def registrable_domain(host):
    """Return the last two labels of a host name.

    NOTE: this ignores multi-label public suffixes such as co.uk. No bundled provider
    uses one, so a suffix list is not worth carrying here.
    """
    return ".".join(host.split(".")[-2:])


def near_miss_hosts(domain):
    """Build host names that look like `domain` but belong to someone else.

    The first list is matched after normalize_host. The second list is matched exactly
    as written, so the pattern itself must reject a trailing dot or newline.
    """
    squashed = domain.replace(".", "")
    normalized = [
        domain + ".example.net",
        domain + ".example.net.",
        "www." + domain + ".example.net",
        domain.upper() + ".EXAMPLE.NET",
        domain + ".evil.com",
        "x" + domain,
        "evil-" + domain,
        "evil" + domain,
        domain + "x",
        domain + "-evil.com",
        "api." + domain + "-evil.com",
        domain.replace(".", "x"),
        domain.replace(".", "-"),
        "api." + domain.replace(".", "-") + ".example.net",
        squashed,
        "a." + squashed + ".net",
        "." + domain,
        "a.." + domain,
        "a_b." + domain,
        "example.net",
    ]
    raw = [domain + ".", domain + "\n", "api." + domain + ".", " " + domain]
    return normalized, raw


def unescaped_dot_outside_class(pattern):
    """Tell whether `pattern` has a `.` wildcard, that is a dot neither escaped nor in [...]."""
    in_class = False
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if char == "\\":
            index += 2
            continue
        if in_class:
            if char == "]":
                in_class = False
        elif char == "[":
            in_class = True
            # A `]` right after `[` or `[^` is a literal member of the class.
            if pattern[index + 1:index + 2] == "^":
                index += 1
            if pattern[index + 1:index + 2] == "]":
                index += 1
        elif char == ".":
            return True
        index += 1
    return False


def check_regex(report, name, pattern, other_hosts):
    """Check one `regex:` pattern of provider `name` and return how many near misses it rejected."""
    field = "api_url"
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        report.fail(name, field, "regex {!r} does not compile: {}".format(pattern, exc))
        return 0

    if not pattern.startswith("^"):
        report.fail(name, field, "regex {!r} must start with ^".format(pattern))
    if not pattern.endswith("$") or pattern.endswith("\\$"):
        report.fail(name, field, "regex {!r} must end with an unescaped $".format(pattern))
    if unescaped_dot_outside_class(pattern):
        report.fail(name, field, "regex {!r} has an unescaped dot; write \\. for a literal dot".format(pattern))
    if any(char.isupper() for char in re.sub(r"\\.", "", pattern)):
        # Escapes such as \S are removed first, so only literal letters and class ranges count.
        report.fail(name, field, "regex {!r} contains upper-case letters, but hosts are matched lower-case".format(
            pattern))

    real_hosts = REAL_HOSTS.get(name)
    if not real_hosts:
        report.fail(name, field, "no real hosts listed in REAL_HOSTS for regex {!r}".format(pattern))
        return 0

    for host in real_hosts:
        for variant in (host, host.upper() + "."):
            if not compiled.fullmatch(normalize_host(variant)):
                report.fail(name, field, "regex {!r} does not match real host {!r}".format(pattern, variant))

    rejected = 0
    for domain in sorted({registrable_domain(host) for host in real_hosts}):
        normalized, raw = near_miss_hosts(domain)
        for host in normalized:
            if compiled.fullmatch(normalize_host(host)):
                report.fail(name, field, "regex {!r} matches foreign host {!r}".format(pattern, host))
            else:
                rejected += 1
        for host in raw:
            if compiled.fullmatch(host):
                report.fail(name, field, "regex {!r} matches unnormalized host {!r}".format(pattern, host))
            else:
                rejected += 1

    own_domains = {registrable_domain(host) for host in real_hosts}
    for host in sorted(other_hosts):
        if registrable_domain(host) in own_domains:
            continue
        if compiled.fullmatch(host):
            report.fail(name, field, "regex {!r} matches {!r}, a host of another domain".format(pattern, host))
        else:
            rejected += 1
    return rejected


def https_url_problem(value):
    """Return why `value` is not an absolute https URL without query or fragment, or None."""
    if not isinstance(value, str):
        return "must be a string"
    parts = urlsplit(value)
    if parts.scheme != "https":
        return "{!r} must start with https://".format(value)
    if not parts.hostname or not HOST_RE.match(parts.hostname):
        return "{!r} has no valid lower-case host".format(value)
    if parts.username or parts.password:
        return "{!r} must not carry user information".format(value)
    if parts.query or parts.fragment:
        return "{!r} must not carry a query or fragment".format(value)
    return None


def api_url_entries(provider):
    """Return the api_url entries of a provider as a list (empty if the field is malformed)."""
    value = provider.get("api_url")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return value
    return []


def plain_hosts(providers):
    """Return {provider name: hosts of its bare-host and https api_url entries}."""
    hosts = {}
    for provider in providers:
        names = set()
        for entry in api_url_entries(provider):
            if not isinstance(entry, str) or entry.startswith("regex:"):
                continue
            if entry.startswith("https://"):
                names.add(urlsplit(entry).hostname or "")
            else:
                names.add(entry)
        hosts[provider.get("name")] = names
    return hosts


def check_api_url(report, provider, other_hosts):
    """Check the api_url entries of one provider and return how many near-miss hosts were rejected."""
    name = provider["name"]
    value = provider["api_url"]
    if isinstance(value, list):
        if not value:
            report.fail(name, "api_url", "list must not be empty")
        if len(set(map(str, value))) != len(value):
            report.fail(name, "api_url", "list has duplicate entries")
    elif not isinstance(value, str):
        report.fail(name, "api_url", "must be a string or a list of strings")
        return 0

    rejected = 0
    for entry in api_url_entries(provider):
        if not isinstance(entry, str):
            report.fail(name, "api_url", "entry {!r} must be a string".format(entry))
        elif entry.startswith("regex:"):
            rejected += check_regex(report, name, entry[len("regex:"):], other_hosts)
        elif "://" in entry:
            problem = https_url_problem(entry)
            if problem:
                report.fail(name, "api_url", problem)
            elif entry.endswith("/"):
                report.fail(name, "api_url", "{!r} must not end with /".format(entry))
        elif not HOST_RE.match(entry):
            report.fail(name, "api_url", "{!r} is not a lower-case host name".format(entry))
    return rejected


def check_export(report, provider):
    """Check that export maps environment variable names to the auth_type's source."""
    name = provider["name"]
    export = provider["export"]
    if not isinstance(export, dict) or not export:
        report.fail(name, "export", "must be a non-empty object")
        return
    expected = EXPORT_SOURCE_BY_AUTH_TYPE.get(provider.get("auth_type"))
    for env_name, source in export.items():
        if not ENV_NAME_RE.match(env_name):
            report.fail(name, "export", "{!r} is not an environment variable name".format(env_name))
        if source != expected:
            report.fail(name, "export", "{} maps to {!r}, expected {!r}".format(env_name, source, expected))


def check_api_key(report, provider):
    """Check the api_key object of an api_key provider."""
    name = provider["name"]
    api_key = provider.get("api_key")
    if not isinstance(api_key, dict):
        report.fail(name, "api_key", "api_key providers need an api_key object")
        return

    for field in sorted(set(api_key) - API_KEY_FIELDS):
        report.fail(name, "api_key." + field, "unknown field")
    for field in sorted(REQUIRED_API_KEY_FIELDS - set(api_key)):
        report.fail(name, "api_key." + field, "missing (write it out, even when it is the default)")
    for field in sorted(set(api_key) & API_KEY_FIELDS):
        if not isinstance(api_key[field], str):
            report.fail(name, "api_key." + field, "must be a string")
            return

    if not HTTP_TOKEN_RE.match(api_key.get("header_name", "")):
        report.fail(name, "api_key.header_name", "{!r} is not an HTTP header name".format(api_key.get("header_name")))
    if api_key.get("header_prefix", "") != api_key.get("header_prefix", "").strip():
        report.fail(name, "api_key.header_prefix", "must not have surrounding spaces")

    export = provider.get("export")
    if isinstance(export, dict) and export and api_key.get("env_var") != next(iter(export)):
        report.fail(name, "api_key.env_var", "{!r} must be the first export variable {!r}".format(
            api_key.get("env_var"), next(iter(export))))

    pattern = api_key.get("key_pattern")
    hint = api_key.get("key_pattern_hint")
    if pattern is None:
        if hint is not None:
            report.fail(name, "api_key.key_pattern_hint", "given without a key_pattern")
        return
    try:
        re.compile(pattern)
    except re.error as exc:
        report.fail(name, "api_key.key_pattern", "{!r} does not compile: {}".format(pattern, exc))
    if not (pattern.startswith("^") and pattern.endswith("$")):
        report.fail(name, "api_key.key_pattern", "{!r} must be anchored with ^ and $".format(pattern))
    if not hint or not hint.endswith("."):
        report.fail(name, "api_key.key_pattern_hint", "needs a one-sentence hint ending with a period")


def check_oauth(report, provider):
    """Check the oauth object (and registration) of an oauth2 provider."""
    name = provider["name"]
    flow = provider.get("flow")
    oauth = provider.get("oauth")
    if not isinstance(oauth, dict):
        report.fail(name, "oauth", "oauth2 providers need an oauth object")
        return

    for field in sorted(set(oauth) - OAUTH_FIELDS):
        report.fail(name, "oauth." + field, "unknown field")
    for field in sorted(REQUIRED_OAUTH_FIELDS - set(oauth)):
        report.fail(name, "oauth." + field, "missing")

    base_url = oauth.get("base_url")
    if base_url is not None:
        problem = https_url_problem(base_url)
        if problem:
            report.fail(name, "oauth.base_url", problem)

    for field in OAUTH_URL_FIELDS:
        if field not in oauth:
            continue
        value = oauth[field]
        if isinstance(value, str) and value.startswith("{base_url}"):
            if base_url is None:
                report.fail(name, "oauth." + field, "uses {base_url} but oauth.base_url is missing")
                continue
            value = value.replace("{base_url}", base_url)
        problem = https_url_problem(value)
        if problem:
            report.fail(name, "oauth." + field, problem)

    scopes = oauth.get("scopes")
    if not isinstance(scopes, list) or not all(isinstance(s, str) and s and " " not in s for s in scopes):
        report.fail(name, "oauth.scopes", "must be a list of non-empty strings without spaces")
    elif len(set(scopes)) != len(scopes):
        report.fail(name, "oauth.scopes", "has duplicates")
    if "pkce" in oauth and not isinstance(oauth["pkce"], bool):
        report.fail(name, "oauth.pkce", "must be true or false")

    method = oauth.get("token_endpoint_auth_method")
    if method is not None and method not in TOKEN_ENDPOINT_AUTH_METHODS:
        report.fail(name, "oauth.token_endpoint_auth_method", "{!r} is not one of {}".format(
            method, sorted(TOKEN_ENDPOINT_AUTH_METHODS)))

    params = oauth.get("extra_authorize_params")
    if params is not None and not (
            isinstance(params, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in params.items())):
        report.fail(name, "oauth.extra_authorize_params", "must be an object of strings")
    request_format = oauth.get("device_token_request")
    if request_format is not None and request_format not in DEVICE_TOKEN_REQUEST_FORMATS:
        report.fail(name, "oauth.device_token_request", "{!r} is not one of {}".format(
            request_format, sorted(DEVICE_TOKEN_REQUEST_FORMATS)))

    if flow == "device_code" and "device_authorization_url" not in oauth:
        report.fail(name, "oauth.device_authorization_url", "required by flow device_code")

    registration = provider.get("registration")
    if flow == "dcr_pkce":
        if method != "none":
            report.fail(name, "oauth.token_endpoint_auth_method", "dcr_pkce public clients use 'none'")
        if not isinstance(registration, dict) or set(registration) != {"registration_endpoint"}:
            report.fail(name, "registration", "dcr_pkce needs exactly {registration_endpoint}")
        else:
            problem = https_url_problem(registration["registration_endpoint"])
            if problem:
                report.fail(name, "registration.registration_endpoint", problem)
    elif registration is not None:
        report.fail(name, "registration", "only dcr_pkce providers register a client")


def check_provider(report, provider, other_hosts):
    """Check one provider object and return how many near-miss hosts its patterns rejected."""
    if not isinstance(provider, dict):
        report.fail("?", "-", "provider entry {!r} is not an object".format(provider))
        return 0
    name = provider.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        report.fail(repr(name), "name", "must match {}".format(NAME_RE.pattern))
        return 0

    for field in sorted(set(provider) - PROVIDER_FIELDS):
        report.fail(name, field, "unknown field")
    missing = REQUIRED_PROVIDER_FIELDS - set(provider)
    for field in sorted(missing):
        report.fail(name, field, "missing")
    if missing:
        return 0

    if not isinstance(provider["display_name"], str) or not provider["display_name"].strip():
        report.fail(name, "display_name", "must be a non-empty string")
    if provider["category"] not in CATEGORIES:
        report.fail(name, "category", "{!r} is not one of {}".format(provider["category"], sorted(CATEGORIES)))

    auth_type = provider["auth_type"]
    if auth_type not in FLOWS_BY_AUTH_TYPE:
        report.fail(name, "auth_type", "{!r} is not one of {}".format(auth_type, sorted(FLOWS_BY_AUTH_TYPE)))
        return 0
    if provider["flow"] not in FLOWS_BY_AUTH_TYPE[auth_type]:
        report.fail(name, "flow", "{!r} is not valid for auth_type {}".format(provider["flow"], auth_type))

    if "docs_url" in provider:
        problem = https_url_problem(provider["docs_url"])
        if problem:
            report.fail(name, "docs_url", problem)

    check_export(report, provider)
    if auth_type == "api_key":
        check_api_key(report, provider)
        for field in ("oauth", "registration"):
            if field in provider:
                report.fail(name, field, "not allowed for api_key providers")
    else:
        check_oauth(report, provider)
        if "api_key" in provider:
            report.fail(name, "api_key", "not allowed for oauth2 providers")

    return check_api_url(report, provider, other_hosts)


def check_catalog(path):
    """Check the catalog at `path` and return (failure lines, provider count, near misses rejected)."""
    report = Report(path)
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        report.fail("-", "-", "invalid JSON: {}".format(exc))
        return report.failures, 0, 0

    if not isinstance(document, dict) or set(document) != TOP_LEVEL_FIELDS:
        report.fail("-", "-", "top level must be an object with exactly {}".format(sorted(TOP_LEVEL_FIELDS)))
        return report.failures, 0, 0
    if document["format"] != EXPECTED_FORMAT:
        report.fail("-", "format", "{!r}, expected {!r}".format(document["format"], EXPECTED_FORMAT))
    if document["version"] != EXPECTED_VERSION:
        report.fail("-", "version", "{!r}, expected {!r}".format(document["version"], EXPECTED_VERSION))
    if text != json.dumps(document, indent=2, ensure_ascii=False) + "\n":
        report.fail("-", "-", "not in canonical layout (json.dumps with indent=2, ensure_ascii=False, final newline)")

    providers = document["providers"]
    if not isinstance(providers, list):
        report.fail("-", "providers", "must be a list")
        return report.failures, 0, 0
    if len(providers) != EXPECTED_COUNT:
        report.fail("-", "providers", "{} providers, expected {}".format(len(providers), EXPECTED_COUNT))

    names = [p.get("name") for p in providers if isinstance(p, dict)]
    duplicates = sorted({n for n in names if names.count(n) > 1}, key=str)
    if duplicates:
        report.fail("-", "providers", "duplicate names: {}".format(", ".join(map(str, duplicates))))
    if all(isinstance(n, str) for n in names) and names != sorted(names):
        report.fail("-", "providers", "not sorted by name")

    hosts_by_provider = plain_hosts(p for p in providers if isinstance(p, dict))
    rejected = 0
    for provider in providers:
        own_name = provider.get("name") if isinstance(provider, dict) else None
        other_hosts = set()
        for name, hosts in hosts_by_provider.items():
            if name != own_name:
                other_hosts |= hosts
        rejected += check_provider(report, provider, other_hosts)
    return report.failures, len(providers), rejected


def main(argv):
    if len(argv) > 2 or (len(argv) == 2 and argv[1] in ("-h", "--help")):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    path = argv[1] if len(argv) == 2 else "providers.json"
    try:
        failures, count, rejected = check_catalog(path)
    except OSError as exc:
        print("error: failed to read {}: {}; pass the path of providers.json".format(path, exc.strerror),
              file=sys.stderr)
        return 2

    for line in failures:
        print(line)
    if failures:
        print("FAILED: {} problem(s) in {}".format(len(failures), path))
        return 1
    print("ok: {} providers in {}; regex patterns rejected {} near-miss hosts".format(count, path, rejected))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
