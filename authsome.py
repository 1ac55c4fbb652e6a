#!/usr/bin/env python3
"""authsome: a local credential broker for AI agents.

One file, standard library only (CPython 3.9+). A person logs in to a service once; authsome
keeps the API key or OAuth token in an encrypted vault under $AUTHSOME_HOME (default
~/.authsome); `authsome run -- COMMAND` starts COMMAND behind a local proxy that adds the real
credential to its HTTPS requests for that service, while the child's environment holds only a
placeholder.

Threat model: the secret is kept out of the agent's environment, argv, logs and memory, and out
of copies of the home folder. In key-file mode a process of the same user can still read the key
file; passphrase mode or AUTHSOME_MASTER_KEY keeps the data key in authsome's memory only.

Sections, in dependency order: errors and utilities, crypto primitives, vault, provider catalog,
credential records, login flows, certificate authority, HTTP/1.1 wire handling, proxy, child
process runner, CLI.
"""

import base64
import contextlib
import datetime
import errno
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import socket
import ssl
import stat
import struct
import sys
import threading
import time

__version__ = "0.1.0"

# ---------------------------------------------------------------------------------------------
# errors and utilities
# ---------------------------------------------------------------------------------------------

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_LOGIN = 4
EXIT_CREDENTIAL = 5
EXIT_REFRESH = 6
EXIT_VAULT = 7

PLACEHOLDER = "authsome-proxy-managed"


class AuthsomeError(Exception):
    """An error reported to the user as one line; `code` is the process exit code."""

    code = EXIT_UNEXPECTED

    def __init__(self, message, code=None):
        super().__init__(message)
        if code is not None:
            self.code = code


class UsageError(AuthsomeError):
    code = EXIT_USAGE


class NotFoundError(AuthsomeError):
    code = EXIT_NOT_FOUND


class LoginError(AuthsomeError):
    code = EXIT_LOGIN


class CredentialError(AuthsomeError):
    code = EXIT_CREDENTIAL


class RefreshError(AuthsomeError):
    code = EXIT_REFRESH


class VaultError(AuthsomeError):
    code = EXIT_VAULT


log = logging.getLogger("authsome")


