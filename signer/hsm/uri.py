"""RFC 7512 ``pkcs11:`` URIs, with the attribute set gokeyless accepts.

gokeyless (``internal/rfc7512/rfc7512.go``; PEERS.md A1) parses these attributes and
rejects every other one:

* path (``;``-separated): ``token``, ``manufacturer``, ``serial``, ``model``,
  ``library-manufacturer``, ``library-description``, ``library-version``, ``object``,
  ``type``, ``id``, ``slot-manufacturer``, ``slot-description``, ``slot-id``;
* query (``&``-separated): ``pin-source``, ``pin-value``, ``module-name``,
  ``module-path``, ``max-sessions``.

Where Keyward deliberately differs from gokeyless:

* Values are percent-decoded as RFC 7512 says (``%20`` is a space, ``+`` stays a
  plus); gokeyless uses Go's ``url.QueryUnescape``, which turns ``+`` into a space.
* A value may contain ``=`` (``id=a=b``), as the grammar allows; gokeyless splits on
  every ``=`` and rejects it.
* A repeated attribute is an error instead of "last one wins", and ``pin-source``
  together with ``pin-value`` is refused as RFC 7512 section 2.3 asks: either would
  leave it unclear which PIN is used.
* ``slot-id``, ``max-sessions``, ``library-version`` and ``type`` are checked instead
  of being silently read as 0 or ignored.
* ``pin-source`` is implemented (gokeyless issue #238): ``file:/path`` (the file's
  contents, trailing newline removed), ``file:///path``, a bare absolute path, or the
  Keyward extension ``env:NAME``.

:func:`parse_pkcs11_uri` with ``strict=True`` (the default) also enforces what a
signer needs: ``module-path``, exactly one token selector (``token``, ``serial`` or
``slot-id``) and ``type`` absent or ``private``. ``strict=False`` is the grammar
alone (what gokeyless's parser checks).

The PIN never appears in ``repr()``, ``str()`` or :meth:`Pkcs11Uri.redacted`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = [
    "PATH_ATTRIBUTES",
    "QUERY_ATTRIBUTES",
    "PinSourceError",
    "Pkcs11Uri",
    "UriError",
    "parse_pkcs11_uri",
]


class UriError(ValueError):
    """A malformed or unusable ``pkcs11:`` URI. ``attribute`` names the culprit."""

    attribute: str | None

    def __init__(self, message: str, attribute: str | None = None) -> None:
        super().__init__(message)
        self.attribute = attribute


class PinSourceError(UriError):
    """The PIN could not be read from its ``pin-source`` (missing file or variable)."""


PATH_ATTRIBUTES: Final[tuple[str, ...]] = (
    "token",
    "manufacturer",
    "serial",
    "model",
    "library-manufacturer",
    "library-description",
    "library-version",
    "object",
    "type",
    "id",
    "slot-manufacturer",
    "slot-description",
    "slot-id",
)
QUERY_ATTRIBUTES: Final[tuple[str, ...]] = (
    "pin-source",
    "pin-value",
    "module-name",
    "module-path",
    "max-sessions",
)
_OBJECT_TYPES: Final[frozenset[str]] = frozenset(
    {"public", "private", "cert", "secret-key", "data"}
)

# RFC 7512 section 2.3: pk11-pchar / pk11-qchar, as unreserved / pct-encoded /
# the listed sub-delimiters. '%' is checked separately (it must start %XX).
_PCHAR: Final = re.compile(r"[A-Za-z0-9\-._~%:\[\]@!$'()*+,=&]*")
_QCHAR: Final = re.compile(r"[A-Za-z0-9\-._~%:\[\]@!$'()*+,=/?|]*")
_NAME: Final = re.compile(r"[a-z][a-z\-_]*")
_BAD_PERCENT: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")
_VERSION: Final = re.compile(r"[0-9]+(\.[0-9]+)?")
_DECIMAL: Final = re.compile(r"[0-9]+")
_ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CK_ULONG_MAX: Final = 2**64 - 1
_PIN_FILE_MAX: Final = 4096  # a PIN file is tiny; refuse to slurp a wrong path's content

# Attribute name -> dataclass field name.
_FIELDS: Final[dict[str, str]] = {
    name: name.replace("-", "_") for name in PATH_ATTRIBUTES + QUERY_ATTRIBUTES
}
_FIELDS["object"] = "object_label"
_FIELDS["type"] = "object_type"
_FIELDS["id"] = "object_id"


@dataclass(frozen=True, repr=False)
class Pkcs11Uri:
    """A parsed ``pkcs11:`` URI. Text attributes are decoded strings, ``object_id`` bytes.

    Use :meth:`redacted` (or ``str()``/``repr()``, which call it) for logs: the PIN
    is replaced by ``***``.
    """

    token: str | None = None
    manufacturer: str | None = None
    serial: str | None = None
    model: str | None = None
    library_manufacturer: str | None = None
    library_description: str | None = None
    library_version: str | None = None
    object_label: str | None = None
    object_type: str | None = None
    object_id: bytes | None = None
    slot_manufacturer: str | None = None
    slot_description: str | None = None
    slot_id: int | None = None
    pin_source: str | None = None
    pin_value: str | None = dataclasses.field(default=None, compare=False)
    module_name: str | None = None
    module_path: str | None = None
    max_sessions: int | None = None

    # -- presentation ---------------------------------------------------------------

    def redacted(self) -> str:
        """The URI in canonical form with the PIN value hidden (``pin-value=***``)."""
        path: list[str] = []
        for name in PATH_ATTRIBUTES:
            value = getattr(self, _FIELDS[name])
            if value is not None:
                path.append(f"{name}={_encode(value)}")
        query: list[str] = []
        for name in QUERY_ATTRIBUTES:
            value = getattr(self, _FIELDS[name])
            if value is None:
                continue
            if name == "pin-value":
                query.append("pin-value=***")
            else:
                query.append(f"{name}={_encode(value, query=True)}")
        text = "pkcs11:" + ";".join(path)
        if query:
            text += "?" + "&".join(query)
        return text

    def __repr__(self) -> str:
        return f"Pkcs11Uri({self.redacted()!r})"

    def __str__(self) -> str:
        return self.redacted()

    # -- PIN ------------------------------------------------------------------------

    @property
    def has_pin(self) -> bool:
        """True when the URI says where the PIN comes from (value or source)."""
        return self.pin_value is not None or self.pin_source is not None

    def resolve_pin(self) -> str:
        """The user PIN: ``pin-value``, or read now from ``pin-source``.

        The source is read on every call, so a rotated PIN file is picked up when the
        signer logs in again after a fault. Raises :class:`PinSourceError` naming the
        source (never the PIN) when the file or variable is missing or empty, and
        :class:`UriError` when the URI names no PIN at all.
        """
        if self.pin_value is not None:
            return self.pin_value
        if self.pin_source is None:
            raise UriError("the PKCS#11 URI has neither pin-value nor pin-source", "pin-source")
        kind, target = _split_pin_source(self.pin_source)
        if kind == "env":
            pin = os.environ.get(target)
            if pin is None:
                raise PinSourceError(
                    f"pin-source env:{target}: environment variable {target} is not set",
                    "pin-source",
                )
        else:
            pin = _read_pin_file(target)
        # One trailing newline (and a CR before it) is what editors and `echo` add.
        if pin.endswith("\n"):
            pin = pin[:-1]
            if pin.endswith("\r"):
                pin = pin[:-1]
        if not pin:
            raise PinSourceError(f"pin-source {self.pin_source}: the PIN is empty", "pin-source")
        return pin


def _read_pin_file(path: str) -> str:
    try:
        with open(path, "rb") as handle:
            data = handle.read(_PIN_FILE_MAX + 1)
    except FileNotFoundError:
        raise PinSourceError(
            f"pin-source file:{path}: the file does not exist", "pin-source"
        ) from None
    except OSError as exc:
        # The errno text ("Permission denied") helps; the file's content is never read.
        raise PinSourceError(
            f"pin-source file:{path}: cannot read it ({exc.strerror or type(exc).__name__})",
            "pin-source",
        ) from None
    if len(data) > _PIN_FILE_MAX:
        raise PinSourceError(
            f"pin-source file:{path}: longer than {_PIN_FILE_MAX} bytes, not a PIN file",
            "pin-source",
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise PinSourceError(f"pin-source file:{path}: not UTF-8 text", "pin-source") from None


def _split_pin_source(source: str) -> tuple[str, str]:
    """``("file", path)`` or ``("env", name)``; raises UriError for anything else."""
    if source.startswith("env:"):
        name = source[4:]
        if not _ENV_NAME.fullmatch(name):
            raise UriError(
                f"pin-source {source!r}: not a valid environment variable name", "pin-source"
            )
        return "env", name
    if source.startswith("file://"):
        parsed = urllib.parse.urlsplit(source)
        if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
            raise UriError(
                f"pin-source {source!r}: only local absolute file: URIs are supported", "pin-source"
            )
        return "file", parsed.path
    path = source[5:] if source.startswith("file:") else source
    if not Path(path).is_absolute():
        raise UriError(f"pin-source {source!r}: use file:/absolute/path or env:NAME", "pin-source")
    return "file", path


def _encode(value: object, *, query: bool = False) -> str:
    if isinstance(value, bytes):
        return "".join(f"%{b:02X}" for b in value)
    # Keep the characters RFC 7512 lets through unescaped readable.
    safe = "-._~:[]@!$'()*+,=/?|" if query else "-._~:[]@!$'()*+,=&"
    return urllib.parse.quote(str(value), safe=safe)


def _decode_text(name: str, raw: str) -> str:
    try:
        return urllib.parse.unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise UriError(f"attribute {name}: percent-decoded value is not UTF-8", name) from None


def _split_attr(part: str, where: str) -> tuple[str, str]:
    name, sep, value = part.partition("=")
    name = name.strip()
    if not sep:
        raise UriError(f"{where} attribute {name or part!r} has no '=value'", name or None)
    if not _NAME.fullmatch(name):
        raise UriError(f"{where} attribute name {name!r} is malformed", name or None)
    return name, value.strip()


def parse_pkcs11_uri(text: str, *, strict: bool = True) -> Pkcs11Uri:
    """Parse a ``pkcs11:`` URI. See the module docstring for the rules.

    Raises :class:`UriError` (a ``ValueError``) whose message names the attribute.
    """
    if not isinstance(text, str):
        raise UriError("a PKCS#11 URI must be a string")
    text = text.strip()
    if not text.startswith("pkcs11:"):
        raise UriError("a PKCS#11 URI must start with 'pkcs11:'")
    body = text[len("pkcs11:") :]
    path_part, qmark, query_part = body.partition("?")
    if not path_part:
        raise UriError("the PKCS#11 URI has an empty path (e.g. pkcs11:token=...)")
    if qmark and not query_part:
        raise UriError("the PKCS#11 URI has '?' but no query attributes")

    values: dict[str, object] = {}

    for part in path_part.split(";"):
        name, raw = _split_attr(part, "path")
        if name in QUERY_ATTRIBUTES:
            raise UriError(
                f"{name} is a query attribute: write it after '?', e.g. "
                f"pkcs11:token=...?{name}=...",
                name,
            )
        if name not in PATH_ATTRIBUTES:
            raise UriError(f"unknown PKCS#11 URI path attribute {name!r}", name)
        if not _PCHAR.fullmatch(raw):
            raise UriError(
                f"attribute {name}: value contains characters not allowed "
                "in a PKCS#11 URI path (percent-encode them)",
                name,
            )
        _store(values, name, raw)

    if qmark:
        for part in query_part.split("&"):
            if ";" in part:
                # The classic mistake (PROTOCOL.md section 14, item 13): ';' separates
                # path attributes only; query attributes are joined by '&'.
                raise UriError(
                    f"';' is not allowed in the query part (near {part.split('=')[0]!r}); "
                    "separate query attributes with '&'",
                    part.split("=", 1)[0].strip() or None,
                )
            name, raw = _split_attr(part, "query")
            if name in PATH_ATTRIBUTES:
                raise UriError(
                    f"{name} is a path attribute: write it before '?', e.g. pkcs11:{name}=...",
                    name,
                )
            if name not in QUERY_ATTRIBUTES:
                raise UriError(f"unknown PKCS#11 URI query attribute {name!r}", name)
            if not _QCHAR.fullmatch(raw):
                raise UriError(
                    f"attribute {name}: value contains characters not allowed "
                    "in a PKCS#11 URI query (percent-encode them)",
                    name,
                )
            _store(values, name, raw)

    if "pin-value" in values and "pin-source" in values:
        raise UriError(
            "pin-value and pin-source are both given; use one (RFC 7512 section 2.3)",
            "pin-source",
        )
    if "pin-source" in values:
        _split_pin_source(str(values["pin-source"]))  # syntax check now, read later

    uri = Pkcs11Uri(**{_FIELDS[name]: value for name, value in values.items()})  # type: ignore[arg-type]
    if strict:
        _check_for_signer(uri)
    return uri


def _store(values: dict[str, object], name: str, raw: str) -> None:
    if name in values:
        raise UriError(f"attribute {name} appears more than once", name)
    if raw == "":
        raise UriError(f"attribute {name} has an empty value", name)
    if _BAD_PERCENT.search(raw):
        raise UriError(f"attribute {name}: '%' must start a %XX escape", name)
    value: object
    if name == "id":
        value = urllib.parse.unquote_to_bytes(raw)
    elif name in ("slot-id", "max-sessions"):
        text = _decode_text(name, raw)
        if not _DECIMAL.fullmatch(text):
            raise UriError(f"attribute {name} must be a decimal number, got {text!r}", name)
        number = int(text)
        if number > _CK_ULONG_MAX:
            raise UriError(f"attribute {name} is out of range", name)
        if name == "max-sessions" and number < 1:
            raise UriError("attribute max-sessions must be at least 1", name)
        value = number
    else:
        text = _decode_text(name, raw)
        if name == "library-version" and not _VERSION.fullmatch(text):
            raise UriError(
                f"attribute library-version must look like 2 or 2.40, got {text!r}", name
            )
        if name == "type" and text not in _OBJECT_TYPES:
            raise UriError(
                f"attribute type must be one of {', '.join(sorted(_OBJECT_TYPES))}, got {text!r}",
                name,
            )
        # pin-value must not be echoed in any message, so it is never included above.
        value = text
    values[name] = value


def _check_for_signer(uri: Pkcs11Uri) -> None:
    if uri.module_path is None:
        raise UriError(
            "module-path is required (the PKCS#11 module to load, "
            "e.g. ?module-path=/usr/lib/softhsm/libsofthsm2.so)",
            "module-path",
        )
    selectors = [
        name
        for name, value in (("token", uri.token), ("serial", uri.serial), ("slot-id", uri.slot_id))
        if value is not None
    ]
    if len(selectors) != 1:
        given = ", ".join(selectors) if selectors else "none"
        raise UriError(
            f"exactly one of token, serial or slot-id must select the token (given: {given})",
            "token" if not selectors else selectors[1],
        )
    if uri.object_type is not None and uri.object_type != "private":
        raise UriError(
            f"type={uri.object_type}: a signer serves private keys; use type=private or "
            "leave type out",
            "type",
        )
