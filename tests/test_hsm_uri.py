"""RFC 7512 URI parsing (signer.hsm.uri), including gokeyless's samples (PROTOCOL.md 14.13)."""

from __future__ import annotations

from pathlib import Path

import pytest

from signer.hsm.uri import PinSourceError, Pkcs11Uri, UriError, parse_pkcs11_uri

# gokeyless internal/rfc7512/rfc7512_test.go "samples" -- grammar-valid URIs. The
# last one is adapted: gokeyless accepts type=I and library-version=G, which we
# check (type must be an RFC 7512 object class, the version digits).
GOKEYLESS_SAMPLES = [
    "pkcs11:id=0",
    "pkcs11:id=0;token=b",
    "pkcs11:id=b?pin-value=1234",
    "pkcs11:id=b?pin-value=1234&module-path=/a/b.so",
    "pkcs11:id=b;token=b?pin-value=1234&module-path=/a/b.so",
    "pkcs11:token=Thalesn6000;id=%00?module-path=/opt/nfast/toolkits/pkcs11/libcknfast.so"
    "&pin-value=1234",
    "pkcs11:token=SoftHSM2;id=%00;slot-id=1359138056?module-path=/usr/lib64/libsofthsm2.so"
    "&pin-value=1234",
    "pkcs11:token=YubiKey%20PIV;id=%00;slot-id=0?module-path=/usr/lib64/libykcs11.so"
    "&pin-value=123456",
    "pkcs11:token=Gemalto;id=%04;slot-id=0?module-path=/usr/lib/libCryptoki2_64.so"
    "&pin-value=abcd",
    "pkcs11:token=A;manufacturer=B;serial=C;model=D;library-manufacturer=E;"
    "library-description=F;library-version=7.2;object=H;type=private;id=J;"
    "slot-manufacturer=K;slot-description=L;slot-id=0?pin-source=file:/N&"
    "module-name=P&module-path=Q&max-sessions=1",
]

GOKEYLESS_NEGATIVES = [
    "pkcs11:",
    "pkcs12:id=0",
    "pkcs11:id=b?pin-value=1234;module-path=/a/b.so",  # PROTOCOL.md section 14 item 13
]


@pytest.mark.parametrize("text", GOKEYLESS_SAMPLES)
def test_gokeyless_samples_parse(text: str) -> None:
    parse_pkcs11_uri(text, strict=False)


@pytest.mark.parametrize("text", GOKEYLESS_NEGATIVES)
def test_gokeyless_negatives_rejected(text: str) -> None:
    with pytest.raises(UriError):
        parse_pkcs11_uri(text, strict=False)
    with pytest.raises(UriError):
        parse_pkcs11_uri(text)


def test_semicolon_in_query_names_the_problem() -> None:
    with pytest.raises(UriError, match="';' is not allowed in the query") as info:
        parse_pkcs11_uri("pkcs11:id=b?pin-value=1234;module-path=/a/b.so")
    assert isinstance(info.value, ValueError)
    # The message names the place, never the PIN.
    assert "1234" not in str(info.value)


def test_all_attributes_decoded() -> None:
    uri = parse_pkcs11_uri(GOKEYLESS_SAMPLES[-1], strict=False)
    assert uri.token == "A"
    assert uri.manufacturer == "B"
    assert uri.serial == "C"
    assert uri.model == "D"
    assert uri.library_manufacturer == "E"
    assert uri.library_description == "F"
    assert uri.library_version == "7.2"
    assert uri.object_label == "H"
    assert uri.object_type == "private"
    assert uri.object_id == b"J"
    assert uri.slot_manufacturer == "K"
    assert uri.slot_description == "L"
    assert uri.slot_id == 0
    assert uri.pin_source == "file:/N"
    assert uri.module_name == "P"
    assert uri.module_path == "Q"
    assert uri.max_sessions == 1


def test_percent_decoding() -> None:
    uri = parse_pkcs11_uri(
        "pkcs11:token=My%20Token;object=a+b;id=%00%01%fe%FF"
        "?module-path=/opt/HSM%20lib/p11.so&pin-value=12%2634"
    )
    assert uri.token == "My Token"
    assert uri.object_label == "a+b"  # RFC 7512: '+' is not a space
    assert uri.object_id == b"\x00\x01\xfe\xff"
    assert uri.module_path == "/opt/HSM lib/p11.so"
    assert uri.pin_value == "12&34"
    assert uri.resolve_pin() == "12&34"


def test_value_may_contain_equals_and_ampersand_in_path() -> None:
    uri = parse_pkcs11_uri("pkcs11:token=a=b&c?module-path=/m.so&pin-value=1")
    assert uri.token == "a=b&c"


