"""The one config loader (``signer.common.config``) through the real service schemas.

Everything goes through ``load_config`` with ``SignerConfig`` and ``GatewayConfig``
exactly as ``keyward signer`` and ``keyward gateway`` call it, plus two runs of the
real ``keyward gateway`` command to see what an operator sees on the terminal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import GatewayConfig
from signer.common.config import ConfigError, Duration, dump_config, load_config
from signer.common.tls import TLSFiles
from signer.config import SignerConfig

URI = "pkcs11:token=keyward?module-path=/usr/lib/softhsm/libsofthsm2.so"
SECRET_PIN = "93170417"
SECRET_URI = f"pkcs11:token=keyward?pin-value={SECRET_PIN}"
GATEWAY_REQUIRED = {
    "auth_cert": "/etc/keyward/server.pem",
    "auth_key": "/etc/keyward/server-key.pem",
    "cloudflare_ca_cert": "/etc/keyward/edge-ca.pem",
    "signers": ["signer-a:2410"],
}


def signer(
    path: Path | None = None,
    env: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> SignerConfig:
    """Load a SignerConfig as ``keyward signer`` does (section ``signer``)."""
    return load_config(
        SignerConfig, path=path, env=env or {}, overrides=overrides, section="signer"
    )


def gateway(
    path: Path | None = None,
    env: dict[str, str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> GatewayConfig:
    """Load a GatewayConfig as ``keyward gateway`` does (section ``gateway``)."""
    return load_config(
        GatewayConfig, path=path, env=env or {}, overrides=overrides, section="gateway"
    )


def write(tmp_path: Path, text: str, name: str = "keyward.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def gateway_yaml(**extra: Any) -> str:
    """A valid gateway file, with ``extra`` keys added or replacing the required ones."""
    return yaml.safe_dump({**GATEWAY_REQUIRED, **extra})


# -- defaults -------------------------------------------------------------------------


def test_signer_defaults_apply_when_only_the_uri_is_given() -> None:
    config = signer(overrides={"pkcs11_uri": URI})
    assert config.pkcs11_uri == URI
    assert config.listen == "127.0.0.1:2410"
    assert config.unix_socket is None
    assert config.insecure is False
    assert config.tls == TLSFiles(cert=None, key=None, ca=None)
    assert config.allowed_clients == []
    assert config.sessions is None
    assert config.max_queue == 4096
    assert config.key_refresh_interval == 10.0
    assert isinstance(config.key_refresh_interval, Duration)
    assert config.drain_timeout == 10.0
    assert config.log_level == "info"
    assert config.log_format == "text"


def test_gateway_defaults_apply_when_only_required_settings_are_given() -> None:
    config = gateway(overrides=GATEWAY_REQUIRED)
    assert config.signers == ["signer-a:2410"]
    assert config.auth_cert == Path("/etc/keyward/server.pem")
    assert config.bind_address == "127.0.0.1"
    assert config.port == 2407
    assert config.hostname is None
    assert config.max_conn_pending_requests == 1024
    assert config.max_pending_requests == 65536
    assert config.tcp_timeout == 30.0
    assert config.request_timeout == 5.0
    assert config.signer_tls == TLSFiles(cert=None, key=None, ca=None)
    assert config.signer_insecure is False
    assert config.signer_server_name is None
    assert (config.log_level, config.log_format) == ("info", "text")


def test_default_lists_are_not_shared_between_configs() -> None:
    first = signer(overrides={"pkcs11_uri": URI})
    first.allowed_clients.append("edge")
    assert signer(overrides={"pkcs11_uri": URI}).allowed_clients == []


# -- values from a YAML file ----------------------------------------------------------


def test_signer_file_values_are_converted_to_their_types(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
pkcs11_uri: "{URI}"
listen: "[::1]:9000"
unix_socket: ~/signer.sock
insecure: yes
tls:
  cert: /etc/keyward/signer.pem
  key: /etc/keyward/signer-key.pem
  ca: /etc/keyward/ca.pem
allowed_clients: [gateway-1, gateway-2]
sessions: "4"
max_queue: 100
key_refresh_interval: 250ms
drain_timeout: 2m
log_level: debug
log_format: json
""",
    )
    config = signer(path=path)
    assert config.pkcs11_uri == URI
    assert config.listen == "[::1]:9000"
    assert config.unix_socket == Path.home() / "signer.sock"
    assert config.insecure is True
    assert config.tls == TLSFiles(
        cert=Path("/etc/keyward/signer.pem"),
        key=Path("/etc/keyward/signer-key.pem"),
        ca=Path("/etc/keyward/ca.pem"),
    )
    assert config.allowed_clients == ["gateway-1", "gateway-2"]
    assert config.sessions == 4
    assert config.max_queue == 100
    assert config.key_refresh_interval == pytest.approx(0.25)
    assert config.drain_timeout == 120.0
    assert (config.log_level, config.log_format) == ("debug", "json")


