"""``keyward keys generate | import | list`` as an operator runs them.

Every command is a real subprocess on a real SoftHSM2 token (the ``softhsm``
fixture). The keys' SKIs are checked against ``cryptography`` and against a
SHA-1 of the subjectPublicKey BIT STRING computed here.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from softhsm import SoftHsmToken

KINDS = {
    # kind: (type, size) as `keys list --json` reports them
    "rsa2048": ("rsa", "2048 bits"),
    "rsa3072": ("rsa", "3072 bits"),
    "p256": ("ec", "secp256r1"),
    "p384": ("ec", "secp384r1"),
    "ed25519": ("ed25519", "ed25519"),
}
# One algorithm every key of that type must offer.
TYPICAL_ALGORITHM = {"rsa": "RSA_PSS_SHA256", "ec": "ECDSA_SHA256", "ed25519": "ED25519"}

# The two ways of running keyward: `python -m signer.common.cli` and the console script.
FORMS = ("python-m", "console-script")


# -- running the command ----------------------------------------------------------------


def _console_script() -> str:
    script = Path(sys.executable).parent / "keyward"
    if not script.exists():
        pytest.skip("the keyward console script is not installed next to this interpreter")
    return str(script)


def keyward(
    token: SoftHsmToken, *args: str, form: str = "python-m", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``keyward ARGS`` against the token's SoftHSM2 configuration.

    ``form`` is ``python-m`` (``python -m signer.common.cli``, as keyward demo and the
    test harness start it) or ``console-script`` (the installed ``keyward`` command).
    """
    argv = [sys.executable, "-m", "signer.common.cli"] if form == "python-m" else [
        _console_script()]
    environment = {k: v for k, v in token.env().items() if not k.startswith("KEYWARD_")}
    environment.update(env or {})
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=180,
                          check=False, env=environment)


def error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The one-line error keyward ends with (log lines of the token opening may precede
    it on stderr)."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    return lines[-1]


def ok_json(proc: subprocess.CompletedProcess[str]) -> Any:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def listed(token: SoftHsmToken) -> list[dict[str, Any]]:
    keys: list[dict[str, Any]] = ok_json(
        keyward(token, "keys", "list", "--json", "--pkcs11-uri", token.uri()))
    return keys


# -- SKIs, computed independently ---------------------------------------------------------


def bit_string_contents(public_key: Any) -> bytes:
    """The contents of the subjectPublicKey BIT STRING of the key's SPKI."""
    if isinstance(public_key, rsa.RSAPublicKey):
        return public_key.public_bytes(serialization.Encoding.DER,
                                       serialization.PublicFormat.PKCS1)
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return public_key.public_bytes(serialization.Encoding.X962,
                                       serialization.PublicFormat.UncompressedPoint)
    assert isinstance(public_key, ed25519.Ed25519PublicKey)
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def ski_of(public_key: Any) -> str:
    ski = x509.SubjectKeyIdentifier.from_public_key(public_key).digest
    assert ski == hashlib.sha1(bit_string_contents(public_key)).digest()
    return ski.hex()


def ski_of_pem(public_key_pem: str) -> str:
    return ski_of(serialization.load_pem_public_key(public_key_pem.encode()))


def check_description(entry: dict[str, Any], label: str, key_type: str, size: str) -> None:
    assert entry["label"] == label
    assert entry["type"] == key_type
    assert entry["size"] == size
    assert entry["ski"] == ski_of_pem(entry["public_key_pem"])
    assert len(entry["ski"]) == 40
    assert TYPICAL_ALGORITHM[key_type] in entry["algorithms"]
    public_key = serialization.load_pem_public_key(entry["public_key_pem"].encode())
    if key_type == "rsa":
        assert isinstance(public_key, rsa.RSAPublicKey)
        assert f"{public_key.key_size} bits" == size
    elif key_type == "ec":
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        assert public_key.curve.name == size
    else:
        assert isinstance(public_key, ed25519.Ed25519PublicKey)


# -- keys generate / keys list ---------------------------------------------------------


@pytest.fixture(scope="module")
def generated(softhsm: SoftHsmToken) -> dict[str, dict[str, Any]]:
    """One key of every kind, generated with ``keyward keys generate``."""
    out = {}
    for kind in KINDS:
        out[kind] = ok_json(keyward(softhsm, "keys", "generate", "--type", kind,
                                    "--label", f"gen-{kind}", "--pkcs11-uri", softhsm.uri()))
    return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_generate_prints_the_new_key(generated: dict[str, dict[str, Any]], kind: str) -> None:
    key_type, size = KINDS[kind]
    check_description(generated[kind], f"gen-{kind}", key_type, size)


