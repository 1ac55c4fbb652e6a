#!/usr/bin/env python3
"""authsome: a local credential broker for AI agents.

One file, standard library only (CPython 3.9+). A person logs in to a service once, and authsome
keeps the API key or OAuth token in an encrypted vault under $AUTHSOME_HOME (default
~/.authsome). `authsome run -- COMMAND` starts COMMAND behind a local proxy that adds the real
credential to its HTTPS requests for that service, while the child's environment contains only
a placeholder.

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


_iso_time_cache = (None, "")


def iso_time(timestamp=None):
    global _iso_time_cache
    second = int(now() if timestamp is None else timestamp)
    cached_second, text = _iso_time_cache
    if second != cached_second:
        text = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))
        _iso_time_cache = (second, text)  # the proxy logs many entries per second
    return text


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
                raise VaultError("%s is busy: another authsome process has locked %s; retry when it "
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
                    raise VaultError("%s is busy: another authsome process has locked %s" % (what, path))
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
# HMAC-SHA256. HKDF (RFC 5869) splits the key in two. The keystream is HMAC blocks over nonce
# and counter, and the tag is an HMAC over the length-prefixed associated data, nonce and
# ciphertext.

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
            # hashlib.scrypt rejects maxmem >= 2^31 and derive_passphrase_key passes 256*n*r*p,
            # so n*r*p stays at or below 2^22 (512 MiB of scrypt memory).
            if (params["n"] > 2 ** 24 or params["r"] * params["p"] > 2 ** 10
                    or params["n"] * params["r"] * params["p"] > 2 ** 22):
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
                passphrase = None  # no terminal or a cancelled prompt ends in the VaultError below
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
    """A destination for a provider's credential: an exact host (with port and path prefix) or
    a `regex:` pattern full-matched against the host name."""

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
    bracketed = re.match(r"^\[([^\]]*)\](?::([0-9]{1,5}))?$", entry)
    if bracketed:  # an IPv6 literal, [::1] or [::1]:8443
        host, port_text = bracketed.group(1), bracketed.group(2) or ""
    elif entry.startswith("["):
        fail("%r is not a host name, an https:// URL or a regex: pattern" % entry)
    else:
        host, _, port_text = entry.partition(":") if entry.count(":") == 1 else (entry, "", "")
    host = normalize_host(host)
    try:
        host = str(ipaddress.ip_address(host))  # IP literals are legitimate routes
    except ValueError:
        if bracketed or not HOST_RE.match(host):
            fail("%r is not a host name, an https:// URL or a regex: pattern" % entry)
    if port_text and (not port_text.isdigit() or not 0 < int(port_text) < 65536):
        fail("%r has an invalid port" % entry)
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
        if not self.export and self.auth_type == "api_key" and self.api_key.get("env_var"):
            # A file with only api_key.env_var still names the variable that carries the key.
            self.export = {self.api_key["env_var"]: "API_KEY"}
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
            close = self.suggest(name)
            if not close:
                hint = "no similar name"
            elif len(close) == 1:
                hint = "did you mean %s?" % close[0]
            else:
                hint = "did you mean %s or %s?" % (", ".join(close[:-1]), close[-1])
            raise NotFoundError("unknown provider %r: %s (all providers: authsome list)"
                                % (name, hint))
        return provider

    def suggest(self, name):
        """Return up to three provider names close to `name`, for 'did you mean' hints."""
        import difflib
        names = sorted(self.providers)
        close = difflib.get_close_matches(name.lower(), names, n=3, cutoff=0.5)
        prefixed = [other for other in names if len(name) >= 2 and other.startswith(name.lower())]
        return (close + [other for other in prefixed if other not in close])[:3]

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
# The vault document contains credentials[provider][connection] = record, defaults[provider] =
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
ENCODED_DOT_RE = re.compile("%2[eE]")


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


class AuditLog:
    """Appends JSON lines to one audit log file, keeping the file open between entries."""

    CHECK_EVERY = 200  # entries between checks for rotation by this or another process

    def __init__(self, home):
        self.home = home
        self.path = os.path.join(home, AUDIT_FILE)
        self.fd = None
        self.written = 0
        self.lock = threading.Lock()

    def write(self, line):
        with self.lock:
            if self.fd is None or self.written >= self.CHECK_EVERY:
                self._reopen()
            os.write(self.fd, line)
            self.written += 1

    def _reopen(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        ensure_private_dir(self.home)
        if os.path.exists(self.path) and os.path.getsize(self.path) > AUDIT_MAX_BYTES:
            rotate_audit_log(self.home, self.path)
        self.fd = open_private(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        self.written = 0


_audit_logs = {}
_audit_logs_lock = threading.Lock()


def audit(home, event, **fields):
    """Append one JSON line to the audit log; fields must never hold a secret value."""
    entry = {"time": iso_time(), "event": event}
    entry.update({key: value for key, value in fields.items() if value is not None})
    line = secret_filter.mask(json.dumps(entry, sort_keys=True)) + "\n"
    with _audit_logs_lock:
        audit_log = _audit_logs.get(home)
        if audit_log is None:
            audit_log = _audit_logs[home] = AuditLog(home)
    try:
        audit_log.write(line.encode("utf-8"))
    except OSError as exc:
        log.warning("cannot write audit log %s: %s", audit_log.path, exc.strerror)


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
    path = ENCODED_DOT_RE.sub(".", path)
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
        return "the key does not match the %s key format: %s" % (provider.display_name, hint)
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
        self.failure = None  # an AuthsomeError raised while storing the key ends the login
        self.httpd = self._bind(port)
        self.port = self.httpd.server_address[1]
        self.url = "http://127.0.0.1:%d/?token=%s" % (self.port, self.token)
        self.fallback = self.port != port

    def render(self, error=None):
        return key_form(self.provider, self.token, error)

    def check(self, fields):
        return self.accept(fields.get("key", ""))

    def saved_page(self):
        done = ('<p class="ok">Your %s key is saved. You can close this tab.</p>'
                % self.provider.display_name)
        return form_page("Logged in to %s" % self.provider.display_name, done)

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
            if self.failure is not None:
                raise self.failure
        finally:
            self.httpd.shutdown()
            self.httpd.server_close()

    def _handler_class(self):
        from urllib.parse import parse_qs, urlsplit
        form = self

        class Handler(loopback_handler_base()):

            def do_GET(self):
                parts = urlsplit(self.path)
                token = (parse_qs(parts.query).get("token") or [""])[0]
                if parts.path != "/" or not self._host_ok():
                    return self._send(404, form_page("Not found", "<p>Nothing here.</p>"))
                if not hmac.compare_digest(token.encode(), form.token.encode()):
                    return self._reject_token()
                self._send(200, form.render())

            def do_POST(self):
                if urlsplit(self.path).path != "/submit" or not self._host_ok():
                    return self._send(404, form_page("Not found", "<p>Nothing here.</p>"))
                fields = self._read_form()
                if fields is None:
                    return self._send(400, form_page("Bad request", "<p>Malformed form.</p>"))
                token = fields.get("token", "")
                if not hmac.compare_digest(token.encode(), form.token.encode()):
                    return self._reject_token()
                try:
                    error = form.check(fields)
                except AuthsomeError as exc:
                    import html
                    form.failure = exc
                    self._send(500, form_page("Login failed", '<p class="error" role="alert">%s</p>'
                                              % html.escape(str(exc))))
                    form.done.set()
                    return
                if error:
                    return self._send(400, form.render(error))
                self._send(200, form.saved_page())
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
                send_local_page(self, status, page)

        return Handler


def client_form(provider, token, client_id, wants_secret, error=None):
    """Render the form that collects an OAuth client ID (unless given) and client secret."""
    import html
    error_line = '<p class="error" role="alert">%s</p>' % html.escape(error) if error else ""
    if client_id:
        id_field = "<p>Client ID: <code>%s</code></p>" % html.escape(client_id)
    else:
        id_field = ('<label for="client_id">Client ID</label>'
                    '<input type="text" id="client_id" name="client_id" autocomplete="off" '
                    'autocapitalize="off" spellcheck="false" required autofocus>')
    secret_field = ('<label for="client_secret">Client secret (leave empty for a public '
                    'client)</label><input type="password" id="client_secret" '
                    'name="client_secret" autocomplete="new-password" autocapitalize="off" '
                    'spellcheck="false">') if wants_secret else ""
    body = ('<p>Enter the OAuth client that you registered with %s. It is stored encrypted on '
            'this machine and reused by later logins.</p><form method="post" action="/submit" '
            'autocomplete="off"><input type="hidden" name="token" value="%s">%s%s'
            '<button type="submit">Continue</button></form>'
            % (html.escape(provider.display_name), html.escape(token), id_field, secret_field))
    return form_page("%s OAuth client" % provider.display_name, body, error_line)


class ClientFormServer(KeyFormServer):
    """The one-shot local form that collects an OAuth client ID and secret in the browser."""

    def __init__(self, provider, accept, port, client_id, wants_secret):
        self.client_id = client_id
        self.wants_secret = wants_secret
        super().__init__(provider, accept, port)

    def render(self, error=None):
        return client_form(self.provider, self.token, self.client_id, self.wants_secret, error)

    def check(self, fields):
        return self.accept(fields)

    def saved_page(self):
        done = ('<p class="ok">The client is saved. The %s authorization page opens next; you '
                'can close this tab.</p>' % self.provider.display_name)
        return form_page("%s OAuth client" % self.provider.display_name, done)


@functools.lru_cache(maxsize=None)
def loopback_handler_base():
    """Return the base request handler of the loopback login servers (http.server is imported
    on first use, because most commands never serve a page)."""
    from http.server import BaseHTTPRequestHandler

    class LoopbackHandler(BaseHTTPRequestHandler):
        server_version = "authsome"

        def version_string(self):
            return self.server_version

        def log_message(self, format, *args):
            pass  # request lines carry one-time tokens and authorization codes; nothing is logged

    return LoopbackHandler


def send_local_page(handler, status, page):
    """Send an HTML page from a loopback login server and close the connection.

    The headers keep the page offline (strict CSP) and out of caches and frames."""
    handler.send_response(status)
    handler.send_header("Content-Type", "text/html; charset=utf-8")
    handler.send_header("Content-Length", str(len(page)))
    handler.send_header("Content-Security-Policy", FORM_CSP)
    handler.send_header("Cache-Control", "no-store")
    handler.send_header("Referrer-Policy", "no-referrer")
    handler.send_header("X-Content-Type-Options", "nosniff")
    handler.send_header("X-Frame-Options", "DENY")
    handler.send_header("Connection", "close")
    handler.end_headers()
    handler.wfile.write(page)
    handler.close_connection = True


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
# oauth2
# ---------------------------------------------------------------------------------------------
# Authorization code with PKCE (RFC 7636) on a loopback redirect (RFC 8252), the device
# authorization grant (RFC 8628), dynamic client registration (RFC 7591) with metadata discovery
# (RFC 8414, then OpenID Connect discovery), refresh at use and revocation (RFC 7009). The OAuth
# client of a provider is the vault record clients[provider]: client_id, client_secret (None for
# a public client), token_endpoint_auth_method, and for registered clients `registered`,
# `redirect_uri` and the discovered `endpoints`. Token values never reach a log line, an error
# message or the audit log.

OAUTH_HTTP_TIMEOUT = 30.0
REVOKE_TIMEOUT = 10.0
OAUTH_MAX_RESPONSE = 1024 * 1024
REFRESH_MARGIN = 300  # seconds: an access token with less than this left is refreshed at use
REFRESH_RETRY_AFTER = 30.0  # seconds between failed refresh attempts of one run proxy
REFRESH_LOCK_TIMEOUT = 90.0  # longer than one token request, so waiters outlast the refresher
DEVICE_GRANT_TYPE = "urn:ietf:params:oauth:grant-type:device_code"
DEVICE_DEFAULT_INTERVAL = 5  # RFC 8628 3.2
DEVICE_DEFAULT_LIFETIME = 900
CALLBACK_PATH = "/callback"
METADATA_FIELDS = {"authorization_endpoint": "authorization_url", "token_endpoint": "token_url",
                   "revocation_endpoint": "revocation_url",
                   "device_authorization_endpoint": "device_authorization_url",
                   "registration_endpoint": "registration_endpoint"}


def one_line(text, limit=300):
    """Collapse `text` (a provider's error description, say) to one short line, secrets masked."""
    text = re.sub(r"\s+", " ", CONTROL_CHARS_RE.sub(" ", str(text))).strip()
    text = secret_filter.mask(text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def endpoint_label(url):
    """Return the URL without query or fragment, for messages."""
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    return "%s://%s%s" % (parts.scheme, parts.netloc, parts.path)


def is_endpoint_url(url):
    """Return True for an https:// URL, or http:// on a loopback address (as validation does)."""
    from urllib.parse import urlsplit
    try:
        parts = urlsplit(url)
        parts.port
    except (ValueError, TypeError, AttributeError):
        return False
    if not parts.hostname:
        return False
    loopback = parts.hostname in ("127.0.0.1", "::1", "localhost")
    return parts.scheme == "https" or (parts.scheme == "http" and loopback)


def oauth_http(url, form=None, json_body=None, headers=None, timeout=OAUTH_HTTP_TIMEOUT,
               what="token endpoint", error_class=LoginError):
    """Send one request to a provider endpoint; return (status, content type, body bytes).

    TLS is verified by the default context, which honours SSL_CERT_FILE. Redirects are not
    followed, so a body that carries a code or a secret goes only to the configured URL. A
    network failure raises `error_class` with one line naming the endpoint.
    """
    import http.client
    import urllib.error
    import urllib.request
    from urllib.parse import urlencode

    class RefuseRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None  # urllib then raises HTTPError with the 3xx status

    request_headers = {"Accept": "application/json", "User-Agent": "authsome/%s" % __version__}
    data = None
    if json_body is not None:
        data = json.dumps(json_body).encode("utf-8")
        request_headers["Content-Type"] = "application/json"
    elif form is not None:
        data = urlencode(form).encode("ascii")
        request_headers["Content-Type"] = "application/x-www-form-urlencoded"
    request_headers.update(headers or {})
    request = urllib.request.Request(url, data=data, headers=request_headers,
                                     method="POST" if data is not None else "GET")
    opener = urllib.request.build_opener(
        urllib.request.HTTPSHandler(context=ssl.create_default_context()), RefuseRedirect)
    log.info("%s %s", request.get_method(), endpoint_label(url))
    try:
        with opener.open(request, timeout=timeout) as response:
            return (response.status, response.headers.get("Content-Type", ""),
                    response.read(OAUTH_MAX_RESPONSE))
    except urllib.error.HTTPError as exc:
        with contextlib.closing(exc):
            body = exc.read(OAUTH_MAX_RESPONSE) if exc.fp is not None else b""
        content_type = exc.headers.get("Content-Type", "") if exc.headers is not None else ""
        return exc.code, content_type, body
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise error_class("cannot reach the %s %s: %s"
                          % (what, endpoint_label(url), one_line(reason, 200))) from None


def parse_oauth_body(content_type, body):
    """Decode a reply that is a JSON object or form-encoded; None when it is neither."""
    from urllib.parse import parse_qsl
    text = body.decode("utf-8", "replace").strip()
    if text.startswith("{") or "json" in content_type.lower():
        try:
            document = json.loads(text)
        except ValueError:
            return None
        return document if isinstance(document, dict) else None
    if "html" in content_type.lower() or not text:
        return None
    try:
        return dict(parse_qsl(text, keep_blank_values=True, strict_parsing=True))
    except ValueError:
        return None


def oauth_error_text(document):
    """Format the `error (error_description)` of an OAuth error reply as one safe line."""
    error = one_line(document.get("error"), 80)
    description = document.get("error_description")
    return "%s (%s)" % (error, one_line(description, 200)) if description else error


def parse_expires_in(value):
    """Return expires_in (a number or a numeric string) in seconds; None when absent or unusable."""
    if isinstance(value, str) and re.fullmatch(r"\s*\d+(\.\d+)?\s*", value):
        value = float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return int(value)
    return None


def parse_scope_list(value):
    """Return the scopes of a space- or comma-separated string (GitHub and Slack use commas)."""
    if isinstance(value, list):
        return [str(scope) for scope in value if scope]
    if isinstance(value, str):
        return [scope for scope in re.split(r"[\s,]+", value) if scope]
    return None


def parse_token_response(status, content_type, body, what, error_class):
    """Check a token endpoint reply and return its tokens; an `error`, even in a 200, fails."""
    document = parse_oauth_body(content_type, body)
    if document is None:
        raise error_class("the %s responded with HTTP %d and a body that is neither JSON nor form "
                          "encoded" % (what, status))
    if document.get("error"):
        failure = error_class("the %s rejected the request: %s"
                              % (what, oauth_error_text(document)))
        failure.oauth_error = str(document["error"])
        raise failure
    if not 200 <= status < 300:
        raise error_class("the %s responded with HTTP %d" % (what, status))
    access_token = document.get("access_token")
    refresh_token = document.get("refresh_token") or None
    for value in (access_token, refresh_token):
        if value is not None and (not isinstance(value, str) or CONTROL_CHARS_RE.search(value)):
            raise error_class("the %s sent a token that is not a plain string" % what)
    if not access_token:
        raise error_class("the %s sent no access_token" % what)
    secret_filter.register(access_token)
    secret_filter.register(refresh_token)
    token_type = document.get("token_type")
    return {"access_token": access_token, "refresh_token": refresh_token,
            "token_type": token_type if isinstance(token_type, str) and token_type else "Bearer",
            "expires_in": parse_expires_in(document.get("expires_in")),
            "scopes": parse_scope_list(document.get("scope"))}


def token_record(provider, connection, tokens, requested_scopes, base_url, client_id,
                 previous=None):
    """Build the credential record of a token reply; `previous` is the record it refreshes."""
    stamp = iso_time()
    previous = previous or {}
    expires_in = tokens["expires_in"]
    scopes = tokens["scopes"] if tokens["scopes"] is not None else list(requested_scopes or [])
    return {"provider": provider.name, "connection": connection, "auth_type": "oauth2",
            "access_token": tokens["access_token"],
            # RFC 6749 6: without a new refresh token in the reply, the old one stays valid.
            "refresh_token": tokens["refresh_token"] or previous.get("refresh_token"),
            "token_type": tokens["token_type"],
            "expires_at": int(now() + expires_in) if expires_in is not None else None,
            "scopes": scopes, "status": STATUS_CONNECTED,
            "created_at": previous.get("created_at", stamp), "updated_at": stamp,
            "base_url": base_url, "client_id": client_id}


def resolve_oauth_endpoints(provider, base_url=None, client=None):
    """Return the provider's OAuth endpoints with {base_url} filled in.

    Endpoints the provider file leaves out come from the discovery results stored with a
    registered client."""
    endpoints = {field: provider.oauth_url(field, base_url) for field in OAUTH_URL_FIELDS}
    registration = provider.data.get("registration")
    endpoints["registration_endpoint"] = (registration or {}).get("registration_endpoint")
    for field, url in ((client or {}).get("endpoints") or {}).items():
        if not endpoints.get(field):
            endpoints[field] = url
    return endpoints


def client_for_record(document, provider, record):
    """Return the client that obtained `record`: the stored client, or only the record's client
    ID (as a public client) when the stored client was replaced since."""
    client = dict(document["clients"].get(provider.name) or {})
    if record.get("client_id") and client.get("client_id") != record["client_id"]:
        client = {"client_id": record["client_id"]}
    return client


def token_auth_method(provider, client):
    if client.get("registered"):
        return client.get("token_endpoint_auth_method") or "none"
    return provider.oauth.get("token_endpoint_auth_method") or "client_secret_post"


def add_client_auth(provider, client, form, headers):
    """Add client authentication to a request as RFC 6749 2.3.1 describes.

    A client without a secret is public and sends only its ID."""
    from urllib.parse import quote_plus
    secret = client.get("client_secret")
    method = token_auth_method(provider, client)
    if secret and method == "client_secret_basic":
        # Both halves are form-encoded before the Basic encoding (RFC 6749 2.3.1).
        pair = "%s:%s" % (quote_plus(client["client_id"]), quote_plus(secret))
        headers["Authorization"] = "Basic " + b64encode(pair.encode("utf-8"))
        return
    form["client_id"] = client["client_id"]
    if secret and method == "client_secret_post":
        form["client_secret"] = secret


def client_request(provider, client, url, form, error_class, what, timeout=OAUTH_HTTP_TIMEOUT,
                   revocation=False):
    """POST `form` plus client authentication to a token, device or revocation endpoint.

    A provider with `device_token_request: json` gets JSON bodies at its device and token
    endpoints instead of form encoding. Revocation requests are always form-encoded (RFC 7009).
    """
    form, headers = dict(form), {}
    add_client_auth(provider, client, form, headers)
    if provider.oauth.get("device_token_request") == "json" and not revocation:
        return oauth_http(url, json_body=form, headers=headers, timeout=timeout, what=what,
                          error_class=error_class)
    return oauth_http(url, form=form, headers=headers, timeout=timeout, what=what,
                      error_class=error_class)


def prompt_visible(prompt):
    """Read one visible line from the terminal (the client ID is not a secret)."""
    if not open_terminal_prompt():
        raise LoginError("no terminal to ask for the OAuth client ID: pass it with --client-id")
    try:
        if os.name == "nt":
            return input(prompt)
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
        with open(fd, "rb+", buffering=0) as tty:  # text mode would need a seekable file
            tty.write(prompt.encode("utf-8"))
            line = tty.readline().decode("utf-8", "replace")
    except (EOFError, KeyboardInterrupt):
        raise LoginError("login cancelled") from None
    if not line:
        raise LoginError("login cancelled")
    return line.rstrip("\r\n")


def client_value_problem(value, what):
    """Return why an OAuth client ID or secret is unusable, or None when it is acceptable."""
    if not value or CONTROL_CHARS_RE.search(value) or re.search(r"\s", value) or len(value) > 1024:
        return ("the OAuth %s is empty, too long, or contains spaces or control characters"
                % what)
    return None


def check_client_value(value, what):
    problem = client_value_problem(value, what)
    if problem:
        raise LoginError("%s; nothing was stored" % problem)
    return value


def ask_client_in_browser(provider, client_id, wants_secret, port=LOGIN_PORT, out=None):
    """Collect the OAuth client ID (unless given) and secret with the local browser form;
    returns (client ID, secret or None)."""
    out = out or sys.stderr
    result = {}

    def accept(fields):
        typed_id = client_id or fields.get("client_id", "").strip()
        secret = fields.get("client_secret", "") if wants_secret else ""
        problem = client_value_problem(typed_id, "client ID")
        if not problem and secret:
            problem = client_value_problem(secret, "client secret")
        if problem:
            return problem
        result.update(client_id=typed_id, client_secret=secret or None)
        return None

    server = ClientFormServer(provider, accept, port, client_id, wants_secret)
    out.write("Opening the OAuth client form for %s. If no browser opens, visit:\n  %s\n"
              % (provider.display_name, server.url))
    out.flush()
    open_browser(server.url)
    server.serve()
    if result.get("client_secret"):
        secret_filter.register(result["client_secret"])
    return result["client_id"], result["client_secret"]


def collect_client(provider, stored, client_id=None, secret_mode="prompt", stdin=None):
    """Return the client to log in with.

    The ID comes from --client-id, else the stored client, else the browser form (`secret_mode`
    "browser", which also asks for a secret not stored yet) or a prompt. The secret, when the
    token endpoint authenticates clients, comes from standard input (`secret_mode` "stdin":
    standard input contains only the client secret, empty to keep the stored one), else the stored
    client with the same ID, else a hidden prompt. It is never taken from argv. An empty secret
    means a public client.
    """
    stored = stored or {}
    client_id = client_id or stored.get("client_id")
    method = provider.oauth.get("token_endpoint_auth_method") or "client_secret_post"
    typed_secret = None
    if secret_mode == "browser":
        known = bool(client_id) and stored.get("client_id") == client_id  # secret stored with it
        wants_secret = method != "none" and not known
        if not client_id or wants_secret:
            port = int(os.environ.get("AUTHSOME_LOGIN_PORT") or LOGIN_PORT)
            client_id, typed_secret = ask_client_in_browser(provider, client_id, wants_secret,
                                                            port)
    if not client_id:
        if secret_mode == "stdin":
            raise LoginError("%s needs an OAuth client ID: pass it with --client-id (with --stdin, "
                             "standard input contains only the client secret)" % provider.name)
        client_id = prompt_visible("%s OAuth client ID: " % provider.display_name).strip()
    check_client_value(client_id, "client ID")
    same = stored.get("client_id") == client_id
    secret = stored.get("client_secret") if same else None
    if same and stored.get("registered"):
        method = token_auth_method(provider, stored)
    elif method == "none":
        secret = None
    elif secret_mode == "stdin":
        secret = read_stdin_secret(stdin) or secret
    elif secret_mode == "browser":
        secret = typed_secret or secret
    elif not same:
        secret = prompt_hidden("%s OAuth client secret (input hidden; leave empty for a public "
                               "client): " % provider.display_name) or None
    if secret:
        check_client_value(secret, "client secret")
        secret_filter.register(secret)
    client = dict(stored) if same else {}
    client.update({"client_id": client_id, "client_secret": secret,
                   "token_endpoint_auth_method": method})
    client.setdefault("created_at", iso_time())
    return client


def pkce_pair():
    """Return (code_verifier, S256 code_challenge) per RFC 7636 4.1-4.2."""
    verifier = secrets.token_urlsafe(48)  # 64 characters of the unreserved set
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def build_authorization_url(endpoint, params):
    from urllib.parse import quote, urlencode
    return endpoint + ("&" if "?" in endpoint else "?") + urlencode(params, quote_via=quote)


class CallbackServer:
    """The loopback redirect target of the authorization code flow (RFC 8252 7.3).

    The first GET /callback ends the wait: with a code when its `state` matches, otherwise with
    a LoginError (a state that does not match is rejected, since the reply does not belong to
    the authorization request this process made). The request line, which contains the code,
    is never logged.
    """

    def __init__(self, port=0):
        from http.server import ThreadingHTTPServer
        self.state = secrets.token_urlsafe(24)
        self.result = None
        self.done = threading.Event()
        self._result_lock = threading.Lock()
        try:
            self.httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler_class())
        except OSError as exc:
            if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
                raise
            raise LoginError("port %d on 127.0.0.1 is busy or not allowed, so the OAuth callback "
                             "cannot listen there; choose another with --port, or leave --port "
                             "out for a free one" % port) from None
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.redirect_uri = "http://127.0.0.1:%d%s" % (self.port, CALLBACK_PATH)
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                         daemon=True).start()

    def wait(self, timeout=LOGIN_TIMEOUT):
        """Return the authorization code, or raise LoginError."""
        deadline = time.monotonic() + timeout
        while not self.done.wait(0.2):  # short waits keep Ctrl-C responsive
            if time.monotonic() > deadline:
                raise LoginError("login timed out after %d seconds without the OAuth callback; "
                                 "nothing was stored" % timeout)
        kind, value = self.result
        if kind != "code":
            raise LoginError(value)
        return value

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def _finish(self, kind, value):
        with self._result_lock:
            if self.result is None:  # the first callback decides
                self.result = (kind, value)
        self.done.set()

    def _outcome(self, query):
        """Return (kind, value, page status, page text) for the query of a callback."""
        state = query.get("state", "")
        if not hmac.compare_digest(state.encode("utf-8"), self.state.encode("utf-8")):
            return ("error", "the OAuth callback carried a state that does not match this login, "
                             "so it was rejected (a stale browser tab or a forged link); nothing "
                             "was stored", 400,
                    "This callback does not belong to the login in progress. Run authsome "
                    "login again.")
        if query.get("error"):
            message = ("the provider rejected the authorization: %s; nothing was stored"
                       % oauth_error_text(query))
            return "error", message, 400, message
        if not query.get("code"):
            message = "the OAuth callback carried neither a code nor an error; nothing was stored"
            return "error", message, 400, message
        return ("code", query["code"], 200,
                "authsome received the authorization. You can close this tab and return to the "
                "terminal.")

    def _handler_class(self):
        from urllib.parse import parse_qs, urlsplit
        callback = self

        class Handler(loopback_handler_base()):

            def do_GET(self):
                parts = urlsplit(self.path)
                host = (self.headers.get("Host") or "").lower()
                if parts.path != CALLBACK_PATH or host not in (
                        "127.0.0.1:%d" % callback.port, "localhost:%d" % callback.port):
                    return self._send(404, "Not found", "Nothing here.")
                if callback.done.is_set():
                    return self._send(409, "Login finished", "Return to the terminal.")
                query = {name: values[0] for name, values in
                         parse_qs(parts.query, keep_blank_values=True).items()}
                kind, value, status, text = callback._outcome(query)
                title = "Authorization received" if kind == "code" else "Login failed"
                try:
                    self._send(status, title, text)
                finally:
                    # Only now: the waiting login may end the process as soon as it wakes.
                    callback._finish(kind, value)

            def _send(self, status, title, text):
                import html
                send_local_page(self, status, form_page(title, "<p>%s</p>" % html.escape(text)))

        return Handler