class SecretMaskFilter(logging.Filter):
    """Replace every registered secret in a log record with ***.

    Callers never format secrets into log lines; this filter is the second line of defence.
    """

    def __init__(self):
        super().__init__()
        self._secrets = set()
        self._lock = threading.Lock()

    def register(self, value):
        if value and len(value) >= 4:
            with self._lock:
                self._secrets.add(value)

    def mask(self, text):
        for value in list(self._secrets):
            if value in text:
                text = text.replace(value, "***")
        return text

    def filter(self, record):
        message = record.getMessage()
        masked = self.mask(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


secret_filter = SecretMaskFilter()
log.addFilter(secret_filter)


def now():
    return time.time()


def iso_time(timestamp=None):
    moment = time.gmtime(now() if timestamp is None else timestamp)
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", moment)


def home_dir():
    """Return the authsome home folder from $AUTHSOME_HOME, defaulting to ~/.authsome."""
    configured = os.environ.get("AUTHSOME_HOME")
    return os.path.abspath(os.path.expanduser(configured or "~/.authsome"))


def ensure_private_dir(path):
    """Create `path` (and missing parents) with mode 0700 whatever the umask."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent and not os.path.isdir(parent):
        os.makedirs(parent, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    # mkdir applies the umask; a bit set in the umask can only remove permissions, and chmod on
    # an empty folder we just made exposes nothing.
    os.chmod(path, 0o700)


def open_private(path, flags):
    """Open `path` with mode 0600 from creation, whatever the umask."""
    old_umask = os.umask(0o077)
    try:
        return os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o600)
    finally:
        os.umask(old_umask)


def fsync_dir(path):
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path, data):
    """Write `data` to `path` through a 0600 temp file, fsync and os.replace."""
    folder = os.path.dirname(path)
    temp = os.path.join(folder, ".%s.%s.tmp" % (os.path.basename(path), secrets.token_hex(6)))
    fd = open_private(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    fsync_dir(folder)


def append_private(path, data):
    fd = open_private(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


@contextlib.contextmanager
def file_lock(path, timeout=30.0, what="vault"):
    """Hold an exclusive advisory lock on `path` (created 0600) for the duration of the block."""
    fd = open_private(path, os.O_RDWR | os.O_CREAT)
    deadline = time.monotonic() + timeout
    try:
        _acquire_lock(fd, deadline, path, what)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _acquire_lock(fd, deadline, path, what):
    if os.name == "posix":
        import fcntl
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() > deadline:
                raise VaultError("%s is busy: another authsome process holds %s; retry when it "
                                 "finishes" % (what, path))
            time.sleep(0.01)
    else:
        import msvcrt
        while True:
            try:
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise VaultError("%s is busy: another authsome process holds %s" % (what, path))
                time.sleep(0.01)


def b64encode(data):
    return base64.b64encode(data).decode("ascii")


def b64decode(text, what):
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeError):
        raise VaultError("%s is not valid base64" % what) from None


# ---------------------------------------------------------------------------------------------
# crypto primitives
# ---------------------------------------------------------------------------------------------
# The standard library has no AES, so the vault uses an encrypt-then-MAC AEAD built from
# HMAC-SHA256: keys split with HKDF (RFC 5869), a keystream of HMAC blocks over nonce and
# counter, and an HMAC tag over the length-prefixed associated data, nonce and ciphertext.

NONCE_SIZE = 16
TAG_SIZE = 32
ENCRYPTION_LABEL = b"authsome v1 encryption key"
AUTHENTICATION_LABEL = b"authsome v1 authentication key"


def hkdf_extract(salt, ikm):
    if not salt:
        salt = b"\x00" * 32
    return hmac.new(salt, ikm, hashlib.sha256).digest()


def hkdf_expand(prk, info, length):
    if length > 255 * 32:
        raise ValueError("HKDF-SHA256 output is limited to 8160 bytes")
    output, block, counter = b"", b"", 1
    while len(output) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        output += block
        counter += 1
    return output[:length]


def hkdf_sha256(ikm, salt, info, length):
    """Derive `length` bytes from `ikm` with HKDF-SHA256 (RFC 5869)."""
    return hkdf_expand(hkdf_extract(salt, ikm), info, length)


def _aead_keys(key):
    if len(key) != 32:
        raise ValueError("AEAD key must be 32 bytes")
    return (hkdf_sha256(key, b"", ENCRYPTION_LABEL, 32),
            hkdf_sha256(key, b"", AUTHENTICATION_LABEL, 32))


def _keystream_xor(enc_key, nonce, data):
    """XOR `data` with blocks HMAC-SHA256(enc_key, nonce || uint64_be(i)), i = 0, 1, ..."""
    if not data:
        return b""
    base = hmac.new(enc_key, nonce, hashlib.sha256)
    blocks = []
    for index in range((len(data) + 31) // 32):
        block = base.copy()
        block.update(struct.pack(">Q", index))
        blocks.append(block.digest())
    stream = b"".join(blocks)[:len(data)]
    mixed = int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")
    return mixed.to_bytes(len(data), "big")


def _aead_tag(mac_key, associated_data, nonce, ciphertext):
    mac = hmac.new(mac_key, digestmod=hashlib.sha256)
    for part in (associated_data, nonce, ciphertext):
        mac.update(struct.pack(">Q", len(part)))
        mac.update(part)
    return mac.digest()


def aead_seal(key, plaintext, associated_data, nonce=None):
    """Encrypt and authenticate; returns nonce || ciphertext || tag."""
    enc_key, mac_key = _aead_keys(key)
    nonce = os.urandom(NONCE_SIZE) if nonce is None else nonce
    ciphertext = _keystream_xor(enc_key, nonce, plaintext)
    return nonce + ciphertext + _aead_tag(mac_key, associated_data, nonce, ciphertext)


class AuthenticationFailed(Exception):
    """The AEAD tag did not verify: wrong key, or the data was modified."""


def aead_open(key, blob, associated_data):
    """Verify the tag of nonce || ciphertext || tag, then decrypt."""
    if len(blob) < NONCE_SIZE + TAG_SIZE:
        raise AuthenticationFailed("sealed data is shorter than nonce and tag")
    enc_key, mac_key = _aead_keys(key)
    nonce, ciphertext, tag = blob[:NONCE_SIZE], blob[NONCE_SIZE:-TAG_SIZE], blob[-TAG_SIZE:]
    expected = _aead_tag(mac_key, associated_data, nonce, ciphertext)
    if not hmac.compare_digest(expected, tag):
        raise AuthenticationFailed("tag mismatch")
    return _keystream_xor(enc_key, nonce, ciphertext)


# ---------------------------------------------------------------------------------------------
# vault
# ---------------------------------------------------------------------------------------------
# File layout (all integers big-endian; see docs/vault-format.md):
#   magic "AUTHSOME" | uint16 format version | uint32 header length | header (JSON)
#   | wrapped data key (nonce 16 | ciphertext 32 | tag 32) | document (nonce 16 | ciphertext | tag 32)
# The data key is sealed under the key-encryption key with associated data = everything before
# it plus the label "dek"; the document is sealed under the data key with associated data =
# everything before it. Every byte of the file is therefore covered by a tag.

VAULT_MAGIC = b"AUTHSOME"
VAULT_VERSION = 1
VAULT_FILE = "vault.bin"
KEY_FILE = "vault.key"
LOCK_FILE = "vault.lock"
WRAPPED_KEY_SIZE = NONCE_SIZE + 32 + TAG_SIZE
KEK_KEY_FILE = "key_file"
KEK_PASSPHRASE = "passphrase"
KEK_MASTER_KEY = "master_key"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 15, 8, 1
SCRYPT_MAXMEM = 64 * 1024 * 1024  # scrypt needs 128 * r * N * p = 32 MiB at the defaults


def empty_document():
    return {"version": 1, "credentials": {}, "defaults": {}, "clients": {}}


def derive_passphrase_key(passphrase, params):
    """Derive a 32-byte KEK from a passphrase with scrypt and the header's parameters."""
    return hashlib.scrypt(passphrase.encode("utf-8"), salt=b64decode(params["salt"], "scrypt salt"),
                          n=params["n"], r=params["r"], p=params["p"],
                          maxmem=max(SCRYPT_MAXMEM, 256 * params["r"] * params["n"] * params["p"]),
                          dklen=32)


def new_scrypt_params():
    return {"n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P, "salt": b64encode(os.urandom(16))}


def decode_master_key(text):
    try:
        key = base64.b64decode(text.strip().encode("ascii"), validate=True)
    except (ValueError, UnicodeError):
        key = b""
    if len(key) != 32:
        raise VaultError("AUTHSOME_MASTER_KEY must be the base64 encoding of 32 bytes; make one "
                         "with: python3 -c 'import os,base64;print(base64.b64encode(os.urandom(32)).decode())'")
    return key


class VaultFile:
    """The parsed parts of a vault file; raises VaultError when the framing is damaged."""

    def __init__(self, path, raw):
        self.path = path
        self.raw = raw
        fixed = len(VAULT_MAGIC) + 6
        if len(raw) < fixed or raw[:len(VAULT_MAGIC)] != VAULT_MAGIC:
            raise self.damaged("not an authsome vault or truncated header")
        version, header_length = struct.unpack(">HI", raw[len(VAULT_MAGIC):fixed])
        if version != VAULT_VERSION:
            raise self.damaged("unsupported format version %d" % version)
        body_start = fixed + header_length + WRAPPED_KEY_SIZE
        if len(raw) < body_start + NONCE_SIZE + TAG_SIZE:
            raise self.damaged("file is truncated")
        self.prefix = raw[:fixed + header_length]
        self.wrapped_key = raw[fixed + header_length:body_start]
        self.sealed_document = raw[body_start:]
        self.header = self._parse_header(raw[fixed:fixed + header_length])

    def _parse_header(self, data):
        try:
            header = json.loads(data.decode("utf-8"))
        except (UnicodeError, ValueError):
            raise self.damaged("header is not valid JSON") from None
        kind = header.get("kek") if isinstance(header, dict) else None
        if kind not in (KEK_KEY_FILE, KEK_PASSPHRASE, KEK_MASTER_KEY):
            raise self.damaged("unknown key-encryption key kind %r" % (kind,))
        if kind == KEK_PASSPHRASE:
            params = header.get("scrypt")
            valid = isinstance(params, dict) and all(
                isinstance(params.get(name), int) and params[name] > 0 for name in ("n", "r", "p"))
            if not valid or not isinstance(params.get("salt"), str):
                raise self.damaged("scrypt parameters are missing or invalid")
            if params["n"] > 2 ** 24 or params["r"] * params["p"] > 2 ** 10:
                raise self.damaged("scrypt parameters are out of range")
            if params["n"] < 2 or params["n"] & (params["n"] - 1):
                raise self.damaged("scrypt parameter n is not a power of 2")
            try:
                b64decode(params["salt"], "scrypt salt")
            except VaultError:
                raise self.damaged("scrypt salt is not valid base64") from None
        return header

    def damaged(self, reason):
        return VaultError("vault %s is damaged (%s); it was left unchanged: restore it from a "
                          "backup, or move it away and log in again" % (self.path, reason))


def build_vault_file(header, data_key, kek, document):
    header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    prefix = VAULT_MAGIC + struct.pack(">HI", VAULT_VERSION, len(header_bytes)) + header_bytes
    wrapped_key = aead_seal(kek, data_key, prefix + b"dek")
    plaintext = json.dumps(document, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return prefix + wrapped_key + aead_seal(data_key, plaintext, prefix + wrapped_key)


class Vault:
    """The encrypted store of credential and OAuth client records in one home folder.

    `load()` reads without locking (writes are atomic renames); `update(mutate)` runs
    `mutate(document)` under an exclusive lock on a re-read document and writes the result.
    """

    def __init__(self, home=None, passphrase_prompt=None):
        self.home = home or home_dir()
        self.path = os.path.join(self.home, VAULT_FILE)
        self.key_path = os.path.join(self.home, KEY_FILE)
        self.lock_path = os.path.join(self.home, LOCK_FILE)
        self.passphrase_prompt = passphrase_prompt
        self._keks = {}

    def exists(self):
        return os.path.exists(self.path)

    def kind(self):
        """Return the KEK kind of the vault file, or None when there is no vault yet."""
        vault_file = self._read_file()
        return vault_file.header["kek"] if vault_file else None

    def load(self):
        vault_file = self._read_file()
        if vault_file is None:
            return empty_document()
        return self._decrypt(vault_file)[1]

    def update(self, mutate):
        """Apply `mutate(document)` under the lock and persist; returns what mutate returned."""
        ensure_private_dir(self.home)
        with file_lock(self.lock_path):
            self._remove_stale_temp_files()
            vault_file = self._read_file()
            if vault_file is None:
                header, data_key, kek = self._new_vault_keys()
                document = empty_document()
            else:
                data_key, document = self._decrypt(vault_file)
                header, kek = vault_file.header, self._kek(vault_file)
            result = mutate(document)
            self._write(build_vault_file(header, data_key, kek, document))
            return result

    def rewrap(self, kind, passphrase=None):
        """Wrap the data key under a new KEK of `kind`; the document is re-sealed unchanged."""
        ensure_private_dir(self.home)
        with file_lock(self.lock_path):
            vault_file = self._read_file()
            if vault_file is None:
                data_key, document = os.urandom(32), empty_document()
            else:
                data_key, document = self._decrypt(vault_file)
            header, kek = self._kek_for_new_kind(kind, passphrase)
            self._write(build_vault_file(header, data_key, kek, document))
        if kind != KEK_KEY_FILE and os.path.exists(self.key_path):
            # The new wrap is on disk and fsynced, so the old key file no longer opens anything.
            os.unlink(self.key_path)

    def _write(self, data):
        try:
            write_file_atomic(self.path, data)
        except OSError as exc:
            raise VaultError("cannot write vault %s: %s; the previous version was kept"
                             % (self.path, exc.strerror or exc)) from None

    def _read_file(self):
        try:
            with open(self.path, "rb") as handle:
                raw = handle.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise VaultError("cannot read vault %s: %s" % (self.path, exc.strerror)) from None
        return VaultFile(self.path, raw)

    def _decrypt(self, vault_file):
        kek = self._kek(vault_file)
        try:
            data_key = aead_open(kek, vault_file.wrapped_key, vault_file.prefix + b"dek")
        except AuthenticationFailed:
            raise VaultError(self._unwrap_failure(vault_file.header["kek"])) from None
        try:
            plaintext = aead_open(data_key, vault_file.sealed_document,
                                  vault_file.prefix + vault_file.wrapped_key)
            document = json.loads(plaintext.decode("utf-8"))
        except (AuthenticationFailed, UnicodeError, ValueError):
            raise vault_file.damaged("the encrypted document failed its integrity check") from None
        if not isinstance(document, dict):
            raise vault_file.damaged("the document is not a JSON object")
        for section in ("credentials", "defaults", "clients"):
            document.setdefault(section, {})
        return data_key, document

    def _unwrap_failure(self, kind):
        if kind == KEK_PASSPHRASE:
            return ("wrong passphrase for vault %s (or the file was modified); the vault was left "
                    "unchanged" % self.path)
        if kind == KEK_MASTER_KEY:
            return ("AUTHSOME_MASTER_KEY does not open vault %s (wrong key, or the file was "
                    "modified); the vault was left unchanged" % self.path)
        return ("key file %s does not open vault %s (wrong key file, or the vault was modified); "
                "the vault was left unchanged" % (self.key_path, self.path))

    def _kek(self, vault_file):
        cache_key = vault_file.prefix
        if cache_key not in self._keks:
            self._keks[cache_key] = self._obtain_kek(vault_file.header)
        return self._keks[cache_key]

    def _obtain_kek(self, header):
        kind = header["kek"]
        if kind == KEK_MASTER_KEY:
            text = os.environ.get("AUTHSOME_MASTER_KEY")
            if not text:
                raise VaultError("vault %s is locked by an external key: set AUTHSOME_MASTER_KEY"
                                 % self.path)
            return decode_master_key(text)
        if kind == KEK_PASSPHRASE:
            return derive_passphrase_key(self._passphrase(), header["scrypt"])
        return self._read_key_file()

    def _passphrase(self):
        passphrase = os.environ.get("AUTHSOME_PASSPHRASE")
        if passphrase:
            return passphrase
        if self.passphrase_prompt is not None:
            try:
                passphrase = self.passphrase_prompt("Vault passphrase: ")
            except LoginError:
                passphrase = None  # no terminal, or the prompt was cancelled: a vault error below
            if passphrase:
                return passphrase
        raise VaultError("vault %s is locked by a passphrase: set AUTHSOME_PASSPHRASE or run the "
                         "command in a terminal to be asked for it" % self.path)

    def _read_key_file(self):
        try:
            with open(self.key_path, "rb") as handle:
                text = handle.read().decode("ascii", "replace")
        except FileNotFoundError:
            raise VaultError("key file %s is missing, so vault %s cannot be opened; restore the key "
                             "file from a backup" % (self.key_path, self.path)) from None
        try:
            key = base64.b64decode(text.strip(), validate=True)
        except ValueError:
            key = b""
        if len(key) != 32:
            raise VaultError("key file %s is damaged (expected base64 of 32 bytes)" % self.key_path)
        return key

    def _new_vault_keys(self):
        kind = KEK_MASTER_KEY if os.environ.get("AUTHSOME_MASTER_KEY") else KEK_KEY_FILE
        header, kek = self._kek_for_new_kind(kind)
        return header, os.urandom(32), kek

    def _kek_for_new_kind(self, kind, passphrase=None):
        if kind == KEK_MASTER_KEY:
            header = {"kek": kind}
            kek = decode_master_key(os.environ.get("AUTHSOME_MASTER_KEY", ""))
            return header, kek
        if kind == KEK_PASSPHRASE:
            if not passphrase:
                raise UsageError("a passphrase must not be empty")
            params = new_scrypt_params()
            return {"kek": kind, "scrypt": params}, derive_passphrase_key(passphrase, params)
        return {"kek": KEK_KEY_FILE}, self._create_or_read_key_file()

    def _create_or_read_key_file(self):
        if os.path.exists(self.key_path):
            try:
                return self._read_key_file()
            except VaultError:
                # Callers hold the lock and are about to wrap the data key under this file, so
                # no vault depends on it yet: one cut short by a crash is replaced.
                os.unlink(self.key_path)
        key = os.urandom(32)
        fd = open_private(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        with os.fdopen(fd, "wb") as handle:
            handle.write(base64.b64encode(key) + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        fsync_dir(self.home)
        return key

    def _remove_stale_temp_files(self):
        # Temp files are only created under the lock, so any found now was left by a crash.
        prefix = ".%s." % VAULT_FILE
        for name in os.listdir(self.home):
            if name.startswith(prefix) and name.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.home, name))


# ---------------------------------------------------------------------------------------------
# provider catalog
# ---------------------------------------------------------------------------------------------

BUNDLED_CATALOG = "providers.json"
PROVIDER_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
HOST_RE = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*$")
AUTH_TYPES = ("api_key", "oauth2")
FLOWS = {"api_key": ("api_key",), "oauth2": ("pkce", "device_code", "dcr_pkce")}
EXPORT_SOURCES = ("API_KEY", "ACCESS_TOKEN", "BASE_URL")
TOKEN_AUTH_METHODS = ("client_secret_post", "client_secret_basic", "none")
OAUTH_URL_FIELDS = ("authorization_url", "token_url", "revocation_url", "device_authorization_url")


class ProviderError(AuthsomeError):
    """A provider definition broke a rule; the message names the file, the field and the rule."""

    code = EXIT_USAGE


def normalize_host(host):
    """Lower-case a host name and drop one trailing dot and IPv6 brackets."""
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host[:-1] if host.endswith(".") else host


class Route:
    """Where a provider's credential may go: an exact host (and port, and path prefix) or a
    `regex:` full-matched against the host name."""

    def __init__(self, provider, host=None, port=443, path_prefix="", pattern=None):
        self.provider = provider
        self.host = host
        self.port = port
        self.path_prefix = path_prefix
        self.pattern = pattern

    @property
    def is_regex(self):
        return self.pattern is not None

    def matches_host(self, host, port):
        if port != self.port:
            return False
        if self.pattern is not None:
            return self.pattern.fullmatch(host) is not None
        return host == self.host

    def matches_path(self, path):
        prefix = self.path_prefix
        if not prefix:
            return True
        return path == prefix or path.startswith(prefix + "/")


def parse_api_url(entry, provider_name, fail):
    """Turn one api_url entry into a Route; `fail(rule)` raises the caller's ProviderError."""
    if not isinstance(entry, str) or not entry.strip():
        fail("each entry must be a non-empty string")
    if entry.startswith("regex:"):
        try:
            pattern = re.compile(entry[len("regex:"):])
        except re.error as exc:
            fail("regex %r does not compile: %s" % (entry, exc))
        return Route(provider_name, pattern=pattern)
    if "://" in entry:
        from urllib.parse import urlsplit
        try:
            parts = urlsplit(entry)
            port = parts.port or 443
        except ValueError:
            fail("%r is not a valid URL" % entry)
        if parts.scheme != "https" or not parts.hostname or parts.query or parts.fragment:
            fail("%r must be https://host[:port][/path-prefix] without query or fragment" % entry)
        host = normalize_host(parts.hostname)
        return Route(provider_name, host=host, port=port, path_prefix=parts.path.rstrip("/"))
    host, _, port_text = entry.partition(":") if entry.count(":") == 1 else (entry, "", "")
    host = normalize_host(host)
    if not HOST_RE.match(host) or (port_text and not port_text.isdigit()):
        fail("%r is not a host name, an https:// URL or a regex: pattern" % entry)
    return Route(provider_name, host=host, port=int(port_text or 443))


class Provider:
    """One validated provider definition; `data` is the definition as written."""

    def __init__(self, data, source, path=None):
        self.data = data
        self.source = source
        self.path = path
        self.name = data["name"]
        self.display_name = data.get("display_name") or self.name
        self.auth_type = data["auth_type"]
        self.flow = data.get("flow") or FLOWS[self.auth_type][0]
        urls = data.get("api_url") or []
        self.api_urls = [urls] if isinstance(urls, str) else list(urls)
        self.api_key = data.get("api_key") or {}
        self.oauth = data.get("oauth") or {}
        self.export = data.get("export") or {}
        self.routes = [parse_api_url(entry, self.name, self._never_fails) for entry in self.api_urls]

    @staticmethod
    def _never_fails(rule):
        raise AssertionError(rule)  # entries were validated before construction

    @property
    def header_name(self):
        return self.api_key.get("header_name") or "Authorization"

    @property
    def header_prefix(self):
        if self.auth_type == "oauth2":
            return "Bearer"
        prefix = self.api_key.get("header_prefix", "Bearer")
        return prefix or ""

    def header_value(self, secret):
        return "%s %s" % (self.header_prefix, secret) if self.header_prefix else secret

    def oauth_url(self, field, base_url=None):
        url = self.oauth.get(field)
        if url and "{base_url}" in url:
            url = url.replace("{base_url}", (base_url or self.oauth.get("base_url") or "").rstrip("/"))
        return url

    def oauth_endpoints(self):
        """Return (host, path) of each OAuth endpoint, which the proxy never injects into."""
        from urllib.parse import urlsplit
        endpoints = set()
        for field in OAUTH_URL_FIELDS:
            url = self.oauth_url(field)
            if url:
                parts = urlsplit(url)
                endpoints.add((normalize_host(parts.hostname or ""), parts.path.rstrip("/")))
        return endpoints


def validate_provider(data, source):
    """Check a provider definition; raises ProviderError naming `source`, the field and the rule."""

    def fail(field, rule):
        raise ProviderError("invalid provider file %s: field %s: %s" % (source, field, rule))

    if not isinstance(data, dict):
        fail("(top level)", "must be a JSON object")
    name = data.get("name")
    if not isinstance(name, str) or not PROVIDER_NAME_RE.match(name):
        fail("name", "must match ^[a-z0-9][a-z0-9._-]*$")
    if data.get("auth_type") not in AUTH_TYPES:
        fail("auth_type", "must be one of %s" % ", ".join(AUTH_TYPES))
    flow = data.get("flow", FLOWS[data["auth_type"]][0])
    if flow not in FLOWS[data["auth_type"]]:
        fail("flow", "must be one of %s for auth_type %s" % (
            ", ".join(FLOWS[data["auth_type"]]), data["auth_type"]))
    for field in ("display_name", "docs_url", "category"):
        if field in data and not isinstance(data[field], str):
            fail(field, "must be a string")
    _validate_api_urls(data.get("api_url"), name, fail)
    _validate_api_key_block(data.get("api_key"), fail)
    if data["auth_type"] == "oauth2":
        _validate_oauth_block(data.get("oauth"), flow, data.get("registration"), fail)
    _validate_export(data.get("export"), data["auth_type"], fail)
    return data


def _validate_api_urls(urls, name, fail):
    entries = [urls] if isinstance(urls, str) else urls
    if not isinstance(entries, list) or not entries:
        fail("api_url", "must be a host, an https:// URL, a regex: pattern, or a non-empty list "
                        "of them")
    for entry in entries:
        parse_api_url(entry, name, lambda rule: fail("api_url", rule))


def _validate_api_key_block(block, fail):
    if block is None:
        return
    if not isinstance(block, dict):
        fail("api_key", "must be an object")
    header = block.get("header_name", "Authorization")
    if not isinstance(header, str) or not HEADER_NAME_RE.match(header):
        fail("api_key.header_name", "must be an HTTP header name")
    prefix = block.get("header_prefix", "Bearer")
    if prefix is not None and (not isinstance(prefix, str) or re.search(r"[\x00-\x1f\x7f]", prefix)):
        fail("api_key.header_prefix", "must be a string without control characters, or null")
    pattern = block.get("key_pattern")
    if pattern is not None:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as exc:
            fail("api_key.key_pattern", "must be a valid regular expression (%s)" % exc)
    if "key_pattern_hint" in block and not isinstance(block["key_pattern_hint"], str):
        fail("api_key.key_pattern_hint", "must be a string")
    env_var = block.get("env_var")
    if env_var is not None and (not isinstance(env_var, str) or not ENV_NAME_RE.match(env_var)):
        fail("api_key.env_var", "must be an environment variable name")


def _validate_oauth_block(block, flow, registration, fail):
    if not isinstance(block, dict):
        fail("oauth", "is required for auth_type oauth2 and must be an object")
    for field in OAUTH_URL_FIELDS + ("base_url",):
        if field in block:
            _validate_endpoint_url(block[field], "oauth." + field, fail)
    needed = {"pkce": ("authorization_url", "token_url"),
              "device_code": ("device_authorization_url", "token_url"),
              "dcr_pkce": ()}[flow]
    for field in needed:
        if not block.get(field):
            fail("oauth." + field, "is required for flow %s" % flow)
    if flow == "dcr_pkce":
        endpoint = (registration or {}).get("registration_endpoint") if isinstance(
            registration, dict) else None
        if endpoint is not None:
            _validate_endpoint_url(endpoint, "registration.registration_endpoint", fail)
        elif not block.get("base_url") and not block.get("authorization_url"):
            fail("registration.registration_endpoint", "or oauth.base_url is required for flow "
                                                       "dcr_pkce")
    scopes = block.get("scopes", [])
    if not isinstance(scopes, list) or not all(isinstance(scope, str) for scope in scopes):
        fail("oauth.scopes", "must be a list of strings")
    if "pkce" in block and not isinstance(block["pkce"], bool):
        fail("oauth.pkce", "must be true or false")
    method = block.get("token_endpoint_auth_method", "client_secret_post")
    if method not in TOKEN_AUTH_METHODS:
        fail("oauth.token_endpoint_auth_method", "must be one of %s" % ", ".join(TOKEN_AUTH_METHODS))
    extra = block.get("extra_authorize_params", {})
    if not isinstance(extra, dict) or not all(
            isinstance(key, str) and isinstance(value, str) for key, value in extra.items()):
        fail("oauth.extra_authorize_params", "must be an object of string values")
    if block.get("device_token_request", "form") not in ("form", "json"):
        fail("oauth.device_token_request", "must be form or json")


def _validate_endpoint_url(url, field, fail):
    from urllib.parse import urlsplit
    if not isinstance(url, str):
        fail(field, "must be a string URL")
    templated = url.replace("{base_url}", "https://base.invalid")
    try:
        parts = urlsplit(templated)
        parts.port
    except ValueError:
        fail(field, "%r is not a valid URL" % url)
    loopback = parts.hostname in ("127.0.0.1", "::1", "localhost")
    if not parts.hostname or not (parts.scheme == "https" or (parts.scheme == "http" and loopback)):
        fail(field, "%r must be an https:// URL (http:// only for loopback addresses)" % url)


def _validate_export(export, auth_type, fail):
    if export is None:
        return
    if not isinstance(export, dict):
        fail("export", "must be an object mapping variable names to API_KEY, ACCESS_TOKEN or "
                       "BASE_URL")
    for variable, source in export.items():
        if not ENV_NAME_RE.match(variable):
            fail("export.%s" % variable, "must be an environment variable name")
        if source not in EXPORT_SOURCES:
            fail("export.%s" % variable, "must be one of %s" % ", ".join(EXPORT_SOURCES))
        if source == "API_KEY" and auth_type != "api_key":
            fail("export.%s" % variable, "API_KEY is only valid for auth_type api_key")
        if source == "ACCESS_TOKEN" and auth_type != "oauth2":
            fail("export.%s" % variable, "ACCESS_TOKEN is only valid for auth_type oauth2")


def read_bundled_file(name):
    """Read a file shipped beside authsome.py, or inside the zipapp that contains it."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
    loader = globals().get("__loader__")
    if loader is not None and hasattr(loader, "get_data"):
        return loader.get_data(path)
    with open(path, "rb") as handle:
        return handle.read()


class Catalog:
    """Bundled providers overlaid by the user's definitions in $AUTHSOME_HOME/providers/."""

    def __init__(self, providers, problems):
        self.providers = providers
        self.problems = problems  # one message per user file that was skipped

    def get(self, name):
        provider = self.providers.get(name)
        if provider is None:
            import difflib
            close = difflib.get_close_matches(name, list(self.providers), n=1)
            hint = "; did you mean %s?" % close[0] if close else "; run 'authsome list' to see them"
            raise NotFoundError("unknown provider %r%s" % (name, hint))
        return provider

    def __iter__(self):
        return iter(sorted(self.providers.values(), key=lambda provider: provider.name))


def load_bundled_definitions():
    try:
        document = json.loads(read_bundled_file(BUNDLED_CATALOG).decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise AuthsomeError("bundled %s is missing or unreadable: %s" % (BUNDLED_CATALOG, exc))
    return document["providers"] if isinstance(document, dict) else document


def load_catalog(home=None):
    home = home or home_dir()
    providers = {}
    for data in load_bundled_definitions():
        validate_provider(data, BUNDLED_CATALOG)
        providers[data["name"]] = Provider(data, "bundled")
    problems = []
    folder = os.path.join(home, "providers")
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    for file_name in names:
        if not file_name.endswith(".json"):
            continue
        path = os.path.join(folder, file_name)
        try:
            provider = load_provider_file(path)
        except ProviderError as exc:
            problems.append(str(exc))
            continue
        providers[provider.name] = provider
    return Catalog(providers, problems)


def load_provider_file(path, source="custom"):
    try:
        with open(path, "rb") as handle:
            data = json.loads(handle.read().decode("utf-8"))
    except (UnicodeError, ValueError) as exc:
        raise ProviderError("invalid provider file %s: not valid JSON (%s)" % (path, exc)) from None
    except OSError as exc:
        raise ProviderError("cannot read provider file %s: %s" % (path, exc.strerror)) from None
    if isinstance(data, dict) and "providers" in data and "name" not in data:
        raise ProviderError("invalid provider file %s: field (top level): must hold one provider, "
                            "not a catalog" % path)
    validate_provider(data, path)
    return Provider(data, source, path)


# ---------------------------------------------------------------------------------------------
# credential records
# ---------------------------------------------------------------------------------------------
# The vault document holds credentials[provider][connection] = record, defaults[provider] =
# connection name, and clients[provider] = OAuth client record. Secret fields of a record are
# listed in SECRET_FIELDS; everything else is safe to print.

DEFAULT_CONNECTION = "default"
CONNECTION_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SECRET_FIELDS = ("api_key", "access_token", "refresh_token", "client_secret")
STATUS_CONNECTED = "connected"
STATUS_EXPIRED = "expired"
STATUS_NOT_CONNECTED = "not_connected"
STATUS_INVALID = "invalid"
AUDIT_FILE = "audit.log"
AUDIT_MAX_BYTES = 1024 * 1024
AUDIT_KEEP = 3


def check_connection_name(name):
    if not CONNECTION_NAME_RE.match(name or ""):
        raise UsageError("invalid connection name %r: use letters, digits, '.', '_' or '-' "
                         "(at most 64)" % (name,))
    return name


def record_status(record, at=None):
    """Return the status of a credential record at time `at` (default now)."""
    if record is None:
        return STATUS_NOT_CONNECTED
    if record.get("status") == STATUS_INVALID:
        return STATUS_INVALID
    expires_at = record.get("expires_at")
    if expires_at is not None and expires_at <= (now() if at is None else at):
        return STATUS_EXPIRED
    return STATUS_CONNECTED


def record_secret(record):
    return record.get("api_key") or record.get("access_token")


def default_connection_name(document, provider_name):
    connections = document["credentials"].get(provider_name) or {}
    chosen = document["defaults"].get(provider_name)
    if chosen in connections:
        return chosen
    if DEFAULT_CONNECTION in connections:
        return DEFAULT_CONNECTION
    # The first connection made becomes the default when the chosen one was removed.
    ordered = sorted(connections.values(), key=lambda record: record.get("created_at", ""))
    return ordered[0]["connection"] if ordered else None


def find_record(document, provider_name, connection=None):
    """Return the record for (provider, connection); connection None means the default."""
    connections = document["credentials"].get(provider_name) or {}
    name = connection or default_connection_name(document, provider_name)
    return connections.get(name) if name else None


def put_record(document, record):
    connections = document["credentials"].setdefault(record["provider"], {})
    connections[record["connection"]] = record
    if document["defaults"].get(record["provider"]) not in connections:
        document["defaults"][record["provider"]] = record["connection"]


def drop_record(document, provider_name, connection):
    connections = document["credentials"].get(provider_name) or {}
    removed = connections.pop(connection, None)
    if not connections:
        document["credentials"].pop(provider_name, None)
        document["defaults"].pop(provider_name, None)
    elif document["defaults"].get(provider_name) == connection:
        document["defaults"][provider_name] = default_connection_name(document, provider_name)
    return removed


def public_record(record, show_secret=False):
    """Return a copy of `record` with secret fields as *** unless `show_secret`."""
    shown = {}
    for field, value in record.items():
        if field in SECRET_FIELDS and value and not show_secret:
            value = "***"
        shown[field] = value
    shown["status"] = record_status(record)
    return shown


def register_record_secrets(record):
    for field in SECRET_FIELDS:
        secret_filter.register(record.get(field))


def audit(home, event, **fields):
    """Append one JSON line to the audit log; fields must never hold a secret value."""
    entry = {"time": iso_time(), "event": event}
    entry.update({key: value for key, value in fields.items() if value is not None})
    line = secret_filter.mask(json.dumps(entry, sort_keys=True)) + "\n"
    path = os.path.join(home, AUDIT_FILE)
    try:
        ensure_private_dir(home)
        if os.path.exists(path) and os.path.getsize(path) > AUDIT_MAX_BYTES:
            rotate_audit_log(home, path)
        append_private(path, line.encode("utf-8"))
    except OSError as exc:
        log.warning("cannot write audit log %s: %s", path, exc.strerror)


def rotate_audit_log(home, path):
    with file_lock(os.path.join(home, "audit.lock"), timeout=5.0, what="audit log"):
        if not os.path.exists(path) or os.path.getsize(path) <= AUDIT_MAX_BYTES:
            return  # another process rotated it while this one waited for the lock
        for index in range(AUDIT_KEEP - 1, 0, -1):
            older = "%s.%d" % (path, index)
            if os.path.exists(older):
                os.replace(older, "%s.%d" % (path, index + 1))
        os.replace(path, path + ".1")


def read_audit_log(home, limit=None):
    path = os.path.join(home, AUDIT_FILE)
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        return []
    entries = []
    for line in lines[-limit:] if limit else lines:
        with contextlib.suppress(ValueError):
            entries.append(json.loads(line))
    return entries


class RouteTable:
    """Routes of the providers that have a usable credential in this run.

    `resolve()` picks the most specific route: an exact host beats a regex, a longer path prefix
    beats a shorter one, and a tie between providers injects nothing.
    """

    def __init__(self, routes, oauth_endpoints=()):
        self.exact = {}
        self.regex = []
        for route in routes:
            if route.is_regex:
                self.regex.append(route)
            else:
                self.exact.setdefault((route.host, route.port), []).append(route)
        self.oauth_endpoints = set(oauth_endpoints)

    def exact_routes(self):
        return [route for routes in self.exact.values() for route in routes]

    def intercepts(self, host, port):
        host = normalize_host(host)
        if (host, port) in self.exact:
            return True
        return any(route.matches_host(host, port) for route in self.regex)

    def resolve(self, host, port, path):
        """Return (route, reason): route None means inject nothing, for `reason`."""
        host = normalize_host(host)
        path = normalize_request_path(path)
        if (host, path.rstrip("/")) in self.oauth_endpoints:
            return None, "oauth endpoint"
        candidates = [route for route in self.exact.get((host, port), ())
                      if route.matches_path(path)]
        if candidates:
            longest = max(len(route.path_prefix) for route in candidates)
            candidates = [route for route in candidates if len(route.path_prefix) == longest]
        else:
            candidates = [route for route in self.regex if route.matches_host(host, port)]
        providers = sorted({route.provider for route in candidates})
        if not providers:
            return None, "no route"
        if len(providers) > 1:
            return None, "tie between %s" % ", ".join(providers)
        return candidates[0], "route"


def normalize_request_path(target):
    """Return the path of a request target, without query, with dot segments removed."""
    path = target.split("?", 1)[0].split("#", 1)[0]
    if "://" in path:
        path = "/" + path.split("://", 1)[1].partition("/")[2]
    path = re.sub("%2[eE]", ".", path)
    output = []
    for segment in path.split("/"):
        if segment == "..":
            if len(output) > 1:
                output.pop()
        elif segment != ".":
            output.append(segment)
    if path.endswith(("/.", "/..")):
        output.append("")
    normalized = "/".join(output)
    return normalized if normalized.startswith("/") else "/" + normalized


# ---------------------------------------------------------------------------------------------
# login flows
# ---------------------------------------------------------------------------------------------

LOGIN_PORT = 7998
LOGIN_TIMEOUT = 600.0
CONTROL_CHARS_RE = re.compile(r"[\x00-\x1f\x7f]")
FORM_CSP = ("default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
            "frame-ancestors 'none'; base-uri 'none'")


def has_graphical_session():
    """Guess whether a browser opened here would reach the user."""
    if sys.platform == "darwin":
        return not (os.environ.get("SSH_CONNECTION") or os.environ.get("SSH_TTY"))
    if os.name == "nt":
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def check_api_key(provider, key):
    """Return an error message for an unusable key, or None when the key is acceptable."""
    if not key:
        return "the key is empty"
    if CONTROL_CHARS_RE.search(key) or key != key.strip():
        return "the key contains spaces, line breaks or control characters"
    pattern = provider.api_key.get("key_pattern")
    if pattern and not re.fullmatch(pattern, key):
        hint = provider.api_key.get("key_pattern_hint") or "expected pattern %s" % pattern
        return "the key does not look like a %s key: %s" % (provider.display_name, hint)
    return None


def open_terminal_prompt():
    """Return True when a terminal is available for a hidden prompt."""
    if os.name == "nt":
        return sys.stdin is not None and sys.stdin.isatty()
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return False
    os.close(fd)
    return True


def prompt_hidden(prompt):
    """Read a value with echo off from the terminal; LoginError when there is no terminal."""
    import getpass
    if not open_terminal_prompt():
        raise LoginError("no terminal to read the secret from: pass it on standard input with "
                         "--stdin, or run the command in a terminal")
    try:
        return getpass.getpass(prompt)
    except (EOFError, KeyboardInterrupt):
        raise LoginError("login cancelled") from None


def read_stdin_secret(stream=None):
    stream = stream or sys.stdin
    if stream is None:
        raise LoginError("--stdin was given but there is no standard input")
    value = stream.read()
    return value.rstrip("\r\n")


def form_page(title, body, status_line=""):
    import html
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<title>%s</title><style>body{font-family:system-ui,sans-serif;max-width:34rem;"
            "margin:3rem auto;padding:0 1rem;color:#1b1b1b}input[type=password]{width:100%%;"
            "padding:.5rem;font-size:1rem;box-sizing:border-box}button{margin-top:1rem;"
            "padding:.5rem 1.2rem;font-size:1rem}.error{color:#a40000}.ok{color:#0a6b1f}"
            "</style></head><body><h1>%s</h1>%s%s</body></html>"
            % (html.escape(title), html.escape(title), status_line, body)).encode("utf-8")


def key_form(provider, token, error=None):
    import html
    docs = provider.data.get("docs_url")
    docs_line = ('<p>Get a key: <a href="%s" rel="noreferrer">%s</a></p>'
                 % (html.escape(docs), html.escape(docs))) if docs else ""
    error_line = '<p class="error" role="alert">%s</p>' % html.escape(error) if error else ""
    body = ('<p>Paste your %s API key. It is stored encrypted on this machine and never shown '
            'again.</p>%s<form method="post" action="/submit" autocomplete="off">'
            '<input type="hidden" name="token" value="%s">'
            '<label for="key">API key</label>'
            '<input type="password" id="key" name="key" autocomplete="new-password" '
            'autocapitalize="off" spellcheck="false" required autofocus>'
            '<button type="submit">Save key</button></form>'
            % (html.escape(provider.display_name), docs_line, html.escape(token)))
    return form_page("Log in to %s" % provider.display_name, body, error_line)


class KeyFormServer:
    """The one-shot local form that collects an API key in the browser.

    The page and the POST must carry the random one-time token from the printed URL; the key is
    checked with `accept(key)`, which returns an error message or None once the key is stored.
    The server stops after the first accepted key.
    """

    def __init__(self, provider, accept, port=LOGIN_PORT):
        self.provider = provider
        self.accept = accept
        self.token = secrets.token_urlsafe(24)
        self.done = threading.Event()
        self.httpd = self._bind(port)
        self.port = self.httpd.server_address[1]
        self.url = "http://127.0.0.1:%d/?token=%s" % (self.port, self.token)
        self.fallback = self.port != port

    def _bind(self, port):
        from http.server import ThreadingHTTPServer
        handler = self._handler_class()
        try:
            httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        except OSError as exc:
            if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
                raise
            httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        httpd.daemon_threads = True
        return httpd

    def serve(self, timeout=LOGIN_TIMEOUT):
        thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                  daemon=True)
        thread.start()
        try:
            if not self.done.wait(timeout):
                raise LoginError("login timed out after %d seconds without a key" % timeout)
        finally:
            self.httpd.shutdown()
            self.httpd.server_close()

    def _handler_class(self):
        from http.server import BaseHTTPRequestHandler
        from urllib.parse import parse_qs, urlsplit
        form = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "authsome"
            sys_version = ""

            def log_message(self, format, *args):
                pass  # request lines carry the one-time token; nothing is logged

            def do_GET(self):
                parts = urlsplit(self.path)
                token = (parse_qs(parts.query).get("token") or [""])[0]
                if parts.path != "/" or not self._host_ok():
                    return self._send(404, form_page("Not found", "<p>Nothing here.</p>"))
                if not hmac.compare_digest(token.encode(), form.token.encode()):
                    return self._reject_token()
                self._send(200, key_form(form.provider, form.token))

            def do_POST(self):
                if urlsplit(self.path).path != "/submit" or not self._host_ok():
                    return self._send(404, form_page("Not found", "<p>Nothing here.</p>"))
                fields = self._read_form()
                if fields is None:
                    return self._send(400, form_page("Bad request", "<p>Malformed form.</p>"))
                token = fields.get("token", "")
                if not hmac.compare_digest(token.encode(), form.token.encode()):
                    return self._reject_token()
                error = form.accept(fields.get("key", ""))
                if error:
                    return self._send(400, key_form(form.provider, form.token, error))
                done = ('<p class="ok">Your %s key is saved. You can close this tab.</p>'
                        % form.provider.display_name)
                self._send(200, form_page("Logged in to %s" % form.provider.display_name, done))
                form.done.set()

            def _read_form(self):
                try:
                    length = int(self.headers.get("Content-Length", "0"))
                except ValueError:
                    return None
                if length < 0 or length > 65536:
                    return None
                body = self.rfile.read(length).decode("utf-8", "replace")
                return {name: values[0] for name, values in
                        parse_qs(body, keep_blank_values=True).items()}

            def _host_ok(self):
                # A page on another site may point a DNS name at 127.0.0.1; only our own
                # address is accepted as Host.
                host = (self.headers.get("Host") or "").lower()
                return host in ("127.0.0.1:%d" % form.port, "localhost:%d" % form.port)

            def _reject_token(self):
                self._send(403, form_page("Link expired or incomplete",
                                          "<p>This page needs the one-time link printed by "
                                          "<code>authsome login</code>.</p>"))

            def _send(self, status, page):
                self.send_response(status)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(page)))
                self.send_header("Content-Security-Policy", FORM_CSP)
                self.send_header("Cache-Control", "no-store")
                self.send_header("Referrer-Policy", "no-referrer")
                self.send_header("X-Content-Type-Options", "nosniff")
                self.send_header("X-Frame-Options", "DENY")
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(page)
                self.close_connection = True

        return Handler


def open_browser(url):
    """Open `url` in the user's browser without blocking; failures only mean the URL is printed."""
    import webbrowser

    def target():
        with contextlib.suppress(Exception):
            webbrowser.open(url)

    threading.Thread(target=target, daemon=True).start()


def collect_api_key_in_browser(provider, accept, port, out):
    server = KeyFormServer(provider, accept, port)
    if server.fallback:
        out.write("Port %d is busy; the form is on port %d instead.\n" % (port, server.port))
    out.write("Opening the login form for %s. If no browser opens, visit:\n  %s\n"
              % (provider.display_name, server.url))
    out.flush()
    open_browser(server.url)
    server.serve()


def login_api_key(home, provider, connection, mode, port=LOGIN_PORT, stdin=None, out=None):
    """Collect an API key by `mode` (browser, prompt or stdin), check it and store it."""
    out = out or sys.stderr
    vault = Vault(home, passphrase_prompt=prompt_hidden)

    def store(key):
        problem = check_api_key(provider, key)
        if problem:
            return problem
        secret_filter.register(key)
        stamp = iso_time()
        record = {"provider": provider.name, "connection": connection, "auth_type": "api_key",
                  "api_key": key, "status": STATUS_CONNECTED, "created_at": stamp,
                  "updated_at": stamp}

        def mutate(document):
            previous = find_record(document, provider.name, connection)
            if previous:
                record["created_at"] = previous.get("created_at", stamp)
            put_record(document, record)

        vault.update(mutate)
        return None

    if mode == "browser":
        collect_api_key_in_browser(provider, store, port, out)
        return
    if mode == "stdin":
        key = read_stdin_secret(stdin)
    else:
        key = prompt_hidden("%s API key (input hidden): " % provider.display_name)
    problem = store(key)
    if problem:
        raise LoginError("%s; nothing was stored" % problem)


# ---------------------------------------------------------------------------------------------
# certificate authority
# ---------------------------------------------------------------------------------------------
# NIST P-256 (secp256r1) domain parameters from FIPS 186-4 appendix D.1.2.3. The curve has a = -3.
P256_P = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF
P256_B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
P256_G = (
    0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296,
    0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5,
)

# Affine points are (x, y). Jacobian points are (X, Y, Z) with x = X/Z^2 and y = Y/Z^3.
# Z == 0 is the point at infinity.
_INFINITY = (1, 1, 0)


def _on_curve(point):
    x, y = point
    p = P256_P
    return 0 <= x < p and 0 <= y < p and (y * y - x * x * x + 3 * x - P256_B) % p == 0


def _jacobian_double(point):
    # "dbl-2001-b" formulas for a = -3 (Explicit-Formulas Database).
    x, y, z = point
    if z == 0 or y == 0:
        return _INFINITY
    p = P256_P
    delta = z * z % p
    gamma = y * y % p
    beta = x * gamma % p
    alpha = 3 * (x - delta) * (x + delta) % p
    x3 = (alpha * alpha - 8 * beta) % p
    z3 = ((y + z) * (y + z) - gamma - delta) % p
    y3 = (alpha * (4 * beta - x3) - 8 * gamma * gamma) % p
    return (x3, y3, z3)


def _jacobian_add_affine(point, affine):
    """Add an affine point (never infinity) to a Jacobian point."""
    x1, y1, z1 = point
    if z1 == 0:
        return (affine[0], affine[1], 1)
    p = P256_P
    z1z1 = z1 * z1 % p
    h = (affine[0] * z1z1 - x1) % p
    r = (affine[1] * z1 * z1z1 - y1) % p
    if h == 0:
        return _jacobian_double(point) if r == 0 else _INFINITY
    hh = h * h % p
    hhh = h * hh % p
    v = x1 * hh % p
    x3 = (r * r - hhh - 2 * v) % p
    y3 = (r * (v - x3) - y1 * hhh) % p
    return (x3, y3, z1 * h % p)


def _to_affine(point):
    x, y, z = point
    if z == 0:
        raise ValueError("point at infinity has no affine coordinates")
    z_inv = pow(z, -1, P256_P)
    z_inv2 = z_inv * z_inv % P256_P
    return (x * z_inv2 % P256_P, y * z_inv2 * z_inv % P256_P)


def _batch_to_affine(points):
    """Convert Jacobian points to affine with one modular inversion (Montgomery's trick)."""
    p = P256_P
    prefix = [1]
    for _, _, z in points:
        prefix.append(prefix[-1] * z % p)
    inverse = pow(prefix[-1], -1, p)
    affine = [None] * len(points)
    for index in range(len(points) - 1, -1, -1):
        x, y, z = points[index]
        z_inv = inverse * prefix[index] % p
        inverse = inverse * z % p
        z_inv2 = z_inv * z_inv % p
        affine[index] = (x * z_inv2 % p, y * z_inv2 * z_inv % p)
    return affine


@functools.lru_cache(maxsize=None)
def _generator_table():
    """Build rows i = 0..63 of affine multiples j * 16**i * G for j = 1..15.

    Built once per process on first use; one batched inversion per row keeps it to a few
    milliseconds.
    """
    table = []
    base = P256_G
    for _ in range(64):
        multiples = [(base[0], base[1], 1)]
        for _ in range(15):
            multiples.append(_jacobian_add_affine(multiples[-1], base))
        affine = _batch_to_affine(multiples)
        table.append(affine[:15])
        base = affine[15]
    return table


def _multiply_generator(k):
    # Fixed-base method with 4-bit digits: one table addition per digit, no doublings.
    total = _INFINITY
    for row in _generator_table():
        digit = k & 15
        if digit:
            total = _jacobian_add_affine(total, row[digit - 1])
        k >>= 4
    return total


def _multiply_point(k, affine):
    total = _INFINITY
    for bit in bin(k)[2:]:
        total = _jacobian_double(total)
        if bit == "1":
            total = _jacobian_add_affine(total, affine)
    return total


def p256_public_key(private_key):
    """Return the affine public point (x, y) of a P-256 private scalar."""
    return _to_affine(_multiply_generator(private_key))


def p256_keypair():
    """Generate a P-256 key pair (private scalar, public point) from `secrets`."""
    private_key = secrets.randbelow(P256_N - 1) + 1
    return private_key, p256_public_key(private_key)


def _hmac_sha256(key, data):
    return hmac.new(key, data, hashlib.sha256).digest()


def rfc6979_nonces(private_key, digest):
    """Yield the deterministic ECDSA nonces of RFC 6979 section 3.2 for a SHA-256 digest.

    The caller takes the next nonce when a signature comes out with r or s equal to zero.
    """
    # For P-256 with SHA-256, qlen = hlen = 256, so bits2int is a plain big-endian read.
    x = private_key.to_bytes(32, "big")
    h1 = (int.from_bytes(digest, "big") % P256_N).to_bytes(32, "big")
    v = b"\x01" * 32
    k = b"\x00" * 32
    for separator in (b"\x00", b"\x01"):  # steps d to g
        k = _hmac_sha256(k, v + separator + x + h1)
        v = _hmac_sha256(k, v)
    while True:  # step h
        v = _hmac_sha256(k, v)
        candidate = int.from_bytes(v, "big")
        if 1 <= candidate < P256_N:
            yield candidate
        k = _hmac_sha256(k, v + b"\x00")
        v = _hmac_sha256(k, v)


def p256_sign(private_key, digest):
    """Sign a 32-byte SHA-256 digest with ECDSA (SEC 1 section 4.1.3) and return (r, s)."""
    # NOTE: Python integer arithmetic is not constant-time, so signing time depends on the
    # secret key and nonce. The CA key signs only on the local machine and lives for one run.
    e = int.from_bytes(digest, "big")
    for k in rfc6979_nonces(private_key, digest):
        r = _to_affine(_multiply_generator(k))[0] % P256_N
        if r == 0:
            continue
        s = pow(k, -1, P256_N) * (e + r * private_key) % P256_N
        if s != 0:
            return r, s
    raise AssertionError("unreachable: the nonce generator never ends")


def p256_verify(public_key, digest, r, s):
    """Return True if (r, s) is a valid ECDSA signature of a SHA-256 digest (SEC 1 section 4.1.4)."""
    if not (1 <= r < P256_N and 1 <= s < P256_N) or not _on_curve(public_key):
        return False
    w = pow(s, -1, P256_N)
    u1 = int.from_bytes(digest, "big") * w % P256_N
    u2 = r * w % P256_N
    total = _multiply_generator(u1)
    key_part = _multiply_point(u2, public_key)
    if key_part[2] != 0:
        total = _jacobian_add_affine(total, _to_affine(key_part))
    if total[2] == 0:
        return False
    return _to_affine(total)[0] % P256_N == r


# DER encoding (ITU-T X.690), only the types that certificates and keys here use.


def _der_length(length):
    # X.690 8.1.3: short form below 128, else 0x80 | count followed by the big-endian length.
    if length < 0x80:
        return bytes([length])
    body = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def der_tlv(tag, content):
    return bytes([tag]) + _der_length(len(content)) + content


def der_integer(value):
    # X.690 8.3: minimal two's complement, so a set top bit needs a leading zero octet.
    if value < 0:
        raise ValueError("negative DER INTEGER is not supported")
    return der_tlv(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def der_boolean(value):
    # X.690 11.1: DER encodes TRUE as 0xFF.
    return der_tlv(0x01, b"\xff" if value else b"\x00")


def _base128(number):
    octets = [number & 0x7F]
    number >>= 7
    while number:
        octets.append(0x80 | (number & 0x7F))
        number >>= 7
    return bytes(reversed(octets))


def der_oid(dotted):
    # X.690 8.19: the first two arcs share one subidentifier, 40 * first + second.
    arcs = [int(arc) for arc in dotted.split(".")]
    subidentifiers = [40 * arcs[0] + arcs[1]] + arcs[2:]
    return der_tlv(0x06, b"".join(_base128(number) for number in subidentifiers))


def der_sequence(*elements):
    return der_tlv(0x30, b"".join(elements))


def der_set(*elements):
    # X.690 11.6: DER sorts the encodings of SET OF elements in ascending order.
    return der_tlv(0x31, b"".join(sorted(elements)))


def der_bit_string(data, unused_bits=0):
    return der_tlv(0x03, bytes([unused_bits]) + data)


def der_octet_string(data):
    return der_tlv(0x04, data)


def der_utf8_string(text):
    return der_tlv(0x0C, text.encode("utf-8"))


def der_time(moment):
    # RFC 5280 section 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050, always UTC seconds.
    moment = moment.astimezone(datetime.timezone.utc)
    if moment.year < 2050:
        return der_tlv(0x17, moment.strftime("%y%m%d%H%M%SZ").encode("ascii"))
    return der_tlv(0x18, moment.strftime("%Y%m%d%H%M%SZ").encode("ascii"))


def der_context(number, content, constructed=True):
    """Wrap content in a context-specific tag: constructed for EXPLICIT, primitive for IMPLICIT."""
    return der_tlv((0xA0 if constructed else 0x80) | number, content)


def pem_encode(label, der):
    """Encode DER bytes as PEM with 64-character lines (RFC 7468)."""
    text = base64.b64encode(der).decode("ascii")
    lines = [text[i:i + 64] for i in range(0, len(text), 64)]
    body = "\n".join(lines)
    return ("-----BEGIN %s-----\n%s\n-----END %s-----\n" % (label, body, label)).encode("ascii")


def ecdsa_der_signature(r, s):
    """Encode an ECDSA signature as Ecdsa-Sig-Value, a SEQUENCE of two INTEGERs (RFC 5480)."""
    return der_sequence(der_integer(r), der_integer(s))


# X.509 certificates (RFC 5280) with P-256 keys and ecdsa-with-SHA256 signatures.

OID_EC_PUBLIC_KEY = "1.2.840.10045.2.1"
OID_PRIME256V1 = "1.2.840.10045.3.1.7"
OID_ECDSA_WITH_SHA256 = "1.2.840.10045.4.3.2"
OID_COMMON_NAME = "2.5.4.3"
OID_SUBJECT_KEY_IDENTIFIER = "2.5.29.14"
OID_KEY_USAGE = "2.5.29.15"
OID_SUBJECT_ALT_NAME = "2.5.29.17"
OID_BASIC_CONSTRAINTS = "2.5.29.19"
OID_AUTHORITY_KEY_IDENTIFIER = "2.5.29.35"
OID_EXTENDED_KEY_USAGE = "2.5.29.37"
OID_SERVER_AUTH = "1.3.6.1.5.5.7.3.1"

# RFC 5758 section 3.2: the ecdsa-with-SHA256 AlgorithmIdentifier has no parameters field.
_SIGNATURE_ALGORITHM = der_sequence(der_oid(OID_ECDSA_WITH_SHA256))
_EC_KEY_ALGORITHM = der_sequence(der_oid(OID_EC_PUBLIC_KEY), der_oid(OID_PRIME256V1))

# keyUsage is a named BIT STRING, and X.690 11.2.2 drops trailing zero bits in DER.
# digitalSignature is bit 0. keyCertSign is bit 5 and cRLSign is bit 6.
_KEY_USAGE_DIGITAL_SIGNATURE = der_bit_string(b"\x80", unused_bits=7)
_KEY_USAGE_CERT_SIGN_CRL_SIGN = der_bit_string(b"\x06", unused_bits=1)


def _encode_point(public_key):
    # SEC 1 section 2.3.3: uncompressed form 0x04 || X || Y.
    x, y = public_key
    return b"\x04" + x.to_bytes(32, "big") + y.to_bytes(32, "big")


def _subject_public_key_info(public_key):
    return der_sequence(_EC_KEY_ALGORITHM, der_bit_string(_encode_point(public_key)))


def _key_identifier(public_key):
    # RFC 7093 section 2 method 1: the leftmost 160 bits of SHA-256 over the subjectPublicKey bits.
    return hashlib.sha256(_encode_point(public_key)).digest()[:20]


def _pkcs8_private_key(private_key, public_key):
    # PKCS#8 PrivateKeyInfo (RFC 5208) around a SEC 1 ECPrivateKey (RFC 5915) with its public key.
    ec_private_key = der_sequence(
        der_integer(1),
        der_octet_string(private_key.to_bytes(32, "big")),
        der_context(1, der_bit_string(_encode_point(public_key))),
    )
    return der_sequence(der_integer(0), _EC_KEY_ALGORITHM, der_octet_string(ec_private_key))


def _name(common_name):
    attribute = der_sequence(der_oid(OID_COMMON_NAME), der_utf8_string(common_name))
    return der_sequence(der_set(attribute))


def _extension(oid, value, critical=False):
    parts = [der_oid(oid)]
    if critical:  # X.690 11.5: DER omits a value equal to its DEFAULT, and critical defaults to FALSE.
        parts.append(der_boolean(True))
    parts.append(der_octet_string(value))
    return der_sequence(*parts)


def _ca_extensions(key_identifier):
    return [
        _extension(OID_BASIC_CONSTRAINTS, der_sequence(der_boolean(True)), critical=True),
        _extension(OID_KEY_USAGE, _KEY_USAGE_CERT_SIGN_CRL_SIGN, critical=True),
        _extension(OID_SUBJECT_KEY_IDENTIFIER, der_octet_string(key_identifier)),
    ]


def _leaf_extensions(general_name, key_identifier, authority_key_identifier):
    # basicConstraints with cA = FALSE is an empty SEQUENCE, because DER omits the DEFAULT value.
    authority = der_sequence(der_context(0, authority_key_identifier, constructed=False))
    return [
        _extension(OID_BASIC_CONSTRAINTS, der_sequence(), critical=True),
        _extension(OID_KEY_USAGE, _KEY_USAGE_DIGITAL_SIGNATURE, critical=True),
        _extension(OID_EXTENDED_KEY_USAGE, der_sequence(der_oid(OID_SERVER_AUTH))),
        _extension(OID_SUBJECT_ALT_NAME, der_sequence(general_name)),
        _extension(OID_AUTHORITY_KEY_IDENTIFIER, authority),
        _extension(OID_SUBJECT_KEY_IDENTIFIER, der_octet_string(key_identifier)),
    ]


def _general_name(host):
    # RFC 5280 section 4.2.1.6: dNSName is [2] IA5String, iPAddress is [7] with 4 or 16 octets.
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return der_context(2, host.encode("ascii"), constructed=False)
    return der_context(7, address.packed, constructed=False)


def _normalize_host(host):
    """Return host lower-case, without IPv6 brackets or a trailing dot, with IPs in canonical form."""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    host = host.rstrip(".").lower()
    if not host or not host.isascii() or not host.isprintable() or " " in host:
        raise ValueError("invalid host for a certificate: %r" % host)
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def _random_serial():
    # RFC 5280 section 4.1.2.2: a positive serial of at most 20 octets, so below 2**159.
    return secrets.randbelow((1 << 159) - 1) + 1


def _validity_window():
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    return now - datetime.timedelta(hours=1), now + datetime.timedelta(days=30)


def _tbs_certificate(serial, issuer, validity, subject, public_key, extensions):
    not_before, not_after = validity
    return der_sequence(
        der_context(0, der_integer(2)),  # version v3, EXPLICIT [0]
        der_integer(serial),
        _SIGNATURE_ALGORITHM,
        issuer,
        der_sequence(der_time(not_before), der_time(not_after)),
        subject,
        _subject_public_key_info(public_key),
        der_context(3, der_sequence(*extensions)),  # EXPLICIT [3]
    )


def _sign_certificate(tbs, private_key):
    r, s = p256_sign(private_key, hashlib.sha256(tbs).digest())
    return der_sequence(tbs, _SIGNATURE_ALGORITHM, der_bit_string(ecdsa_der_signature(r, s)))


def _write_private_file(path, data):
    # O_EXCL rejects an existing file or symlink. The mode applies from creation on.
    fd = open_private(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


def _new_server_context(cert_path, key_path):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_path, key_path)
    context.set_alpn_protocols(["http/1.1"])
    return context


class CertificateAuthority:
    """Per-run ECDSA P-256 certificate authority for intercepted TLS connections.

    The CA private key exists only in memory. One leaf key pair serves every host.
    Each leaf certificate is issued on first use and cached. `workdir` must be an
    existing folder private to this instance (mode 0700). The leaf key and leaf
    certificates are written there as new files with mode 0600.
    """

    def __init__(self, workdir):
        self.workdir = workdir
        self._lock = threading.RLock()
        self._leaf_cert_paths = {}
        self._server_contexts = {}
        self._validity = _validity_window()
        self._ca_key, ca_public_key = p256_keypair()
        self._ca_key_identifier = _key_identifier(ca_public_key)
        self._ca_name = _name("authsome run CA " + secrets.token_hex(8))
        self.ca_cert_der = self._issue_ca_certificate(ca_public_key)
        self.ca_cert_pem = pem_encode("CERTIFICATE", self.ca_cert_der)
        self._leaf_key, self._leaf_public_key = p256_keypair()
        self._leaf_key_identifier = _key_identifier(self._leaf_public_key)
        self._leaf_key_path = self._write_leaf_key()

    def _issue_ca_certificate(self, ca_public_key):
        extensions = _ca_extensions(self._ca_key_identifier)
        tbs = _tbs_certificate(
            _random_serial(), self._ca_name, self._validity, self._ca_name, ca_public_key, extensions
        )
        return _sign_certificate(tbs, self._ca_key)

    def _write_leaf_key(self):
        path = os.path.join(self.workdir, "leaf-key.pem")
        der = _pkcs8_private_key(self._leaf_key, self._leaf_public_key)
        _write_private_file(path, pem_encode("PRIVATE KEY", der))
        return path

    def _issue_leaf_certificate(self, host):
        extensions = _leaf_extensions(
            _general_name(host), self._leaf_key_identifier, self._ca_key_identifier
        )
        subject = _name(host[:64])  # RFC 5280 upper bound ub-common-name is 64 characters.
        tbs = _tbs_certificate(
            _random_serial(), self._ca_name, self._validity, subject, self._leaf_public_key, extensions
        )
        return _sign_certificate(tbs, self._ca_key)

    def _write_leaf_certificate(self, host):
        name = "leaf-%s.pem" % hashlib.sha256(host.encode("ascii")).hexdigest()[:32]
        path = os.path.join(self.workdir, name)
        _write_private_file(path, pem_encode("CERTIFICATE", self._issue_leaf_certificate(host)))
        return path

    def leaf_files(self, host):
        """Issue the leaf certificate for host on first use and return (cert_path, key_path).

        host is a DNS name or an IP literal, with or without IPv6 brackets. ValueError is
        raised for an empty host or one with spaces, control or non-ASCII characters.
        """
        host = _normalize_host(host)
        with self._lock:
            if host not in self._leaf_cert_paths:
                self._leaf_cert_paths[host] = self._write_leaf_certificate(host)
            return self._leaf_cert_paths[host], self._leaf_key_path

    def server_context(self, host):
        """Create on first use and return the TLS server context for host.

        The context loads the leaf for host, requires TLS 1.2 or later and offers
        only the ALPN protocol http/1.1.
        """
        host = _normalize_host(host)
        with self._lock:
            if host not in self._server_contexts:
                self._server_contexts[host] = _new_server_context(*self.leaf_files(host))
            return self._server_contexts[host]


# ---------------------------------------------------------------------------------------------
# HTTP/1.1 wire handling
# ---------------------------------------------------------------------------------------------
# Pure functions over bytes (RFC 9112), plus a small buffered socket reader with deadlines.

MAX_HEAD_BYTES = 64 * 1024
MAX_CHUNK_LINE = 4096
TOKEN_RE = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
TARGET_RE = re.compile(rb"^[\x21-\x7e]+$")
FIELD_VALUE_BAD_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
HOP_BY_HOP_PROXY_HEADERS = ("proxy-authorization", "proxy-connection", "proxy-authenticate")


class ProtocolError(Exception):
    """Malformed HTTP; `status` is the response to send (400, 431, ...)."""

    def __init__(self, status, reason):
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Head:
    """A request or response head: start line parts and headers as [name, value] pairs."""

    def __init__(self, start, headers):
        self.start = start
        self.headers = headers

    def get(self, name):
        name = name.lower()
        values = [value for key, value in self.headers if key.lower() == name]
        return values[-1] if values else None

    def get_all(self, name):
        name = name.lower()
        return [value for key, value in self.headers if key.lower() == name]

    def remove(self, *names):
        lowered = {name.lower() for name in names}
        self.headers = [pair for pair in self.headers if pair[0].lower() not in lowered]

    def has_token(self, name, token):
        """Whether a comma-separated header such as Connection lists `token`."""
        token = token.lower()
        return any(part.strip().lower() == token
                   for value in self.get_all(name) for part in value.split(","))

    def serialize(self):
        lines = [" ".join(self.start)] + ["%s: %s" % (key, value) for key, value in self.headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class RequestHead(Head):
    @property
    def method(self):
        return self.start[0]

    @property
    def target(self):
        return self.start[1]

    @property
    def version(self):
        return self.start[2]


class ResponseHead(Head):
    @property
    def version(self):
        return self.start[0]

    @property
    def status(self):
        return int(self.start[1])


def _split_head_lines(data):
    text = data.replace(b"\r\n", b"\n")
    if b"\r" in text:
        raise ProtocolError(400, "bare CR in message head")
    lines = text.split(b"\n")
    while lines and lines[-1] == b"":
        lines.pop()
    if not lines:
        raise ProtocolError(400, "empty message head")
    return lines


def _parse_header_lines(lines):
    headers = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            raise ProtocolError(400, "obsolete line folding in header")
        name, colon, value = line.partition(b":")
        if not colon or not TOKEN_RE.match(name):
            raise ProtocolError(400, "malformed header line")
        value = value.strip(b" \t")
        if FIELD_VALUE_BAD_RE.search(value):
            raise ProtocolError(400, "control character in header value")
        headers.append([name.decode("latin-1"), value.decode("latin-1")])
    return headers


def parse_request_head(data):
    """Parse a request head (start line and headers, ending at the blank line)."""
    lines = _split_head_lines(data)
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not TOKEN_RE.match(parts[0]) or not TARGET_RE.match(parts[1]):
        raise ProtocolError(400, "malformed request line")
    if not re.match(rb"^HTTP/1\.[01]$", parts[2]):
        raise ProtocolError(505 if parts[2].startswith(b"HTTP/") else 400, "unsupported HTTP version")
    start = [part.decode("latin-1") for part in parts]
    return RequestHead(start, _parse_header_lines(lines[1:]))


def parse_response_head(data):
    lines = _split_head_lines(data)
    version, _, rest = lines[0].partition(b" ")
    status, _, reason = rest.partition(b" ")
    if not re.match(rb"^HTTP/1\.[01]$", version) or not re.match(rb"^[1-5][0-9][0-9]$", status):
        raise ProtocolError(502, "malformed status line from upstream")
    start = [version.decode("latin-1"), status.decode("latin-1"), reason.decode("latin-1")]
    return ResponseHead(start, _parse_header_lines(lines[1:]))


def _content_length(head):
    values = head.get_all("Content-Length")
    if not values:
        return None
    lengths = {part.strip() for value in values for part in value.split(",")}
    if len(lengths) != 1:
        raise ProtocolError(400, "conflicting Content-Length values")
    length = lengths.pop()
    if not length.isdigit() or len(length) > 18:
        raise ProtocolError(400, "invalid Content-Length")
    return int(length)


def _is_chunked(head):
    codings = [part.strip().lower() for value in head.get_all("Transfer-Encoding")
               for part in value.split(",") if part.strip()]
    if not codings:
        return False
    if codings[-1] != "chunked":
        raise ProtocolError(400, "Transfer-Encoding must end with chunked")
    return True


def request_framing(head):
    """Return ("length", n) or ("chunked", None) for a request body (RFC 9112 section 6.3)."""
    chunked = _is_chunked(head)
    length = _content_length(head)
    if chunked and length is not None:
        raise ProtocolError(400, "both Transfer-Encoding and Content-Length")
    if chunked:
        return "chunked", None
    return "length", length or 0


def response_framing(method, head):
    """Return how a response body ends: ("none"|"length"|"chunked"|"close", n)."""
    status = head.status
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return "none", 0
    if method == "CONNECT" and 200 <= status < 300:
        return "none", 0
    try:
        if _is_chunked(head):
            return "chunked", None
        length = _content_length(head)
    except ProtocolError as exc:
        raise ProtocolError(502, "upstream " + exc.reason) from None
    if length is not None:
        return "length", length
    return "close", None


def parse_chunk_size(line):
    """Parse a chunk-size line such as b"1a;ext=1\\r\\n" (RFC 9112 section 7.1)."""
    size_text = line.split(b";", 1)[0].strip(b" \t\r\n")
    if not size_text or len(size_text) > 15 or not re.match(rb"^[0-9a-fA-F]+$", size_text):
        raise ProtocolError(400, "invalid chunk size")
    return int(size_text, 16)


class ConnectionClosed(Exception):
    """The peer closed the connection before a message was complete."""


class SocketReader:
    """Buffered reads from a socket (plain or TLS) with an optional deadline per call."""

    def __init__(self, sock, timeout=None, chunk_size=256 * 1024):
        self.sock = sock
        self.timeout = timeout  # seconds per recv when a call has no deadline; None waits forever
        self.chunk_size = chunk_size
        self.buffer = b""

    def _recv(self, deadline):
        if deadline is None:
            self.sock.settimeout(self.timeout)
        else:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("deadline passed")
            self.sock.settimeout(remaining)
        return self.sock.recv(self.chunk_size)

    def read_head(self, limit=MAX_HEAD_BYTES, idle_timeout=None, header_timeout=None):
        """Return the bytes of one message head, or None on EOF before any byte.

        `idle_timeout` bounds the wait for the first byte; `header_timeout` bounds the time from
        the first byte to the end of the head, so a client trickling bytes cannot hold a thread.
        """
        started = time.monotonic()
        idle_deadline = started + idle_timeout if idle_timeout is not None else None
        head_deadline = started + header_timeout if self.buffer and header_timeout else None
        scanned = 0
        while True:
            end = self.buffer.find(b"\r\n\r\n", max(0, scanned - 3))
            if end >= 0:
                head, self.buffer = self.buffer[:end + 4], self.buffer[end + 4:]
                return head
            bare = self.buffer.find(b"\n\n", max(0, scanned - 1))
            if bare >= 0:
                head, self.buffer = self.buffer[:bare + 2], self.buffer[bare + 2:]
                return head
            if len(self.buffer) > limit:
                raise ProtocolError(431, "message head larger than %d bytes" % limit)
            scanned = len(self.buffer)
            data = self._recv(head_deadline if self.buffer else idle_deadline)
            if not data:
                if self.buffer.strip():
                    raise ConnectionClosed("connection closed inside a message head")
                return None
            # RFC 9112 section 2.2: empty lines before a request line are ignored.
            self.buffer = (self.buffer + data).lstrip(b"\r\n")
            if self.buffer and head_deadline is None and header_timeout is not None:
                head_deadline = time.monotonic() + header_timeout

    def read_line(self, limit=MAX_CHUNK_LINE, deadline=None):
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line, self.buffer = self.buffer[:end + 1], self.buffer[end + 1:]
                return line
            if len(self.buffer) > limit:
                raise ProtocolError(400, "line longer than %d bytes" % limit)
            data = self._recv(deadline)
            if not data:
                raise ConnectionClosed("connection closed inside a line")
            self.buffer += data

    def read_some(self, limit, deadline=None):
        """Return up to `limit` bytes (at least one), or b"" on EOF."""
        if self.buffer:
            data, self.buffer = self.buffer[:limit], self.buffer[limit:]
            return data
        data = self._recv(deadline)
        if len(data) > limit:
            data, self.buffer = data[:limit], data[limit:]
        return data


def relay_length(reader, sock, remaining, deadline=None):
    while remaining > 0:
        data = reader.read_some(min(remaining, reader.chunk_size), deadline)
        if not data:
            raise ConnectionClosed("connection closed %d bytes before the end of a body" % remaining)
        sock.sendall(data)
        remaining -= len(data)


def relay_chunked(reader, sock, deadline=None):
    """Copy a chunked body chunk by chunk, so each chunk reaches the peer as soon as it arrives."""
    while True:
        size = parse_chunk_size(reader.read_line(MAX_CHUNK_LINE, deadline))
        sock.sendall(b"%x\r\n" % size)
        if size == 0:
            break
        relay_length(reader, sock, size, deadline)
        if reader.read_line(MAX_CHUNK_LINE, deadline).strip(b"\r\n"):
            raise ProtocolError(400, "chunk data longer than its size")
        sock.sendall(b"\r\n")
    trailer_bytes = 0
    while True:
        line = reader.read_line(MAX_CHUNK_LINE, deadline)
        sock.sendall(line if line.endswith(b"\r\n") else line.rstrip(b"\n") + b"\r\n")
        if not line.strip(b"\r\n"):
            return
        trailer_bytes += len(line)
        if trailer_bytes > MAX_HEAD_BYTES:
            raise ProtocolError(431, "chunked trailer too large")


def relay_until_close(reader, sock):
    while True:
        data = reader.read_some(reader.chunk_size)
        if not data:
            return
        sock.sendall(data)


def relay_body(reader, sock, framing, deadline=None):
    kind, length = framing
    if kind == "length":
        relay_length(reader, sock, length, deadline)
    elif kind == "chunked":
        relay_chunked(reader, sock, deadline)
    elif kind == "close":
        relay_until_close(reader, sock)


def simple_response(status, reason, body, extra_headers=()):
    """Build a complete small response with a text body (never holding a secret)."""
    payload = body.encode("utf-8")
    headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(payload))),
               ("Connection", "close")] + list(extra_headers)
    lines = ["HTTP/1.1 %d %s" % (status, reason)] + ["%s: %s" % pair for pair in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


def split_host_port(authority, default_port):
    """Split "host:port", "[v6]:port" or "host" into (normalized host, port)."""
    authority = authority.strip()
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise ProtocolError(400, "malformed IPv6 literal")
        host, rest = authority[1:end], authority[end + 1:]
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ProtocolError(400, "malformed authority")
    elif authority.count(":") == 1:
        host, _, port_text = authority.partition(":")
    else:
        host, port_text = authority, ""
    if port_text and (not port_text.isdigit() or not 0 < int(port_text) < 65536):
        raise ProtocolError(400, "invalid port in %r" % authority)
    host = normalize_host(host)
    if not host or not re.match(r"^[A-Za-z0-9._:-]+$", host):
        raise ProtocolError(400, "invalid host in %r" % authority)
    return host, int(port_text) if port_text else default_port


def format_authority(host, port):
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


# ---------------------------------------------------------------------------------------------
# proxy
# ---------------------------------------------------------------------------------------------


def usable_record(record):
    """A record the proxy can inject: connected, or expired with a refresh token."""
    status = record_status(record)
    return status == STATUS_CONNECTED or (status == STATUS_EXPIRED and record.get("refresh_token"))


class Broker:
    """Which credential goes to which host and path during one run.

    The route table is rebuilt when the vault file changes, so logins made during a run take
    effect on the next CONNECT.
    """

    def __init__(self, home, catalog, vault, connection_overrides=None, refresher=None):
        self.home = home
        self.catalog = catalog
        self.vault = vault
        self.overrides = dict(connection_overrides or {})
        self.refresher = refresher
        self.records = {}
        self.table = RouteTable([])
        self._stamp = None
        self._lock = threading.Lock()
        self._oauth_endpoints = set()
        for provider in catalog:
            self._oauth_endpoints |= provider.oauth_endpoints()
        self.reload(force=True)

    def _vault_stamp(self):
        try:
            info = os.stat(self.vault.path)
        except FileNotFoundError:
            return None
        return info.st_mtime_ns, info.st_size, info.st_ino

    def reload(self, force=False):
        stamp = self._vault_stamp()
        if not force and stamp == self._stamp:
            return
        with self._lock:
            if not force and stamp == self._stamp:
                return
            try:
                document = self.vault.load()
            except AuthsomeError as exc:
                if force:
                    raise
                log.warning("keeping the previous routes: %s", exc)
                return
            self._apply(document, stamp)

    def _apply(self, document, stamp):
        records, routes = {}, []
        for provider in self.catalog:
            record = find_record(document, provider.name, self.overrides.get(provider.name))
            if record is None or not usable_record(record):
                continue
            register_record_secrets(record)
            records[provider.name] = record
            routes.extend(provider.routes)
        self.records = records
        self.table = RouteTable(routes, self._oauth_endpoints)
        self._stamp = stamp

    def credential_header(self, provider_name):
        """Return (header name, value, connection) for a provider, or None when unusable."""
        record = self.records.get(provider_name)
        if record is None:
            return None
        provider = self.catalog.get(provider_name)
        if self.refresher is not None and record.get("refresh_token"):
            record = self.refresher(provider, record) or record
        secret = record_secret(record)
        if not secret or record_status(record) != STATUS_CONNECTED:
            return None
        return provider.header_name, provider.header_value(secret), record["connection"]


class ProxyLimits:
    """Timeouts (seconds) and caps of the run proxy."""

    def __init__(self, header_timeout=30.0, idle_timeout=120.0, connect_timeout=30.0,
                 upstream_timeout=3600.0, max_connections=512, expect_wait=1.0):
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.upstream_timeout = upstream_timeout
        self.max_connections = max_connections
        self.expect_wait = expect_wait


def parse_connect_to(entries):
    """Parse HOST:PORT=HOST2:PORT2 entries into {(host, port): (host2, port2)}."""
    mapping = {}
    for entry in entries:
        source, equals, target = entry.partition("=")
        try:
            if not equals:
                raise ProtocolError(400, "missing =")
            mapping[split_host_port(source, 443)] = split_host_port(target, 443)
        except ProtocolError:
            raise UsageError("invalid --connect-to %r: expected HOST:PORT=HOST2:PORT2" % entry) from None
    return mapping


class Upstream:
    """One connection from the proxy to an origin, TLS-verified unless `use_tls` is False."""

    def __init__(self, proxy, host, port, use_tls=True):
        self.host, self.port = host, port
        dial_host, dial_port = proxy.connect_to.get((host, port), (host, port))
        raw = socket.create_connection((dial_host, dial_port), timeout=proxy.limits.connect_timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if use_tls:
                raw = proxy.upstream_context.wrap_socket(raw, server_hostname=host)
            raw.settimeout(proxy.limits.upstream_timeout)
        except BaseException:
            raw.close()
            raise
        self.sock = raw
        self.reader = SocketReader(raw, proxy.limits.upstream_timeout)

    def is_stale(self):
        """An idle kept-alive connection that became readable was closed by the origin."""
        if self.reader.buffer:
            return True
        import select
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def close(self):
        with contextlib.suppress(OSError):
            self.sock.close()


def describe_upstream_error(host, port, exc):
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = "certificate verification failed (%s)" % (exc.verify_message or exc.reason)
    elif isinstance(exc, ssl.SSLError):
        reason = "TLS handshake failed (%s)" % (exc.reason or exc.__class__.__name__)
    elif isinstance(exc, socket.timeout):
        reason = "timed out"
    elif isinstance(exc, socket.gaierror):
        reason = "name resolution failed"
    else:
        reason = getattr(exc, "strerror", None) or exc.__class__.__name__
    return "authsome: could not reach %s: %s\n" % (format_authority(host, port), reason)


class ProxyServer:
    """The threaded forward proxy of one `authsome run`, listening on 127.0.0.1."""

    def __init__(self, broker, ca, connect_to=None, limits=None, deny_unmatched=False,
                 upstream_context=None):
        self.broker = broker
        self.ca = ca
        self.connect_to = connect_to or {}
        self.limits = limits or ProxyLimits()
        self.deny_unmatched = deny_unmatched
        self.token = secrets.token_urlsafe(24)
        self._upstream_context = upstream_context
        self._context_ready = threading.Event()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(256)
        self.port = self.listener.getsockname()[1]
        self.url = "http://authsome:%s@127.0.0.1:%d" % (self.token, self.port)
        self._active = 0
        self._active_lock = threading.Lock()
        self._closed = False
        self._auth_value = b64encode(("authsome:%s" % self.token).encode())

    @property
    def upstream_context(self):
        self._context_ready.wait()
        return self._upstream_context

    def _load_upstream_context(self):
        # Loading the system trust store takes tens of milliseconds, so it happens in the
        # background while the child starts. OpenSSL also honours $SSL_CERT_FILE here.
        try:
            if self._upstream_context is None:
                context = ssl.create_default_context()
                context.set_alpn_protocols(["http/1.1"])
                self._upstream_context = context
        finally:
            self._context_ready.set()

    def start(self):
        threading.Thread(target=self._load_upstream_context, daemon=True).start()
        threading.Thread(target=self._accept_loop, name="authsome-accept", daemon=True).start()

    def close(self):
        self._closed = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        with contextlib.suppress(OSError):
            self.listener.close()

    def _accept_loop(self):
        while not self._closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                if self._closed:
                    return
                time.sleep(0.05)  # e.g. EMFILE: back off instead of spinning
                continue
            with self._active_lock:
                full = self._active >= self.limits.max_connections
                if not full:
                    self._active += 1
            if full:
                self._reject_busy(conn)
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _reject_busy(self, conn):
        with contextlib.suppress(OSError):
            conn.settimeout(1.0)
            conn.sendall(simple_response(503, "Service Unavailable",
                                         "authsome: too many simultaneous connections\n"))
        conn.close()

    def _serve(self, conn):
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            ClientSession(self, conn).run()
        except (OSError, ConnectionClosed, ssl.SSLError) as exc:
            log.debug("client connection ended: %s", exc.__class__.__name__)
        except Exception:
            log.exception("unexpected error in a proxy connection")
        finally:
            with contextlib.suppress(OSError):
                conn.close()
            with self._active_lock:
                self._active -= 1

    def authorized(self, head):
        value = head.get("Proxy-Authorization") or ""
        scheme, _, credentials = value.partition(" ")
        if scheme.lower() != "basic":
            return False
        return hmac.compare_digest(credentials.strip().encode(), self._auth_value.encode())


class ClientSession:
    """One client connection to the proxy: the first request decides CONNECT, tunnel or forward."""

    def __init__(self, proxy, conn):
        self.proxy = proxy
        self.limits = proxy.limits
        self.conn = conn
        self.reader = SocketReader(conn, proxy.limits.idle_timeout)

    def run(self):
        try:
            data = self.reader.read_head(MAX_HEAD_BYTES, self.limits.header_timeout,
                                         self.limits.header_timeout)
            if data is None:
                return
            head = parse_request_head(data)
        except ProtocolError as exc:
            return self._send_error(exc.status, exc.reason)
        except socket.timeout:
            return self._send_error(408, "timed out waiting for the request head")
        if not self.proxy.authorized(head):
            return self.conn.sendall(simple_response(
                407, "Proxy Authentication Required", "authsome: proxy credentials missing or wrong\n",
                [("Proxy-Authenticate", 'Basic realm="authsome"')]))
        if head.method == "CONNECT":
            return self._connect(head)
        target = head.target.lower()
        if target.startswith("http://"):
            return self._forward_absolute(head, use_tls=False)
        if target.startswith("https://"):
            return self._forward_absolute(head, use_tls=True)
        self._send_error(400, "expected CONNECT or an absolute http:// or https:// URL")

    def _send_error(self, status, reason):
        from http.client import responses
        with contextlib.suppress(OSError):
            self.conn.sendall(simple_response(status, responses.get(status, "Error"),
                                              "authsome: %s\n" % reason))

    def _connect(self, head):
        try:
            host, port = split_host_port(head.target, 443)
        except ProtocolError as exc:
            return self._send_error(400, exc.reason)
        self.proxy.broker.reload()
        if self.proxy.broker.table.intercepts(host, port):
            return self._intercept(host, port)
        if self.proxy.deny_unmatched:
            log.info("CONNECT %s denied: no credential route", format_authority(host, port))
            return self._send_error(403, "%s has no credential and --deny-unmatched is set"
                                    % format_authority(host, port))
        self._tunnel(host, port)

    def _tunnel(self, host, port):
        dial_host, dial_port = self.proxy.connect_to.get((host, port), (host, port))
        try:
            upstream = socket.create_connection((dial_host, dial_port),
                                                timeout=self.limits.connect_timeout)
        except OSError as exc:
            return self.conn.sendall(simple_response(502, "Bad Gateway",
                                                     describe_upstream_error(host, port, exc)))
        log.info("CONNECT %s tunnelled (no credential route)", format_authority(host, port))
        try:
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.conn.sendall(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            if self.reader.buffer:
                upstream.sendall(self.reader.buffer)
                self.reader.buffer = b""
            pump_sockets(self.conn, upstream)
        finally:
            upstream.close()

    def _intercept(self, host, port):
        if self.reader.buffer:
            return self._send_error(400, "data sent before the CONNECT response")
        self.conn.sendall(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        context = self.proxy.ca.server_context(host)
        self.conn.settimeout(self.limits.header_timeout)
        tls = context.wrap_socket(self.conn, server_side=True)
        try:
            reader = SocketReader(tls, self.limits.idle_timeout)
            Exchange(self.proxy, tls, reader, host, port, intercepted=True).serve()
        finally:
            with contextlib.suppress(OSError):
                tls.close()

    def _forward_absolute(self, head, use_tls):
        from urllib.parse import urlsplit
        try:
            parts = urlsplit(head.target)
            host, port = split_host_port(parts.netloc.rpartition("@")[2], 443 if use_tls else 80)
        except (ValueError, ProtocolError):
            return self._send_error(400, "malformed absolute URL")
        if self.proxy.deny_unmatched and not (use_tls and self.proxy.broker.table.intercepts(host, port)):
            return self._send_error(403, "%s has no credential and --deny-unmatched is set"
                                    % format_authority(host, port))
        exchange = Exchange(self.proxy, self.conn, self.reader, host, port, intercepted=use_tls,
                            use_tls=use_tls)
        exchange.serve(first_head=head)


def pump_sockets(first, second):
    """Copy bytes both ways between two plain sockets until both directions are closed."""
    import selectors
    peers = {first: second, second: first}
    for sock in peers:
        sock.settimeout(None)
    selector = selectors.DefaultSelector()
    try:
        for sock in peers:
            selector.register(sock, selectors.EVENT_READ)
        open_directions = 2
        while open_directions:
            for key, _ in selector.select():
                source = key.fileobj
                try:
                    data = source.recv(256 * 1024)
                except (ConnectionResetError, ConnectionAbortedError):
                    return
                if not data:
                    selector.unregister(source)
                    open_directions -= 1
                    with contextlib.suppress(OSError):
                        peers[source].shutdown(socket.SHUT_WR)
                    continue
                peers[source].sendall(data)
    finally:
        selector.close()


class Exchange:
    """Requests from one client stream, forwarded to one origin, with the credential injected
    where a route matches (`intercepted`); plain http:// forwarding never injects."""

    def __init__(self, proxy, client, reader, host, port, intercepted, use_tls=True):
        self.proxy = proxy
        self.limits = proxy.limits
        self.client = client
        self.reader = reader
        self.host, self.port = host, port
        self.intercepted = intercepted
        self.use_tls = use_tls
        self.upstream = None

    def serve(self, first_head=None):
        try:
            keep_alive = True
            head = first_head
            while keep_alive:
                if head is None:
                    head = self._next_head()
                    if head is None:
                        return
                keep_alive = self._handle(head)
                head = None
        finally:
            if self.upstream:
                self.upstream.close()

    def _next_head(self):
        try:
            data = self.reader.read_head(MAX_HEAD_BYTES, self.limits.idle_timeout,
                                         self.limits.header_timeout)
        except socket.timeout:
            if self.reader.buffer:
                self._send_error(408, "timed out waiting for the request head")
            return None
        except ProtocolError as exc:
            self._send_error(exc.status, exc.reason)
            return None
        if data is None:
            return None
        try:
            return parse_request_head(data)
        except ProtocolError as exc:
            self._send_error(exc.status, exc.reason)
            return None

    def _send_error(self, status, reason):
        from http.client import responses
        with contextlib.suppress(OSError):
            self.client.sendall(simple_response(status, responses.get(status, "Error"),
                                                "authsome: %s\n" % reason))

    def _handle(self, head):
        """Forward one request and its response; returns whether the client stays connected."""
        try:
            framing = request_framing(head)
            self._check_target(head)
        except ProtocolError as exc:
            self._send_error(exc.status, exc.reason)
            return False
        path = normalize_request_path(head.target)
        injected = self._inject(head) if self.intercepted else (None, "plain http")
        head.remove(*HOP_BY_HOP_PROXY_HEADERS)
        try:
            upstream = self._upstream()
        except (OSError, ssl.SSLError) as exc:
            self._log(head, path, 502, injected)
            self.client.sendall(simple_response(502, "Bad Gateway",
                                                describe_upstream_error(self.host, self.port, exc)))
            return False
        try:
            status, keep_alive = self._exchange(head, framing, upstream)
        except ProtocolError as exc:
            self._log(head, path, exc.status, injected)
            self._send_error(exc.status, exc.reason)
            self._drop_upstream()
            return False
        except (ConnectionClosed, socket.timeout, OSError, ssl.SSLError) as exc:
            self._log(head, path, 502, injected)
            if not getattr(self, "_response_started", False):
                self.client.sendall(simple_response(
                    502, "Bad Gateway", describe_upstream_error(self.host, self.port, exc)))
            self._drop_upstream()
            return False
        self._log(head, path, status, injected)
        return keep_alive

    def _check_target(self, head):
        """Reject a request whose target or Host names another host than this stream's origin."""
        target = head.target
        if target.lower().startswith(("http://", "https://")):
            from urllib.parse import urlsplit
            authority = urlsplit(target).netloc.rpartition("@")[2]
            suffix = target.split("://", 1)[1]
            head.start[1] = "/" + suffix.partition("/")[2] if "/" in suffix else "/"
            if not self._same_origin(authority):
                raise ProtocolError(421, "request names another host than the connection")
            if not head.get("Host"):
                head.headers.insert(0, ["Host", authority])
        elif not target.startswith("/") and not (target == "*" and head.method == "OPTIONS"):
            raise ProtocolError(400, "malformed request target")
        hosts = head.get_all("Host")
        if len(hosts) != 1:
            raise ProtocolError(400, "a request needs exactly one Host header")
        if not self._same_origin(hosts[0]):
            raise ProtocolError(421, "Host header names another host than the connection")

    def _same_origin(self, authority):
        default_port = 443 if self.use_tls else 80
        try:
            host, port = split_host_port(authority, default_port)
        except ProtocolError:
            return False
        return host == self.host and port == self.port

    def _inject(self, head):
        broker = self.proxy.broker
        route, reason = broker.table.resolve(self.host, self.port, head.target)
        if route is None:
            if reason.startswith("tie"):
                log.warning("no credential injected for %s%s: %s", self.host,
                            normalize_request_path(head.target), reason)
            return None, reason
        header = broker.credential_header(route.provider)
        if header is None:
            return None, "%s credential is not usable" % route.provider
        name, value, connection = header
        head.remove(name)
        head.headers.append([name, value])
        return "%s/%s" % (route.provider, connection), "injected"

    def _upstream(self):
        if self.upstream is not None and self.upstream.is_stale():
            self._drop_upstream()
        if self.upstream is None:
            self.upstream = Upstream(self.proxy, self.host, self.port, self.use_tls)
        return self.upstream

    def _drop_upstream(self):
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None

    def _exchange(self, head, framing, upstream):
        """Send the request, relay the response; returns (status, keep the client connection)."""
        self._response_started = False
        client_closes = head.has_token("Connection", "close") or (
            head.version == "HTTP/1.0" and not head.has_token("Connection", "keep-alive"))
        expects_continue = head.has_token("Expect", "100-continue") and framing != ("length", 0)
        upstream.sock.sendall(head.serialize())
        response = None
        if expects_continue:
            response = self._await_continue(upstream)
        if response is None or response.status == 100:
            if response is not None:
                self._response_started = True
                self.client.sendall(response.serialize())
            relay_body(self.reader, upstream.sock, framing)
            response = self._read_final_response(upstream)
        elif response.status >= 200:
            # The origin answered without the body; the client may still send it, so this
            # connection cannot carry another request.
            client_closes = True
        return self._relay_response(head, response, upstream, client_closes)

    def _await_continue(self, upstream):
        try:
            data = upstream.reader.read_head(MAX_HEAD_BYTES, self.limits.expect_wait,
                                             self.limits.header_timeout)
        except socket.timeout:
            upstream.sock.settimeout(self.limits.upstream_timeout)
            return None  # the origin ignores Expect: send the body anyway, as curl does
        upstream.sock.settimeout(self.limits.upstream_timeout)
        if data is None:
            raise ConnectionClosed("origin closed the connection")
        response = parse_response_head(data)
        while 100 < response.status < 200 and response.status != 101:
            self._response_started = True
            self.client.sendall(response.serialize())
            response = self._read_response_head(upstream)
        return response

    def _read_response_head(self, upstream):
        data = upstream.reader.read_head(MAX_HEAD_BYTES, self.limits.upstream_timeout,
                                         self.limits.header_timeout)
        if data is None:
            raise ConnectionClosed("origin closed the connection before responding")
        return parse_response_head(data)

    def _read_final_response(self, upstream):
        response = self._read_response_head(upstream)
        while 100 <= response.status < 200 and response.status != 101:
            self._response_started = True
            self.client.sendall(response.serialize())
            response = self._read_response_head(upstream)
        return response

    def _relay_response(self, head, response, upstream, client_closes):
        self._response_started = True
        if response.status == 101:
            self.client.sendall(response.serialize())
            relay_upgraded(self.client, self.reader, upstream)
            self._drop_upstream()
            return 101, False
        framing = response_framing(head.method, response)
        self.client.sendall(response.serialize())
        relay_body(upstream.reader, self.client, framing)
        origin_closes = framing[0] == "close" or response.has_token("Connection", "close") or (
            response.version == "HTTP/1.0" and not response.has_token("Connection", "keep-alive"))
        if origin_closes:
            self._drop_upstream()
        return response.status, not (client_closes or framing[0] == "close")

    def _log(self, head, path, status, injected):
        credential, reason = injected
        outcome = "injected %s" % credential if credential else "no credential (%s)" % reason
        log.info("%s %s %s %s %s", head.method, format_authority(self.host, self.port), path,
                 status, outcome)
        if self.intercepted:
            provider, _, connection = (credential or "").partition("/")
            audit(self.proxy.broker.home, "inject" if credential else "miss",
                  provider=provider or None, connection=connection or None,
                  host=self.host, method=head.method, path=path, outcome=status,
                  reason=None if credential else reason)


def relay_upgraded(client, client_reader, upstream):
    """After 101 Switching Protocols, copy raw bytes both ways until either side closes."""

    def copy(source_reader, source, destination):
        try:
            source_reader.timeout = None
            while True:
                data = source_reader.read_some(256 * 1024)
                if not data:
                    break
                destination.sendall(data)
        except (OSError, ssl.SSLError):
            pass
        finally:
            with contextlib.suppress(OSError, ssl.SSLError):
                destination.shutdown(socket.SHUT_WR)

    upward = threading.Thread(target=copy, args=(client_reader, client, upstream.sock), daemon=True)
    upward.start()
    copy(upstream.reader, upstream.sock, client)
    upward.join()


# ---------------------------------------------------------------------------------------------
# child process runner
# ---------------------------------------------------------------------------------------------

CA_VARIABLES = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO",
                "AWS_CA_BUNDLE", "PIP_CERT", "NPM_CONFIG_CAFILE")
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")
AUTHSOME_SECRET_VARIABLES = ("AUTHSOME_MASTER_KEY", "AUTHSOME_PASSPHRASE")
SYSTEM_CA_FILES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt",
                   "/etc/ssl/ca-bundle.pem", "/etc/ssl/cert.pem", "/usr/local/etc/openssl/cert.pem")
FORWARDED_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")


def system_ca_file():
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.openssl_cafile, paths.cafile) + SYSTEM_CA_FILES:
        if candidate and os.path.isfile(candidate):
            return candidate
    return None


def build_ca_bundle(parent_env, run_ca_pem):
    """Concatenate the system roots, every CA file the parent pointed at, and the run's CA."""
    sources = [system_ca_file()] + [parent_env.get(name) for name in CA_VARIABLES]
    sources.append(parent_env.get("NODE_EXTRA_CA_CERTS"))
    parts, seen = [], set()
    for path in sources:
        if not path or not os.path.isfile(path):
            continue
        real = os.path.realpath(path)
        if real in seen:
            continue
        seen.add(real)
        with contextlib.suppress(OSError):
            with open(real, "rb") as handle:
                parts.append(handle.read().rstrip(b"\n") + b"\n")
    parts.append(run_ca_pem)
    return b"".join(parts)


def representative_host(route):
    """Return a host name a route matches, used to test NO_PROXY entries against it."""
    if not route.is_regex:
        return route.host
    # Patterns written as ^(label\.)*domain\.tld$ match their bare domain.
    text = re.sub(r"\(\[[^\]]*\][+*]\\\.\)[*?]", "", route.pattern.pattern).strip("^$")
    text = text.replace("\\.", ".").replace("\\-", "-")
    return text if route.pattern.fullmatch(text) else None


def no_proxy_entry_covers(entry, host):
    entry = entry.strip().lower()
    if entry == "*":
        return True
    entry = entry.lstrip("*").lstrip(".").split(":")[0]
    return bool(entry) and (host == entry or host.endswith("." + entry))


def child_no_proxy(parent_env, routes, warn):
    """Merge the inherited NO_PROXY entries with loopback, dropping entries that cover a
    brokered host (they would let the child skip the proxy for it)."""
    inherited = []
    for name in ("NO_PROXY", "no_proxy"):
        for entry in (parent_env.get(name) or "").split(","):
            if entry.strip() and entry.strip() not in inherited:
                inherited.append(entry.strip())
    hosts = [host for host in (representative_host(route) for route in routes) if host]
    kept = []
    for entry in inherited:
        covered = [host for host in hosts if no_proxy_entry_covers(entry, host)]
        if covered:
            warn("NO_PROXY entry %r dropped: it would send %s around the proxy" % (entry, covered[0]))
        else:
            kept.append(entry)
    for loopback in ("localhost", "127.0.0.1", "::1"):
        if loopback not in kept:
            kept.append(loopback)
    return ",".join(kept)


def child_environment(parent_env, proxy_url, bundle_path, run_ca_path, broker, warn):
    env = {name: value for name, value in parent_env.items()
           if name not in AUTHSOME_SECRET_VARIABLES}
    for name in PROXY_VARIABLES:
        env[name] = proxy_url
    no_proxy = child_no_proxy(parent_env, broker.table.exact_routes() + broker.table.regex, warn)
    env["NO_PROXY"] = env["no_proxy"] = no_proxy
    env["NODE_USE_ENV_PROXY"] = "1"
    for name in CA_VARIABLES:
        env[name] = bundle_path
    env["NODE_EXTRA_CA_CERTS"] = run_ca_path
    for provider_name, record in broker.records.items():
        provider = broker.catalog.get(provider_name)
        for variable, source in provider.export.items():
            if source == "BASE_URL":
                base_url = record.get("base_url") or provider.oauth.get("base_url")
                if base_url:
                    env[variable] = base_url
            else:
                env[variable] = PLACEHOLDER
    return env


def exit_code_of(returncode):
    """Map a Popen return code to a shell-style exit code (128+N after signal N)."""
    return 128 - returncode if returncode < 0 else returncode


def signal_came_from_terminal(signum):
    """Whether a terminal keyboard signal also reached the child (same foreground group)."""
    import signal
    if signum not in (signal.SIGINT, signal.SIGQUIT):
        return False
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (OSError, AttributeError, ValueError):
        return False


def run_child(command, env):
    """Start `command` with `env`, forward signals to it, and return its exit code."""
    import signal
    import subprocess
    try:
        child = subprocess.Popen(command, env=env)
    except FileNotFoundError:
        raise AuthsomeError("command not found: %s" % command[0], code=127) from None
    except PermissionError:
        raise AuthsomeError("command is not executable: %s" % command[0], code=126) from None

    def forward(signum, frame):
        # NOTE: a signal sent with kill to a foreground authsome in a terminal is not forwarded
        # for INT and QUIT, because the terminal already delivered it to the child's group.
        if not signal_came_from_terminal(signum):
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    previous = {}
    for name in FORWARDED_SIGNALS:
        signum = getattr(signal, name, None)
        if signum is not None:
            previous[signum] = signal.signal(signum, forward)
    try:
        return exit_code_of(child.wait())
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_with_proxy(command, home=None, connection_overrides=None, connect_to=(),
                   deny_unmatched=False, limits=None, out=None):
    """Run `command` behind a fresh proxy and return its exit code."""
    import tempfile
    out = out or sys.stderr
    home = home or home_dir()
    if not command:
        raise UsageError("nothing to run: give a command after --, e.g. authsome run -- python3 agent.py")
    catalog = load_catalog(home)
    vault = Vault(home, passphrase_prompt=prompt_hidden)
    overrides = parse_connection_overrides(connection_overrides or (), catalog, vault)
    mapping = parse_connect_to(list(connect_to) + [
        entry for entry in os.environ.get("AUTHSOME_CONNECT_TO", "").split(",") if entry.strip()])
    broker = Broker(home, catalog, vault, overrides, refresher=token_refresher(home, vault))
    workdir = tempfile.mkdtemp(prefix="authsome-run-")  # mkdtemp makes the folder 0700
    try:
        ca = CertificateAuthority(workdir)
        run_ca_path = os.path.join(workdir, "run-ca.pem")
        bundle_path = os.path.join(workdir, "ca-bundle.pem")
        _write_private_file(run_ca_path, ca.ca_cert_pem)
        _write_private_file(bundle_path, build_ca_bundle(os.environ, ca.ca_cert_pem))
        proxy = ProxyServer(broker, ca, mapping, limits or limits_from_environment(),
                            deny_unmatched)
        proxy.start()
        warn = lambda message: out.write("warning: %s\n" % message)
        env = child_environment(os.environ, proxy.url, bundle_path, run_ca_path, broker, warn)
        log.info("proxy on 127.0.0.1:%d; credentials for: %s", proxy.port,
                 ", ".join(sorted(broker.records)) or "none")
        try:
            return run_child(command, env)
        finally:
            proxy.close()
    finally:
        import shutil
        shutil.rmtree(workdir, ignore_errors=True)


def limits_from_environment():
    """Read optional AUTHSOME_PROXY_* overrides of the proxy timeouts (seconds) and caps."""
    names = {"AUTHSOME_PROXY_HEADER_TIMEOUT": "header_timeout",
             "AUTHSOME_PROXY_IDLE_TIMEOUT": "idle_timeout",
             "AUTHSOME_PROXY_CONNECT_TIMEOUT": "connect_timeout",
             "AUTHSOME_PROXY_MAX_CONNECTIONS": "max_connections"}
    values = {}
    for variable, field in names.items():
        text = os.environ.get(variable)
        if text:
            try:
                values[field] = int(text) if field == "max_connections" else float(text)
            except ValueError:
                raise UsageError("%s must be a number, got %r" % (variable, text)) from None
    return ProxyLimits(**values)


def parse_connection_overrides(entries, catalog, vault):
    """Parse PROVIDER=CONNECTION pairs of `run --connection` and check that each exists."""
    overrides = {}
    document = vault.load() if entries else None
    for entry in entries:
        provider_name, equals, connection = entry.partition("=")
        if not equals or not provider_name or not connection:
            raise UsageError("invalid --connection %r: expected PROVIDER=CONNECTION, e.g. g2=team"
                             % entry)
        catalog.get(provider_name)
        if find_record(document, provider_name, connection) is None:
            raise NotFoundError("%s has no connection named %r; see: authsome list"
                                % (provider_name, connection))
        overrides[provider_name] = connection
    return overrides


def token_refresher(home, vault):
    """Return the Broker's hook that refreshes OAuth access tokens (None until OAuth exists)."""
    return None


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
# Each command parses its arguments, calls one function below (tests call them too) and prints.


class Context:
    """What every command needs: the home, the catalog and the vault, opened lazily."""

    def __init__(self, home=None, err=None):
        self.home = home or home_dir()
        self.err = err or sys.stderr
        self._catalog = None
        self.vault = Vault(self.home, passphrase_prompt=prompt_hidden)

    @property
    def catalog(self):
        if self._catalog is None:
            self._catalog = load_catalog(self.home)
            for problem in self._catalog.problems:
                self.err.write("warning: skipped %s\n" % problem)
        return self._catalog

    def record(self, provider_name, connection=None):
        """Return the record of (provider, connection), or raise the right not-found error."""
        provider = self.catalog.get(provider_name)
        document = self.vault.load()
        record = find_record(document, provider.name, connection)
        if record is None:
            if connection and document["credentials"].get(provider.name):
                raise NotFoundError("%s has no connection named %r; see: authsome list"
                                    % (provider.name, connection))
            raise CredentialError("%s is not connected%s; run: authsome login %s%s" % (
                provider.name, " (connection %s)" % connection if connection else "",
                provider.name, " --connection %s" % connection if connection else ""))
        return record


def get_credential(ctx, provider_name, connection=None, field=None, show_secret=False):
    """Return the public view of a record, or one field of it."""
    if field == "status":
        try:
            record = ctx.record(provider_name, connection)
        except CredentialError:
            return STATUS_NOT_CONNECTED
        return record_status(record)
    record = ctx.record(provider_name, connection)
    shown = public_record(record, show_secret)
    if field is None:
        return shown
    if field not in shown:
        raise UsageError("record of %s has no field %r; fields: %s"
                         % (provider_name, field, ", ".join(sorted(shown))))
    return shown[field]


def logout_connection(ctx, provider_name, connection=None):
    """Remove one local credential (revoking OAuth tokens remotely where possible)."""
    provider = ctx.catalog.get(provider_name)
    record = ctx.record(provider.name, connection)
    revoke_remote(ctx, provider, record)

    def mutate(document):
        drop_record(document, provider.name, record["connection"])

    ctx.vault.update(mutate)
    audit(ctx.home, "logout", provider=provider.name, connection=record["connection"])
    return {"provider": provider.name, "connection": record["connection"], "removed": True}


def revoke_provider(ctx, provider_name):
    """Revoke and remove every connection of a provider and its OAuth client record."""
    provider = ctx.catalog.get(provider_name)
    document = ctx.vault.load()
    connections = sorted((document["credentials"].get(provider.name) or {}).values(),
                         key=lambda record: record["connection"])
    for record in connections:
        revoke_remote(ctx, provider, record)

    def mutate(latest):
        latest["credentials"].pop(provider.name, None)
        latest["defaults"].pop(provider.name, None)
        latest["clients"].pop(provider.name, None)

    ctx.vault.update(mutate)
    audit(ctx.home, "revoke", provider=provider.name)
    return {"provider": provider.name, "removed_connections": [r["connection"] for r in connections]}


def remove_provider(ctx, provider_name):
    """Revoke the provider and also delete its user definition file, if any."""
    result = revoke_provider(ctx, provider_name)
    path = os.path.join(ctx.home, "providers", "%s.json" % provider_name)
    result["removed_definition"] = None
    if os.path.exists(path):
        os.unlink(path)
        result["removed_definition"] = path
    return result


def revoke_remote(ctx, provider, record):
    """Revoke an OAuth token at the provider (RFC 7009); API keys have nothing to revoke."""
    return None


def list_providers(ctx):
    document = ctx.vault.load()
    rows = []
    for provider in ctx.catalog:
        connections = document["credentials"].get(provider.name) or {}
        default = default_connection_name(document, provider.name)
        rows.append({
            "name": provider.name, "display_name": provider.display_name,
            "auth_type": provider.auth_type, "flow": provider.flow, "source": provider.source,
            "connections": [{"connection": name, "status": record_status(record),
                             "default": name == default, "expires_at": record.get("expires_at")}
                            for name, record in sorted(connections.items())],
        })
    return rows


def inspect_provider(ctx, provider_name):
    return ctx.catalog.get(provider_name).data


def register_provider(ctx, path, force=False):
    provider = load_provider_file(path, source=path)
    folder = os.path.join(ctx.home, "providers")
    ensure_private_dir(ctx.home)
    ensure_private_dir(folder)
    destination = os.path.join(folder, "%s.json" % provider.name)
    if os.path.exists(destination) and not force:
        raise UsageError("%s already exists; use --force to replace it" % destination)
    payload = json.dumps(provider.data, indent=2).encode("utf-8") + b"\n"
    write_file_atomic(destination, payload)
    return {"provider": provider.name, "path": destination}


def set_default_connection(ctx, provider_name, connection):
    ctx.record(provider_name, connection)

    def mutate(document):
        document["defaults"][provider_name] = connection

    ctx.vault.update(mutate)
    return {"provider": provider_name, "default": connection}


def export_variables(ctx, provider_name=None, connection=None):
    """Return {VARIABLE: value} with real secrets for one or all connected providers."""
    document = ctx.vault.load()
    names = [ctx.catalog.get(provider_name).name] if provider_name else sorted(
        document["credentials"])
    variables = {}
    for name in names:
        provider = ctx.catalog.get(name)
        record = ctx.record(name, connection) if provider_name else find_record(document, name)
        if record is None or record_status(record) != STATUS_CONNECTED:
            if provider_name:
                raise CredentialError("%s credential is %s; run: authsome login %s"
                                      % (name, record_status(record), name))
            continue
        for variable, source in provider.export.items():
            value = {"API_KEY": record.get("api_key"), "ACCESS_TOKEN": record.get("access_token"),
                     "BASE_URL": record.get("base_url") or provider.oauth.get("base_url")}[source]
            if value:
                variables[variable] = value
    return variables


def shell_quote(value):
    import shlex
    return shlex.quote(value)


def format_export(variables, output_format):
    if output_format == "json":
        return json.dumps(variables, indent=2, sort_keys=True)
    keyword = "export " if output_format == "shell" else ""
    return "\n".join("%s%s=%s" % (keyword, name, shell_quote(value))
                     for name, value in sorted(variables.items()))


def vault_summary(ctx):
    document = ctx.vault.load() if ctx.vault.exists() else empty_document()
    count = sum(len(connections) for connections in document["credentials"].values())
    return {"home": ctx.home, "vault": ctx.vault.path,
            "vault_exists": ctx.vault.exists(),
            "key_protection": ctx.vault.kind() or "none yet", "connections": count,
            "providers": len(ctx.catalog.providers), "version": __version__}


def init_vault(ctx, passphrase=None):
    if ctx.vault.exists():
        raise UsageError("vault %s already exists; to change its protection use: authsome "
                         "passphrase" % ctx.vault.path)
    if passphrase:
        ctx.vault.rewrap(KEK_PASSPHRASE, passphrase)
    else:
        ctx.vault.update(lambda document: None)
    return {"vault": ctx.vault.path, "key_protection": ctx.vault.kind()}


def change_passphrase(ctx, new_passphrase=None, remove=False):
    """Set, change or remove the vault passphrase; only the data key is re-wrapped."""
    if remove:
        if ctx.vault.kind() != KEK_PASSPHRASE:
            raise UsageError("vault %s has no passphrase to remove" % ctx.vault.path)
        ctx.vault.rewrap(KEK_KEY_FILE)
    else:
        ctx.vault.rewrap(KEK_PASSPHRASE, new_passphrase)
    audit(ctx.home, "passphrase", outcome="removed" if remove else "set")
    return {"vault": ctx.vault.path, "key_protection": ctx.vault.kind()}


def doctor_checks(ctx):
    """Return a list of {check, ok, detail} for the home, the vault and the provider files."""
    checks = []
    home_mode = stat.S_IMODE(os.stat(ctx.home).st_mode) if os.path.isdir(ctx.home) else None
    checks.append({"check": "home folder", "ok": home_mode in (None, 0o700),
                   "detail": "%s mode %s" % (ctx.home, oct(home_mode) if home_mode is not None
                                             else "(not created yet)")})
    loose = []
    for folder, _, files in os.walk(ctx.home) if home_mode is not None else ():
        for name in files:
            path = os.path.join(folder, name)
            if stat.S_IMODE(os.lstat(path).st_mode) & 0o077:
                loose.append(path)
    checks.append({"check": "file modes", "ok": not loose,
                   "detail": "readable by others: %s" % ", ".join(loose) if loose else "all 0600"})
    try:
        ctx.vault.load()
        checks.append({"check": "vault", "ok": True,
                       "detail": "%s opens (%s)" % (ctx.vault.path, ctx.vault.kind() or "not created yet")})
    except VaultError as exc:
        checks.append({"check": "vault", "ok": False, "detail": str(exc)})
    catalog = load_catalog(ctx.home)
    checks.append({"check": "provider definitions", "ok": not catalog.problems,
                   "detail": "; ".join(catalog.problems) or "%d valid" % len(catalog.providers)})
    return checks


def build_parser():
    import argparse
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print one JSON document on stdout")
    common.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS,
                        help="log each proxied request and other details on stderr")
    common.add_argument("--no-color", action="store_true", default=argparse.SUPPRESS,
                        help="print without colour (also when NO_COLOR is set)")
    parser = argparse.ArgumentParser(
        prog="authsome", parents=[common],
        description="Local credential broker for AI agents: log in once, run agents behind a "
                    "proxy that injects the credential.",
        epilog="example: authsome login g2 && authsome run -- python3 my_agent.py")
    parser.add_argument("--version", action="version", version="authsome %s" % __version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name, summary, example):
        return commands.add_parser(name, parents=[common], help=summary, description=summary,
                                   epilog="example: %s" % example)

    def connection_option(sub):
        sub.add_argument("--connection", metavar="NAME",
                         help="connection name (default: the provider's default connection)")

    sub = command("login", "Log in to a provider and store its credential in the vault.",
                  "authsome login g2 --connection team")
    sub.add_argument("provider")
    connection_option(sub)
    sub.add_argument("--force", action="store_true", help="replace an existing credential")
    sub.add_argument("--no-browser", action="store_true", help="ask in the terminal instead")
    sub.add_argument("--stdin", action="store_true", help="read the key from standard input")
    sub.add_argument("--port", type=int, help="port of the local login form (default 7998, "
                                              "or AUTHSOME_LOGIN_PORT)")
    sub.add_argument("--flow", choices=("pkce", "device_code", "dcr_pkce"),
                     help="OAuth2 flow to use instead of the provider's default")
    sub.add_argument("--scopes", help="comma-separated OAuth2 scopes to request")
    sub.add_argument("--base-url", help="provider base URL, for self-hosted instances")
    sub.add_argument("--client-id", help="OAuth2 client ID (not a secret)")

    sub = command("get", "Show a stored credential record (secrets masked).",
                  "authsome get g2 --field status")
    sub.add_argument("provider")
    connection_option(sub)
    sub.add_argument("--field", help="print only this field, e.g. status")
    sub.add_argument("--show-secret", action="store_true", help="print secret values too")

    sub = command("logout", "Remove one local credential.", "authsome logout g2")
    sub.add_argument("provider")
    connection_option(sub)

    sub = command("revoke", "Revoke and remove every connection of a provider.",
                  "authsome revoke g2")
    sub.add_argument("provider")

    sub = command("remove", "Remove all local state for a provider, its user definition too.",
                  "authsome remove g2")
    sub.add_argument("provider")

    command("list", "List providers with their connections and status.", "authsome list")

    sub = command("inspect", "Print a provider's effective definition as a provider file.",
                  "authsome inspect g2 > ~/.authsome/providers/g2.json")
    sub.add_argument("provider")

    sub = command("register", "Validate and install a provider definition file.",
                  "authsome register ./acme.json")
    sub.add_argument("file")
    sub.add_argument("--force", action="store_true", help="replace an existing user definition")

    sub = command("set-default", "Choose the connection that run and export use.",
                  "authsome set-default g2 team")
    sub.add_argument("provider")
    sub.add_argument("connection")

    sub = command("export", "Print credentials as environment variables (less safe than run).",
                  'eval "$(authsome export g2 --format env)"')
    sub.add_argument("provider", nargs="?")
    connection_option(sub)
    sub.add_argument("--format", choices=("env", "shell", "json"), default="env",
                     help="env: NAME='value' lines; shell: export lines; json: one object")

    command("whoami", "Show the home folder, the vault and how it is protected.", "authsome whoami")

    sub = command("log", "Show the audit log.", "authsome log -n 20")
    sub.add_argument("-n", type=int, default=20, metavar="N", help="number of entries (default 20)")

    sub = command("init", "Create the vault.", "authsome init --passphrase")
    sub.add_argument("--passphrase", action="store_true",
                     help="protect the vault with a passphrase (asked, or AUTHSOME_NEW_PASSPHRASE)")

    sub = command("passphrase", "Set, change or remove the vault passphrase.",
                  "authsome passphrase")
    sub.add_argument("--remove", action="store_true", help="go back to the key file")

    command("doctor", "Check the home folder, the vault and the provider definitions.",
            "authsome doctor")

    sub = command("run", "Run a command behind the credential-injecting proxy.",
                  "authsome run -- python3 my_agent.py")
    sub.add_argument("--connection", action="append", default=[], metavar="PROVIDER=NAME",
                     help="inject this connection of a provider (repeatable)")
    sub.add_argument("--deny-unmatched", action="store_true",
                     help="refuse connections to hosts that have no credential route")
    sub.add_argument("--connect-to", action="append", default=[], metavar="HOST:PORT=HOST2:PORT2",
                     help="dial HOST2:PORT2 for HOST:PORT, still verifying HOST (repeatable)")
    sub.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARG...]")
    return parser