def test_list_json_shows_every_generated_key(
    softhsm: SoftHsmToken, generated: dict[str, dict[str, Any]]
) -> None:
    by_label = {entry["label"]: entry for entry in listed(softhsm)}
    for kind, (key_type, size) in KINDS.items():
        entry = by_label[f"gen-{kind}"]
        check_description(entry, f"gen-{kind}", key_type, size)
        assert entry == generated[kind]
    assert len({e["ski"] for e in generated.values()}) == len(KINDS)


def test_list_as_text_has_one_line_per_key(
    softhsm: SoftHsmToken, generated: dict[str, dict[str, Any]]
) -> None:
    proc = keyward(softhsm, "keys", "list", "--pkcs11-uri", softhsm.uri())
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line.split() for line in proc.stdout.splitlines()}
    for kind, entry in generated.items():
        fields = lines[entry["ski"]]
        assert fields[1] == KINDS[kind][0]
        assert fields[-1] == f"gen-{kind}"


def test_list_on_an_empty_token_says_so(softhsm: SoftHsmToken) -> None:
    empty = softhsm.add_token("keyward-empty")
    proc = keyward(empty, "keys", "list", "--pkcs11-uri", empty.uri())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert "no keys on this token" in proc.stderr
    assert json.loads(keyward(empty, "keys", "list", "--json", "--pkcs11-uri",
                              empty.uri()).stdout) == []


def test_generate_and_list_with_a_config_file(softhsm: SoftHsmToken, tmp_path: Path) -> None:
    config = tmp_path / "signer.yaml"
    config.write_text(f"pkcs11_uri: '{softhsm.uri()}'\nlog_level: warning\n")
    made = ok_json(keyward(softhsm, "keys", "generate", "--config", str(config),
                           "--type", "p256", "--label", "from-config"))
    check_description(made, "from-config", "ec", "secp256r1")
    keys = ok_json(keyward(softhsm, "keys", "list", "--json", "-c", str(config)))
    assert made in keys


def test_a_config_file_may_hold_the_pin_and_it_is_never_printed(
    softhsm: SoftHsmToken, tmp_path: Path
) -> None:
    config = tmp_path / "signer.yaml"
    config.write_text(f"pkcs11_uri: '{softhsm.uri(pin_value=softhsm.user_pin)}'\n")
    proc = keyward(softhsm, "keys", "list", "--json", "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    assert softhsm.user_pin not in proc.stdout + proc.stderr
    assert json.loads(proc.stdout)


def test_the_flag_uri_beats_the_config_file(softhsm: SoftHsmToken, tmp_path: Path) -> None:
    config = tmp_path / "signer.yaml"
    config.write_text(f"pkcs11_uri: '{softhsm.uri(token='no-such-token')}'\n")
    keys = ok_json(keyward(softhsm, "keys", "list", "--json", "--config", str(config),
                           "--pkcs11-uri", softhsm.uri()))
    assert keys


def test_uri_from_the_environment_with_the_pin_from_a_variable(softhsm: SoftHsmToken) -> None:
    env = {"KEYWARD_PKCS11_URI": softhsm.uri(pin_source="env:KEYWARD_TEST_PIN"),
           "KEYWARD_TEST_PIN": softhsm.user_pin}
    keys = ok_json(keyward(softhsm, "keys", "list", "--json", env=env))
    assert keys


# -- keys import ---------------------------------------------------------------------------


def _new_key(algorithm: str) -> Any:
    if algorithm == "rsa2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if algorithm == "rsa3072":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    curve = {"p256": ec.SECP256R1(), "p384": ec.SECP384R1(), "p521": ec.SECP521R1()}[algorithm]
    return ec.generate_private_key(curve)


FORMATS = {
    "pkcs8": (serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8),
    "traditional": (serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL),
    "pkcs8-der": (serialization.Encoding.DER, serialization.PrivateFormat.PKCS8),
}
EXPECTED = {
    "rsa2048": ("rsa", "2048 bits"),
    "rsa3072": ("rsa", "3072 bits"),
    "p256": ("ec", "secp256r1"),
    "p384": ("ec", "secp384r1"),
    "p521": ("ec", "secp521r1"),
    "ed25519": ("ed25519", "ed25519"),
}
PASSWORD = b"correct horse battery staple"


def write_key(path: Path, key: Any, fmt: str, password: bytes | None = None) -> Path:
    encoding, private_format = FORMATS[fmt]
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password
        else serialization.NoEncryption())
    path.write_bytes(key.private_bytes(encoding, private_format, encryption))
    return path