def test_gateway_file_values_are_used(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        gateway_yaml(
            signers=["signer-a:2410", "[fd00::2]:2410", "unix:/run/keyward/signer.sock"],
            port=12407,
            bind_address="0.0.0.0",
            tcp_timeout="1.5s",
            request_timeout=0.5,
            signer_tls={"cert": "/c.pem", "key": "/k.pem", "ca": "/ca.pem"},
            signer_server_name="signer.internal",
        ),
    )
    config = gateway(path=path)
    assert config.signers == ["signer-a:2410", "[fd00::2]:2410", "unix:/run/keyward/signer.sock"]
    assert config.port == 12407
    assert config.bind_address == "0.0.0.0"
    assert config.tcp_timeout == pytest.approx(1.5)
    assert config.request_timeout == pytest.approx(0.5)
    assert config.signer_tls.ca == Path("/ca.pem")
    assert config.signer_server_name == "signer.internal"


def test_an_empty_file_means_all_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "# nothing configured here yet\n")
    assert signer(path=path, overrides={"pkcs11_uri": URI}).listen == "127.0.0.1:2410"


# -- environment over file, command line over environment ---------------------------


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"pkcs11_uri: '{URI}'\nsessions: 2\nlisten: 127.0.0.1:1000\n"
        "tls: {cert: /file/cert.pem, key: /file/key.pem, ca: /file/ca.pem}\n",
    )
    config = signer(
        path=path,
        env={
            "KEYWARD_SESSIONS": "8",
            "KEYWARD_TLS__CERT": "/env/cert.pem",
            "KEYWARD_ALLOWED_CLIENTS": "gw-1, gw-2,,gw-3 ",
        },
    )
    assert config.sessions == 8
    assert config.tls.cert == Path("/env/cert.pem")
    # The rest of the nested section still comes from the file.
    assert config.tls.key == Path("/file/key.pem")
    assert config.tls.ca == Path("/file/ca.pem")
    assert config.listen == "127.0.0.1:1000"
    assert config.allowed_clients == ["gw-1", "gw-2", "gw-3"]


def test_nested_environment_names_with_underscores_in_the_field_name() -> None:
    config = gateway(
        overrides=GATEWAY_REQUIRED,
        env={"KEYWARD_SIGNER_TLS__CA": "/env/ca.pem", "KEYWARD_SIGNER_SERVER_NAME": "s.internal"},
    )
    assert config.signer_tls.ca == Path("/env/ca.pem")
    assert config.signer_server_name == "s.internal"


def test_signers_list_from_a_comma_separated_variable(tmp_path: Path) -> None:
    path = write(tmp_path, gateway_yaml(signers=["from-file:1"]))
    config = gateway(path=path, env={"KEYWARD_SIGNERS": "a:2410,b:2410, [::1]:2410"})
    assert config.signers == ["a:2410", "b:2410", "[::1]:2410"]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("2m", 120.0), ("1.5s", 1.5), ("1h", 3600.0), ("3", 3.0),
     ("0.75", 0.75), ("500us", 0.0005), (" 20 s ", 20.0)],
)
def test_durations_from_the_environment(text: str, seconds: float) -> None:
    config = signer(env={"KEYWARD_PKCS11_URI": URI, "KEYWARD_DRAIN_TIMEOUT": text})
    assert config.drain_timeout == pytest.approx(seconds)
    assert isinstance(config.drain_timeout, Duration)