def read_new_passphrase():
    passphrase = os.environ.get("AUTHSOME_NEW_PASSPHRASE")
    if passphrase:
        return passphrase
    first = prompt_hidden("New vault passphrase: ")
    if first != prompt_hidden("Repeat the passphrase: "):
        raise UsageError("the two passphrases differ; nothing was changed")
    return first


def login_command(ctx, args, out):
    provider = ctx.catalog.get(args.provider)
    connection = check_connection_name(args.connection or DEFAULT_CONNECTION)
    existing = find_record(ctx.vault.load(), provider.name, connection)
    if existing and record_status(existing) == STATUS_CONNECTED and not args.force:
        return {"provider": provider.name, "connection": connection, "status": STATUS_CONNECTED,
                "changed": False,
                "message": "%s is already connected (connection %s); use --force to replace it"
                           % (provider.name, connection)}
    if provider.auth_type != "api_key":
        return login_oauth(ctx, provider, connection, args, out)
    if args.stdin:
        mode = "stdin"
    elif args.no_browser or not has_graphical_session():
        mode = "prompt"
    else:
        mode = "browser"
    port = args.port or int(os.environ.get("AUTHSOME_LOGIN_PORT") or LOGIN_PORT)
    login_api_key(ctx.home, provider, connection, mode, port=port, out=ctx.err)
    audit(ctx.home, "login", provider=provider.name, connection=connection, outcome="connected")
    return {"provider": provider.name, "connection": connection, "status": STATUS_CONNECTED,
            "changed": True, "message": "Logged in to %s (connection %s)."
                                        % (provider.display_name, connection)}