def authorization_code_grant(provider, client, endpoints, scopes, server, use_pkce, browser,
                             err):
    """Send the user to the authorization endpoint, wait for the callback on `server` and
    exchange the code; return the parsed tokens."""
    verifier, challenge = pkce_pair() if use_pkce else (None, None)
    params = dict(provider.oauth.get("extra_authorize_params") or {})
    params.update({"response_type": "code", "client_id": client["client_id"],
                   "redirect_uri": server.redirect_uri, "state": server.state})
    if scopes:
        params["scope"] = " ".join(scopes)
    if use_pkce:
        params.update({"code_challenge": challenge, "code_challenge_method": "S256"})
    url = build_authorization_url(endpoints["authorization_url"], params)
    err.write("To log in to %s, open this URL in a browser:\n  %s\nWaiting for the redirect to "
              "%s ...\n" % (provider.display_name, url, server.redirect_uri))
    err.flush()
    if browser:
        open_browser(url)
    code = server.wait()
    form = {"grant_type": "authorization_code", "code": code, "redirect_uri": server.redirect_uri}
    if verifier:
        form["code_verifier"] = verifier
    what = "token endpoint of %s" % provider.name
    status, content_type, body = client_request(provider, client, endpoints["token_url"], form,
                                                LoginError, what)
    return parse_token_response(status, content_type, body, what, LoginError)