@pytest.mark.parametrize(
    ("text", "value"),
    [("true", True), ("TRUE", True), ("yes", True), ("on", True), ("1", True),
     ("false", False), ("No", False), ("off", False), ("0", False)],
)
def test_booleans_from_the_environment(text: str, value: bool) -> None:
    config = signer(env={"KEYWARD_PKCS11_URI": URI, "KEYWARD_INSECURE": text})
    assert config.insecure is value


def test_environment_is_read_from_the_process_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KEYWARD_PKCS11_URI", URI)
    monkeypatch.setenv("KEYWARD_MAX_QUEUE", "77")
    config = load_config(SignerConfig, section="signer")
    assert (config.pkcs11_uri, config.max_queue) == (URI, 77)


def test_command_line_overrides_beat_environment_and_file(tmp_path: Path) -> None:
    path = write(
        tmp_path, f"pkcs11_uri: '{URI}'\nsessions: 2\nlisten: 127.0.0.1:1000\ntls: {{cert: /f}}\n"
    )
    config = signer(
        path=path,
        env={"KEYWARD_SESSIONS": "4", "KEYWARD_LISTEN": "127.0.0.1:2000",
             "KEYWARD_TLS__CERT": "/env"},
        overrides={"sessions": 6, "listen": "127.0.0.1:3000", "tls.cert": Path("/cli")},
    )
    assert config.sessions == 6
    assert config.listen == "127.0.0.1:3000"
    assert config.tls.cert == Path("/cli")


def test_none_overrides_are_ignored(tmp_path: Path) -> None:
    # Unset flags arrive as None and must not hide file or environment values.
    path = write(tmp_path, gateway_yaml(port=12407, bind_address="10.0.0.1"))
    config = gateway(
        path=path,
        env={"KEYWARD_LOG_LEVEL": "warning"},
        overrides={"port": None, "bind_address": None, "signers": None, "log_level": None},
    )
    assert config.port == 12407
    assert config.bind_address == "10.0.0.1"
    assert config.signers == GATEWAY_REQUIRED["signers"]
    assert config.log_level == "warning"


def test_command_line_list_replaces_the_file_list(tmp_path: Path) -> None:
    path = write(tmp_path, gateway_yaml(signers=["a:1", "b:1"]))
    assert gateway(path=path, overrides={"signers": ["c:1"]}).signers == ["c:1"]


def test_variables_for_other_settings_are_ignored() -> None:
    # Signer and gateway share the KEYWARD_ prefix: a signer must not choke on the
    # gateway's KEYWARD_PORT or KEYWARD_SIGNERS in a shared environment.
    config = signer(
        env={"KEYWARD_PKCS11_URI": URI, "KEYWARD_PORT": "2407", "KEYWARD_SIGNERS": "a:1",
             "KEYWARD_": "x", "OTHER_SESSIONS": "nonsense"}
    )
    assert config.pkcs11_uri == URI
    assert config.sessions is None


# -- bad values: field, expectation and source in one message -------------------------


