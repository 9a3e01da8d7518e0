"""Module loading, token selection, login, discovery filters, and oddities on the token."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import Attribute, KeyType, ObjectClass
from softhsm import SoftHsmToken, verify_signature

from signer.hsm import admin
from signer.hsm import module as module_mod
from signer.hsm.errors import HsmError
from signer.hsm.keys import KeyInfo, ec_params_for_curve
from signer.hsm.pool import Job, Token
from signer.hsm.uri import PinSourceError
from signer.v1 import signer_pb2 as pb

DIGEST = hashlib.sha256(b"Hello!").digest()


@pytest.fixture(scope="module")
def token(softhsm: SoftHsmToken) -> Iterator[Token]:
    with Token(softhsm.uri(pin_value=softhsm.user_pin)) as tok:
        yield tok


@pytest.fixture(scope="module")
def keys(token: Token) -> dict[str, KeyInfo]:
    return {"a": admin.generate_key(token, "p256", "mod-a"),
            "b": admin.generate_key(token, "ed25519", "mod-b")}


def _sign_ok(tok: Token, key: KeyInfo) -> None:
    signature = tok.run(Job.sign(key.ski, pb.ECDSA_SHA256, DIGEST))
    verify_signature(key.spki, "ECDSA_SHA256", DIGEST, signature)


def test_token_identity(token: Token, softhsm: SoftHsmToken) -> None:
    assert token.label == softhsm.token_label
    assert token.serial == softhsm.serial
    assert token.description == f"{softhsm.token_label} ({softhsm.serial})"
    assert token.session_count == 2  # the default without max-sessions
    assert token.module.cryptoki_version[0] == 2
    assert "SoftHSM" in token.module.manufacturer_id
    assert softhsm.user_pin not in repr(token) + repr(token.uri) + str(token.uri)


@pytest.mark.parametrize("selector", ["serial", "slot_id", "token"])
def test_select_token_and_share_module(softhsm: SoftHsmToken, token: Token,
                                       keys: dict[str, KeyInfo], selector: str) -> None:
    choices: dict[str, str | int] = {"serial": softhsm.serial, "slot_id": token.slot_id,
                                     "token": softhsm.token_label}
    value = choices[selector]
    extra: dict[str, str | int] = {selector: value, "manufacturer": "SoftHSM project",
                                   "model": "SoftHSM v2", "max_sessions": 3}
    with Token(softhsm.uri(**extra)) as other:
        assert other.session_count == 3
        assert other.module is token.module  # one initialisation per process
        assert other.slot_id == token.slot_id
        _sign_ok(other, keys["a"])
    # The other Token's close neither logged this one out nor finalised the module.
    _sign_ok(token, keys["a"])
    assert token.healthy


def test_no_matching_token(softhsm: SoftHsmToken) -> None:
    for extra in ({"token": "no-such-token"}, {"serial": "0000"}, {"model": "Other HSM"},
                  {"slot_id": 123456}, {"library_version": "99"}):
        with pytest.raises(HsmError) as info:
            Token(softhsm.uri(**extra))
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        assert "matches" in info.value.message or "does not match" in info.value.message
        assert softhsm.user_pin not in info.value.message


def test_second_token_shares_the_login(softhsm: SoftHsmToken, token: Token) -> None:
    """Login state is per application and token: a second Token in this process does
    not call C_Login again (so its PIN is not even checked; see the subprocess test
    below for a wrong PIN), and closing it does not log the first one out."""
    refs_before = token.module._refs
    with Token(softhsm.uri(pin_value="00000000"), sessions=1) as tok:
        assert tok.healthy
        assert token.module._logins[token.slot_id] == 2
    assert token.module._logins[token.slot_id] == 1
    assert token.module._refs == refs_before
    assert token.healthy


def test_missing_module(tmp_path: Path) -> None:
    uri = f"pkcs11:token=x?module-path={tmp_path}/nope.so&pin-value=1"
    with pytest.raises(HsmError) as info:
        Token(uri)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "does not exist" in info.value.message
    not_a_module = tmp_path / "not-a-module.so"
    not_a_module.write_bytes(b"\x7fELF garbage")
    with pytest.raises(HsmError) as info:
        Token(f"pkcs11:token=x?module-path={not_a_module}&pin-value=1")
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_missing_pin_file(softhsm: SoftHsmToken, tmp_path: Path, token: Token) -> None:
    refs_before = token.module._refs
    with pytest.raises(PinSourceError, match="does not exist"):
        Token(softhsm.uri(pin_source=f"file:{tmp_path}/missing.pin"))
    assert token.module._refs == refs_before  # released on failure


def test_uri_filters_keys(softhsm: SoftHsmToken, keys: dict[str, KeyInfo]) -> None:
    with Token(softhsm.uri(object="mod-a"), sessions=1) as by_label:
        served = by_label.keys()
        assert [k.ski for k in served] == [keys["a"].ski]
    with Token(softhsm.uri(id=keys["b"].ski), sessions=1) as by_id:
        served = by_id.keys()
        assert [k.ski for k in served] == [keys["b"].ski]
        with pytest.raises(HsmError) as info:
            by_id.run(Job.sign(keys["a"].ski, pb.ECDSA_SHA256, DIGEST))
        assert info.value.code == grpc.StatusCode.NOT_FOUND


def test_private_key_without_public_half_is_skipped(
    token: Token, keys: dict[str, KeyInfo], caplog: pytest.LogCaptureFixture
) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    scalar = private.private_numbers().private_value.to_bytes(32, "big")

    def create_lonely(session: object) -> None:
        session.create_object({  # type: ignore[attr-defined]
            Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.KEY_TYPE: KeyType.EC,
            Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False, Attribute.SIGN: True,
            Attribute.EC_PARAMS: ec_params_for_curve("secp256r1"), Attribute.VALUE: scalar,
            Attribute.LABEL: "lonely-key", Attribute.ID: b"lonely",
        })

    generation = token.generation
    token.call(create_lonely, rw=True)
    with caplog.at_level(logging.WARNING, logger="signer.hsm.keys"):
        assert token.refresh_keys() is False
    assert token.generation == generation
    assert any("lonely-key" in record.getMessage() and "no public key" in record.getMessage()
               for record in caplog.records)
    served = token.keys()
    assert {k.ski for k in served} == {k.ski for k in keys.values()}

    def remove(session: object) -> None:
        for obj in list(session.get_objects({Attribute.ID: b"lonely"})):  # type: ignore[attr-defined]
            obj.destroy()

    token.call(remove, rw=True)


def test_sessions_from_uri_and_argument(softhsm: SoftHsmToken) -> None:
    with Token(softhsm.uri(max_sessions=1)) as one:
        assert one.session_count == 1
    with Token(softhsm.uri(max_sessions=4), sessions=2) as two:
        assert two.session_count == 2
    with pytest.raises(ValueError, match="sessions"):
        Token(softhsm.uri(), sessions=0)


def test_module_registry_released(softhsm: SoftHsmToken, token: Token) -> None:
    path = token.module.path
    assert module_mod._registry[path] is token.module
    refs = token.module._refs
    with module_mod.opened_module(softhsm.module_path) as again:
        assert again is token.module
        assert token.module._refs == refs + 1
    assert token.module._refs == refs


def test_token_without_pin_sees_no_private_keys(softhsm: SoftHsmToken, token: Token,
                                                keys: dict[str, KeyInfo]) -> None:
    # This process is logged in already (the module fixture's Token), and login state
    # is shared, so even a PIN-less Token sees the keys -- which is PKCS#11 behaviour.
    with Token(softhsm.uri(pin_source=None), sessions=1) as anonymous:
        served = anonymous.keys()
        assert {k.ski for k in served} == {k.ski for k in keys.values()}


def test_close_is_final(softhsm: SoftHsmToken, keys: dict[str, KeyInfo]) -> None:
    tok = Token(softhsm.uri(), sessions=1)
    _sign_ok(tok, keys["a"])
    tok.close()
    assert not tok.healthy
    with pytest.raises(HsmError) as info:
        tok.submit([Job.sign(keys["a"], pb.ECDSA_SHA256, DIGEST)])
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(HsmError):
        tok.recover()


def test_fresh_process_state_wrong_pin(tmp_path: Path) -> None:
    """With no other user logged in, a wrong PIN reaches C_Login: FAILED_PRECONDITION."""
    import subprocess
    import sys

    from softhsm import create_token

    other = create_token(tmp_path, label="pin-test")
    script = (
        "import sys, grpc\n"
        "from signer.hsm.pool import Token\n"
        "from signer.hsm.errors import HsmError\n"
        "try:\n"
        "    Token(sys.argv[1])\n"
        "except HsmError as e:\n"
        "    print(e.code.name, e.ckr, e.hsm_fault)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, other.uri(pin_value="99999999")],
        env=other.env(), capture_output=True, text=True, timeout=60,
        cwd=Path(__file__).resolve().parents[1], check=False,
    )
    assert out.stdout.strip() == "FAILED_PRECONDITION CKR_PIN_INCORRECT False", out.stderr
    assert "99999999" not in out.stdout + out.stderr


def test_module_opened_by_python_pkcs11_first(tmp_path: Path) -> None:
    """Other code called pkcs11.lib() (symlink spelling, NULL init) before us: we take
    the same lib object over, re-initialise it with OS locking, and sign from two
    threads at once without crashing (NULL-initialised SoftHSM2 segfaults here)."""
    import subprocess
    import sys

    from softhsm import create_token

    other = create_token(tmp_path, label="takeover")
    script = (
        "import sys, threading, hashlib, pkcs11\n"
        "lib = pkcs11.lib(sys.argv[2])\n"  # python-pkcs11's C_Initialize(NULL)
        "from signer.hsm.pool import Token, Job\n"
        "from signer.hsm import admin\n"
        "from signer.v1 import signer_pb2 as pb\n"
        "with Token(sys.argv[1], sessions=2) as t:\n"
        "    assert t.module.lib is lib\n"
        "    key = admin.generate_key(t, 'p256', 'k')\n"
        "    d = hashlib.sha256(b'x').digest()\n"
        "    def work():\n"
        "        for _ in range(200):\n"
        "            t.submit([Job.sign(key, pb.ECDSA_SHA256, d)] * 4).result(30)\n"
        "    threads = [threading.Thread(target=work) for _ in range(4)]\n"
        "    [x.start() for x in threads]; [x.join() for x in threads]\n"
        "    assert t.healthy\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, other.uri(), other.module_path],
        env=other.env(), capture_output=True, text=True, timeout=120,
        cwd=Path(__file__).resolve().parents[1], check=False,
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