def positive_number(value, default):
    number = parse_expires_in(value)
    return number if number else default


def device_authorization_grant(provider, client, endpoints, scopes, err, browser=False,
                               clock=None, sleep=None):
    """Run the device authorization grant (RFC 8628) and return the parsed tokens.

    `clock` (seconds, default `now`) and `sleep` (default time.sleep) are injectable so that
    tests drive the polling without waiting.
    """
    clock, sleep = clock or now, sleep or time.sleep
    what = "device authorization endpoint of %s" % provider.name
    form = {"scope": " ".join(scopes)} if scopes else {}
    status, content_type, body = client_request(
        provider, client, endpoints["device_authorization_url"], form, LoginError, what)
    document = parse_oauth_body(content_type, body) or {}
    if document.get("error"):
        raise LoginError("the %s rejected the request: %s" % (what, oauth_error_text(document)))
    device_code, user_code = document.get("device_code"), document.get("user_code")
    verification = document.get("verification_uri") or document.get("verification_url")
    if not 200 <= status < 300 or not all(isinstance(value, str) and value for value in (
            device_code, user_code, verification)):
        raise LoginError("the %s responded with HTTP %d without device_code, user_code and "
                         "verification_uri" % (what, status))
    secret_filter.register(device_code)
    interval = positive_number(document.get("interval"), DEVICE_DEFAULT_INTERVAL)
    deadline = clock() + positive_number(document.get("expires_in"), DEVICE_DEFAULT_LIFETIME)
    complete = document.get("verification_uri_complete")
    err.write("To log in to %s, visit %s and enter the code %s\n"
              % (provider.display_name, one_line(verification), one_line(user_code, 64)))
    if isinstance(complete, str) and complete:
        err.write("  or open: %s\n" % one_line(complete))
    err.write("Waiting for approval ...\n")
    err.flush()
    if browser and is_endpoint_url(complete or verification):
        open_browser(complete or verification)
    expired = LoginError("the device code expired before the login was approved; run authsome "
                         "login %s again; nothing was stored" % provider.name)
    what = "token endpoint of %s" % provider.name
    while True:
        sleep(interval)
        if clock() >= deadline:
            raise expired
        status, content_type, body = client_request(
            provider, client, endpoints["token_url"],
            {"grant_type": DEVICE_GRANT_TYPE, "device_code": device_code}, LoginError, what)
        reply = parse_oauth_body(content_type, body) or {}
        error = reply.get("error")
        if error == "authorization_pending":
            continue
        if error == "slow_down":
            # RFC 8628 3.5: add 5 seconds to this and all later polls; never poll faster.
            interval = max(interval + 5, positive_number(reply.get("interval"), 0))
            continue
        if error == "expired_token":
            raise expired
        if error == "access_denied":
            raise LoginError("the login was denied at %s (access_denied); nothing was stored"
                             % provider.display_name)
        return parse_token_response(status, content_type, body, what, LoginError)


def discover_endpoints(issuer):
    """Fetch authorization server metadata: RFC 8414 first, then OpenID Connect discovery.

    Returns {field: url} in provider-file field names, for https (or loopback) URLs only.
    """
    from urllib.parse import urlsplit
    parts = urlsplit(issuer)
    origin, path = "%s://%s" % (parts.scheme, parts.netloc), parts.path.rstrip("/")
    candidates = [origin + "/.well-known/oauth-authorization-server" + path,
                  origin + path + "/.well-known/openid-configuration"]
    failures = []
    for url in candidates:
        try:
            status, content_type, body = oauth_http(url, what="metadata endpoint")
        except LoginError as exc:
            failures.append(str(exc))
            continue
        document = parse_oauth_body(content_type, body) if status == 200 else None
        if not document:
            failures.append("%s responded with HTTP %d" % (endpoint_label(url), status))
            continue
        return {field: document[name] for name, field in METADATA_FIELDS.items()
                if isinstance(document.get(name), str) and is_endpoint_url(document[name])}
    raise LoginError("no OAuth authorization server metadata found for %s: %s"
                     % (endpoint_label(issuer), "; ".join(failures)))


def discovery_issuer(provider, base_url, endpoints):
    """Return the issuer to discover from: the base URL, else the origin of a known endpoint."""
    from urllib.parse import urlsplit
    if base_url:
        return base_url
    for field in ("registration_endpoint", "authorization_url", "token_url"):
        if endpoints.get(field):
            parts = urlsplit(endpoints[field])
            return "%s://%s" % (parts.scheme, parts.netloc)
    raise LoginError("%s names no base_url or endpoint to discover its OAuth metadata from; add "
                     "oauth.base_url to its provider file" % provider.name)


def register_client(provider, endpoint, redirect_uri, scopes):
    """Register a public client (RFC 7591) for the loopback redirect; return the client record."""
    body = {"client_name": "authsome", "redirect_uris": [redirect_uri],
            "grant_types": ["authorization_code", "refresh_token"], "response_types": ["code"],
            "token_endpoint_auth_method": "none"}
    if scopes:
        body["scope"] = " ".join(scopes)
    what = "registration endpoint of %s" % provider.name
    status, content_type, data = oauth_http(endpoint, json_body=body, what=what)
    document = parse_oauth_body(content_type, data) or {}
    if document.get("error"):
        raise LoginError("the %s rejected the request: %s" % (what, oauth_error_text(document)))
    client_id = document.get("client_id")
    if not 200 <= status < 300 or not isinstance(client_id, str) or not client_id:
        raise LoginError("the %s responded with HTTP %d without a client_id" % (what, status))
    secret = document.get("client_secret")
    secret = secret if isinstance(secret, str) and secret else None
    secret_filter.register(secret)
    method = document.get("token_endpoint_auth_method")
    if method not in TOKEN_AUTH_METHODS:
        method = "client_secret_basic" if secret else "none"
    return {"client_id": check_client_value(client_id, "client ID"), "client_secret": secret,
            "token_endpoint_auth_method": method, "registered": True,
            "redirect_uri": redirect_uri, "created_at": iso_time()}


def choose_oauth_flow(provider, requested, endpoints):
    """Return the flow to run: --flow, else the provider's.

    A pkce provider with a device endpoint uses the device flow when no browser on this
    machine would reach the user."""
    flow = requested or provider.flow
    if (not requested and flow == "pkce" and endpoints.get("device_authorization_url")
            and not has_graphical_session()):
        flow = "device_code"
    if flow == "device_code" and not (endpoints.get("device_authorization_url")
                                      and endpoints.get("token_url")):
        raise UsageError("%s has no device authorization endpoint; use --flow pkce"
                         % provider.name)
    return flow


def callback_port(port, client):
    """Return (port, remembered): --port, else the port a registered client was registered with."""
    from urllib.parse import urlsplit
    if port is not None or not client or not client.get("redirect_uri"):
        return port, False
    try:
        return urlsplit(client["redirect_uri"]).port or 0, True
    except ValueError:
        return 0, False


def save_client(vault, provider, client):
    def mutate(document):
        document["clients"][provider.name] = client

    vault.update(mutate)


def loopback_login(vault, provider, stored, flow, endpoints, scopes, base_url, options, err):
    """Run the authorization code flow (pkce or dcr_pkce); return (tokens, client, endpoints)."""
    register = flow == "dcr_pkce" and not options.get("client_id")
    reuse = stored if register and stored and stored.get("registered") else None
    needed = ["authorization_url", "token_url"] + (["registration_endpoint"] if register else [])
    discovered = any(not endpoints.get(field) for field in needed)
    if discovered:
        found = discover_endpoints(discovery_issuer(provider, base_url, endpoints))
        endpoints = dict(endpoints, **{field: url for field, url in found.items()
                                       if not endpoints.get(field)})
        missing = [field for field in needed if not endpoints.get(field)]
        if missing:
            raise LoginError("the OAuth metadata of %s has no %s" % (provider.name,
                                                                     ", ".join(missing)))
    client = None if register else collect_client(
        provider, stored, options.get("client_id"), options.get("secret_mode", "prompt"),
        options.get("stdin"))
    port, remembered = callback_port(options.get("port"), reuse)
    try:
        server = CallbackServer(port or 0)
    except LoginError:
        if not remembered:
            raise
        server, reuse = CallbackServer(0), None  # the registered port is taken: register anew
    try:
        if register:
            if reuse is not None and reuse.get("redirect_uri") == server.redirect_uri:
                client = reuse
            else:
                client = register_client(provider, endpoints["registration_endpoint"],
                                         server.redirect_uri, scopes)
                client["endpoints"] = {field: url for field, url in endpoints.items() if url}
                save_client(vault, provider, client)
        use_pkce = flow == "dcr_pkce" or provider.oauth.get("pkce", True)
        tokens = authorization_code_grant(provider, client, endpoints, scopes, server, use_pkce,
                                          options.get("browser", False), err)
    finally:
        server.close()
    if discovered and not client.get("endpoints"):
        # Refresh and revocation need the discovered endpoints too.
        client["endpoints"] = {field: url for field, url in endpoints.items() if url}
    return tokens, client, endpoints


def oauth_login(home, provider, connection, flow=None, scopes=None, base_url=None,
                client_id=None, secret_mode="prompt", stdin=None, port=None, browser=False,
                err=None, clock=None, sleep=None):
    """Log in to an OAuth2 provider and store the token record and the client; return the record.

    `secret_mode` is "prompt", "browser" or "stdin" (see collect_client); `browser` opens the user's
    browser; `clock` and `sleep` drive device polling in tests.
    """
    err = err or sys.stderr
    vault = Vault(home, passphrase_prompt=prompt_hidden)
    base_url = (base_url or provider.oauth.get("base_url") or "").rstrip("/") or None
    if base_url and not is_endpoint_url(base_url):
        raise UsageError("base URL %r must be an https:// URL (http:// only for loopback)"
                         % base_url)
    stored = vault.load()["clients"].get(provider.name)
    endpoints = resolve_oauth_endpoints(provider, base_url, stored)
    flow = choose_oauth_flow(provider, flow, endpoints)
    scopes = list(provider.oauth.get("scopes") or []) if scopes is None else list(scopes)
    if flow == "device_code":
        client = collect_client(provider, stored, client_id, secret_mode, stdin)
        tokens = device_authorization_grant(provider, client, endpoints, scopes, err, browser,
                                            clock, sleep)
    else:
        options = {"client_id": client_id, "secret_mode": secret_mode, "stdin": stdin,
                   "port": port, "browser": browser}
        tokens, client, endpoints = loopback_login(vault, provider, stored, flow, endpoints,
                                                   scopes, base_url, options, err)
    record = token_record(provider, connection, tokens, scopes, base_url, client["client_id"])

    def mutate(document):
        previous = find_record(document, provider.name, connection)
        if previous:
            record["created_at"] = previous.get("created_at", record["created_at"])
        put_record(document, record)
        document["clients"][provider.name] = client

    vault.update(mutate)
    audit(home, "login", provider=provider.name, connection=connection, outcome="connected",
          flow=flow)
    return record


def needs_refresh(record, at=None):
    """Return True when the access token expires in less than REFRESH_MARGIN seconds."""
    expires_at = record.get("expires_at")
    return expires_at is not None and expires_at - (now() if at is None else at) < REFRESH_MARGIN


def login_hint(provider_name, connection):
    suffix = "" if connection == DEFAULT_CONNECTION else " --connection %s" % connection
    return "authsome login %s%s" % (provider_name, suffix)


def refresh_lock_path(home, provider_name, connection):
    folder = os.path.join(home, "locks")
    ensure_private_dir(home)
    ensure_private_dir(folder)
    return os.path.join(folder, "%s.%s.lock" % (provider_name, connection))