@pytest.mark.parametrize(
    ("algorithm", "fmt", "encrypted"),
    [
        ("rsa2048", "pkcs8", False),
        ("rsa2048", "traditional", False),  # BEGIN RSA PRIVATE KEY (PKCS#1)
        ("rsa3072", "pkcs8-der", False),
        ("rsa2048", "pkcs8", True),  # BEGIN ENCRYPTED PRIVATE KEY
        ("rsa2048", "traditional", True),  # Proc-Type: 4,ENCRYPTED
        ("p256", "pkcs8", False),
        ("p256", "traditional", False),  # BEGIN EC PRIVATE KEY (SEC1)
        ("p384", "traditional", False),
        ("p384", "pkcs8", True),
        ("p521", "pkcs8", False),
        ("ed25519", "pkcs8", False),
        ("ed25519", "pkcs8", True),
    ],
    ids=lambda v: ("encrypted" if v else "plain") if isinstance(v, bool) else v,
)
def test_import_keeps_the_files_ski(
    softhsm: SoftHsmToken, tmp_path: Path, algorithm: str, fmt: str, encrypted: bool
) -> None:
    key = _new_key(algorithm)
    path = write_key(tmp_path / f"{algorithm}.key", key, fmt, PASSWORD if encrypted else None)
    label = f"imp-{algorithm}-{fmt}-{'enc' if encrypted else 'plain'}"
    args = ["keys", "import", "--pem", str(path), "--label", label,
            "--pkcs11-uri", softhsm.uri()]
    env = {}
    if encrypted:
        args += ["--password-env", "KEYWARD_TEST_KEY_PASSWORD"]
        env["KEYWARD_TEST_KEY_PASSWORD"] = PASSWORD.decode()
    proc = keyward(softhsm, *args, env=env)
    imported = ok_json(proc)
    key_type, size = EXPECTED[algorithm]
    check_description(imported, label, key_type, size)
    assert imported["ski"] == ski_of(key.public_key())
    # The token serves the same public key as the file's.
    assert imported["public_key_pem"] == key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    assert PASSWORD.decode() not in proc.stdout + proc.stderr
    assert imported in listed(softhsm)


def _imported_once(softhsm: SoftHsmToken, tmp_path: Path, label: str) -> tuple[Path, str]:
    key = _new_key("p256")
    path = write_key(tmp_path / "dup.pem", key, "pkcs8")
    ok_json(keyward(softhsm, "keys", "import", "--pem", str(path), "--label", label,
                    "--pkcs11-uri", softhsm.uri()))
    return path, ski_of(key.public_key())


def test_a_second_import_of_the_same_key_is_refused_and_leaves_one_copy(
    softhsm: SoftHsmToken, tmp_path: Path
) -> None:
    path, ski = _imported_once(softhsm, tmp_path, "dup-first")
    again = keyward(softhsm, "keys", "import", "--pem", str(path), "--label", "dup-second",
                    "--pkcs11-uri", softhsm.uri())
    assert again.returncode != 0
    assert again.stdout == ""
    copies = [e for e in listed(softhsm) if e["ski"] == ski]
    assert [e["label"] for e in copies] == ["dup-first"]


@pytest.mark.parametrize("form", FORMS)
def test_a_second_import_says_the_key_is_already_there(
    softhsm: SoftHsmToken, tmp_path: Path, form: str
) -> None:
    path, ski = _imported_once(softhsm, tmp_path, f"dup-msg-{form}")
    again = keyward(softhsm, "keys", "import", "--pem", str(path), "--label", "again",
                    "--pkcs11-uri", softhsm.uri(), form=form)
    assert "Traceback" not in again.stderr, again.stderr
    assert again.returncode in (1, 2)
    assert error_line(again) == (
        f"keyward keys: a key with SKI {ski} is already on the token (label 'dup-msg-{form}')")


UNUSABLE_KEY_FILES = (
    "encrypted-without-password",
    "wrong-password",
    "not-a-key",
    "password-variable-unset",
    "missing-file",
)