# (schema, where the value comes from, the value, the field, what was expected, value shown)
BAD_VALUES = [
    ("signer", "env", ("sessions", "many"), "signer.sessions", "expected an integer", "'many'"),
    ("signer", "file", ("sessions", 0), "signer.sessions", "expected a value >= 1", "got 0"),
    ("signer", "cli", ("sessions", "2.5"), "signer.sessions", "expected an integer", "'2.5'"),
    ("signer", "file", ("max_queue", 0), "signer.max_queue", "a value >= 1", "got 0"),
    ("signer", "env", ("drain_timeout", "soon"), "signer.drain_timeout",
     "expected a duration such as 30s or 250ms", "'soon'"),
    ("signer", "env", ("drain_timeout", "-1s"), "signer.drain_timeout",
     "expected a duration", "'-1s'"),
    ("signer", "file", ("drain_timeout", True), "signer.drain_timeout",
     "expected a duration", "True"),
    ("signer", "env", ("key_refresh_interval", "50ms"), "signer.key_refresh_interval",
     "expected a value >= 0.1", "0.05"),
    ("signer", "env", ("insecure", "maybe"), "signer.insecure", "expected true or false",
     "'maybe'"),
    ("signer", "cli", ("listen", "localhost"), "signer.listen", "expected host:port",
     "'localhost'"),
    ("signer", "file", ("listen", "[::1:2410"), "signer.listen",
     "IPv6 hosts in brackets", "'[::1:2410'"),
    ("signer", "file", ("listen", "127.0.0.1:99999"), "signer.listen", "expected host:port",
     "'127.0.0.1:99999'"),
    ("signer", "file", ("allowed_clients", {"gw": 1}), "signer.allowed_clients",
     "expected a list", "{'gw': 1}"),
    ("signer", "file", ("unix_socket", ["a", "b"]), "signer.unix_socket",
     "expected a file path", "['a', 'b']"),
    ("signer", "file", ("tls", {"cert": ["a"]}), "signer.tls.cert", "expected a file path",
     "['a']"),
    ("signer", "cli", ("log_format", "xml"), "signer.log_format",
     "expected one of text, json", "'xml'"),
    ("signer", "env", ("log_level", "loud"), "signer.log_level",
     "expected one of debug, info, warning, error, critical", "'loud'"),
    ("gateway", "cli", ("port", 70000), "gateway.port", "expected a value from 0 to 65535",
     "70000"),
    ("gateway", "env", ("port", "http"), "gateway.port", "expected an integer", "'http'"),
    ("gateway", "file", ("port", 1.5), "gateway.port", "expected an integer", "1.5"),
    ("gateway", "file", ("port", True), "gateway.port", "expected an integer", "True"),
    ("gateway", "env", ("signers", "a:2410,nonsense"), "gateway.signers",
     "expected host:port entries (bad entry 'nonsense')", "got ['a:2410', 'nonsense']"),
    ("gateway", "file", ("signers", ["a:2410", ["b:2410"]]), "gateway.signers[1]",
     "expected a string", "['b:2410']"),
    ("gateway", "file", ("signers", ["a:2410", {"host": "b"}]), "gateway.signers[1]",
     "expected a string", "{'host': 'b'}"),
    ("gateway", "file", ("signers", 42), "gateway.signers", "expected a list", "42"),
    ("gateway", "env", ("tcp_timeout", "0s"), "gateway.tcp_timeout",
     "expected a value >= 0.1", "0.0"),
    ("gateway", "cli", ("request_timeout", "fast"), "gateway.request_timeout",
     "expected a duration", "'fast'"),
    ("gateway", "file", ("max_conn_pending_requests", -1), "gateway.max_conn_pending_requests",
     "expected a value >= 1", "-1"),
    ("gateway", "env", ("signer_insecure", "sometimes"), "gateway.signer_insecure",
     "expected true or false", "'sometimes'"),
]


def _load_bad(
    tmp_path: Path, schema: str, source: str, field: str, value: Any
) -> tuple[ConfigError, str]:
    """Load a config with one bad value from ``source``; return the error and the
    name of the source the message should mention."""
    base: dict[str, Any] = {"pkcs11_uri": URI} if schema == "signer" else dict(GATEWAY_REQUIRED)
    load = signer if schema == "signer" else gateway
    env: dict[str, str] = {}
    overrides: dict[str, Any] = {}
    if source == "file":
        base[field] = value
        path = write(tmp_path, yaml.safe_dump(base))
        expected_source = str(path)
    else:
        path = write(tmp_path, yaml.safe_dump(base))
        if source == "env":
            env[f"KEYWARD_{field.upper()}"] = value
            expected_source = f"KEYWARD_{field.upper()}"
        else:
            overrides[field] = value
            expected_source = "command line"
    with pytest.raises(ConfigError) as caught:
        load(path=path, env=env, overrides=overrides)
    return caught.value, expected_source