def refresh_token_record(home, vault, provider, record):
    """Refresh the access token of `record` unless another process did; return the newest record.

    Runs under the per-connection lock file that every authsome process shares, and re-reads
    the vault under it first. A refresh failure raises RefreshError whose `.record` is the
    newest stored record. The new record (a rotated refresh token included) is written by one
    atomic vault update.
    """
    connection = record["connection"]
    with file_lock(refresh_lock_path(home, provider.name, connection),
                   timeout=REFRESH_LOCK_TIMEOUT,
                   what="the token refresh of %s (connection %s)" % (provider.name, connection)):
        document = vault.load()
        latest = find_record(document, provider.name, connection)
        if latest is None or latest.get("auth_type") != "oauth2":
            raise CredentialError("%s is no longer connected (connection %s); run: %s"
                                  % (provider.name, connection, login_hint(provider.name,
                                                                           connection)))
        register_record_secrets(latest)
        if not needs_refresh(latest) or not latest.get("refresh_token"):
            return latest
        client = client_for_record(document, provider, latest)
        endpoints = resolve_oauth_endpoints(provider, latest.get("base_url"), client)
        what = "token endpoint of %s" % provider.name
        try:
            if not client.get("client_id") or not endpoints.get("token_url"):
                raise RefreshError("no OAuth client or token endpoint is stored for %s"
                                   % provider.name)
            form = {"grant_type": "refresh_token", "refresh_token": latest["refresh_token"]}
            status, content_type, body = client_request(provider, client, endpoints["token_url"],
                                                        form, RefreshError, what)
            tokens = parse_token_response(status, content_type, body, what, RefreshError)
        except RefreshError as exc:
            audit(home, "refresh", provider=provider.name, connection=connection,
                  outcome="failed")
            rejected = getattr(exc, "oauth_error", None) == "invalid_grant"
            if rejected and record_status(latest) == STATUS_EXPIRED:
                # RFC 6749 section 5.2: the refresh token is invalid, expired or revoked, so no
                # retry can succeed. With the access token expired too, the record is marked
                # invalid until the next login; a still-valid access token stays usable.
                latest = mark_record_invalid(vault, provider.name, connection, latest)
            failure = RefreshError("refreshing the %s token (connection %s) failed: %s"
                                   % (provider.name, connection, exc))
            failure.record = latest
            raise failure from None
        fresh = token_record(provider, connection, tokens, latest.get("scopes"),
                             latest.get("base_url"), client["client_id"], previous=latest)

        def mutate(current):
            stored = find_record(current, provider.name, connection)
            if stored is None or stored.get("refresh_token") != latest["refresh_token"]:
                return False  # logged out or logged in again meanwhile: theirs stays
            put_record(current, fresh)
            return True

        kept = vault.update(mutate)
        audit(home, "refresh", provider=provider.name, connection=connection,
              outcome="refreshed" if kept else "discarded")
        return fresh


def mark_record_invalid(vault, provider_name, connection, record):
    """Store status `invalid` on a record whose refresh token the provider rejected, unless a
    newer login replaced it meanwhile; returns the record as now stored."""
    invalid = dict(record, status=STATUS_INVALID, updated_at=iso_time())

    def mutate(document):
        stored = find_record(document, provider_name, connection)
        if stored is not None and stored.get("refresh_token") == record.get("refresh_token"):
            put_record(document, invalid)

    vault.update(mutate)
    return invalid


def ensure_fresh(home, vault, provider, record, warn):
    """Return a usable record, refreshing it when less than REFRESH_MARGIN remains.

    A failed refresh with a still-valid token keeps that token and calls `warn`. An expired
    token raises CredentialError (no refresh token) or RefreshError, and the message names the
    login command.
    """
    if record.get("auth_type") != "oauth2" or not needs_refresh(record):
        return record
    connection = record["connection"]
    if record.get("refresh_token"):
        try:
            record = refresh_token_record(home, vault, provider, record)
        except RefreshError as exc:
            latest = getattr(exc, "record", None) or record
            if record_status(latest) == STATUS_CONNECTED:
                warn("%s; keeping the current access token until it expires at %s"
                     % (exc, iso_time(latest["expires_at"])))
                return latest
            raise RefreshError("%s; the access token expired at %s; run: %s"
                               % (exc, iso_time(latest["expires_at"]),
                                  login_hint(provider.name, connection))) from None
    if record_status(record) == STATUS_EXPIRED:
        raise CredentialError("the %s access token (connection %s) expired at %s and there is no "
                              "refresh token; run: %s"
                              % (provider.name, connection, iso_time(record["expires_at"]),
                                 login_hint(provider.name, connection)))
    return record


def refresh_at_use(home, vault, provider, record, err=None, strict=True):
    """Run ensure_fresh for `get` and `export`, writing warnings to `err`.

    With `strict` False, an unusable record is returned unchanged after a warning instead of
    raising."""
    err = err or sys.stderr
    if record is None:
        return None
    warn = lambda message: err.write("warning: %s\n" % secret_filter.mask(message))
    try:
        return ensure_fresh(home, vault, provider, record, warn)
    except (CredentialError, RefreshError) as exc:
        if strict:
            raise
        warn(str(exc))
        return record


class ProxyTokenRefresher:
    """The run proxy's refresher: `refresher(provider, record) -> record`.

    While the token it holds has more than REFRESH_MARGIN left it returns at once, reading
    neither the vault nor the network. Otherwise one thread per connection refreshes (under the
    cross-process lock), the result is kept for later requests, and a failure is retried only
    after REFRESH_RETRY_AFTER seconds.
    """

    def __init__(self, home, vault):
        self.home = home
        self.vault = vault
        self._newest = {}
        self._failed_at = {}
        self._locks = {}
        self._guard = threading.Lock()

    @staticmethod
    def _expiry(record):
        expires_at = record.get("expires_at")
        return float("inf") if expires_at is None else expires_at

    def _pick(self, key, record):
        kept = self._newest.get(key)
        if kept is not None and self._expiry(kept) > self._expiry(record):
            return kept
        return record

    def __call__(self, provider, record):
        key = (provider.name, record["connection"])
        record = self._pick(key, record)
        if not needs_refresh(record):
            return record
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            record = self._pick(key, record)
            failed_at = self._failed_at.get(key)
            if not needs_refresh(record) or (
                    failed_at is not None and now() - failed_at < REFRESH_RETRY_AFTER):
                return record
            failures = []
            try:
                fresh = ensure_fresh(self.home, self.vault, provider, record, failures.append)
            except (AuthsomeError, OSError) as exc:
                failures.append(str(exc))
                fresh = record
            for message in failures:
                log.warning("%s", message)
            if failures:
                self._failed_at[key] = now()
            else:
                self._failed_at.pop(key, None)
            self._newest[key] = fresh
            return fresh


def revoke_oauth_tokens(home, vault, provider, record, warn):
    """Revoke a record's tokens at the provider (RFC 7009), refresh token first.

    Returns True when the provider accepted, False when it was unreachable or rejected it (after
    `warn`), None when there is nothing to revoke or no revocation endpoint.
    """
    if record.get("auth_type") != "oauth2":
        return None
    client = client_for_record(vault.load(), provider, record)
    url = resolve_oauth_endpoints(provider, record.get("base_url"), client).get("revocation_url")
    tokens = [(record.get(hint), hint) for hint in ("refresh_token", "access_token")
              if record.get(hint)]
    if not url or not tokens:
        return None
    if not client.get("client_id"):
        warn("no OAuth client is stored for %s, so its token was not revoked at the provider"
             % provider.name)
        return False
    what = "revocation endpoint of %s" % provider.name
    accepted = False
    for token, hint in tokens:
        try:
            status, content_type, body = client_request(
                provider, client, url, {"token": token, "token_type_hint": hint}, LoginError, what,
                timeout=REVOKE_TIMEOUT, revocation=True)
        except LoginError as exc:
            warn("%s; the local credential is removed anyway" % exc)
            break  # unreachable: do not wait a second time
        if 200 <= status < 300:
            accepted = True
            continue
        document = parse_oauth_body(content_type, body) or {}
        reason = oauth_error_text(document) if document.get("error") else "HTTP %d" % status
        warn("the %s did not revoke the %s (%s); the local credential is removed anyway"
             % (what, hint.replace("_", " "), reason))
    audit(home, "revocation", provider=provider.name, connection=record.get("connection"),
          outcome="revoked" if accepted else "failed")
    return accepted


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
COPY_BUFFER_SIZE = 64 * 1024  # per reader, because a TLS record carries at most 16 KiB
TOKEN_RE = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
TARGET_RE = re.compile(rb"^[\x21-\x7e]+$")
FIELD_VALUE_BAD_RE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
HTTP_VERSION_RE = re.compile(rb"^HTTP/1\.[01]$")
STATUS_CODE_RE = re.compile(rb"^[1-5][0-9][0-9]$")
HEX_RE = re.compile(rb"^[0-9a-fA-F]+$")
AUTHORITY_HOST_RE = re.compile(r"^[A-Za-z0-9._:-]+$")
HOP_BY_HOP_PROXY_HEADERS = ("proxy-authorization", "proxy-connection", "proxy-authenticate")
IDEMPOTENT_METHODS = ("GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE")  # RFC 9110 9.2.2


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
        """Return whether a comma-separated header such as Connection lists `token`."""
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
    if not HTTP_VERSION_RE.match(parts[2]):
        raise ProtocolError(505 if parts[2].startswith(b"HTTP/") else 400, "unsupported HTTP version")
    start = [part.decode("latin-1") for part in parts]
    return RequestHead(start, _parse_header_lines(lines[1:]))


def parse_response_head(data):
    lines = _split_head_lines(data)
    version, _, rest = lines[0].partition(b" ")
    status, _, reason = rest.partition(b" ")
    if not HTTP_VERSION_RE.match(version) or not STATUS_CODE_RE.match(status):
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
    if head.get_all("Transfer-Encoding"):
        # RFC 9112 section 6.3: Transfer-Encoding overrides Content-Length; a final coding other
        # than chunked means the body ends when the origin closes the connection.
        codings = [part.strip().lower() for value in head.get_all("Transfer-Encoding")
                   for part in value.split(",") if part.strip()]
        return ("chunked", None) if codings and codings[-1] == "chunked" else ("close", None)
    try:
        length = _content_length(head)
    except ProtocolError as exc:
        raise ProtocolError(502, "upstream " + exc.reason) from None
    if length is not None:
        return "length", length
    return "close", None


def parse_chunk_size(line):
    """Parse a chunk-size line such as b"1a;ext=1\\r\\n" (RFC 9112 section 7.1)."""
    size_text = line.split(b";", 1)[0].strip(b" \t\r\n")
    if not size_text or len(size_text) > 15 or not HEX_RE.match(size_text):
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
        self._scratch = None

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
            size = end + 4 if end >= 0 else None
            bare = self.buffer.find(b"\n\n", max(0, scanned - 1))
            if bare >= 0 and (size is None or bare + 2 < size):
                size = bare + 2
            if size is not None:
                # A head that arrives whole in one read is held to the same cap.
                if size > limit:
                    raise ProtocolError(431, "message head larger than %d bytes" % limit)
                head, self.buffer = self.buffer[:size], self.buffer[size:]
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

    def copy_to(self, destination, remaining=None):
        """Send the next `remaining` bytes, or every byte until EOF when None, to `destination`.

        Reads go through one preallocated buffer with recv_into, so a large body costs no
        allocation per TLS record. Raises ConnectionClosed on EOF before `remaining` bytes.
        """
        if self.buffer:
            take = len(self.buffer) if remaining is None else min(remaining, len(self.buffer))
            destination.sendall(self.buffer[:take])
            self.buffer = self.buffer[take:]
            if remaining is not None:
                remaining -= take
        if remaining == 0:
            return
        if self._scratch is None:
            self._scratch = memoryview(bytearray(COPY_BUFFER_SIZE))
        view = self._scratch
        self.sock.settimeout(self.timeout)
        while remaining is None or remaining > 0:
            wanted = len(view) if remaining is None else min(len(view), remaining)
            count = self.sock.recv_into(view, wanted)
            if not count:
                if remaining is None:
                    return
                raise ConnectionClosed("connection closed %d bytes before the end of a body"
                                       % remaining)
            destination.sendall(view[:count])
            if remaining is not None:
                remaining -= count

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
    if deadline is None:
        reader.copy_to(sock, remaining)
        return
    while remaining > 0:
        data = reader.read_some(min(remaining, reader.chunk_size), deadline)
        if not data:
            raise ConnectionClosed("connection closed %d bytes before the end of a body" % remaining)
        sock.sendall(data)
        remaining -= len(data)


def relay_chunked(reader, sock, deadline=None, decode=False):
    """Copy a chunked body chunk by chunk, so each chunk reaches the peer as soon as it arrives.

    With `decode`, only the chunk data is sent (no sizes, no trailers), for an HTTP/1.0 peer.
    """
    while True:
        size = parse_chunk_size(reader.read_line(MAX_CHUNK_LINE, deadline))
        if not decode:
            sock.sendall(b"%x\r\n" % size)
        if size == 0:
            break
        relay_length(reader, sock, size, deadline)
        if reader.read_line(MAX_CHUNK_LINE, deadline).strip(b"\r\n"):
            raise ProtocolError(400, "chunk data longer than its size")
        if not decode:
            sock.sendall(b"\r\n")
    trailer_bytes = 0
    while True:
        line = reader.read_line(MAX_CHUNK_LINE, deadline)
        if not decode:
            sock.sendall(line if line.endswith(b"\r\n") else line.rstrip(b"\n") + b"\r\n")
        if not line.strip(b"\r\n"):
            return
        trailer_bytes += len(line)
        if trailer_bytes > MAX_HEAD_BYTES:
            raise ProtocolError(431, "chunked trailer too large")


def relay_until_close(reader, sock):
    reader.copy_to(sock)


def relay_body(reader, sock, framing, deadline=None):
    kind, length = framing
    if kind == "length":
        relay_length(reader, sock, length, deadline)
    elif kind == "chunked":
        relay_chunked(reader, sock, deadline)
    elif kind == "close":
        relay_until_close(reader, sock)


LINGER_SECONDS = 2.0
LINGER_BYTES = 4 * 1024 * 1024