@pytest.mark.parametrize("case", UNUSABLE_KEY_FILES)
@pytest.mark.parametrize("form", FORMS)
def test_unusable_key_files_are_reported_in_one_line(
    softhsm: SoftHsmToken, tmp_path: Path, case: str, form: str
) -> None:
    key = _new_key("p256")
    path = tmp_path / "key.pem"
    env: dict[str, str] = {}
    extra: list[str] = []
    if case == "encrypted-without-password":
        write_key(path, key, "pkcs8", PASSWORD)
        expected = "the key is encrypted: a password is needed"
    elif case == "wrong-password":
        write_key(path, key, "pkcs8", PASSWORD)
        extra = ["--password-env", "KEYWARD_TEST_KEY_PASSWORD"]
        env["KEYWARD_TEST_KEY_PASSWORD"] = "not the password"
        expected = "or the password is wrong"
    elif case == "not-a-key":
        path.write_text("this is not a key\n")
        expected = "not a readable private key"
    elif case == "password-variable-unset":
        write_key(path, key, "pkcs8", PASSWORD)
        extra = ["--password-env", "KEYWARD_TEST_UNSET_PASSWORD"]
        expected = "--password-env: KEYWARD_TEST_UNSET_PASSWORD is not set"
    else:
        path = tmp_path / "missing.pem"
        expected = f"--pem: cannot read {path}: No such file or directory"
    proc = keyward(softhsm, "keys", "import", "--pem", str(path), "--label", f"bad-{case}",
                   "--pkcs11-uri", softhsm.uri(), *extra, form=form, env=env)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2
    assert error_line(proc).startswith("keyward keys: ")
    assert expected in error_line(proc)
    assert "not the password" not in proc.stderr


# -- PINs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
def test_a_pin_on_the_command_line_is_refused(softhsm: SoftHsmToken, form: str) -> None:
    label = f"never-made-{form}"
    proc = keyward(softhsm, "keys", "generate", "--type", "p256", "--label", label,
                   "--pkcs11-uri", softhsm.uri(pin_value=softhsm.user_pin), form=form)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2
    assert error_line(proc).startswith(
        "keyward keys: --pkcs11-uri: do not put pin-value on the command line")
    assert "pin-source=file:" in proc.stderr
    assert softhsm.user_pin not in proc.stdout + proc.stderr
    assert label not in {e["label"] for e in listed(softhsm)}


@pytest.fixture(scope="module")
def other_token(softhsm: SoftHsmToken) -> SoftHsmToken:
    """A second token for wrong-PIN attempts, so the main token's PIN counter is spared."""
    return softhsm.add_token("keyward-wrong-pin")


def _wrong_pin_file(token: SoftHsmToken, tmp_path: Path) -> tuple[Path, str]:
    wrong = str((int(token.user_pin) + 1) % 10**8).zfill(8)
    path = tmp_path / "wrong.pin"
    path.write_text(wrong + "\n")
    return path, wrong


def test_a_wrong_pin_is_never_printed(other_token: SoftHsmToken, tmp_path: Path) -> None:
    pin_file, wrong = _wrong_pin_file(other_token, tmp_path)
    for args in (("keys", "list"), ("keys", "generate", "--type", "p256", "--label", "x")):
        proc = keyward(other_token, *args,
                       "--pkcs11-uri", other_token.uri(pin_source=f"file:{pin_file}"))
        assert proc.returncode != 0
        assert "PIN" in proc.stderr
        output = proc.stdout + proc.stderr
        assert wrong not in output
        assert other_token.user_pin not in output


@pytest.mark.parametrize("form", FORMS)
def test_a_wrong_pin_is_reported_in_one_line(
    other_token: SoftHsmToken, tmp_path: Path, form: str
) -> None:
    pin_file, wrong = _wrong_pin_file(other_token, tmp_path)
    proc = keyward(other_token, "keys", "list",
                   "--pkcs11-uri", other_token.uri(pin_source=f"file:{pin_file}"), form=form)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2
    assert error_line(proc).startswith("keyward keys: ")
    assert "wrong PIN" in error_line(proc)
    assert wrong not in proc.stdout + proc.stderr


@pytest.mark.parametrize("form", FORMS)
def test_a_missing_pin_file_is_named(softhsm: SoftHsmToken, tmp_path: Path, form: str) -> None:
    missing = tmp_path / "secrets" / "user.pin"
    proc = keyward(softhsm, "keys", "list", "--pkcs11-uri",
                   softhsm.uri(pin_source=f"file:{missing}"), form=form)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2
    assert error_line(proc) == (
        f"keyward keys: pin-source file:{missing}: the file does not exist")


def test_a_missing_pin_file_fails_naming_the_file(softhsm: SoftHsmToken, tmp_path: Path) -> None:
    # The looser check, in the default form: the command fails and the file is named.
    missing = tmp_path / "secrets" / "user.pin"
    proc = keyward(softhsm, "keys", "list", "--pkcs11-uri",
                   softhsm.uri(pin_source=f"file:{missing}"))
    assert proc.returncode != 0
    assert f"pin-source file:{missing}: the file does not exist" in proc.stderr