def login_oauth(ctx, provider, connection, args, out):
    raise LoginError("OAuth2 login for %s is not available in this version" % provider.name)


def print_human(command, result, out):
    if command in ("login", "logout", "revoke", "remove", "register", "set-default", "init",
                   "passphrase") and isinstance(result, dict):
        out.write(result.get("message") or human_summary(command, result))
        out.write("\n")
    elif command == "get":
        if isinstance(result, dict):
            for key in sorted(result):
                out.write("%s: %s\n" % (key, result[key]))
        else:
            out.write("%s\n" % ("" if result is None else result))
    elif command == "list":
        print_provider_table(result, out)
    elif command in ("whoami",):
        for key, value in result.items():
            out.write("%s: %s\n" % (key, value))
    elif command == "log":
        for entry in result:
            out.write(" ".join("%s=%s" % (key, entry[key]) for key in sorted(entry)) + "\n")
    elif command == "doctor":
        for check in result:
            out.write("%s %s: %s\n" % ("ok  " if check["ok"] else "FAIL", check["check"],
                                       check["detail"]))
    elif command == "inspect":
        out.write(json.dumps(result, indent=2) + "\n")


def human_summary(command, result):
    if command == "logout":
        return "Removed %s (connection %s)." % (result["provider"], result["connection"])
    if command in ("revoke", "remove"):
        removed = ", ".join(result["removed_connections"]) or "none"
        text = "Removed %s connections: %s." % (result["provider"], removed)
        if result.get("removed_definition"):
            text += " Deleted %s." % result["removed_definition"]
        return text
    if command == "register":
        return "Registered %s at %s." % (result["provider"], result["path"])
    if command == "set-default":
        return "Default connection of %s is now %s." % (result["provider"], result["default"])
    return "Vault %s is protected by: %s." % (result["vault"], result["key_protection"])