@pytest.mark.parametrize(
    ("text", "attribute"),
    [
        ("pkcs11:token=a;colour=red?module-path=/m.so", "colour"),
        ("pkcs11:token=a?module-path=/m.so&colour=red", "colour"),
        ("pkcs11:token=a;pin-value=1?module-path=/m.so", "pin-value"),
        ("pkcs11:module-path=/m.so;token=a", "module-path"),
        ("pkcs11:token=a?module-path=/m.so&token=b", "token"),
        ("pkcs11:token=a;token=b?module-path=/m.so", "token"),
        ("pkcs11:token=a;slot-id=x?module-path=/m.so", "slot-id"),
        ("pkcs11:token=a;slot-id=-1?module-path=/m.so", "slot-id"),
        ("pkcs11:token=a?module-path=/m.so&max-sessions=0", "max-sessions"),
        ("pkcs11:token=a?module-path=/m.so&max-sessions=two", "max-sessions"),
        ("pkcs11:token=a;library-version=G?module-path=/m.so", "library-version"),
        ("pkcs11:token=a;type=I?module-path=/m.so", "type"),
        ("pkcs11:token=a;type=cert?module-path=/m.so", "type"),
        ("pkcs11:token=a;id=%zz?module-path=/m.so", "id"),
        ("pkcs11:token=a;id=%4?module-path=/m.so", "id"),
        ("pkcs11:token=a;object=?module-path=/m.so", "object"),
        ("pkcs11:token=a;object=b/c?module-path=/m.so", "object"),
        ("pkcs11:token=a%ff?module-path=/m.so", "token"),
        ("pkcs11:token=a?module-path=/m.so&pin-value=1&pin-source=env:X", "pin-source"),
        ("pkcs11:token=a?module-path=/m.so&pin-source=relative/file", "pin-source"),
        ("pkcs11:token=a?module-path=/m.so&pin-source=env:1BAD", "pin-source"),
        ("pkcs11:token=a?module-path=/m.so&pin-source=https://x/pin", "pin-source"),
        ("pkcs11:token=a", "module-path"),
        ("pkcs11:object=k?module-path=/m.so", "token"),
        ("pkcs11:token=a;serial=b?module-path=/m.so", "serial"),
        ("pkcs11:token=a;slot-id=1?module-path=/m.so", "slot-id"),
    ],
)
def test_invalid_uris_name_the_attribute(text: str, attribute: str) -> None:
    with pytest.raises(UriError) as info:
        parse_pkcs11_uri(text)
    assert info.value.attribute == attribute
    assert attribute in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        "pkcs11:token=a?",
        "pkcs11:token=a;;object=b?module-path=/m.so",
        "pkcs11:token?module-path=/m.so",
        "pkcs11:Token=a?module-path=/m.so",
        "pkcs11:token=a?module-path=/m.so#frag",
        "pkcs11:token=a b?module-path=/m.so",
    ],
)
def test_malformed(text: str) -> None:
    with pytest.raises(UriError):
        parse_pkcs11_uri(text)


def test_exactly_one_token_selector() -> None:
    for selector in ("token=t", "serial=0123", "slot-id=7"):
        uri = parse_pkcs11_uri(f"pkcs11:{selector};id=%01?module-path=/m.so")
        assert uri.object_id == b"\x01"


def test_pin_never_in_repr_or_str() -> None:
    uri = parse_pkcs11_uri("pkcs11:token=t?module-path=/m.so&pin-value=s3cr3t-PIN")
    assert "s3cr3t" not in repr(uri)
    assert "s3cr3t" not in str(uri)
    assert "s3cr3t" not in uri.redacted()
    assert "pin-value=***" in uri.redacted()
    # The redacted text is itself a valid URI naming the same token.
    again = parse_pkcs11_uri(uri.redacted())
    assert again.token == "t" and again.module_path == "/m.so"


def test_redacted_round_trip() -> None:
    text = ("pkcs11:token=My%20Token;id=%00%FF;slot-manufacturer=x?module-path=/a/b.so"
            "&pin-source=env:HSM_PIN&max-sessions=4")
    uri = parse_pkcs11_uri(text, strict=False)
    assert parse_pkcs11_uri(uri.redacted(), strict=False) == uri
    assert isinstance(uri, Pkcs11Uri)


def test_pin_from_file(tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text("98765432\n")
    for source in (f"file:{pin_file}", f"file://{pin_file}", str(pin_file)):
        uri = parse_pkcs11_uri(f"pkcs11:token=t?module-path=/m.so&pin-source={source}")
        assert uri.resolve_pin() == "98765432"
    pin_file.write_text("no-newline")
    uri = parse_pkcs11_uri(f"pkcs11:token=t?module-path=/m.so&pin-source=file:{pin_file}")
    assert uri.resolve_pin() == "no-newline"
    pin_file.write_text("crlf\r\n")
    assert uri.resolve_pin() == "crlf"
    pin_file.write_text("two lines\n\n")
    assert uri.resolve_pin() == "two lines\n"  # only one trailing newline is removed


def test_pin_file_missing_names_the_source(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pin"
    uri = parse_pkcs11_uri(f"pkcs11:token=t?module-path=/m.so&pin-source=file:{missing}")
    with pytest.raises(PinSourceError, match="does not exist") as info:
        uri.resolve_pin()
    assert str(missing) in str(info.value)
    assert info.value.attribute == "pin-source"


def test_pin_file_empty(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pin"
    empty.write_text("\n")
    uri = parse_pkcs11_uri(f"pkcs11:token=t?module-path=/m.so&pin-source=file:{empty}")
    with pytest.raises(PinSourceError, match="empty"):
        uri.resolve_pin()


def test_pin_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    uri = parse_pkcs11_uri("pkcs11:token=t?module-path=/m.so&pin-source=env:KEYWARD_TEST_PIN")
    monkeypatch.delenv("KEYWARD_TEST_PIN", raising=False)
    with pytest.raises(PinSourceError, match="KEYWARD_TEST_PIN is not set"):
        uri.resolve_pin()
    monkeypatch.setenv("KEYWARD_TEST_PIN", "4242")
    assert uri.resolve_pin() == "4242"
    assert "4242" not in repr(uri)


def test_no_pin() -> None:
    uri = parse_pkcs11_uri("pkcs11:token=t?module-path=/m.so")
    assert not uri.has_pin
    with pytest.raises(UriError, match="neither pin-value nor pin-source"):
        uri.resolve_pin()


def test_errors_are_value_errors() -> None:
    with pytest.raises(ValueError, match="unknown PKCS#11 URI path attribute"):
        parse_pkcs11_uri("pkcs11:bogus=1?module-path=/m.so")