@pytest.mark.parametrize(
    ("schema", "source", "setting", "field", "expected", "shown"),
    BAD_VALUES,
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_values_name_field_expectation_value_and_source(
    tmp_path: Path,
    schema: str,
    source: str,
    setting: tuple[str, Any],
    field: str,
    expected: str,
    shown: str,
) -> None:
    error, expected_source = _load_bad(tmp_path, schema, source, *setting)
    message = str(error)
    assert message.startswith(f"{field}: "), message
    assert expected in message
    assert shown in message
    assert message.endswith(f"(from {expected_source})"), message


def test_an_empty_optional_path_in_the_file_means_unset(tmp_path: Path) -> None:
    # ``auth_cert: ""`` is "not configured" (an optional path), so the gateway's own
    # rule about its required TLS files reports it.
    path = write(tmp_path, gateway_yaml(auth_cert=""))
    with pytest.raises(ConfigError, match=r"gateway\.auth_cert: required"):
        gateway(path=path)


def test_empty_variable_unsets_an_optional_nested_setting(tmp_path: Path) -> None:
    path = write(tmp_path, f"pkcs11_uri: '{URI}'\ntls: {{cert: /file/cert.pem}}\n")
    assert signer(path=path, env={"KEYWARD_TLS__CERT": ""}).tls.cert is None


def test_a_bad_variable_gives_one_exact_message() -> None:
    with pytest.raises(ConfigError) as caught:
        gateway(overrides=GATEWAY_REQUIRED,
                env={"KEYWARD_SIGNER_INSECURE": "perhaps"})
    assert str(caught.value) == (
        "gateway.signer_insecure: expected true or false, got 'perhaps' "
        "(from KEYWARD_SIGNER_INSECURE)"
    )


def test_a_section_that_is_not_a_mapping_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, f"pkcs11_uri: '{URI}'\ntls: 5\n")
    with pytest.raises(ConfigError) as caught:
        signer(path=path)
    message = str(caught.value)
    assert message.startswith("signer.tls: expected a mapping")
    assert message.endswith(f"(from {path})"), message


# -- unknown keys ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "text", "message"),
    [
        ("signer", "sesions: 2\n", "signer.sesions: unknown setting (did you mean signer.sessions?)"),
        ("signer", "tls: {crt: /a.pem}\n",
         "signer.tls.crt: unknown setting (did you mean signer.tls.cert?)"),
        ("signer", "pkcs11-uri: x\n",
         "signer.pkcs11-uri: unknown setting (did you mean signer.pkcs11_uri?)"),
        ("gateway", "signer_tsl: {ca: /ca.pem}\n",
         "gateway.signer_tsl: unknown setting (did you mean gateway.signer_tls?)"),
        ("gateway", "prot: 1\n", "gateway.prot: unknown setting (did you mean gateway.port?)"),
        ("gateway", "colour: blue\n", "gateway.colour: unknown setting"),
    ],
)
def test_unknown_keys_in_the_file_are_rejected_with_a_suggestion(
    tmp_path: Path, schema: str, text: str, message: str
) -> None:
    base = f"pkcs11_uri: '{URI}'\n" if schema == "signer" else gateway_yaml()
    path = write(tmp_path, base + text)
    with pytest.raises(ConfigError) as caught:
        (signer if schema == "signer" else gateway)(path=path)
    assert str(caught.value).startswith(message)
    if "did you mean" not in message:
        assert "did you mean" not in str(caught.value)


def test_unknown_override_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"signer\.session: unknown setting \(did you mean"):
        signer(overrides={"pkcs11_uri": URI, "session": 3})


def test_unknown_key_message_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, f"pkcs11_uri: '{URI}'\nsesions: 2\n")
    with pytest.raises(ConfigError) as caught:
        signer(path=path)
    assert str(path) in str(caught.value)


# -- secrets --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [[SECRET_URI], {"uri": SECRET_URI}, {"pin-value": SECRET_PIN}],
    ids=["list", "mapping", "pin-mapping"],
)
def test_a_bad_secret_value_is_never_echoed(tmp_path: Path, value: Any) -> None:
    path = write(tmp_path, yaml.safe_dump({"pkcs11_uri": value}))
    with pytest.raises(ConfigError) as caught:
        signer(path=path)
    message = str(caught.value)
    assert message.startswith("signer.pkcs11_uri: expected a string")
    assert f"(from {path})" in message
    assert SECRET_PIN not in message
    assert "<redacted>" in message


def test_a_null_secret_is_reported_without_a_value(tmp_path: Path) -> None:
    path = write(tmp_path, "pkcs11_uri:\n")
    with pytest.raises(ConfigError) as caught:
        signer(path=path)
    assert str(caught.value) == f"signer.pkcs11_uri: expected a value, got <redacted> (from {path})"


def test_secrets_from_the_environment_stay_out_of_other_fields_errors() -> None:
    with pytest.raises(ConfigError) as caught:
        signer(env={"KEYWARD_PKCS11_URI": SECRET_URI, "KEYWARD_SESSIONS": "lots"})
    assert SECRET_PIN not in str(caught.value)
    assert "signer.sessions" in str(caught.value)