def print_provider_table(rows, out):
    out.write("%-24s %-8s %-8s %s\n" % ("PROVIDER", "TYPE", "SOURCE", "CONNECTIONS"))
    for row in rows:
        connections = ", ".join(
            "%s%s: %s%s" % (item["connection"], "*" if item["default"] else "", item["status"],
                            " until %s" % iso_time(item["expires_at"]) if item["expires_at"] else "")
            for item in row["connections"]) or "-"
        out.write("%-24s %-8s %-8s %s\n" % (row["name"], row["auth_type"], row["source"],
                                            connections))


def dispatch(ctx, args, out):
    """Run one parsed command; returns (result, exit code)."""
    name = args.command
    if name == "login":
        return login_command(ctx, args, out), EXIT_OK
    if name == "get":
        return get_credential(ctx, args.provider, args.connection, args.field,
                              args.show_secret), EXIT_OK
    if name == "logout":
        return logout_connection(ctx, args.provider, args.connection), EXIT_OK
    if name == "revoke":
        return revoke_provider(ctx, args.provider), EXIT_OK
    if name == "remove":
        return remove_provider(ctx, args.provider), EXIT_OK
    if name == "list":
        return list_providers(ctx), EXIT_OK
    if name == "inspect":
        return inspect_provider(ctx, args.provider), EXIT_OK
    if name == "register":
        return register_provider(ctx, args.file, args.force), EXIT_OK
    if name == "set-default":
        return set_default_connection(ctx, args.provider, args.connection), EXIT_OK
    if name == "whoami":
        return vault_summary(ctx), EXIT_OK
    if name == "log":
        return read_audit_log(ctx.home, max(args.n, 0)), EXIT_OK
    if name == "init":
        return init_vault(ctx, read_new_passphrase() if args.passphrase else None), EXIT_OK
    if name == "passphrase":
        new = None if args.remove else read_new_passphrase()
        return change_passphrase(ctx, new, args.remove), EXIT_OK
    if name == "doctor":
        checks = doctor_checks(ctx)
        return checks, EXIT_OK if all(check["ok"] for check in checks) else EXIT_UNEXPECTED
    raise UsageError("unknown command %r" % name)