def close_gracefully(sock, linger=LINGER_SECONDS):
    """Close a client connection so that the last response reaches the client intact.

    A TLS connection first gets a close_notify, because OpenSSL 3 reports an EOF without one as
    an error unless the client opts out. Then the write side is shut, and bytes the client
    still sends are read and dropped for at most `linger` seconds. Closing with unread request
    bytes (an unsent body after an early response, a pipelined request after an error) makes
    the kernel send a reset, which can destroy the response before the client reads it.
    """
    try:
        if sock.fileno() < 0:
            return
        deadline = time.monotonic() + linger
        if isinstance(sock, ssl.SSLSocket):
            # Send the close_notify (waiting for room if the client reads slowly), then wait
            # within the linger for the client's own close_notify or EOF.
            sock.settimeout(linger)
            with contextlib.suppress(ssl.SSLError, OSError, ValueError):
                sock.unwrap()
        sock.shutdown(socket.SHUT_WR)  # on an SSLSocket this drops to the raw socket
        drained = 0
        while drained < LINGER_BYTES:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            sock.settimeout(remaining)
            data = sock.recv(65536)
            if not data:
                break
            drained += len(data)
    except (OSError, ValueError):
        pass
    finally:
        with contextlib.suppress(OSError):
            sock.close()


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
    if not host or not AUTHORITY_HOST_RE.match(host):
        raise ProtocolError(400, "invalid host in %r" % authority)
    return host, int(port_text) if port_text else default_port


def format_authority(host, port):
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


# ---------------------------------------------------------------------------------------------
# proxy
# ---------------------------------------------------------------------------------------------


def usable_record(record):
    """Return whether the proxy can inject `record`: connected, or expired with a refresh token."""
    status = record_status(record)
    return status == STATUS_CONNECTED or (status == STATUS_EXPIRED and record.get("refresh_token"))


class Broker:
    """The map from host and path to credential for one run.

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
        """Return whether the origin closed this idle kept-alive connection (it became readable)."""
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
    elif isinstance(exc, ConnectionClosed):
        reason = "the origin closed the connection before a complete response"
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
            close_gracefully(conn)
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
            # A connection opened ahead of use and never used is closed without a response.
            if self.reader.buffer:
                self._send_error(408, "timed out waiting for the request head")
            return None
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
            close_gracefully(tls)

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
    relay_streams(first, second)


RELAY_HIGH_WATER = 1024 * 1024  # bytes held for a slow receiver before its sender is paused
_WANT_READ, _WANT_WRITE = 1, 2  # selectors.EVENT_READ and EVENT_WRITE


class _RelayEnd:
    """One side of relay_streams: its socket and the bytes waiting to be written to it."""

    def __init__(self, sock):
        self.sock = sock
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.view = memoryview(bytearray(COPY_BUFFER_SIZE))
        self.outgoing = bytearray()
        self.retry = 0  # a TLS write that wanted I/O must be repeated with the same bytes
        self.read_wait = _WANT_READ  # what the socket must become before the next read
        self.write_wait = _WANT_WRITE
        self.read_done = False  # the peer of this socket will send nothing more
        self.write_done = False
        self.peer = None

    def write(self, data):
        """Send from `data` without blocking; returns the count sent (0 when it would block)."""
        try:
            return self.sock.send(data)
        except ssl.SSLWantWriteError:
            self.write_wait = _WANT_WRITE
        except ssl.SSLWantReadError:
            self.write_wait = _WANT_READ
        except BlockingIOError:
            self.write_wait = _WANT_WRITE
            return 0
        self.retry = len(data)
        return 0

    def flush(self):
        moved = False
        while self.outgoing:
            size = self.retry or min(len(self.outgoing), COPY_BUFFER_SIZE)
            self.retry = 0
            sent = self.write(bytes(self.outgoing[:size]))
            if not sent:
                return moved
            del self.outgoing[:sent]
            moved = True
        return moved

    def pass_on(self):
        """Read what is available and hand it to the peer; returns whether anything moved."""
        peer, moved = self.peer, False
        while not self.read_done and len(peer.outgoing) < RELAY_HIGH_WATER:
            try:
                count = self.sock.recv_into(self.view)
            except ssl.SSLWantReadError:
                self.read_wait = _WANT_READ
                return moved
            except ssl.SSLWantWriteError:
                self.read_wait = _WANT_WRITE
                return moved
            except BlockingIOError:
                self.read_wait = _WANT_READ
                return moved
            moved = True
            if not count:
                self.read_done = True
                return moved
            data = self.view[:count]
            sent = 0 if peer.outgoing else peer.write(data)
            if sent < count:
                peer.outgoing += data[sent:]
        return moved


def relay_streams(first, second, from_first=b"", from_second=b""):
    """Copy bytes both ways between two sockets, plain or TLS, until the exchange is over.

    One thread drives both sockets in non-blocking mode, so no OpenSSL object is used by two
    threads at once, and a blocked send in one direction never stops the other direction.
    `from_first` and `from_second` are bytes already read from each side. When one side
    finishes, a plain peer gets a half-close (SHUT_WR) and the other direction goes on. A TLS
    peer cannot be half-closed, so the relay then ends once what was read has been written.
    """
    import selectors
    ends = [_RelayEnd(first), _RelayEnd(second)]
    ends[0].peer, ends[1].peer = ends[1], ends[0]
    ends[1].outgoing += from_first
    ends[0].outgoing += from_second
    selector = selectors.DefaultSelector()
    registered = {}
    try:
        for end in ends:
            end.sock.setblocking(False)
        while True:
            moved = False
            for end in ends:
                moved = end.flush() or moved
                moved = end.pass_on() or moved
            for end in ends:
                peer = end.peer
                if end.read_done and not peer.outgoing and not peer.write_done:
                    if peer.tls:
                        return
                    peer.write_done = True
                    peer.sock.shutdown(socket.SHUT_WR)
            if all(end.read_done and not end.peer.outgoing for end in ends):
                return
            if moved:
                continue
            for end in ends:
                events = 0
                if not end.read_done and len(end.peer.outgoing) < RELAY_HIGH_WATER:
                    events |= end.read_wait
                if end.outgoing:
                    events |= end.write_wait
                if events != registered.get(end, 0):
                    if registered.get(end, 0) and events:
                        selector.modify(end.sock, events, end)
                    elif events:
                        selector.register(end.sock, events, end)
                    else:
                        selector.unregister(end.sock)
                    registered[end] = events
            selector.select()
    except (OSError, ssl.SSLError):
        return  # a reset or a broken TLS stream ends the relay; the callers close both sockets
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
        self._reused = False  # whether the current request went out on a kept-alive connection
        self._response_started = False  # whether any response byte reached the client

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
        # The origin can close a kept-alive upstream connection just as a request goes out on
        # it. A bodyless request with an idempotent method is then sent again on a new one.
        replayable = framing == ("length", 0) and head.method in IDEMPOTENT_METHODS
        attempts = 2
        while True:
            attempts -= 1
            self._response_started = False
            try:
                upstream = self._upstream()
            except (OSError, ssl.SSLError) as exc:
                self._log(head, path, 502, injected)
                self._send_error_page(simple_response(
                    502, "Bad Gateway", describe_upstream_error(self.host, self.port, exc)))
                return False
            try:
                status, keep_alive = self._exchange(head, framing, upstream)
            except ProtocolError as exc:
                self._log(head, path, exc.status, injected)
                if not self._response_started:  # never write an error page into a response
                    self._send_error(exc.status, exc.reason)
                self._drop_upstream()
                return False
            except (ConnectionClosed, socket.timeout, OSError, ssl.SSLError) as exc:
                self._drop_upstream()
                if (attempts and replayable and self._reused and not self._response_started
                        and not isinstance(exc, socket.timeout)):
                    log.debug("kept-alive upstream connection to %s was closed; retrying",
                              format_authority(self.host, self.port))
                    continue
                self._log(head, path, 502, injected)
                if not self._response_started:
                    self._send_error_page(simple_response(
                        502, "Bad Gateway", describe_upstream_error(self.host, self.port, exc)))
                return False
            self._log(head, path, status, injected)
            return keep_alive

    def _send_error_page(self, page):
        with contextlib.suppress(OSError):
            self.client.sendall(page)

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
        if not hosts and head.version == "HTTP/1.0":
            # HTTP/1.0 does not require Host; the origin gets the name of this connection.
            default_port = 443 if self.use_tls else 80
            name = "[%s]" % self.host if ":" in self.host else self.host
            hosts = [name if self.port == default_port else "%s:%d" % (name, self.port)]
            head.headers.insert(0, ["Host", hosts[0]])
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
        self._reused = self.upstream is not None
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
        head_bytes = head.serialize()
        buffered = self.reader.buffer
        if not expects_continue and framing[0] == "length" and 0 < framing[1] <= len(buffered):
            # A small body that arrived with the head goes out in the same TLS record.
            upstream.sock.sendall(head_bytes + buffered[:framing[1]])
            self.reader.buffer = buffered[framing[1]:]
            framing = ("length", 0)
        else:
            upstream.sock.sendall(head_bytes)
        response = None
        early = False
        if expects_continue:
            response = self._await_continue(upstream)
        if response is None or response.status == 100:
            if response is not None:
                self._response_started = True
                self.client.sendall(response.serialize())
            relay_body(self.reader, upstream.sock, framing)
            response = self._read_final_response(upstream)
        elif response.status >= 200:
            # The origin sent a final response before the body. The client may still send the
            # body, so neither connection can carry another request: the response gets
            # "Connection: close", and close_gracefully drains the body bytes in flight.
            early = True
        return self._relay_response(head, response, upstream, client_closes, early)

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

    def _relay_response(self, head, response, upstream, client_closes, early=False):
        if response.status == 101:
            self._response_started = True
            self.client.sendall(response.serialize())
            relay_upgraded(self.client, self.reader, upstream)
            self._drop_upstream()
            return 101, False
        framing = response_framing(head.method, response)
        # An HTTP/1.0 client cannot read chunked framing: it gets the data, ending at the close.
        decode = framing[0] == "chunked" and head.version == "HTTP/1.0"
        keep_alive = not (client_closes or early or decode or framing[0] == "close")
        self._set_connection_headers(head, response, framing, decode, keep_alive)
        self._response_started = True
        head_bytes = response.serialize()
        buffered = upstream.reader.buffer
        if framing[0] == "length" and 0 < framing[1] <= len(buffered):
            # A small body that arrived with the head goes out in the same TLS record.
            self.client.sendall(head_bytes + buffered[:framing[1]])
            upstream.reader.buffer = buffered[framing[1]:]
        else:
            self.client.sendall(head_bytes)
            if decode:
                relay_chunked(upstream.reader, self.client, decode=True)
            else:
                relay_body(upstream.reader, self.client, framing)
        origin_closes = early or framing[0] == "close" or response.has_token("Connection", "close") or (
            response.version == "HTTP/1.0" and not response.has_token("Connection", "keep-alive"))
        if origin_closes:
            self._drop_upstream()
        return response.status, keep_alive

    @staticmethod
    def _set_connection_headers(head, response, framing, decode, keep_alive):
        """Set the response's framing and Connection headers to match what the proxy does next."""
        if framing[0] == "chunked":
            response.remove("Content-Length")  # Transfer-Encoding wins (RFC 9112 section 6.3)
        if decode:
            response.remove("Transfer-Encoding")
        if not keep_alive:
            others = [token.strip() for value in response.get_all("Connection")
                      for token in value.split(",")
                      if token.strip() and token.strip().lower() not in ("close", "keep-alive")]
            response.remove("Connection", "Keep-Alive")
            response.headers.append(["Connection", ", ".join(["close"] + others)])
        elif head.version == "HTTP/1.0" and not response.has_token("Connection", "keep-alive"):
            response.headers.append(["Connection", "keep-alive"])

    def _log(self, head, path, status, injected):
        credential, reason = injected
        if log.isEnabledFor(logging.INFO):
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
    """After 101 Switching Protocols, copy raw bytes both ways until either side closes.

    Both sockets may be TLS; one thread drives them (see relay_streams), because an SSLSocket
    read in one thread while another thread writes it shares one OpenSSL object unsafely.
    """
    from_client, client_reader.buffer = client_reader.buffer, b""
    from_upstream, upstream.reader.buffer = upstream.reader.buffer, b""
    relay_streams(client, upstream.sock, from_client, from_upstream)


# ---------------------------------------------------------------------------------------------
# child process runner
# ---------------------------------------------------------------------------------------------

CA_VARIABLES = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO",
                "AWS_CA_BUNDLE", "PIP_CERT", "NPM_CONFIG_CAFILE", "NIX_SSL_CERT_FILE",
                "HTTPLIB2_CA_CERTS", "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",
                "CLOUDSDK_CORE_CUSTOM_CA_CERTS_FILE")
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")
AUTHSOME_SECRET_VARIABLES = ("AUTHSOME_MASTER_KEY", "AUTHSOME_PASSPHRASE",
                             "AUTHSOME_NEW_PASSPHRASE")
SYSTEM_CA_FILES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt",
                   "/etc/ssl/ca-bundle.pem", "/etc/ssl/cert.pem", "/usr/local/etc/openssl/cert.pem")
FORWARDED_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")


def system_ca_file():
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.openssl_cafile, paths.cafile) + SYSTEM_CA_FILES:
        if candidate and os.path.isfile(candidate):
            return candidate
    return None


