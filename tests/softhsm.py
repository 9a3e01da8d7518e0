"""Fresh SoftHSM2 tokens for tests, each in its own temporary directory.

SoftHSM2 reads its configuration (``SOFTHSM2_CONF``: where the token directory is)
when the module is initialised, so a process can only see the tokens of one
configuration at a time: set ``os.environ["SOFTHSM2_CONF"]`` to
:attr:`SoftHsmToken.conf_path` before the first ``Token`` is opened, and close every
``Token`` before switching to another configuration (the last close finalises the
module). The ``softhsm`` fixture in ``conftest.py`` does the environment part.

More tokens can share one configuration: :meth:`SoftHsmToken.add_token` initialises
another token in the same token directory (it must be done before the module is
initialised in this process, since SoftHSM2 scans the directory then).
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import subprocess
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
)
_QUERY = {"pin-source", "pin-value", "module-name", "module-path", "max-sessions"}


def find_module() -> str | None:
    """Path of libsofthsm2.so (``SOFTHSM2_MODULE`` overrides), or None."""
    override = os.environ.get("SOFTHSM2_MODULE")
    if override:
        return override if Path(override).exists() else None
    for candidate in MODULE_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    return None


def find_util() -> str | None:
    return shutil.which("softhsm2-util")


def unavailable_reason() -> str | None:
    """Why SoftHSM2 tests cannot run here, or None if they can."""
    if find_module() is None:
        return "libsofthsm2.so not found (install softhsm2 or set SOFTHSM2_MODULE)"
    if find_util() is None:
        return "softhsm2-util not found on PATH"
    return None


@dataclass(frozen=True)
class SoftHsmToken:
    """One initialised SoftHSM2 token and everything needed to reach it."""

    module_path: str
    token_label: str
    user_pin: str
    so_pin: str
    conf_path: Path
    directory: Path
    pin_file: Path
    serial: str

    def env(self) -> dict[str, str]:
        """Environment for a subprocess that should see this token."""
        return {**os.environ, "SOFTHSM2_CONF": str(self.conf_path)}

    def uri(self, **extra: str | int | bytes | None) -> str:
        """A ``pkcs11:`` URI for this token.

        Defaults: ``token=<label>``, ``module-path``, ``pin-source=file:<pin file>``.
        Keyword arguments add or override attributes, underscores standing for
        hyphens (``max_sessions=4``, ``pin_value="1234"``, ``object="k1"``,
        ``id=b"\\x01"``); ``None`` removes one (``pin_source=None``). Giving
        ``pin_value`` drops the default ``pin_source``; giving ``serial`` or
        ``slot_id`` drops the default ``token``.
        """
        attrs: dict[str, str | int | bytes | None] = {
            "token": self.token_label,
            "module-path": self.module_path,
            "pin-source": f"file:{self.pin_file}",
        }
        wanted = {name.replace("_", "-"): value for name, value in extra.items()}
        if "pin-value" in wanted and "pin-source" not in wanted:
            attrs.pop("pin-source")
        if ("serial" in wanted or "slot-id" in wanted) and "token" not in wanted:
            attrs.pop("token")
        attrs.update(wanted)
        path: list[str] = []
        query: list[str] = []
        for name, value in attrs.items():
            if value is None:
                continue
            if isinstance(value, bytes):
                encoded = "".join(f"%{b:02X}" for b in value)
            else:
                safe = "/:" if name in _QUERY else ":"
                encoded = urllib.parse.quote(str(value), safe=safe)
            (query if name in _QUERY else path).append(f"{name}={encoded}")
        text = "pkcs11:" + ";".join(path)
        if query:
            text += "?" + "&".join(query)
        return text

    def add_token(self, label: str, user_pin: str | None = None) -> SoftHsmToken:
        """Initialise another token in the same token directory."""
        pin = user_pin or _pin()
        serial = _init_token(self.conf_path, label, pin, self.so_pin)
        pin_file = self.directory / f"{label}.pin"
        pin_file.write_text(pin + "\n")
        pin_file.chmod(0o600)
        return dataclasses.replace(
            self, token_label=label, user_pin=pin, pin_file=pin_file, serial=serial
        )


def _pin() -> str:
    return str(secrets.randbelow(10**8)).zfill(8)


def _init_token(conf: Path, label: str, user_pin: str, so_pin: str) -> str:
    util = find_util()
    assert util is not None, "softhsm2-util not found"
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    subprocess.run(
        [util, "--init-token", "--free", "--label", label, "--pin", user_pin,
         "--so-pin", so_pin],
        env=env, check=True, capture_output=True, text=True, timeout=60,
    )
    shown = subprocess.run(
        [util, "--show-slots"], env=env, check=True, capture_output=True, text=True,
        timeout=60,
    ).stdout
    return _serial_of(shown, label)


def _serial_of(show_slots: str, label: str) -> str:
    """The serial of the token with this label in ``softhsm2-util --show-slots`` output."""
    serial: str | None = None
    for raw in show_slots.splitlines():
        line = raw.strip()
        if raw.startswith("Slot "):
            serial = None  # a new slot block
        elif line.startswith("Serial number:"):
            serial = line.split(":", 1)[1].strip()
        elif line.startswith("Label:") and line.split(":", 1)[1].strip() == label and serial:
            return serial
    raise RuntimeError(f"token {label!r} not in softhsm2-util --show-slots output")


def create_token(directory: Path, label: str = "keyward-test",
                 user_pin: str | None = None, so_pin: str | None = None) -> SoftHsmToken:
    """Create a SoftHSM2 configuration in ``directory`` and one initialised token.

    The user PIN is written to ``<directory>/<label>.pin`` (mode 0600, with a
    trailing newline, as an operator would write it) for ``pin-source=file:``.
    """
    module = find_module()
    assert module is not None, "libsofthsm2.so not found"
    directory = Path(directory)
    tokens = directory / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
        "slots.mechanisms = ALL\n"
        "library.reset_on_fork = false\n"
    )
    user = user_pin or _pin()
    so = so_pin or _pin()
    serial = _init_token(conf, label, user, so)
    pin_file = directory / f"{label}.pin"
    pin_file.write_text(user + "\n")
    pin_file.chmod(0o600)
    return SoftHsmToken(
        module_path=module,
        token_label=label,
        user_pin=user,
        so_pin=so,
        conf_path=conf,
        directory=directory,
        pin_file=pin_file,
        serial=serial,
    )


# -- checking HSM output with `cryptography` (shared by the tests/test_hsm_*.py files) --

_PKCS1_PREFIX = {
    "MD5SHA1": b"",
    "SHA1": bytes.fromhex("3021300906052b0e03021a05000414"),
    "SHA224": bytes.fromhex("302d300d06096086480165030402040500041c"),
    "SHA256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "SHA384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "SHA512": bytes.fromhex("3051300d060960864801650304020305000440"),
}
DIGEST_SIZES = {"MD5SHA1": 36, "SHA1": 20, "SHA224": 28, "SHA256": 32, "SHA384": 48,
                "SHA512": 64}


def verify_signature(spki: bytes, algorithm_name: str, data: bytes, signature: bytes) -> None:
    """Raise unless ``signature`` is a valid ``algorithm_name`` signature of ``data``.

    Written against the SPKI independently of the signer code (which is what is
    being tested): PKCS#1 v1.5 by recomputing EMSA-PKCS1-v1_5 (cryptography cannot
    do MD5SHA1), PSS and ECDSA with cryptography's Prehashed.
    """
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

    public_key = serialization.load_der_public_key(spki)
    if algorithm_name == "ED25519":
        assert isinstance(public_key, ed25519.Ed25519PublicKey)
        public_key.verify(signature, data)
        return
    kind, _, hash_name = algorithm_name.rpartition("_")
    if kind == "RSA_PKCS1V15":
        assert isinstance(public_key, rsa.RSAPublicKey)
        numbers = public_key.public_numbers()
        k = (public_key.key_size + 7) // 8
        assert len(signature) == k, "RSA signature must be k bytes"
        t = _PKCS1_PREFIX[hash_name] + data
        expected = b"\x00\x01" + b"\xff" * (k - len(t) - 3) + b"\x00" + t
        recovered = pow(int.from_bytes(signature, "big"), numbers.e, numbers.n)
        if recovered.to_bytes(k, "big") != expected:
            raise InvalidSignature("PKCS#1 v1.5 signature does not verify")
        return
    chosen = {
        "SHA1": hashes.SHA1(),  # noqa: S303 - verifying what the protocol asks for
        "SHA224": hashes.SHA224(),
        "SHA256": hashes.SHA256(),
        "SHA384": hashes.SHA384(),
        "SHA512": hashes.SHA512(),
    }
    if kind == "RSA_PSS":
        assert isinstance(public_key, rsa.RSAPublicKey)
        hash_algorithm = chosen[hash_name]
        public_key.verify(
            signature, data,
            padding.PSS(mgf=padding.MGF1(hash_algorithm), salt_length=hash_algorithm.digest_size),
            utils.Prehashed(hash_algorithm),
        )
        return
    if kind == "ECDSA":
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        # ECDSA uses the leftmost order-length bits of the input; for P-256 and P-384
        # that is a whole number of bytes, and a shorter input is the same integer
        # when left-padded. Present it as a hash of the order's size.
        size = (public_key.curve.key_size + 7) // 8
        value = data[:size] if len(data) >= size else data.rjust(size, b"\x00")
        by_size = {32: hashes.SHA256(), 48: hashes.SHA384()}
        public_key.verify(signature, value, ec.ECDSA(utils.Prehashed(by_size[size])))
        return
    raise AssertionError(f"unknown algorithm {algorithm_name}")


def rsa_encrypt_raw(spki: bytes, message: bytes) -> bytes:
    """Textbook RSA of a k-byte block (for decrypt tests)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    public_key = serialization.load_der_public_key(spki)
    assert isinstance(public_key, rsa.RSAPublicKey)
    numbers = public_key.public_numbers()
    k = (public_key.key_size + 7) // 8
    return pow(int.from_bytes(message, "big"), numbers.e, numbers.n).to_bytes(k, "big")