def configure_logging(verbose):
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("authsome: %(message)s"))
    handler.addFilter(secret_filter)
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if verbose else logging.WARNING)
    log.propagate = False


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    as_json = getattr(args, "json", False)
    configure_logging(getattr(args, "verbose", False))
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    out = sys.stdout
    try:
        ctx = Context()
        if args.command == "run":
            command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
            try:
                code = run_with_proxy(command, ctx.home, args.connection, args.connect_to,
                                      args.deny_unmatched)
            except AuthsomeError as exc:
                code = report_error(exc, as_json)
            # Proxy threads may still sit in OpenSSL calls; interpreter finalization under
            # them can crash, and nothing is left to clean up, so leave at once.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        if args.command == "export":
            variables = export_variables(ctx, args.provider, args.connection)
            ctx.err.write("warning: these secrets are now in your shell's environment; "
                          "'authsome run -- COMMAND' keeps them out of it\n")
            out.write(format_export(variables, "json" if as_json else args.format) + "\n")
            return EXIT_OK
        result, code = dispatch(ctx, args, out)
        if as_json:
            out.write(json.dumps(result, indent=2, sort_keys=True) + "\n")
        else:
            print_human(args.command, result, out)
        return code
    except AuthsomeError as exc:
        return report_error(exc, as_json)
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (e.g. `authsome list | head`); stop quietly.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def report_error(exc, as_json):
    message = secret_filter.mask(str(exc))
    sys.stderr.write("error: %s\n" % message)
    if as_json:
        sys.stdout.write(json.dumps({"error": message, "exit_code": exc.code}) + "\n")
    return exc.code


if __name__ == "__main__":
    sys.exit(main())