def node_extra_ca_certs(parent_env, run_ca_pem):
    """Return the child's NODE_EXTRA_CA_CERTS file: the parent's extra CAs, if any, and the
    run's CA (Node adds these to its own built-in roots)."""
    path = parent_env.get("NODE_EXTRA_CA_CERTS")
    try:
        with open(path, "rb") as handle:
            return handle.read().rstrip(b"\n") + b"\n" + run_ca_pem
    except (OSError, TypeError):
        return run_ca_pem


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
    """Return whether a NO_PROXY entry (name, .suffix, *.suffix, IP, [IPv6]:port, CIDR) covers
    host."""
    entry = entry.strip().lower()
    if entry == "*":
        return True
    if entry.startswith("["):
        entry = entry[1:].partition("]")[0]
    elif entry.count(":") == 1:
        entry = entry.partition(":")[0]  # host:port; a bare IPv6 literal has more colons
    if "/" in entry:
        try:
            return ipaddress.ip_address(host) in ipaddress.ip_network(entry, strict=False)
        except ValueError:
            return False
    entry = entry.lstrip("*").lstrip(".")
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
        # A provider at a loopback address (a local gateway, a test stand-in) keeps its
        # address out of NO_PROXY, or its requests would go around the proxy.
        if loopback not in kept and not any(no_proxy_entry_covers(loopback, host) for host in hosts):
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
    """Return whether a terminal keyboard signal also reached the child (same foreground group)."""
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
    children, pending = [], []

    def forward(signum, frame):
        # NOTE: a signal sent with kill to a foreground authsome in a terminal is not forwarded
        # for INT and QUIT, because the terminal already delivered it to the child's group.
        if signal_came_from_terminal(signum):
            return
        if not children:
            pending.append(signum)  # arrived before the child existed; delivered after spawn
            return
        with contextlib.suppress(ProcessLookupError):
            children[0].send_signal(signum)

    # Handlers go in before the child starts, so an early signal cannot kill authsome with
    # the default action and orphan the child.
    previous = {}
    for name in FORWARDED_SIGNALS:
        signum = getattr(signal, name, None)
        if signum is not None:
            previous[signum] = signal.signal(signum, forward)
    try:
        try:
            children.append(subprocess.Popen(command, env=env))
        except FileNotFoundError:
            raise AuthsomeError("command not found: %s" % command[0], code=127) from None
        except PermissionError:
            raise AuthsomeError("command is not executable: %s" % command[0], code=126) from None
        for signum in pending:
            with contextlib.suppress(ProcessLookupError):
                children[0].send_signal(signum)
        return exit_code_of(children[0].wait())
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# Node.js 20 ignores HTTP(S)_PROXY and NODE_USE_ENV_PROXY. This CommonJS file, loaded with
# NODE_OPTIONS=--require, sends the http and https modules (every Agent) and the built-in fetch
# through the proxy with CONNECT tunnels, honouring NO_PROXY. Not covered: a request made with
# its own createConnection (the `ws` package does this), a fetch given its own dispatcher, and
# raw net/tls sockets. A Node.js that accepts --use-env-proxy handles the proxy variables
# itself, so the file then does nothing.
NODE_PRELOAD_JS = r"""'use strict';
// Written by authsome run: routes Node's http, https and fetch through the run's proxy.
(function authsomeProxyPreload() {
  const marker = Symbol.for('authsome.proxy-preload');
  if (globalThis[marker]) return;
  globalThis[marker] = true;
  if (process.allowedNodeEnvironmentFlags.has('--use-env-proxy')) return;
  const net = require('net');
  const tls = require('tls');
  const http = require('http');
  const https = require('https');
  const env = process.env;

  function parseProxy(text) {
    try {
      const url = new URL(text);
      const credentials = decodeURIComponent(url.username) + ':' + decodeURIComponent(url.password);
      return { host: url.hostname.replace(/^\[|\]$/g, ''), port: Number(url.port) || 80,
               auth: 'Basic ' + Buffer.from(credentials).toString('base64') };
    } catch (error) {
      return null;
    }
  }
  const proxies = { 'https:': parseProxy(env.HTTPS_PROXY || env.https_proxy || ''),
                    'http:': parseProxy(env.HTTP_PROXY || env.http_proxy || '') };
  const noProxy = (env.NO_PROXY || env.no_proxy || '').split(',')
    .map((entry) => entry.trim().toLowerCase()).filter(Boolean);

  function bare(host) {
    return String(host || '').toLowerCase().replace(/^\[|\]$/g, '').replace(/\.$/, '');
  }
  function bypass(host) {
    host = bare(host);
    return noProxy.some((entry) => {
      if (entry === '*') return true;
      if (entry.startsWith('[')) entry = entry.slice(1).split(']')[0];
      else if (entry.split(':').length === 2) entry = entry.split(':')[0];
      entry = entry.replace(/^\*/, '').replace(/^\./, '');
      return entry !== '' && (host === entry || host.endsWith('.' + entry));
    });
  }

  // Ask the proxy for a tunnel to host:port; callback(error, socket) after its 200.
  function tunnel(proxy, host, port, callback) {
    host = bare(host);
    const target = (host.includes(':') ? '[' + host + ']' : host) + ':' + port;
    const socket = net.connect({ host: proxy.host, port: proxy.port });
    socket.setNoDelay(true);
    let received = Buffer.alloc(0);
    let finished = false;
    function finish(error) {
      if (finished) return;
      finished = true;
      socket.removeListener('data', onData);
      socket.removeListener('error', finish);
      socket.removeListener('end', onEnd);
      if (error) {
        socket.destroy();
        callback(error);
      } else {
        callback(null, socket);
      }
    }
    function onEnd() {
      finish(new Error('the authsome proxy closed the connection during CONNECT ' + target));
    }
    function onData(chunk) {
      received = Buffer.concat([received, chunk]);
      const end = received.indexOf('\r\n\r\n');
      if (end < 0) {
        if (received.length > 65536) finish(new Error('oversized CONNECT response'));
        return;
      }
      const status = received.subarray(0, received.indexOf('\r\n')).toString('latin1');
      if (!/^HTTP\/1\.[01] 200/.test(status)) {
        finish(new Error('the authsome proxy rejected CONNECT ' + target + ': ' + status));
      } else if (end + 4 < received.length) {
        finish(new Error('unexpected bytes after the CONNECT response'));
      } else {
        finish(null);
      }
    }
    socket.on('data', onData);
    socket.once('error', finish);
    socket.once('end', onEnd);
    socket.once('connect', () => {
      socket.write('CONNECT ' + target + ' HTTP/1.1\r\nHost: ' + target +
                   '\r\nProxy-Authorization: ' + proxy.auth + '\r\n\r\n');
    });
  }

  function proxyFor(protocol, host) {
    const proxy = proxies[protocol];
    return proxy && !bypass(host) ? proxy : null;
  }

  const httpsCreate = https.Agent.prototype.createConnection;
  https.Agent.prototype.createConnection = function createConnection(options, callback) {
    const host = options && (options.host || options.hostname);
    const proxy = options && proxyFor('https:', host);
    if (!proxy || typeof callback !== 'function' || options.socket || options.socketPath) {
      return httpsCreate.apply(this, arguments);
    }
    tunnel(proxy, host, Number(options.port) || 443, (error, socket) => {
      if (error) return callback(error);
      let secure;
      try {
        secure = httpsCreate.call(this, Object.assign({}, options, { socket }));
      } catch (failure) {
        socket.destroy();
        return callback(failure);
      }
      callback(null, secure);
    });
    return undefined;
  };

  const httpCreate = http.Agent.prototype.createConnection;
  http.Agent.prototype.createConnection = function createConnection(options, callback) {
    const host = options && (options.host || options.hostname);
    const proxy = options && proxyFor('http:', host);
    if (!proxy || typeof callback !== 'function' || options.socketPath) {
      return httpCreate.apply(this, arguments);
    }
    tunnel(proxy, host, Number(options.port) || 80, callback);
    return undefined;
  };

  // fetch: Node's bundled undici reads its dispatcher from this global symbol. Its Agent
  // class is not exported, so it is taken from the default dispatcher, made on first use.
  const dispatcherKey = Symbol.for('undici.globalDispatcher.1');
  const originalFetch = globalThis.fetch;
  if (typeof originalFetch !== 'function') return;

  function connect(options, callback) {
    const secure = options.protocol === 'https:';
    const host = bare(options.hostname);
    const port = Number(options.port) || (secure ? 443 : 80);
    function start(error, socket) {
      if (error) return callback(error);
      if (!secure) return callback(null, socket);
      const servername = options.servername || (net.isIP(host) ? undefined : host);
      const secureSocket = tls.connect({ socket, host, servername, ALPNProtocols: ['http/1.1'] });
      function onError(failure) {
        callback(failure);
      }
      secureSocket.once('error', onError);
      secureSocket.once('secureConnect', () => {
        secureSocket.removeListener('error', onError);
        callback(null, secureSocket);
      });
    }
    const proxy = proxyFor(options.protocol, host);
    if (proxy) return tunnel(proxy, host, port, start);
    const socket = net.connect({ host, port });
    function onConnectError(failure) {
      callback(failure);
    }
    socket.once('error', onConnectError);
    socket.once('connect', () => {
      socket.removeListener('error', onConnectError);
      start(null, socket);
    });
  }

  let installed = false;
  function install() {
    installed = true;
    if (globalThis[dispatcherKey] !== undefined) return;  // the program chose a dispatcher
    try {
      originalFetch().catch(() => {});  // loads undici, which makes its default Agent
      const current = globalThis[dispatcherKey];
      if (current && typeof current.constructor === 'function') {
        globalThis[dispatcherKey] = new current.constructor({ connect });
      }
    } catch (error) {
      // leave fetch as it was
    }
  }
  globalThis.fetch = function fetch(input, init) {
    if (!installed) install();
    return originalFetch(input, init);
  };
  // Headers, Request, ... load the same undici module (making its default dispatcher), so
  // their first use installs the proxy dispatcher too; a dispatcher found already in place
  // on install was then set by the program itself and is left alone.
  for (const name of ['FormData', 'Headers', 'Request', 'Response', 'MessageEvent',
                      'WebSocket', 'EventSource']) {
    const descriptor = Object.getOwnPropertyDescriptor(globalThis, name);
    if (!descriptor || typeof descriptor.get !== 'function' || !descriptor.configurable) continue;
    Object.defineProperty(globalThis, name, {
      configurable: true,
      enumerable: descriptor.enumerable,
      get() {
        if (!installed) install();
        return descriptor.get.call(this);
      },
      set(value) {
        Object.defineProperty(globalThis, name, { configurable: true, writable: true,
                                                 enumerable: descriptor.enumerable, value });
      },
    });
  }
})();
"""
NODE_PRELOAD_FILE = "node-preload.js"


def child_node_options(parent_value, preload_path):
    """Return NODE_OPTIONS for the child: the inherited options (minus the preload of an outer
    authsome run) followed by --require of this run's preload file."""
    kept = re.sub(r'\s*--require\s+"[^"]*authsome-run-[^"]*%s"' % re.escape(NODE_PRELOAD_FILE), "",
                  parent_value or "").strip()
    quoted = '"%s"' % preload_path.replace("\\", "\\\\").replace('"', '\\"')
    return ("%s --require %s" % (kept, quoted)).strip()


def child_wgetrc(parent_env, bundle_path):
    """Return a wget startup file naming the CA bundle: wget built with GnuTLS (Debian's)
    ignores SSL_CERT_FILE. The user's own startup file comes first, so its settings stay."""
    source = parent_env.get("WGETRC") or os.path.join(os.path.expanduser("~"), ".wgetrc")
    try:
        with open(source, "rb") as handle:
            user = handle.read().rstrip(b"\n")
    except OSError:
        user = b""
    line = b"ca_certificate = " + os.fsencode(bundle_path) + b"\n"
    return (user + b"\n" + line) if user else line


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
        _write_private_file(run_ca_path, node_extra_ca_certs(os.environ, ca.ca_cert_pem))
        _write_private_file(bundle_path, build_ca_bundle(os.environ, ca.ca_cert_pem))
        proxy = ProxyServer(broker, ca, mapping, limits or limits_from_environment(),
                            deny_unmatched)
        proxy.start()
        warn = lambda message: out.write("warning: %s\n" % message)
        env = child_environment(os.environ, proxy.url, bundle_path, run_ca_path, broker, warn)
        preload_path = os.path.join(workdir, NODE_PRELOAD_FILE)
        _write_private_file(preload_path, NODE_PRELOAD_JS.encode("utf-8"))
        env["NODE_OPTIONS"] = child_node_options(os.environ.get("NODE_OPTIONS"), preload_path)
        wgetrc_path = os.path.join(workdir, "wgetrc")
        _write_private_file(wgetrc_path, child_wgetrc(os.environ, bundle_path))
        env["WGETRC"] = wgetrc_path
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
    """Return the Broker's hook that refreshes OAuth access tokens at use (see oauth2)."""
    return ProxyTokenRefresher(home, vault)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
# Each command parses its arguments, calls one function below (tests call them too) and prints.


class Context:
    """The state every command uses: the home, the catalog and the vault, opened lazily."""

    def __init__(self, home=None, err=None):
        self.home = home or home_dir()
        self.err = err or sys.stderr
        self._catalog = None
        self.vault = Vault(self.home, passphrase_prompt=prompt_hidden)
        self.quiet_paths = set()  # provider files not to warn about (being written right now)

    def ensure_home(self):
        """Create the home and its providers/ folder (0700), so that a shell redirect such as
        `authsome inspect g2 > ~/.authsome/providers/g2.json` has a folder to write into."""
        ensure_private_dir(self.home)
        ensure_private_dir(os.path.join(self.home, "providers"))

    def provider_path(self, provider_name):
        return os.path.join(self.home, "providers", "%s.json" % provider_name)

    @property
    def catalog(self):
        if self._catalog is None:
            self._catalog = load_catalog(self.home)
            for problem in self._catalog.problems:
                if not any(problem.startswith("invalid provider file %s:" % path)
                           for path in self.quiet_paths):
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
        record = refresh_at_use(ctx.home, ctx.vault, ctx.catalog.get(provider_name), record,
                                ctx.err, strict=False)
        return record_status(record)
    record = refresh_at_use(ctx.home, ctx.vault, ctx.catalog.get(provider_name),
                            ctx.record(provider_name, connection), ctx.err)
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
    """Revoke the provider and also delete its user definition file, if any.

    A user file that no longer validates is still deleted, so `remove` is how a broken
    definition is cleaned up."""
    path = ctx.provider_path(provider_name)
    user_file = PROVIDER_NAME_RE.match(provider_name) and os.path.isfile(path)
    if provider_name in ctx.catalog.providers or not user_file:
        result = revoke_provider(ctx, provider_name)
    else:
        result = {"provider": provider_name, "removed_connections": []}
    result["removed_definition"] = None
    if user_file:
        os.unlink(path)
        result["removed_definition"] = path
    audit(ctx.home, "remove", provider=provider_name,
          outcome="definition deleted" if user_file else None)
    return result


def revoke_remote(ctx, provider, record):
    """Revoke an OAuth token at the provider (RFC 7009); API keys have nothing to revoke.

    Failures only warn, because the caller removes the local record whatever the provider
    responds."""
    warn = lambda message: ctx.err.write("warning: %s\n" % secret_filter.mask(message))
    return revoke_oauth_tokens(ctx.home, ctx.vault, provider, record, warn)


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
    audit(ctx.home, "register", provider=provider.name, outcome="replaced" if force else "added")
    return {"provider": provider.name, "path": destination}


def set_default_connection(ctx, provider_name, connection):
    record = ctx.record(provider_name, check_connection_name(connection))

    def mutate(document):
        document["defaults"][record["provider"]] = connection

    ctx.vault.update(mutate)
    audit(ctx.home, "set_default", provider=record["provider"], connection=connection)
    return {"provider": record["provider"], "default": connection}