@pytest.mark.parametrize(
    "text",
    [
        # An unterminated quote on a short pkcs11_uri line.
        f'pkcs11_uri: "pkcs11:token=hsm?pin-value={SECRET_PIN}\nsessions: 2\n',
        # A doubled closing quote after a long URI: the snippet centres on the PIN.
        'pkcs11_uri: "pkcs11:token=keyward?module-path=/usr/lib/softhsm/libsofthsm2.so'
        f'&pin-value={SECRET_PIN}""\nsessions: 2\n',
    ],
    ids=["unterminated-quote", "doubled-quote"],
)
def test_invalid_yaml_does_not_quote_a_secret_line(tmp_path: Path, text: str) -> None:
    # pin-value is allowed in config files (the flag refuses it, the file may hold it).
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        signer(path=path)
    message = str(caught.value)
    assert message.startswith(f"config file {path} is not valid YAML")
    assert SECRET_PIN not in message


def test_dump_config_redacts_secrets_and_keeps_the_rest() -> None:
    config = signer(
        overrides={"pkcs11_uri": SECRET_URI, "tls.cert": "/etc/keyward/signer.pem",
                   "allowed_clients": ["gw-1"]}
    )
    dumped = dump_config(config)
    assert dumped["pkcs11_uri"] == "<redacted>"
    assert SECRET_PIN not in json.dumps(dumped)
    assert dumped["tls"] == {"cert": "/etc/keyward/signer.pem", "key": None, "ca": None}
    assert dumped["allowed_clients"] == ["gw-1"]
    assert dumped["listen"] == "127.0.0.1:2410"
    assert dumped["drain_timeout"] == 10.0


def test_dump_config_as_json_loads_back_to_the_same_gateway_config(tmp_path: Path) -> None:
    original = gateway(
        overrides={**GATEWAY_REQUIRED, "tcp_timeout": "2m", "signer_tls.ca": "/ca.pem",
                   "unix_socket": "/run/keyless.sock"}
    )
    path = write(tmp_path, json.dumps(dump_config(original)), name="dumped.json")
    assert gateway(path=path) == original


def test_dump_config_can_be_written_as_yaml(tmp_path: Path) -> None:
    original = gateway(overrides=GATEWAY_REQUIRED)
    path = write(tmp_path, yaml.safe_dump(dump_config(original)))
    assert gateway(path=path) == original


# -- required settings ----------------------------------------------------------------


def test_signer_requires_a_pkcs11_uri() -> None:
    with pytest.raises(ConfigError) as caught:
        signer()
    assert str(caught.value) == "signer.pkcs11_uri: required setting is missing"


def test_gateway_requires_its_three_tls_files() -> None:
    with pytest.raises(ConfigError) as caught:
        gateway(overrides={"signers": ["a:2410"]})
    message = str(caught.value)
    for name in ("gateway.auth_cert", "gateway.auth_key", "gateway.cloudflare_ca_cert"):
        assert name in message
    assert "mutual TLS" in message


def test_gateway_names_only_the_missing_tls_files() -> None:
    with pytest.raises(ConfigError) as caught:
        gateway(overrides={"signers": ["a:2410"], "auth_cert": "/c.pem"},
                env={"KEYWARD_AUTH_KEY": "/k.pem"})
    message = str(caught.value)
    assert message.startswith("gateway.cloudflare_ca_cert: required")
    assert "auth_cert" not in message and "auth_key" not in message


@pytest.mark.parametrize(
    ("overrides", "env"),
    [({}, {}), ({}, {"KEYWARD_SIGNERS": ""}), ({"signers": []}, {}), ({}, {"KEYWARD_SIGNERS": " , "})],
    ids=["absent", "empty-variable", "empty-list", "only-commas"],
)
def test_gateway_requires_at_least_one_signer(
    overrides: dict[str, Any], env: dict[str, str]
) -> None:
    required = {k: v for k, v in GATEWAY_REQUIRED.items() if k != "signers"}
    with pytest.raises(ConfigError) as caught:
        gateway(overrides={**required, **overrides}, env=env)
    assert str(caught.value) == "gateway.signers: at least one signer address is required"


