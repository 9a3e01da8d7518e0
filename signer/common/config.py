"""The one configuration loader for every Keyward service.

A service describes its settings as a tree of dataclasses. Values come from, lowest
precedence first: the field defaults, a YAML file, ``KEYWARD_*`` environment variables,
then command-line overrides. Every value is converted and checked when the service
starts, and a bad one stops it with a message naming the field, e.g.::

    config error: signer.sessions: expected an integer >= 1, got 'many' (from KEYWARD_SESSIONS)

Nested fields are addressed with dots in files and messages and with double
underscores in the environment: ``tls.cert`` is ``KEYWARD_TLS__CERT``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

ENV_PREFIX = "KEYWARD_"


class ConfigError(ValueError):
    """A configuration value is missing or wrong; the message names the field."""


class Duration(float):
    """Seconds, written in configuration as ``30s``, ``250ms``, ``2m``, ``1h`` or a number."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|µs|ms|s|m|h)?\s*$")
_UNITS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str) -> float:
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"expected a duration such as 30s or 250ms, got {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str = "",
    check: Callable[[Any], str | None] | None = None,
    secret: bool = False,
    default_factory: Any = dataclasses.MISSING,
    aliases: Mapping[str, Callable[[Any], Any] | None] | None = None,
) -> Any:
    """A dataclass field with documentation and an optional check.

    ``check`` returns None when the value is fine, or a phrase saying what was
    expected. ``secret`` keeps the value out of error messages and dumps.
    ``aliases`` maps other names this setting is accepted under in files (gokeyless's
    names, for operators moving over) to a function that turns the alias's value into
    this setting's (None: taken as it is); the function raises ValueError with what it
    expected.
    """
    meta = {"help": help, "check": check, "secret": secret, "aliases": dict(aliases or {})}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def at_least(minimum: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= minimum else f"a value >= {minimum}"


def in_range(lo: float, hi: float) -> Callable[[Any], str | None]:
    return lambda v: None if lo <= v <= hi else f"a value from {lo} to {hi}"


def one_of(*choices: str) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else "one of " + ", ".join(choices)


def host_port(value: str) -> str | None:
    """Check for ``host:port`` / ``[v6]:port`` / ``unix:/path``."""
    if value.startswith("unix:"):
        return None if len(value) > 5 else "unix:/path"
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        return "host:port (for example 127.0.0.1:2407)"
    if host.startswith("[") != host.endswith("]") or (":" in host and not host.startswith("[")):
        return "host:port, with IPv6 hosts in brackets ([::1]:2410)"
    return None


def load_config(
    schema: type[T],
    *,
    path: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    section: str = "",
    env_prefix: str = ENV_PREFIX,
) -> T:
    """Build a ``schema`` instance from defaults, file, environment and overrides.

    ``overrides`` maps dotted field names to values (from flags); ``None`` values are
    ignored so that unset flags do not hide file values. ``section`` prefixes field
    names in messages (``signer.port``).
    """
    raw: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is not None:
        file_data = _read_yaml(Path(path))
        raw.update(file_data)
        for key in _flatten(file_data):
            sources[key] = f"{path}"
    env = os.environ if env is None else env
    for name, value in env.items():
        if name.startswith(env_prefix) and len(name) > len(env_prefix):
            dotted = name[len(env_prefix) :].lower().replace("__", ".")
            if _has_field(schema, dotted.split(".")):
                _set_dotted(raw, dotted, value)
                sources[dotted] = name
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(raw, dotted, value)
            sources[dotted] = "command line"
    return _build(schema, raw, section, sources)


def dump_config(obj: Any) -> dict[str, Any]:
    """A plain-data view of a config object, with secrets redacted."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.metadata.get("secret") and value:
            out[f.name] = "<redacted>"
        elif dataclasses.is_dataclass(value):
            out[f.name] = dump_config(value)
        elif isinstance(value, list):
            out[f.name] = [
                dump_config(v) if dataclasses.is_dataclass(v) else _plain(v) for v in value
            ]
        else:
            out[f.name] = _plain(value)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Duration):
        return float(value)
    return value


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        # str(e) quotes the offending line, which may hold a PIN: report where, not what.
        problem = getattr(e, "problem", None) or "syntax error"
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML: {problem}{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return data


def _flatten(data: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k, v in data.items():
        dotted = f"{prefix}{k}"
        keys.append(dotted)
        if isinstance(v, Mapping):
            keys.extend(_flatten(v, dotted + "."))
    return keys


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _hints(schema: type[Any]) -> dict[str, Any]:
    return typing.get_type_hints(schema)


def _has_field(schema: type[Any], parts: list[str]) -> bool:
    if not dataclasses.is_dataclass(schema):
        return False
    hints = _hints(schema)
    if parts[0] not in hints:
        return False
    if len(parts) == 1:
        return True
    inner = _unwrap_optional(hints[parts[0]])
    return isinstance(inner, type) and _has_field(inner, parts[1:])


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _build(schema: type[T], raw: Mapping[str, Any], prefix: str, sources: dict[str, str]) -> T:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(raw).__name__}")
    hints = _hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}  # type: ignore[arg-type]
    raw = _apply_aliases(raw, fields, prefix, sources)
    unknown = [k for k in raw if k not in fields]
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(str(name), list(fields), n=1)
        hint = f" (did you mean {_join(prefix, close[0])}?)" if close else ""
        source = sources.get(str(name))
        where = f" (from {source})" if source else ""
        raise ConfigError(f"{_join(prefix, str(name))}: unknown setting{hint}{where}")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        dotted = _join(prefix, name)
        local = dotted[len(prefix) + 1 :] if prefix else dotted
        if name in raw:
            value = _convert(hints[name], raw[name], dotted, sources.get(local), f, sources, local)
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            raise ConfigError(f"{dotted}: required setting is missing")
        check = f.metadata.get("check")
        if check is not None and value is not None:
            expected = check(value)
            if expected is not None:
                raise ConfigError(_wrong(dotted, expected, value, sources.get(local), f))
        values[name] = value
    try:
        return schema(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        text = str(e)
        named = bool(prefix) and text.startswith(prefix + ".")
        raise ConfigError(text if named else f"{prefix or 'config'}: {text}") from None


def _apply_aliases(
    raw: Mapping[str, Any], fields: Mapping[str, Any], prefix: str, sources: dict[str, str]
) -> Mapping[str, Any]:
    out: dict[str, Any] | None = None
    for name, f in fields.items():
        for alias, convert in f.metadata.get("aliases", {}).items():
            if alias not in raw:
                continue
            out = dict(raw) if out is None else out
            value = out.pop(alias)
            if name in out:
                raise ConfigError(
                    f"{_join(prefix, alias)}: gokeyless's name for {_join(prefix, name)}, "
                    "which is set too: keep one"
                )
            if convert is not None:
                try:
                    value = convert(value)
                except ValueError as e:
                    raise ConfigError(f"{_join(prefix, alias)}: expected {e}") from None
            out[name] = value
            if alias in sources:
                sources[name] = sources[alias]
    return raw if out is None else out


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _wrong(dotted: str, expected: str, value: Any, source: str | None, f: Any) -> str:
    shown = "<redacted>" if f is not None and f.metadata.get("secret") else repr(value)
    where = f" (from {source})" if source else ""
    return f"{dotted}: expected {expected}, got {shown}{where}"


def _convert(
    tp: Any,
    value: Any,
    dotted: str,
    source: str | None,
    f: Any,
    sources: dict[str, str],
    local: str,
) -> Any:
    optional = False
    inner = _unwrap_optional(tp)
    if inner is not tp:
        optional = True
    if value is None or (optional and value == ""):
        if optional:
            return None
        raise ConfigError(_wrong(dotted, "a value", value, source, f))
    origin = typing.get_origin(inner)
    try:
        if dataclasses.is_dataclass(inner) and isinstance(inner, type):
            if not isinstance(value, Mapping):
                raise ConfigError(_wrong(dotted, "a mapping", value, source, f))
            sub = {k[len(local) + 1 :]: v for k, v in sources.items() if k.startswith(local + ".")}
            return _build(inner, value, dotted, sub)
        if origin is list:
            (item_tp,) = typing.get_args(inner)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise ValueError
            return [
                _convert(item_tp, v, f"{dotted}[{i}]", source, None, {}, "")
                for i, v in enumerate(value)
            ]
        if inner is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if inner is Duration:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, int | float):
                return Duration(value)
            return Duration(parse_duration(str(value)))
        if inner is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(str(value).strip()) if isinstance(value, str) else int(value)
        if inner is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if inner is str:
            if isinstance(value, dict | list):
                raise ValueError
            return str(value)
        if inner is Path:
            if isinstance(value, dict | list) or value == "":
                raise ValueError
            return Path(str(value)).expanduser()
    except ConfigError:
        raise
    except (TypeError, ValueError):
        raise ConfigError(_wrong(dotted, _describe(inner), value, source, f)) from None
    raise ConfigError(f"{dotted}: unsupported setting type {inner!r}")


def _describe(tp: Any) -> str:
    if tp is Duration:
        return "a duration such as 30s or 250ms"
    origin = typing.get_origin(tp)
    if origin is list:
        return "a list"
    return {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
        Path: "a file path",
    }.get(tp, getattr(tp, "__name__", str(tp)))