def export_variables(ctx, provider_name=None, connection=None):
    """Return {VARIABLE: value} with real secrets for one or all connected providers.

    Only the sources of each provider's `export` block are read (API key, access token, base
    URL), so a refresh token or client secret never leaves the vault this way."""
    if connection and not provider_name:
        raise UsageError("--connection needs a provider, e.g. authsome export g2 --connection %s"
                         % connection)
    document = ctx.vault.load()
    names = [ctx.catalog.get(provider_name).name] if provider_name else sorted(
        document["credentials"])
    variables = {}
    for name in names:
        provider = ctx.catalog.get(name)
        record = ctx.record(name, connection) if provider_name else find_record(document, name)
        record = refresh_at_use(ctx.home, ctx.vault, provider, record, ctx.err,
                                strict=bool(provider_name))
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
    audit(ctx.home, "export", provider=provider_name, connection=connection,
          outcome="exported %s" % (", ".join(sorted(variables)) or "nothing"))
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
    audit(ctx.home, "init", outcome=ctx.vault.kind())
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
    providers_folder = os.path.join(ctx.home, "providers")
    for folder, _, files in os.walk(ctx.home) if home_mode is not None else ():
        if folder == providers_folder:
            continue  # definitions hold no secret; a shell redirect creates them with the umask
        for name in files:
            path = os.path.join(folder, name)
            if stat.S_IMODE(os.lstat(path).st_mode) & 0o077:
                loose.append(path)
    checks.append({"check": "file modes", "ok": not loose,
                   "detail": "readable by others: %s; fix: chmod 600 them" % ", ".join(loose)
                   if loose else "vault, key file and audit log are 0600"})
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


# -- doctor --clients ---------------------------------------------------------------------------
# Each HTTP client found on this machine is run under `authsome run` against a local stand-in for
# a throwaway provider, in a temporary home with a throwaway credential. The stand-in has its own
# throwaway CA, which the run's proxy trusts through SSL_CERT_FILE, and the proxy reaches it
# through --connect-to, so no request leaves 127.0.0.1.
# NOTE: a client that ignores the proxy variables queries the system resolver for DOCTOR_HOST. The
# name ends in .invalid, which RFC 6761 reserves as never resolving, so that client fails.

DOCTOR_HOST = "authsome-doctor.invalid"
DOCTOR_PROVIDER = "authsome-doctor"
DOCTOR_VARIABLE = "AUTHSOME_DOCTOR_TOKEN"
DOCTOR_CLIENT_TIMEOUT = 30.0
DOCTOR_CLIENTS = ("curl", "urllib", "requests", "httpx", "node", "git", "wget")

# Runs inside `authsome run`. It points the proxy variables at a relay that records the request
# line of each connection and forwards every byte to the run's proxy, then runs the client. The
# relay's record separates "went through the proxy" from "trusted the CA".
# argv: REPORT TIMEOUT COMMAND [ARG...]
DOCTOR_PROBE = r'''
import json, os, socket, subprocess, sys, threading
from urllib.parse import urlsplit

report_path, timeout, command = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
proxy = urlsplit(os.environ["HTTPS_PROXY"])
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(16)
request_lines = []


def pipe(source, target):
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            target.sendall(data)
    except OSError:
        pass
    finally:
        try:
            target.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def relay(client):
    head = b""
    while b"\r\n" not in head and len(head) < 65536:
        data = client.recv(65536)
        if not data:
            break
        head += data
    # Only the method and target are recorded, because the lines after them carry the proxy token.
    request_lines.append(" ".join(head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")[:2]))
    upstream = socket.create_connection((proxy.hostname, proxy.port), timeout=30)
    upstream.settimeout(None)
    upstream.sendall(head)
    threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()
    pipe(client, upstream)


def accept():
    while True:
        client, _ = listener.accept()
        threading.Thread(target=relay, args=(client,), daemon=True).start()


threading.Thread(target=accept, daemon=True).start()
relay_url = "http://%s@127.0.0.1:%d" % (proxy.netloc.rpartition("@")[0], listener.getsockname()[1])
env = dict(os.environ)
for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
    env[name] = relay_url
report = {"requests": request_lines}
try:
    done = subprocess.run(command, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=timeout)
    report.update(returncode=done.returncode, stdout=done.stdout.decode("utf-8", "replace")[-2000:],
                  stderr=done.stderr.decode("utf-8", "replace")[-2000:])
except subprocess.TimeoutExpired:
    report.update(returncode=None, stdout="", stderr="timed out after %d seconds" % timeout)
except OSError as exc:
    report.update(returncode=None, stdout="", stderr=str(exc))
with open(report_path, "w") as handle:
    json.dump(report, handle)
'''

DOCTOR_PYTHON_CLIENTS = {
    "urllib": "import sys, urllib.request\n"
              "print(urllib.request.urlopen(sys.argv[1], timeout=20).read().decode())\n",
    "requests": "import sys, requests\n"
                "response = requests.get(sys.argv[1], timeout=20)\n"
                "response.raise_for_status()\n"
                "print(response.text)\n",
    "httpx": "import sys, httpx\n"
             "response = httpx.get(sys.argv[1], timeout=20)\n"
             "response.raise_for_status()\n"
             "print(response.text)\n",
}

DOCTOR_NODE_CLIENT = ("if (typeof fetch !== 'function') {"
                      " console.error('this Node has no fetch'); process.exit(1); }\n"
                      "fetch(process.argv[1]).then(r => r.text()).then(t => console.log(t), e => {"
                      " console.error(String((e && e.cause) || e)); process.exit(1); });\n")

DOCTOR_FIXES = {
    "proxy": {
        "curl": "curl reads HTTPS_PROXY and https_proxy; remove any proxy or noproxy setting from "
                "~/.curlrc and do not pass --noproxy",
        "urllib": "urllib reads HTTPS_PROXY unless the code installs ProxyHandler({}); let it use "
                  "the environment",
        "requests": "requests reads HTTPS_PROXY unless the session has trust_env=False or the "
                    "call passes proxies=; drop them",
        "httpx": "httpx reads HTTPS_PROXY with trust_env=True (the default) and no explicit "
                 "proxy=; drop trust_env=False",
        "node": "Node ignores HTTPS_PROXY before v24: keep the --require that 'authsome run' "
                "adds to NODE_OPTIONS (it sends http, https and fetch through the proxy), or "
                "upgrade to Node 24.5 or newer, which reads NODE_USE_ENV_PROXY=1; a fetch with its "
                "own dispatcher still bypasses the proxy",
        "git": "git reads https_proxy; check that 'git config --get http.proxy' is empty",
        "wget": "wget reads https_proxy; remove use_proxy = off from ~/.wgetrc and do not pass "
                "--no-proxy",
    },
    "ca": {
        "curl": "curl reads CURL_CA_BUNDLE; remove cacert or capath settings from ~/.curlrc",
        "urllib": "Python's default SSL context reads SSL_CERT_FILE; code that builds its own "
                  "context must load that file (ssl.create_default_context())",
        "requests": "requests reads REQUESTS_CA_BUNDLE unless the call passes verify= with another "
                    "file; drop it",
        "httpx": "httpx reads SSL_CERT_FILE with trust_env=True; an explicit verify= context must "
                 "load os.environ['SSL_CERT_FILE']",
        "node": "Node reads NODE_EXTRA_CA_CERTS at start-up; do not override it in the agent's "
                "launcher",
        "git": "git reads GIT_SSL_CAINFO; check 'git config --get http.sslCAInfo' and "
               "http.sslBackend",
        "wget": "wget built with GnuTLS ignores SSL_CERT_FILE, so 'authsome run' names the CA "
                "bundle in its own WGETRC; keep WGETRC from being replaced",
    },
    "credential": "the request reached the host without the credential; run 'authsome --verbose "
                  "run ...' to see why the proxy injected nothing",
}


def program_command():
    """Return the argv prefix that runs this authsome (the script, or the zipapp holding it)."""
    archive = getattr(globals().get("__loader__"), "archive", None)
    return [sys.executable, archive or os.path.abspath(__file__)]


def client_version(name):
    """Return a short version string of a client, or None when it is unknown."""
    import subprocess
    if name == "urllib":
        return "Python %d.%d.%d" % sys.version_info[:3]
    if name in ("requests", "httpx"):
        command = [sys.executable, "-c", "import %s; print(%s.__version__)" % (name, name)]
    else:
        command = [name, "--version"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=15,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    words = done.stdout.strip().split()
    # The first lines read "curl 7.88.1 ...", "git version 2.39.5" and "GNU Wget 1.21.3 ...".
    position = {"curl": 1, "git": 2, "wget": 2}.get(name, 0)
    if len(words) > position:
        return words[position]
    return None


def present_clients():
    """Return the names of the HTTP clients that exist on this machine, in a fixed order."""
    import importlib.util
    import shutil
    found = []
    for name in DOCTOR_CLIENTS:
        if name == "urllib":
            found.append(name)
        elif name in ("requests", "httpx"):
            if importlib.util.find_spec(name) is not None:
                found.append(name)
        elif shutil.which(name):
            found.append(name)
    return found


def select_clients(text):
    """Return the clients named in `text` (comma-separated, or "all" for every present one)."""
    present = present_clients()
    if text == "all":
        return present
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in DOCTOR_CLIENTS]
    if unknown or not names:
        raise UsageError("invalid --clients %r: choose from %s" % (text, ",".join(DOCTOR_CLIENTS)))
    missing = [name for name in names if name not in present]
    if missing:
        raise UsageError("client not found on this machine: %s; present: %s"
                         % (", ".join(missing), ", ".join(present)))
    return names


def client_command(name, workdir, url):
    if name == "curl":
        return ["curl", "-sS", "--fail", "--max-time", "20", url]
    if name == "node":
        return ["node", "-e", DOCTOR_NODE_CLIENT, url]
    if name == "git":
        return ["git", "ls-remote", url + "/repo.git"]
    if name == "wget":
        return ["wget", "--no-verbose", "-O", "-", "--timeout=20", "--tries=1", url]
    script = os.path.join(workdir, "client_%s.py" % name)
    _write_private_file(script, DOCTOR_PYTHON_CLIENTS[name].encode())
    return [sys.executable, script, url]


class DoctorOrigin:
    """The local stand-in for DOCTOR_HOST: HTTPS with a leaf from its own throwaway CA. It
    records, per client (the first path segment), whether the request carried the credential."""

    def __init__(self, ca, token):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        context = ca.server_context(DOCTOR_HOST)
        expected = ("Bearer " + token).encode()
        received = self.received = {}

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format, *args):
                pass

            def do_GET(self):
                client = self.path.lstrip("/").split("/", 1)[0]
                value = (self.headers.get("Authorization") or "").encode("latin-1", "replace")
                received[client] = hmac.compare_digest(value, expected)
                body = ("authsome doctor stand-in: credential %s\n"
                        % ("received" if received[client] else "missing")).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def finish_request(self, request, client_address):
                try:
                    request.settimeout(30)
                    tls = context.wrap_socket(request, server_side=True)
                except (OSError, ssl.SSLError) as exc:
                    log.debug("doctor stand-in: TLS handshake with the proxy failed: %s", exc)
                    return
                try:
                    Handler(tls, client_address, self)
                except (OSError, ssl.SSLError) as exc:
                    log.debug("doctor stand-in: connection from the proxy failed: %s", exc)
                finally:
                    with contextlib.suppress(OSError):
                        tls.close()

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.1}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.httpd.shutdown()
        self.httpd.server_close()


def doctor_environment(temp_home, ca_path, master_key):
    env = {name: value for name, value in os.environ.items() if not name.startswith("AUTHSOME_")}
    env.update(AUTHSOME_HOME=temp_home, AUTHSOME_MASTER_KEY=master_key, SSL_CERT_FILE=ca_path,
               GIT_TERMINAL_PROMPT="0")
    return env


