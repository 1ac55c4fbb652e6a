"""Tests for the crypto primitives and the vault of authsome, against docs/vault-format.md.

The known-answer vectors are read from the document itself, so the document and the code
cannot drift apart. The test also carries its own small implementation of the AEAD, written
from the document's description, as a third opinion.
"""

import base64
import errno
import fcntl
import hashlib
import hmac
import json
import os
import random
import re
import signal
import stat
import struct
import subprocess
import sys
import time

import pytest

import authsome
from conftest import AUTHSOME, REPO, assert_no_secret, assert_no_secret_in_tree, run_cli

DOC = REPO / "docs" / "vault-format.md"
SECRET = "g2key-abc"
EXIT_VAULT = 7

# RFC 5869 appendix A.1 to A.3 (HKDF with SHA-256): ikm, salt, info, L, PRK, OKM.
RFC5869 = {
    1: ("0b" * 22, "000102030405060708090a0b0c", "f0f1f2f3f4f5f6f7f8f9", 42,
        "077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5",
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"),
    2: (bytes(range(0x00, 0x50)).hex(), bytes(range(0x60, 0xb0)).hex(), bytes(range(0xb0, 0x100)).hex(), 82,
        "06a6b88c5853361a06104c9ceb35b45cef760014904671014a193f40c15fc244",
        "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c"
        "59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71"
        "cc30c58179ec3e87c14c01d5c1f3434f1d87"),
    3: ("0b" * 22, "", "", 42,
        "19ef24a32c717b167f33a91d6f648bdf96596776afdb6377ac434c1c293ccb04",
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"),
}


# ============================================================================================
# Reading the document
# ============================================================================================

def doc_blocks():
    """Return the ```text blocks of the format document as dicts of label -> text value.

    A value continues on following lines that start with a space.
    """
    blocks = []
    for body in re.findall(r"```text\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S):
        fields, last = {}, None
        for line in body.splitlines():
            if not line.strip():
                continue
            if line[0] == " " and last is not None:
                fields[last] += line.strip()
                continue
            label, _, value = line.partition(" ")
            fields[label] = value.strip()
            last = label
        blocks.append(fields)
    return blocks


def unhex(text):
    return b"" if text == "(empty)" else bytes.fromhex(text)


def blocks_with(label):
    return [block for block in doc_blocks() if label in block]


AEAD_BLOCKS = blocks_with("sealed") if DOC.exists() else []


# ============================================================================================
# An independent AEAD, from the document's description
# ============================================================================================

def ref_hkdf(ikm, salt, info, length):
    prk = hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()
    output, block = b"", b""
    for counter in range(1, 256):
        if len(output) >= length:
            break
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        output += block
    return output[:length]


def ref_seal(key, plaintext, ad, nonce):
    enc_key = ref_hkdf(key, b"", b"authsome v1 encryption key", 32)
    mac_key = ref_hkdf(key, b"", b"authsome v1 authentication key", 32)
    stream = b"".join(hmac.new(enc_key, nonce + struct.pack(">Q", i), hashlib.sha256).digest()
                      for i in range((len(plaintext) + 31) // 32))
    ciphertext = bytes(a ^ b for a, b in zip(plaintext, stream))
    tagged = b"".join(struct.pack(">Q", len(part)) + part for part in (ad, nonce, ciphertext))
    return nonce + ciphertext + hmac.new(mac_key, tagged, hashlib.sha256).digest()


# ============================================================================================
# Helpers
# ============================================================================================

@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """In-process vault calls read os.environ: drop the developer's AUTHSOME_* variables."""
    for name in list(os.environ):
        if name.startswith("AUTHSOME_"):
            monkeypatch.delenv(name)


def make_vault(home, secret=SECRET, connection=None):
    """Store one g2 key with the CLI; return the vault file's bytes."""
    args = ["login", "g2", "--stdin"] + (["--connection", connection] if connection else [])
    result = run_cli(args, home.env, input=secret)
    assert result.returncode == 0, result.stderr
    return (home.path / "vault.bin").read_bytes()


def stored_key(home, connection="default"):
    document = authsome.Vault(str(home.path)).load()
    return document["credentials"]["g2"][connection]["api_key"]


def assert_vault_error(result, vault_path):
    """Exit 7 and exactly one line `error: ...` on stderr that names the vault file."""
    assert result.returncode == EXIT_VAULT, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    assert str(vault_path) in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def in_process_fails(home, data):
    """Write `data` as the vault, check that Vault.load() raises VaultError naming the file."""
    path = home.path / "vault.bin"
    path.write_bytes(data)
    with pytest.raises(authsome.VaultError) as caught:
        authsome.Vault(str(home.path)).load()
    assert str(path) in str(caught.value)
    assert caught.value.code == EXIT_VAULT
    assert path.read_bytes() == data


def cli_fails(home, data, args=("get", "g2"), input=None):
    path = home.path / "vault.bin"
    path.write_bytes(data)
    result = run_cli(list(args), home.env, input=input)
    assert_vault_error(result, path)
    assert path.read_bytes() == data
    assert not temp_files(home)
    return result


def temp_files(home):
    return sorted(name for name in os.listdir(home.path) if name.endswith(".tmp"))


def sample_offsets(length):
    """Return 10 offsets spread over framing, header, wrapped key and document of a vault file."""
    fixed = [0, 8, 11, 14, length // 4, length // 2, length - 49, length - 33, length - 1]
    return sorted(set(fixed + [random.randrange(length)]))


def data_key(vault_path, kek):
    """Unwrap the data key of a vault file with `kek`, as the format document describes."""
    parsed = authsome.VaultFile(str(vault_path), vault_path.read_bytes())
    return authsome.aead_open(kek, parsed.wrapped_key, parsed.prefix + b"dek")


def header(vault_path):
    raw = vault_path.read_bytes()
    length = struct.unpack(">I", raw[10:14])[0]
    return json.loads(raw[14:14 + length])


# ============================================================================================
# HKDF
# ============================================================================================

@pytest.mark.parametrize("case", sorted(RFC5869))
def test_hkdf_rfc5869(case):
    ikm, salt, info, length, prk, okm = RFC5869[case]
    assert authsome.hkdf_extract(bytes.fromhex(salt), bytes.fromhex(ikm)).hex() == prk
    assert authsome.hkdf_sha256(bytes.fromhex(ikm), bytes.fromhex(salt), bytes.fromhex(info), length).hex() == okm
    assert ref_hkdf(bytes.fromhex(ikm), bytes.fromhex(salt), bytes.fromhex(info), length).hex() == okm


def test_hkdf_doc_matches_rfc():
    blocks = {int(block["case"]): block for block in blocks_with("okm")}
    assert sorted(blocks) == [1, 2, 3]
    for case, (ikm, salt, info, length, prk, okm) in RFC5869.items():
        block = blocks[case]
        assert unhex(block["ikm"]).hex() == ikm
        assert unhex(block["salt"]).hex() == salt
        assert unhex(block["info"]).hex() == info
        assert int(block["length"]) == length
        assert block["prk"] == prk
        assert block["okm"] == okm


def test_hkdf_length_limit():
    assert len(authsome.hkdf_sha256(b"k", b"", b"", 255 * 32)) == 255 * 32
    with pytest.raises(ValueError):
        authsome.hkdf_sha256(b"k", b"", b"", 255 * 32 + 1)


# ============================================================================================
# AEAD
# ============================================================================================

def test_aead_doc_coverage():
    lengths = sorted(len(unhex(block["plaintext"])) for block in AEAD_BLOCKS)
    assert {0, 1, 100} <= set(lengths), lengths


@pytest.mark.parametrize("block", AEAD_BLOCKS, ids=[b["name"].split()[0] for b in AEAD_BLOCKS])
def test_aead_doc_vectors(block):
    key, nonce, ad = unhex(block["key"]), unhex(block["nonce"]), unhex(block["ad"])
    plaintext, sealed = unhex(block["plaintext"]), unhex(block["sealed"])
    assert authsome.aead_seal(key, plaintext, ad, nonce) == sealed
    assert ref_seal(key, plaintext, ad, nonce) == sealed
    assert authsome.aead_open(key, sealed, ad) == plaintext
    assert len(sealed) == 16 + len(plaintext) + 32


def test_aead_rejects_bit_flips():
    key = bytes(range(32))
    ad = b"associated"
    sealed = authsome.aead_seal(key, b"x" * 45, ad)
    for bit in range(len(sealed) * 8):
        damaged = bytearray(sealed)
        damaged[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(authsome.AuthenticationFailed):
            authsome.aead_open(key, bytes(damaged), ad)
    assert authsome.aead_open(key, sealed, ad) == b"x" * 45


def test_aead_rejects_wrong_inputs():
    key = os.urandom(32)
    sealed = authsome.aead_seal(key, b"payload", b"ad")
    for wrong_key, wrong_ad, blob in [
        (os.urandom(32), b"ad", sealed),
        (key, b"ad!", sealed),
        (key, b"", sealed),
        (key, b"ad", sealed + b"\x00"),
        (key, b"ad", sealed[:-1]),
        (key, b"ad", sealed[:47]),
        (key, b"ad", b""),
    ]:
        with pytest.raises(authsome.AuthenticationFailed):
            authsome.aead_open(wrong_key, blob, wrong_ad)


def test_aead_roundtrip():
    key = os.urandom(32)
    for length in list(range(0, 70)) + [1000, 4097]:
        plaintext = os.urandom(length)
        sealed = authsome.aead_seal(key, plaintext, b"ad")
        assert authsome.aead_open(key, sealed, b"ad") == plaintext
    # Each seal draws a random nonce, so equal inputs give different blobs.
    assert authsome.aead_seal(key, b"same", b"") != authsome.aead_seal(key, b"same", b"")


def test_aead_key_size():
    with pytest.raises(ValueError):
        authsome.aead_seal(b"short", b"", b"")


# ============================================================================================
# File format
# ============================================================================================

def test_format_doc_vault_file(home, monkeypatch):
    (block,) = blocks_with("file")
    master, dek = unhex(block["master"]), unhex(block["dek"])
    document, expected = unhex(block["document"]), unhex(block["file"])
    # Rebuild the file from the description with the vector's nonces.
    header_bytes = b'{"kek":"master_key"}'
    prefix = b"AUTHSOME" + struct.pack(">HI", 1, len(header_bytes)) + header_bytes
    wrapped = ref_seal(master, dek, prefix + b"dek", unhex(block["nonce1"]))
    built = prefix + wrapped + ref_seal(dek, document, prefix + wrapped, unhex(block["nonce2"]))
    assert built == expected
    assert len(expected) == 142 + len(header_bytes) + len(document)
    # authsome opens it.
    home.path.mkdir(mode=0o700)
    (home.path / "vault.bin").write_bytes(expected)
    monkeypatch.setenv("AUTHSOME_MASTER_KEY", base64.b64encode(master).decode())
    assert authsome.Vault(str(home.path)).load() == json.loads(document)


def test_format_keyfile_layout(home):
    raw = make_vault(home)
    assert raw[:8] == b"AUTHSOME"
    version, length = struct.unpack(">HI", raw[8:14])
    assert version == 1
    assert raw[14:14 + length] == b'{"kek":"key_file"}'
    key = base64.b64decode((home.path / "vault.key").read_bytes().strip(), validate=True)
    assert len(key) == 32
    dek = data_key(home.path / "vault.bin", key)
    document = authsome.aead_open(dek, raw[14 + length + 80:], raw[:14 + length + 80])
    assert json.loads(document)["credentials"]["g2"]["default"]["api_key"] == SECRET


# ============================================================================================
# Damaged vault files
# ============================================================================================

def test_vault_byte_flips(home):
    original = make_vault(home)
    for offset in range(len(original)):
        damaged = bytearray(original)
        damaged[offset] ^= 0x01
        in_process_fails(home, bytes(damaged))
    for offset in sample_offsets(len(original)):
        damaged = bytearray(original)
        damaged[offset] ^= 0x01
        cli_fails(home, bytes(damaged))
    (home.path / "vault.bin").write_bytes(original)
    assert stored_key(home) == SECRET


def test_vault_truncations(home):
    original = make_vault(home)
    for length in range(len(original)):
        in_process_fails(home, original[:length])
    for length in sample_offsets(len(original)):
        cli_fails(home, original[:length])


def test_vault_damaged_login_refused(home):
    original = make_vault(home)
    flipped = bytearray(original)
    flipped[len(original) // 2] ^= 0x01
    for damaged in (bytes(flipped), original[:-1], original[:20], b""):
        cli_fails(home, damaged, args=("login", "g2", "--stdin", "--force"), input="g2key-new")
        cli_fails(home, damaged, args=("login", "g2", "--connection", "other", "--stdin"),
                  input="g2key-new")


def test_vault_passphrase_header_damage(home, monkeypatch):
    """Every flip in a passphrase vault's header is a VaultError, never another exception."""
    monkeypatch.setattr(authsome, "SCRYPT_N", 2 ** 10)  # keep each derivation cheap
    monkeypatch.setenv("AUTHSOME_PASSPHRASE", "pw-header")
    vault = authsome.Vault(str(home.path))
    vault.rewrap(authsome.KEK_PASSPHRASE, "pw-header")
    vault.update(lambda document: document["defaults"].update(g2="default"))
    original = (home.path / "vault.bin").read_bytes()
    length = struct.unpack(">I", original[10:14])[0]
    for offset in range(14 + length + 1):
        damaged = bytearray(original)
        damaged[offset] ^= 0x01
        in_process_fails(home, bytes(damaged))

    # Edited headers: each one is reported as a VaultError before or after key derivation.
    body = original[14 + length:]
    salt = json.loads(original[14:14 + length])["scrypt"]["salt"]
    edits = [
        {"n": 2 ** 20, "r": 8, "p": 1},   # 256*n*r*p is above what hashlib.scrypt takes as maxmem
        {"n": 2 ** 11, "r": 8, "p": 1},   # valid but different parameters: the tag fails
        {"n": 1000, "r": 8, "p": 1},
        {"n": 1, "r": 8, "p": 1},
        {"n": 1024, "r": 0, "p": 1},
        {"n": True, "r": 8, "p": 1},
        {"n": 1024, "r": 8, "p": 1, "salt": "not base64!"},
        {"n": 1024, "r": 8, "p": 1, "salt": 7},
    ]
    for params in edits:
        new_header = json.dumps({"kek": "passphrase", "scrypt": dict({"salt": salt}, **params)}).encode()
        in_process_fails(home, b"AUTHSOME" + struct.pack(">HI", 1, len(new_header)) + new_header + body)
    for new_header in (b'{"kek":"passphrase"}', b'{"kek":"other"}', b"[]", b"{", b"\xff"):
        in_process_fails(home, b"AUTHSOME" + struct.pack(">HI", 1, len(new_header)) + new_header + body)


def test_keyfile_missing_or_wrong(home):
    make_vault(home)
    key_path = home.path / "vault.key"
    original_key = key_path.read_bytes()
    key_path.unlink()
    result = run_cli(["get", "g2"], home.env)
    assert_vault_error(result, home.path / "vault.bin")
    assert "vault.key" in result.stderr
    assert "missing" in result.stderr
    key_path.write_bytes(base64.b64encode(os.urandom(32)) + b"\n")
    assert_vault_error(run_cli(["get", "g2"], home.env), home.path / "vault.bin")
    key_path.write_bytes(b"not a key\n")
    result = run_cli(["get", "g2"], home.env)
    assert result.returncode == EXIT_VAULT
    assert "vault.key" in result.stderr
    key_path.write_bytes(original_key)
    assert stored_key(home) == SECRET


def test_keyfile_empty_replaced(home):
    """A key file cut short before any vault used it (a crash on first use) is replaced."""
    home.path.mkdir(mode=0o700)
    (home.path / "vault.key").write_bytes(b"")
    make_vault(home)
    assert stored_key(home) == SECRET
    assert len(base64.b64decode((home.path / "vault.key").read_bytes())) == 32


# ============================================================================================
# Passphrase and master key
# ============================================================================================

def passphrase_env(home, current=None, new=None):
    env = dict(home.env)
    if current is not None:
        env["AUTHSOME_PASSPHRASE"] = current
    if new is not None:
        env["AUTHSOME_NEW_PASSPHRASE"] = new
    return env


def test_passphrase_wrong(home):
    result = run_cli(["init", "--passphrase"], passphrase_env(home, new="pw-right-1"))
    assert result.returncode == 0, result.stderr
    assert header(home.path / "vault.bin")["kek"] == "passphrase"
    assert not (home.path / "vault.key").exists()
    result = run_cli(["login", "g2", "--stdin"], passphrase_env(home, "pw-right-1"), input=SECRET)
    assert result.returncode == 0, result.stderr
    before = (home.path / "vault.bin").read_bytes()
    for args, input in ((["get", "g2"], None), (["login", "g2", "--stdin", "--force"], "g2key-x")):
        result = run_cli(args, passphrase_env(home, "pw-wrong-1"), input=input)
        assert_vault_error(result, home.path / "vault.bin")
        assert "wrong passphrase" in result.stderr
    assert (home.path / "vault.bin").read_bytes() == before
    result = run_cli(["get", "g2", "--field", "api_key", "--show-secret"], passphrase_env(home, "pw-right-1"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == SECRET
    for secret in (SECRET, "pw-right-1"):
        assert_no_secret_in_tree(home.path, secret)


def test_passphrase_without_terminal(home):
    result = run_cli(["init", "--passphrase"], passphrase_env(home, new="pw-tty-1"))
    assert result.returncode == 0, result.stderr
    # A new session has no controlling terminal, so /dev/tty cannot be opened.
    result = subprocess.run([sys.executable, str(AUTHSOME), "get", "g2"], env=home.env,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=30, start_new_session=True)
    assert_vault_error(result, home.path / "vault.bin")
    assert "AUTHSOME_PASSPHRASE" in result.stderr
    assert "locked by a passphrase" in result.stderr


def test_passphrase_change(home):
    vault_path = home.path / "vault.bin"
    make_vault(home)
    dek = data_key(vault_path, base64.b64decode((home.path / "vault.key").read_bytes()))

    def dek_with(passphrase):
        return data_key(vault_path, authsome.derive_passphrase_key(passphrase, header(vault_path)["scrypt"]))

    result = run_cli(["passphrase"], passphrase_env(home, new="pw-one-1"))
    assert result.returncode == 0, result.stderr
    assert header(vault_path)["kek"] == "passphrase"
    assert header(vault_path)["scrypt"]["n"] == 2 ** 15
    assert not (home.path / "vault.key").exists()
    assert dek_with("pw-one-1") == dek
    salt_one = header(vault_path)["scrypt"]["salt"]

    result = run_cli(["passphrase"], passphrase_env(home, "pw-one-1", "pw-two-2"))
    assert result.returncode == 0, result.stderr
    assert header(vault_path)["scrypt"]["salt"] != salt_one
    assert dek_with("pw-two-2") == dek
    result = run_cli(["get", "g2"], passphrase_env(home, "pw-one-1"))
    assert_vault_error(result, vault_path)
    assert "wrong passphrase" in result.stderr
    result = run_cli(["get", "g2", "--field", "api_key", "--show-secret"], passphrase_env(home, "pw-two-2"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == SECRET

    result = run_cli(["passphrase", "--remove"], passphrase_env(home, "pw-two-2"))
    assert result.returncode == 0, result.stderr
    assert header(vault_path) == {"kek": "key_file"}
    assert data_key(vault_path, base64.b64decode((home.path / "vault.key").read_bytes())) == dek
    result = run_cli(["get", "g2", "--field", "api_key", "--show-secret"], home.env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == SECRET
    result = run_cli(["passphrase", "--remove"], home.env)
    assert result.returncode == 2
    for secret in (SECRET, "pw-one-1", "pw-two-2"):
        assert_no_secret_in_tree(home.path, secret)


def test_masterkey_required(home):
    key_text = base64.b64encode(os.urandom(32)).decode()
    env = dict(home.env, AUTHSOME_MASTER_KEY=key_text)
    result = run_cli(["login", "g2", "--stdin"], env, input=SECRET)
    assert result.returncode == 0, result.stderr
    vault_path = home.path / "vault.bin"
    assert header(vault_path) == {"kek": "master_key"}
    assert not (home.path / "vault.key").exists()
    before = vault_path.read_bytes()

    result = run_cli(["get", "g2"], home.env)
    assert_vault_error(result, vault_path)
    assert "AUTHSOME_MASTER_KEY" in result.stderr
    other = base64.b64encode(os.urandom(32)).decode()
    for wrong in (other, "not-base64!", base64.b64encode(b"short").decode()):
        result = run_cli(["get", "g2"], dict(home.env, AUTHSOME_MASTER_KEY=wrong))
        assert result.returncode == EXIT_VAULT, result.stderr
        assert "AUTHSOME_MASTER_KEY" in result.stderr
        assert len(result.stderr.splitlines()) == 1
    assert vault_path.read_bytes() == before

    result = run_cli(["get", "g2", "--field", "api_key", "--show-secret"], env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == SECRET
    assert_no_secret_in_tree(home.path, SECRET)
    assert_no_secret_in_tree(home.path, base64.b64decode(key_text))
    assert_no_secret_in_tree(home.path, key_text)


# ============================================================================================
# Concurrency, crashes, temp files, modes
# ============================================================================================

def test_concurrent_writers(home):
    processes = []
    for index in range(20):
        process = subprocess.Popen(
            [sys.executable, str(AUTHSOME), "login", "g2", "--connection", "c%d" % index, "--stdin"],
            env=home.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        processes.append(process)
    for index, process in enumerate(processes):
        process.stdin.write("g2key-c%d" % index)
        process.stdin.close()
    for process in processes:
        process.wait(timeout=60)
        assert process.returncode == 0, process.stderr.read()
        process.stdout.close()
        process.stderr.close()
    records = authsome.Vault(str(home.path)).load()["credentials"]["g2"]
    assert sorted(records) == sorted("c%d" % index for index in range(20))
    for index in range(20):
        assert records["c%d" % index]["api_key"] == "g2key-c%d" % index


# Runs the CLI's main() in a loop, one connection per write, and reports each finished write.
WRITER = r"""
import io, sys
sys.path.insert(0, sys.argv[1])
import authsome
prefix = sys.argv[2]
print("ready", flush=True)
for index in range(100000):
    name = "%s-%d" % (prefix, index)
    sys.stdin = io.StringIO("g2key-" + name)
    code = authsome.main(["login", "g2", "--connection", name, "--stdin"])
    print("done %s %d" % (name, code), flush=True)
"""


def test_vault_kill9_keeps_writes(home):
    make_vault(home)
    rng = random.Random()
    done = set()
    for round_number in range(30):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(REPO), "r%d" % round_number],
                                  env=home.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True)
        assert writer.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0, 0.05))
        writer.send_signal(signal.SIGKILL)
        output = writer.communicate(timeout=30)[0]
        for line in output.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == "done":
                assert parts[2] == "0", line
                done.add(parts[1])
        records = authsome.Vault(str(home.path)).load()["credentials"]["g2"]
        missing = sorted(done - set(records))
        assert not missing, "writes reported done but lost: %s" % missing
        for name in done:
            assert records[name]["api_key"] == "g2key-" + name
    assert done, "no write finished before its writer was killed"
    make_vault(home, connection="after")
    assert not temp_files(home)
    assert stored_key(home) == SECRET


def test_vault_stale_temp_removed(home):
    make_vault(home)
    stale = home.path / ".vault.bin.0123456789ab.tmp"
    stale.write_bytes(b"left by a crash")
    os.chmod(stale, 0o600)
    assert stored_key(home) == SECRET  # readers ignore it
    make_vault(home, connection="second")
    assert not stale.exists()
    assert stored_key(home, "second") == SECRET


def test_vault_write_failure(home, monkeypatch):
    before = make_vault(home)

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(authsome.os, "fsync", full_disk)
    with pytest.raises(authsome.VaultError) as caught:
        authsome.Vault(str(home.path)).update(lambda document: document["defaults"].update(g2="x"))
    monkeypatch.undo()
    assert "cannot write vault" in str(caught.value)
    assert str(home.path / "vault.bin") in str(caught.value)
    assert (home.path / "vault.bin").read_bytes() == before
    assert not temp_files(home)


def test_vault_lock_busy(home):
    make_vault(home)
    lock_path = home.path / "vault.lock"
    fd = os.open(str(lock_path), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        started = time.monotonic()
        with pytest.raises(authsome.VaultError) as caught:
            with authsome.file_lock(str(lock_path), timeout=0.2):
                pass
        assert time.monotonic() - started < 5
        assert "busy" in str(caught.value)
        assert caught.value.code == EXIT_VAULT
    finally:
        os.close(fd)
    with authsome.file_lock(str(lock_path), timeout=0.2):
        pass


def test_vault_umask_zero_modes(home):
    script = 'umask 000; exec "$0" "$1" login g2 --stdin "$2" "$3"'
    for extra in (["--connection", "default"], ["--connection", "second"]):
        result = subprocess.run(["sh", "-c", script, sys.executable, str(AUTHSOME)] + extra,
                                env=home.env, input=SECRET, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        assert_no_secret(SECRET, result.stdout, result.stderr)
    assert stat.S_IMODE(os.stat(home.path).st_mode) == 0o700
    names = set()
    for path in home.path.rglob("*"):
        mode = stat.S_IMODE(os.lstat(path).st_mode)
        if path.is_dir():
            assert mode == 0o700, (path, oct(mode))
        else:
            assert mode == 0o600, (path, oct(mode))
            names.add(path.name)
    assert {"vault.bin", "vault.key", "vault.lock", "audit.log"} <= names


def test_vault_no_plain_secret(home):
    result = run_cli(["login", "g2", "--stdin"], home.env, input=SECRET)
    assert result.returncode == 0, result.stderr
    assert_no_secret(SECRET, result.stdout, result.stderr)
    result = run_cli(["get", "g2"], home.env)
    assert result.returncode == 0
    assert "***" in result.stdout
    assert_no_secret(SECRET, result.stdout, result.stderr)
    make_vault(home, connection="second")
    assert_no_secret_in_tree(home.path, SECRET)
    assert stored_key(home, "second") == SECRET