# -- the file itself ------------------------------------------------------------------


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"],
                         ids=["list", "string", "number"])
def test_a_file_that_is_not_a_mapping_is_rejected(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        signer(path=path)
    assert str(caught.value) == f"config file {path}: expected a mapping at the top level"


def test_invalid_yaml_is_reported_with_the_file_and_position(tmp_path: Path) -> None:
    path = write(tmp_path, f"pkcs11_uri: '{URI}'\nsessions: [1, 2\n")
    with pytest.raises(ConfigError) as caught:
        signer(path=path)
    message = str(caught.value)
    assert message.startswith(f"config file {path} is not valid YAML")
    assert "line" in message


def test_a_missing_file_is_reported_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "keyward.yaml"
    with pytest.raises(ConfigError) as caught:
        signer(path=path)
    assert str(caught.value) == f"cannot read config file {path}: No such file or directory"


def test_an_unreadable_file_is_reported_with_its_path(tmp_path: Path) -> None:
    # A directory cannot be read as a file, whoever runs the test (root included).
    directory = tmp_path / "conf.d"
    directory.mkdir()
    with pytest.raises(ConfigError) as caught:
        gateway(path=directory)
    assert str(caught.value) == f"cannot read config file {directory}: Is a directory"


def test_config_error_is_a_value_error() -> None:
    # Callers that catch ValueError around configuration keep working.
    with pytest.raises(ValueError, match=r"signer\.pkcs11_uri"):
        signer()


# -- what the operator sees -----------------------------------------------------------


def _keyward(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "signer.common.cli", *args],
        capture_output=True, text=True, timeout=60, check=False, env=env,
    )


def test_keyward_gateway_reports_a_bad_flag_value_in_one_line(tmp_path: Path) -> None:
    path = write(tmp_path, gateway_yaml())
    proc = _keyward("gateway", "--config", str(path), "--port", "70000")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        "keyward gateway: gateway.port: expected a value from 0 to 65535, got 70000 "
        "(from command line)"
    )


def test_keyward_gateway_reports_a_bad_variable_by_name(tmp_path: Path) -> None:
    path = write(tmp_path, gateway_yaml())
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYWARD_")}
    env["KEYWARD_REQUEST_TIMEOUT"] = "soon"
    proc = _keyward("gateway", "--config", str(path), env=env)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "gateway.request_timeout: expected a duration such as 30s or 250ms, got 'soon' " \
        "(from KEYWARD_REQUEST_TIMEOUT)" in proc.stderr


def test_gokeyless_names_are_accepted_in_files(tmp_path: Path) -> None:
    from gateway.config import GatewayConfig

    path = tmp_path / "gokeyless-style.yaml"
    path.write_text(
        "loglevel: 0\n"
        f"private_key_stores:\n  - uri: '{URI}'\n"
    )
    cfg = load_config(SignerConfig, path=path, env={}, section="signer")
    assert cfg.pkcs11_uri == URI and cfg.log_level == "0"
    gw = tmp_path / "gw.yaml"
    gw.write_text(
        "loglevel: 2\nsign_timeout: 1500ms\nport: 2407\nmetrics_port: 2406\n"
        "auth_cert: s.pem\nauth_key: k.pem\ncloudflare_ca_cert: ca.pem\n"
        "signers: ['127.0.0.1:2410']\n"
    )
    g = load_config(GatewayConfig, path=gw, env={}, section="gateway")
    assert g.log_level == "2" and abs(g.attempt_timeout - 1.5) < 1e-9


def test_gokeyless_names_that_do_not_fit_are_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "dir-store.yaml"
    path.write_text("private_key_stores:\n  - dir: /etc/keyless/keys\n")
    with pytest.raises(ConfigError) as caught:
        load_config(SignerConfig, path=path, env={}, section="signer")
    assert str(caught.value).startswith("signer.private_key_stores: expected exactly one entry")
    both = tmp_path / "both.yaml"
    both.write_text(f"loglevel: 1\nlog_level: info\npkcs11_uri: '{URI}'\n")
    with pytest.raises(ConfigError) as caught:
        load_config(SignerConfig, path=both, env={}, section="signer")
    assert "signer.loglevel" in str(caught.value) and "keep one" in str(caught.value)