def setup_doctor_home(temp_home, env, token, program):
    """Install the throwaway provider and log in to it with the throwaway credential."""
    import subprocess
    ensure_private_dir(temp_home)
    ensure_private_dir(os.path.join(temp_home, "providers"))
    definition = {"name": DOCTOR_PROVIDER, "display_name": "authsome doctor stand-in",
                  "auth_type": "api_key", "flow": "api_key", "api_url": DOCTOR_HOST,
                  "api_key": {"header_name": "Authorization", "header_prefix": "Bearer",
                              "env_var": DOCTOR_VARIABLE},
                  "export": {DOCTOR_VARIABLE: "API_KEY"}}
    write_file_atomic(os.path.join(temp_home, "providers", DOCTOR_PROVIDER + ".json"),
                      json.dumps(definition, indent=2).encode())
    done = subprocess.run(program + ["login", DOCTOR_PROVIDER, "--stdin"], input=token, env=env,
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise AuthsomeError("doctor could not set up its throwaway credential: %s"
                            % (done.stderr.strip() or "exit code %d" % done.returncode))


def probe_client(name, workdir, env, program, port, timeout=DOCTOR_CLIENT_TIMEOUT):
    """Run one client under `authsome run` through the probe; return the probe's report."""
    import subprocess
    url = "https://%s/%s" % (DOCTOR_HOST, name)
    report_path = os.path.join(workdir, "report-%s.json" % name)
    probe_path = os.path.join(workdir, "probe.py")
    command = program + ["run", "--connect-to", "%s:443=127.0.0.1:%d" % (DOCTOR_HOST, port), "--",
                         sys.executable, probe_path, report_path, str(timeout)]
    command += client_command(name, workdir, url)
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True,
                              timeout=timeout + 30, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"requests": [], "returncode": None, "stdout": "",
                "stderr": "authsome run timed out"}
    try:
        with open(report_path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {"requests": [], "returncode": done.returncode, "stdout": "",
                "stderr": done.stderr.strip() or "the probe left no report"}


def judge_client(name, version, report, received):
    """Turn a probe report and the stand-in's record into the doctor's verdict for a client."""
    through_proxy = any(DOCTOR_HOST in line for line in report["requests"])
    trusted = (name in received) if through_proxy else None
    credential = received.get(name, False) if trusted else None
    ok = bool(through_proxy and trusted and credential)
    fix = None
    if not through_proxy:
        fix = DOCTOR_FIXES["proxy"][name]
    elif not trusted:
        fix = DOCTOR_FIXES["ca"][name]
    elif not credential:
        fix = DOCTOR_FIXES["credential"]
    lines = [line.strip() for line in (report.get("stderr") or "").splitlines() if line.strip()]
    detail = ""
    if lines and not ok:
        # A Python traceback ends with the exception; the other clients print theirs first.
        line = lines[-1] if name in DOCTOR_PYTHON_CLIENTS else lines[0]
        detail = secret_filter.mask(line)[:300]
    return {"client": name, "version": version, "through_proxy": through_proxy,
            "trusted_ca": trusted, "credential": credential, "ok": ok, "fix": fix,
            "detail": detail}


def check_clients(names=None, program=None, timeout=DOCTOR_CLIENT_TIMEOUT):
    """Run each HTTP client (default: those present) under `authsome run` against a local
    stand-in and return one verdict per client: through the proxy, CA trusted, credential."""
    import shutil
    import tempfile
    program = program or program_command()
    names = present_clients() if names is None else list(names)
    token = "doctor-" + secrets.token_urlsafe(24)
    secret_filter.register(token)
    workdir = tempfile.mkdtemp(prefix="authsome-doctor-")  # 0700, removed below
    try:
        ca_dir = os.path.join(workdir, "ca")
        ensure_private_dir(ca_dir)
        ca = CertificateAuthority(ca_dir)
        ca_path = os.path.join(workdir, "stand-in-ca.pem")
        _write_private_file(ca_path, ca.ca_cert_pem)
        _write_private_file(os.path.join(workdir, "probe.py"), DOCTOR_PROBE.encode())
        temp_home = os.path.join(workdir, "home")
        env = doctor_environment(temp_home, ca_path, b64encode(os.urandom(32)))
        setup_doctor_home(temp_home, env, token, program)
        results = []
        with DoctorOrigin(ca, token) as origin:
            for name in names:
                report = probe_client(name, workdir, env, program, origin.port, timeout)
                results.append(judge_client(name, client_version(name), report, origin.received))
        return results
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def build_parser():
    import argparse

    class Parser(argparse.ArgumentParser):
        """An argument parser that reports usage errors as one `error:` line (exit code 2)
        instead of a usage block."""

        def error(self, message):
            raise UsageError("%s; see: %s --help" % (message, self.prog))

    common = Parser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print one JSON document on stdout")
    common.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS,
                        help="log each proxied request and other details on stderr")
    common.add_argument("--no-color", action="store_true", default=argparse.SUPPRESS,
                        help="print without colour (also when NO_COLOR is set)")
    common.add_argument("--version", action="version", version="authsome %s" % __version__)
    parser = Parser(
        prog="authsome", parents=[common],
        description="Local credential broker for AI agents: log in once, run agents behind a "
                    "proxy that injects the credential.",
        epilog="example: authsome login g2 && authsome run -- python3 my_agent.py")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name, summary, example):
        return commands.add_parser(name, parents=[common], help=summary, description=summary,
                                   epilog="example: %s" % example,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)

    def connection_option(sub):
        sub.add_argument("--connection", metavar="NAME",
                         help="connection name (default: the provider's default connection)")

    sub = command("login", "Log in to a provider and store its credential in the vault.",
                  "authsome login g2 --connection team")
    sub.add_argument("provider")
    connection_option(sub)
    sub.add_argument("--force", action="store_true", help="replace an existing credential")
    sub.add_argument("--no-browser", action="store_true", help="ask in the terminal instead")
    sub.add_argument("--stdin", action="store_true",
                     help="read the API key, or the OAuth client secret, from standard input")
    sub.add_argument("--port", type=int, help="port of the local login form (default 7998, "
                                              "or AUTHSOME_LOGIN_PORT) or of the OAuth callback "
                                              "(default: a free port)")
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
                     help="protect the vault with a passphrase (asked twice, or taken from "
                          "AUTHSOME_NEW_PASSPHRASE or AUTHSOME_PASSPHRASE)")

    sub = command("passphrase", "Set, change or remove the vault passphrase.",
                  "authsome passphrase")
    sub.add_argument("--remove", action="store_true", help="go back to the key file")

    sub = command("doctor", "Check the home folder, the vault and the provider definitions.",
                  "authsome doctor --clients")
    sub.add_argument("--clients", nargs="?", const="all", metavar="NAMES",
                     help="also run each HTTP client found here (curl, urllib, requests, httpx, "
                          "node, git, wget; or only the comma-separated NAMES) under 'authsome "
                          "run' against a local stand-in, and report whether it used the proxy, "
                          "trusted the CA and got the credential")

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


def read_new_passphrase(fallback_variable=None):
    """Return the new passphrase from AUTHSOME_NEW_PASSPHRASE (or `fallback_variable`), else ask
    for it twice on the terminal."""
    for variable in ("AUTHSOME_NEW_PASSPHRASE", fallback_variable):
        if variable and variable in os.environ:
            if not os.environ[variable]:
                raise UsageError("%s is set but empty; a passphrase must not be empty" % variable)
            return os.environ[variable]
    if not open_terminal_prompt():
        raise UsageError("no terminal to ask for the new passphrase: set AUTHSOME_NEW_PASSPHRASE, "
                         "or run the command in a terminal")
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
    scopes = parse_scope_list(args.scopes) if args.scopes is not None else None
    browser = has_graphical_session() and not args.no_browser
    if args.stdin:
        secret_mode = "stdin"
    else:
        secret_mode = "browser" if browser else "prompt"
    record = oauth_login(ctx.home, provider, connection, flow=args.flow, scopes=scopes,
                         base_url=args.base_url, client_id=args.client_id,
                         secret_mode=secret_mode, port=args.port, browser=browser, err=ctx.err)
    return {"provider": provider.name, "connection": connection,
            "status": record_status(record), "changed": True, "scopes": record["scopes"],
            "expires_at": record["expires_at"],
            "message": "Logged in to %s (connection %s)." % (provider.display_name, connection)}


ANSI_CODES = {"green": "32", "yellow": "33", "red": "31", "dim": "2", "bold": "1"}
STATUS_COLORS = {STATUS_CONNECTED: "green", STATUS_EXPIRED: "yellow", STATUS_INVALID: "red",
                 STATUS_NOT_CONNECTED: "dim"}


def color_enabled(args, stream):
    """Colour only on a terminal, and never with --no-color or a non-empty NO_COLOR."""
    if getattr(args, "no_color", False) or os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and os.environ.get("TERM") != "dumb"


def paint(text, color, enabled):
    return "\x1b[%sm%s\x1b[0m" % (ANSI_CODES[color], text) if enabled and color else text


def print_human(command, result, out, color=False):
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
        print_provider_table(result, out, color)
    elif command == "whoami":
        for key, value in result.items():
            out.write("%s: %s\n" % (key, value))
    elif command == "log":
        for entry in result:
            out.write(format_audit_entry(entry) + "\n")
    elif command == "doctor":
        print_doctor(result, out, color)
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


def provider_table_rows(rows):
    """Flatten list_providers() into one table row per connection (or per provider without
    one): provider, source, type, connection, status, expiry."""
    table = []
    for row in rows:
        several = len(row["connections"]) > 1
        for item in row["connections"]:
            expires = item["expires_at"]
            table.append([row["name"], row["source"], row["auth_type"],
                          item["connection"] + ("*" if several and item["default"] else ""),
                          item["status"], iso_time(expires) if expires else "never"])
        if not row["connections"]:
            table.append([row["name"], row["source"], row["auth_type"], "-",
                          STATUS_NOT_CONNECTED, "-"])
    return table


def print_provider_table(rows, out, color=False):
    header = ["PROVIDER", "SOURCE", "TYPE", "CONNECTION", "STATUS", "EXPIRES"]
    table = provider_table_rows(rows)
    widths = [max(len(line[index]) for line in [header] + table) for index in range(len(header))]
    for line in [header] + table:
        cells = [cell.ljust(width) for cell, width in zip(line, widths)]
        if line is not header:
            cells[4] = paint(cells[4], STATUS_COLORS.get(line[4]), color)
        out.write("  ".join(cells).rstrip() + "\n")
    if any(line[3].endswith("*") for line in table):
        out.write("* default connection (change it with: authsome set-default PROVIDER "
                  "CONNECTION)\n")


def format_audit_entry(entry):
    known = ("time", "event", "provider", "connection", "method", "host", "path", "outcome")
    parts = [entry.get("time", "-"), "%-11s" % entry.get("event", "-")]
    if entry.get("provider"):
        parts.append(entry["provider"] + ("/" + entry["connection"] if entry.get("connection")
                                          else ""))
    request = " ".join(entry[key] for key in ("method", "host", "path") if entry.get(key))
    if request:
        parts.append(request)
    if entry.get("outcome"):
        parts.append(str(entry["outcome"]))
    parts.extend("%s=%s" % (key, entry[key]) for key in sorted(entry) if key not in known)
    return "  ".join(parts)


def yes_no(value):
    if value is None:
        return "not tested"
    return "yes" if value else "no"


def print_doctor(report, out, color=False):
    for check in report["checks"]:
        mark = paint("ok  ", "green", color) if check["ok"] else paint("FAIL", "red", color)
        out.write("%s  %s: %s\n" % (mark, check["check"], check["detail"]))
    if "clients" not in report:
        return
    out.write("clients (each run under 'authsome run' against a local stand-in, with a "
              "throwaway credential):\n")
    for client in report["clients"]:
        mark = paint("ok  ", "green", color) if client["ok"] else paint("FAIL", "red", color)
        name = client["client"] + (" " + client["version"] if client.get("version") else "")
        out.write("  %s  %s: went through the proxy: %s; trusted the CA: %s; received the "
                  "credential: %s\n" % (mark, name, yes_no(client["through_proxy"]),
                                        yes_no(client["trusted_ca"]), yes_no(client["credential"])))
        if client.get("detail"):
            out.write("        output: %s\n" % client["detail"])
        if client.get("fix"):
            out.write("        fix: %s\n" % client["fix"])


def export_command(ctx, args):
    """Run `export`: the variables, plus the warning on stderr about where they now live."""
    variables = export_variables(ctx, args.provider, args.connection)
    if variables:
        ctx.err.write("warning: these secrets are now in your shell's environment; "
                      "'authsome run -- COMMAND' keeps them out of it\n")
    else:
        ctx.err.write("warning: nothing to export: no connected provider has export variables\n")
    return variables


def doctor_command(ctx, args):
    report = {"checks": doctor_checks(ctx)}
    if args.clients:
        report["clients"] = check_clients(select_clients(args.clients))
    report["ok"] = all(item["ok"] for item in report["checks"] + report.get("clients", []))
    return report


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
        # `authsome inspect g2 > ~/.authsome/providers/g2.json`: the shell has already created
        # the empty target, which is not worth a warning.
        target = ctx.provider_path(args.provider)
        if PROVIDER_NAME_RE.match(args.provider) and os.path.isfile(target) \
                and os.path.getsize(target) == 0:
            ctx.quiet_paths.add(target)
        return inspect_provider(ctx, args.provider), EXIT_OK
    if name == "register":
        return register_provider(ctx, args.file, args.force), EXIT_OK
    if name == "set-default":
        return set_default_connection(ctx, args.provider, args.connection), EXIT_OK
    if name == "export":
        return export_command(ctx, args), EXIT_OK
    if name == "whoami":
        return vault_summary(ctx), EXIT_OK
    if name == "log":
        if args.n < 0:
            raise UsageError("-n must be 0 or more, got %d" % args.n)
        return read_audit_log(ctx.home, args.n), EXIT_OK
    if name == "init":
        passphrase = read_new_passphrase("AUTHSOME_PASSPHRASE") if args.passphrase else None
        return init_vault(ctx, passphrase), EXIT_OK
    if name == "passphrase":
        new = None if args.remove else read_new_passphrase()
        return change_passphrase(ctx, new, args.remove), EXIT_OK
    if name == "doctor":
        report = doctor_command(ctx, args)
        return report, EXIT_OK if report["ok"] else EXIT_UNEXPECTED
    raise UsageError("unknown command %r" % name)


def configure_logging(verbose):
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("authsome: %(message)s"))
    handler.addFilter(secret_filter)
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if verbose else logging.WARNING)
    log.propagate = False


def wants_json(argv):
    """Return whether --json is among the options (not in a command after `--`), for usage
    errors that stop before the arguments are parsed."""
    options = argv[:argv.index("--")] if "--" in argv else argv
    return "--json" in options


def main(argv=None):
    if sys.version_info < (3, 9):
        sys.stderr.write("error: authsome needs Python 3.9 or newer; this is Python %d.%d\n"
                         % sys.version_info[:2])
        return EXIT_UNEXPECTED
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = wants_json(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        return report_error(exc, as_json)
    as_json = getattr(args, "json", False)
    verbose = getattr(args, "verbose", False)
    configure_logging(verbose)
    if not args.command:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    out = sys.stdout
    try:
        ctx = Context()
        try:
            ctx.ensure_home()
        except OSError as exc:
            raise AuthsomeError("cannot create home folder %s: %s; set AUTHSOME_HOME to a "
                                "writable folder" % (ctx.home, exc.strerror or exc)) from None
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
        result, code = dispatch(ctx, args, out)
        if as_json:
            out.write(json.dumps(result, indent=2, sort_keys=True) + "\n")
        elif args.command == "export":
            text = format_export(result, args.format)
            out.write(text + "\n" if text else "")
        else:
            print_human(args.command, result, out, color_enabled(args, out))
        out.flush()
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
    except Exception as exc:
        return report_unexpected(exc, verbose)


def report_error(exc, as_json):
    message = secret_filter.mask(str(exc))
    sys.stderr.write("error: %s\n" % message)
    if as_json:
        sys.stdout.write(json.dumps({"error": message, "exit_code": exc.code}) + "\n")
    return exc.code


def report_unexpected(exc, verbose):
    """Report a bug (not a user error): one line by default, the masked traceback with
    --verbose."""
    if verbose:
        import traceback
        sys.stderr.write(secret_filter.mask(traceback.format_exc()))
    sys.stderr.write("error: unexpected %s: %s (run with --verbose for the traceback, and "
                     "please report it)\n" % (exc.__class__.__name__, secret_filter.mask(str(exc))))
    return EXIT_UNEXPECTED

if __name__ == "__main__":
    sys.exit(main())
