"""``keyward migrate``: a gateway config and signer configs from a gokeyless.yaml.

gokeyless is one process holding every key; Keyward is a gateway (the keyless
listener) in front of signers (one PKCS#11 token each). The mapping, key by key, is
the table in docs/migrating-from-gokeyless.md; in short:

* listener settings go to the gateway: ``hostname``, ``auth_cert``, ``auth_key``,
  ``cloudflare_ca_cert``, ``port``, ``metrics_port``, ``loglevel``, and
  ``sign_timeout`` (times 1 + ``sign_retry_count``, since Keyward's
  ``request_timeout`` is the whole budget, retries on other signers included);
* each PKCS#11 token among the ``private_key_stores`` ``uri: pkcs11:...`` entries
  becomes a signer; a ``pin-value`` is moved out of the URI into a 0600 PIN file
  read through ``pin-source=file:`` (Keyward refuses PINs on command lines and
  warns about them in files);
* ``dir:`` and ``file:`` stores hold software keys, which Keyward serves only from an
  HSM: the ``keyward keys import`` command of each ``.key`` file is printed, and run
  with ``--import``;
* the Signer API between gateway and signers is new (mutual TLS); unless
  ``--no-signer-pki``, a private CA for that link alone is created in
  ``OUT/signer-api/``;
* what has no equivalent is reported (``pid_file``, ``current_time``,
  ``tracing_address``), secrets that do not belong in a config are not copied
  (``origin_ca_api_key``), and key stores Keyward cannot serve (Azure Key Vault,
  Google Cloud KMS) stop the migration with nothing written.

Relative paths in gokeyless.yaml are resolved against its directory, which is
gokeyless's working directory as packaged (``/etc/keyless``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from signer.common.cli import CommandError, add_logging_flags

# gokeyless's config keys (cmd/gokeyless/gokeyless.go), and the pre-2018 names its
# packaged gokeyless.yaml still used (cert, key, ca_cert, csr, origin_ca_key).
ALIASES = {
    "cert": "auth_cert",
    "key": "auth_key",
    "ca_cert": "cloudflare_ca_cert",
    "csr": "auth_csr",
    "origin_ca_key": "origin_ca_api_key",
}
KNOWN = {
    "loglevel",
    "hostname",
    "zone_id",
    "origin_ca_api_key",
    "init_endpoint",
    "auth_cert",
    "auth_key",
    "auth_csr",
    "cloudflare_ca_cert",
    "private_key_stores",
    "port",
    "metrics_port",
    "pid_file",
    "current_time",
    "tracing_enabled",
    "tracing_address",
    "tracing_sample_rate",
    "sign_timeout",
    "sign_retry_count",
}
DEFAULTS = {  # gokeyless's own defaults, relative to its working directory
    "auth_cert": "server.pem",
    "auth_key": "server-key.pem",
    "auth_csr": "server.csr",
    "cloudflare_ca_cert": "keyless_cacert.pem",
}
LOG_LEVELS = {0: "debug", 1: "info", 2: "warning", 3: "error", 4: "critical", 5: "critical"}
KEY_FILE = re.compile(r".+\.key$")  # gokeyless server/keystore.go keyExt
GATEWAY_CLIENT_CN = "keyward-gateway"
_GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_TOKEN_SELECTORS = ("token", "serial", "slot-id")
_KEY_SELECTORS = ("id", "object", "type")
# Characters RFC 7512 allows unescaped in a query value (pk11-qchar), for the PIN path.
_QUERY_SAFE = "-._~:[]@!$'()*+,=/?|"


def register_migrate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    m = sub.add_parser(
        "migrate",
        help="write Keyward gateway and signer configs from a gokeyless.yaml "
        "(and import its key files into the HSM with --import)",
        description="Read a gokeyless configuration and write gateway.yaml, signer.yaml "
        "(one per PKCS#11 token) and PIN files into --out-dir. Nothing is written when "
        "a key store cannot be migrated. See docs/migrating-from-gokeyless.md.",
    )
    m.add_argument("gokeyless_config", type=Path, metavar="GOKEYLESS_YAML")
    m.add_argument("--out-dir", type=Path, default=Path("."), help="where to write (default .)")
    m.add_argument(
        "--signer-address",
        default="127.0.0.1:2410",
        metavar="HOST:PORT",
        help="the (first) signer's Signer API address; further signers take port +10 each",
    )
    m.add_argument(
        "--pkcs11-uri",
        help="token to import dir:/file: keys into, when gokeyless.yaml has no pkcs11 store "
        "(PIN via pin-source=file: or env:, never pin-value here)",
    )
    m.add_argument(
        "--no-signer-pki",
        action="store_true",
        help="do not create the gateway<->signer CA and certificates in OUT/signer-api/",
    )
    m.add_argument(
        "--import",
        dest="run_import",
        action="store_true",
        help="run the keyward keys import commands for the dir:/file: keys",
    )
    m.add_argument("--force", action="store_true", help="overwrite existing output files")
    add_logging_flags(m)
    m.set_defaults(handler=run_migrate)


@dataclass(slots=True)
class SignerPlan:
    name: str
    listen: str
    uri: str  # without any pin-value
    pin: str | None  # moved out of the URI, written to pin_file
    pin_file: Path | None
    keys: list[str] = field(default_factory=list)  # gokeyless key selectors, for notes
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class KeyImport:
    pem: Path
    label: str
    signer: str


@dataclass(slots=True)
class Plan:
    gateway: dict[str, Any] = field(default_factory=dict)
    signers: list[SignerPlan] = field(default_factory=list)
    imports: list[KeyImport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    init_command: list[str] | None = None
    tls_dir: Path | None = None


def run_migrate(args: argparse.Namespace) -> int:
    import yaml

    source_path: Path = args.gokeyless_config
    try:
        loaded = yaml.safe_load(source_path.read_text())
    except OSError as e:
        raise CommandError(f"cannot read {source_path}: {e.strerror}") from None
    except yaml.YAMLError:
        # The file may hold PINs and the Origin CA key: never quote its lines.
        raise CommandError(f"{source_path} is not valid YAML") from None
    if not isinstance(loaded, dict):
        raise CommandError(f"{source_path}: expected a mapping at the top level")
    if args.pkcs11_uri and "pin-value=" in args.pkcs11_uri:
        raise CommandError(
            "--pkcs11-uri: do not put pin-value on the command line; use "
            "pin-source=file:/path or pin-source=env:NAME"
        )
    out: Path = args.out_dir.resolve()
    plan = make_plan(
        loaded,
        base=source_path.resolve().parent,
        out=out,
        signer_address=args.signer_address,
        pkcs11_uri=args.pkcs11_uri,
        signer_pki=not args.no_signer_pki,
    )
    if plan.refused:
        for problem in plan.refused:
            print(f"keyward migrate: cannot migrate: {problem}", file=sys.stderr)
        print("keyward migrate: nothing written", file=sys.stderr)
        return 1
    written = write_plan(plan, out, source=source_path, force=args.force)
    print(f"keyward migrate: from {source_path}")
    for path in written:
        print(f"  wrote {path}")
    for note in plan.notes:
        print(f"  note: {note}")
    if plan.init_command:
        print(
            "the key server certificate (when it needs renewing; the Origin CA key from a "
            "0600 file or KEYWARD_ORIGIN_CA_API_KEY):"
        )
        print("  " + " ".join(plan.init_command))
    status = 0
    if plan.imports:
        print(f"software keys of the dir:/file: stores ({len(plan.imports)}) go into the HSM:")
        for imp in plan.imports:
            print("  " + " ".join(_import_argv(imp, out)))
        if args.run_import:
            status = run_imports(plan, out)
        else:
            print(
                "  (run them, or keyward migrate ... --import; then keep the .key files "
                "offline or destroy them)"
            )
    first = plan.signers[0].name if plan.signers else "signer"
    print("then:")
    print(f"  keyward signer --config {out / (first + '.yaml')}")
    print(f"  keyward gateway --config {out / 'gateway.yaml'}")
    return status


def make_plan(
    src: dict[str, Any],
    *,
    base: Path,
    out: Path,
    signer_address: str,
    pkcs11_uri: str | None = None,
    signer_pki: bool = True,
) -> Plan:
    from gateway.config import GatewayConfig
    from signer.config import SignerConfig

    gw_fields = {f.name for f in dataclasses.fields(GatewayConfig)}
    signer_fields = {f.name for f in dataclasses.fields(SignerConfig)}
    plan = Plan()
    cfg: dict[str, Any] = {}
    for old, new in ALIASES.items():
        if old in src:
            if new not in src:
                src = {**src, new: src[old]}
            plan.notes.append(f"{old}: the old gokeyless name of {new}, read as {new}")
    for key in src:
        if key not in KNOWN and key not in ALIASES:
            plan.notes.append(f"{key}: not a gokeyless setting; ignored")

    def path(key: str) -> str:
        value = src.get(key) or DEFAULTS[key]
        return str((base / str(value)).resolve())

    if src.get("hostname"):
        cfg["hostname"] = str(src["hostname"])
    # gokeyless listens on every interface and has no option for it; so must the
    # gateway for the edge (or cloudflared on another host) to reach it.
    cfg["bind_address"] = "0.0.0.0"
    cfg["port"] = int(src.get("port") or 2407)
    for key in ("auth_cert", "auth_key", "cloudflare_ca_cert"):
        cfg[key] = path(key)
    if "metrics_port" in src:
        if "metrics_port" in gw_fields:
            cfg["metrics_port"] = int(src["metrics_port"])
        else:
            plan.notes.append("metrics_port: this Keyward has no metrics endpoint yet; dropped")
    if "metrics_address" in gw_fields:
        plan.notes.append(
            "metrics: gokeyless served /metrics on every interface; the gateway serves it on "
            "127.0.0.1 (metrics_address: 0.0.0.0 if Prometheus scrapes from another host)"
        )
    log_level = _log_level(src.get("loglevel"), plan)
    if log_level is not None:
        cfg["log_level"] = log_level
    _timeouts(src, cfg, plan)
    tracing = _tracing(src, plan)
    if tracing:
        if "tracing" in gw_fields:
            cfg["tracing"] = tracing
        else:
            plan.notes.append("tracing_*: this Keyward has no tracing settings yet; dropped")
    for key, why in (
        ("pid_file", "systemd (or the container runtime) tracks the process; dropped"),
        ("current_time", "a testing override of the certificate clock; dropped"),
        ("auth_csr", "only keyward init uses it (--auth-csr)"),
    ):
        if key in src:
            plan.notes.append(f"{key}: {why}")
    if src.get("origin_ca_api_key"):
        plan.notes.append(
            "origin_ca_api_key: not copied (Keyward keeps no API keys in config files); "
            "remove it from gokeyless.yaml once migrated"
        )
    if src.get("zone_id") or src.get("origin_ca_api_key"):
        init = ["keyward", "init", "--config", str(out / "gateway.yaml")]
        if src.get("zone_id"):
            init += ["--zone-id", str(src["zone_id"])]
        init += ["--auth-csr", path("auth_csr"), "--origin-ca-key-file", "FILE"]
        from gateway.init import DEFAULT_ENDPOINT

        if src.get("init_endpoint") and src["init_endpoint"] != DEFAULT_ENDPOINT:
            init += ["--endpoint", str(src["init_endpoint"])]
        plan.init_command = init

    _stores(src.get("private_key_stores"), base, out, pkcs11_uri, signer_address, plan)
    if not plan.signers and not plan.refused:
        plan.refused.append(
            "no key stores: gokeyless.yaml has no private_key_stores (gokeyless reads "
            "--private-key-dirs flags; give --pkcs11-uri and import those keys yourself)"
        )

    tls_dir = out / "signer-api"
    plan.tls_dir = tls_dir if signer_pki else None
    if not signer_pki:
        plan.notes.append(
            f"Signer API: put the CA, gateway client and signer certificates where "
            f"{tls_dir} says in the configs (mutual TLS between gateway and signers)"
        )
    cfg["signers"] = [s.listen for s in plan.signers]
    cfg["signer_tls"] = {
        "cert": str(tls_dir / "gateway-client.pem"),
        "key": str(tls_dir / "gateway-client-key.pem"),
        "ca": str(tls_dir / "ca.pem"),
    }
    plan.gateway = cfg
    for signer in plan.signers:
        scfg: dict[str, Any] = {"pkcs11_uri": signer.uri, "listen": signer.listen}
        scfg["tls"] = {
            "cert": str(tls_dir / "signer.pem"),
            "key": str(tls_dir / "signer-key.pem"),
            "ca": str(tls_dir / "ca.pem"),
        }
        if signer_pki:
            scfg["allowed_clients"] = [GATEWAY_CLIENT_CN]
        if log_level is not None:
            scfg["log_level"] = log_level
        if tracing and "tracing" in signer_fields:
            scfg["tracing"] = dict(tracing)
        if "metrics_listen" in signer_fields:
            # Each signer on a host needs its own operations port: listen's port + 1.
            host, _, port = signer.listen.rpartition(":")
            scfg["metrics_listen"] = f"{host}:{int(port) + 1}"
        signer.config = scfg
    return plan


def _log_level(value: Any, plan: Plan) -> str | None:
    if value is None:
        return None
    try:
        return LOG_LEVELS[int(value)]
    except (ValueError, TypeError, KeyError):
        plan.notes.append(f"loglevel: {value!r} is not 0-5; the default (info) is used")
        return None


def go_duration(text: str) -> float:
    """Seconds in a Go duration (``1m30s``, ``500ms``, ``2s``)."""
    text = text.strip()
    if not text or _GO_DURATION.sub("", text):
        raise ValueError(f"not a Go duration: {text!r}")
    return sum(float(n) * _GO_UNITS[u] for n, u in _GO_DURATION.findall(text))


def _timeouts(src: dict[str, Any], cfg: dict[str, Any], plan: Plan) -> None:
    raw = src.get("sign_timeout")
    retries = src.get("sign_retry_count") or 0
    if raw in (None, ""):
        if retries:
            plan.notes.append(
                "sign_retry_count: the gateway retries on another signer by itself, within "
                "request_timeout; dropped"
            )
        return
    try:
        per_attempt = go_duration(str(raw))
        attempts = 1 + int(retries)
    except ValueError:
        plan.notes.append(f"sign_timeout: {raw!r} is not a Go duration; the default is used")
        return
    total = per_attempt * attempts
    cfg["request_timeout"] = f"{total:g}s"
    plan.notes.append(
        f"sign_timeout {raw} x {attempts} attempts -> request_timeout {total:g}s (one budget "
        "for the whole request, retries on other signers included; decrypts too)"
    )


def _tracing(src: dict[str, Any], plan: Plan) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "tracing_enabled" in src:
        out["enabled"] = bool(src["tracing_enabled"])
    if "tracing_sample_rate" in src:
        out["sample_ratio"] = float(src["tracing_sample_rate"] or 0.0)
    if src.get("tracing_address"):
        plan.notes.append(
            f"tracing_address {src['tracing_address']}: a Jaeger UDP agent; Keyward exports "
            "OTLP: set tracing.endpoint or OTEL_EXPORTER_OTLP_ENDPOINT (Jaeger takes OTLP "
            "on 4317)"
        )
    return out


def _stores(
    stores: Any,
    base: Path,
    out: Path,
    pkcs11_uri: str | None,
    signer_address: str,
    plan: Plan,
) -> None:
    if stores is None:
        stores = []
    if not isinstance(stores, list):
        plan.refused.append("private_key_stores: expected a list")
        return
    tokens: dict[tuple[str, ...], list[str]] = {}  # token identity -> URIs
    files: list[tuple[Path, Path]] = []  # (key file, the dir it was found under)
    for n, store in enumerate(stores):
        where = f"private_key_stores[{n}]"
        kinds = [k for k in ("dir", "file", "uri") if isinstance(store, dict) and store.get(k)]
        if len(kinds) != 1:
            plan.refused.append(f"{where}: must set exactly one of dir, file, uri")
            continue
        value = str(store[kinds[0]])
        if kinds[0] == "uri":
            if not value.startswith("pkcs11:"):
                plan.refused.append(
                    f"{where}: {_kms_name(value)} keys cannot be served by Keyward, whose "
                    "signers use PKCS#11 only; import the keys into an HSM if they are "
                    "exportable, or keep gokeyless for them"
                )
                continue
            try:
                identity = _token_identity(value)
            except ValueError as e:
                plan.refused.append(f"{where}: {e}")
                continue
            tokens.setdefault(identity, []).append(value)
            continue
        p = (base / value).resolve()
        if kinds[0] == "file":
            if not p.is_file():
                plan.refused.append(f"{where}: key file {p} does not exist")
            else:
                files.append((p, p.parent))
            continue
        if not p.is_dir():
            plan.refused.append(f"{where}: key directory {p} does not exist")
            continue
        found = sorted(q for q in p.rglob("*") if q.is_file() and KEY_FILE.match(q.name))
        if not found:
            plan.notes.append(f"{where}: no .key files in {p}")
        files.extend((q, p) for q in found)

    if pkcs11_uri:
        try:
            identity = _token_identity(pkcs11_uri)
        except ValueError as e:
            plan.refused.append(f"--pkcs11-uri: {e}")
            return
        tokens.setdefault(identity, []).insert(0, pkcs11_uri)
        target = identity
    else:
        target = next(iter(tokens), ())

    host, _, port_text = signer_address.rpartition(":")
    if not host or not port_text.isdigit():
        raise CommandError(f"--signer-address: expected HOST:PORT, got {signer_address!r}")
    names = ["signer"] if len(tokens) == 1 else [f"signer-{i + 1}" for i in range(len(tokens))]
    target_name = ""
    for i, (identity, uris) in enumerate(tokens.items()):
        name = names[i]
        if identity == target:
            target_name = name
        uri, pin = _signer_uri(uris, name, plan)
        pin_file = out / f"{name}.pin" if pin is not None else None
        if pin_file is not None:
            uri = _with_pin_source(uri, pin_file)
        plan.signers.append(
            SignerPlan(
                name=name,
                listen=f"{host}:{int(port_text) + 10 * i}",
                uri=uri,
                pin=pin,
                pin_file=pin_file,
            )
        )
    labels: set[str] = set()
    for key_file, root in files:
        label = _label(key_file, root, labels)
        plan.imports.append(KeyImport(key_file, label, target_name))
    if files and not tokens:
        plan.refused.append(
            "the dir:/file: keys need a PKCS#11 token to live in and gokeyless.yaml names "
            "none: give --pkcs11-uri (SoftHSM2 will do to start with)"
        )


def _kms_name(uri: str) -> str:
    if ".vault.azure.net" in uri or ".managedhsm.azure.net" in uri:
        return "Azure Key Vault / Managed HSM"
    if uri.startswith("projects/"):
        return "Google Cloud KMS"
    return f"non-PKCS#11 ({uri.split(':', 1)[0]}:)"


def _split_uri(uri: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    body = uri.removeprefix("pkcs11:")
    path, _, query = body.partition("?")

    def attrs(text: str, sep: str) -> list[tuple[str, str]]:
        out = []
        for part in text.split(sep):
            if part:
                name, _, value = part.partition("=")
                out.append((name.strip(), value.strip()))
        return out

    return attrs(path, ";"), attrs(query, "&")


def _join_uri(path: list[tuple[str, str]], query: list[tuple[str, str]]) -> str:
    text = "pkcs11:" + ";".join(f"{k}={v}" for k, v in path)
    if query:
        text += "?" + "&".join(f"{k}={v}" for k, v in query)
    return text


def _token_identity(uri: str) -> tuple[str, ...]:
    """Module and token selectors: two URIs with the same identity share a signer."""
    path, query = _split_uri(uri)
    p, q = dict(path), dict(query)
    if "module-path" not in q:
        raise ValueError("the PKCS#11 URI has no module-path")
    selectors = [f"{k}={p[k]}" for k in _TOKEN_SELECTORS if k in p]
    if not selectors:
        raise ValueError("the PKCS#11 URI selects no token (token=, serial= or slot-id=)")
    return (q["module-path"], *selectors)


def _signer_uri(uris: list[str], name: str, plan: Plan) -> tuple[str, str | None]:
    """One URI for the signer of these gokeyless URIs (one token), and its PIN."""
    path, query = _split_uri(uris[0])
    pins = set()
    for uri in uris:
        q = dict(_split_uri(uri)[1])
        if "pin-value" in q:
            pins.add(urllib.parse.unquote(q["pin-value"]))
    if len(pins) > 1:
        plan.refused.append(f"{name}: the URIs of one token carry different PINs")
    pin = next(iter(pins), None)
    if len(uris) > 1:
        # A signer serves one token's keys, selected by one URI: with several
        # gokeyless URIs on the token, serve the whole token.
        selected = [
            ";".join(f"{k}={v}" for k, v in _split_uri(u)[0] if k in _KEY_SELECTORS) for u in uris
        ]
        path = [(k, v) for k, v in path if k not in _KEY_SELECTORS]
        plan.notes.append(
            f"{name}: gokeyless had {len(uris)} URIs on this token ({', '.join(selected)}); "
            "the signer serves every private key on the token"
        )
    # gokeyless ignored pin-source and used pin-value; a lone pin-source is kept.
    source = dict(query).get("pin-source")
    query = [(k, v) for k, v in query if k not in ("pin-value", "pin-source")]
    if pin is not None:
        plan.notes.append(
            f"{name}: pin-value moved out of the URI into {name}.pin (0600), read with "
            "pin-source=file:; remove the PIN from gokeyless.yaml once migrated"
        )
    elif source is not None:
        query.append(("pin-source", source))
    else:
        plan.notes.append(f"{name}: the URI gives no PIN; the signer logs in without one")
    return _join_uri(path, query), pin


def _with_pin_source(uri: str, pin_file: Path) -> str:
    path, query = _split_uri(uri)
    query = [(k, v) for k, v in query if k != "pin-source"]
    query.append(("pin-source", "file:" + urllib.parse.quote(str(pin_file), safe=_QUERY_SAFE)))
    return _join_uri(path, query)


def _label(key_file: Path, root: Path, taken: set[str]) -> str:
    """The key's label on the token: its file name without .key, made unique."""
    rel = key_file.relative_to(root) if key_file.is_relative_to(root) else Path(key_file.name)
    label = str(rel.with_suffix("")).replace(os.sep, "-")[:128]
    candidate, n = label, 2
    while candidate in taken:
        candidate = f"{label}-{n}"
        n += 1
    taken.add(candidate)
    return candidate


def write_plan(plan: Plan, out: Path, *, source: Path, force: bool) -> list[Path]:
    import yaml

    outputs = [out / "gateway.yaml"]
    for s in plan.signers:
        outputs.append(out / f"{s.name}.yaml")
        if s.pin_file is not None:
            outputs.append(s.pin_file)
    existing = [p for p in outputs if p.exists()]
    if existing and not force:
        raise CommandError(
            f"{existing[0]} exists; --force overwrites ({len(existing)} files would be replaced)"
        )
    out.mkdir(parents=True, exist_ok=True)
    header = (
        f"# Written by keyward migrate from {source}.\n"
        "# Settings: docs/migrating-from-gokeyless.md; every one can also come from\n"
        "# KEYWARD_* environment variables.\n"
    )
    written: list[Path] = []
    gw_notes = "".join(f"# note: {n}\n" for n in plan.notes)
    _write_text(out / "gateway.yaml", header + gw_notes + yaml.safe_dump(plan.gateway), 0o640)
    written.append(out / "gateway.yaml")
    for s in plan.signers:
        if s.pin_file is not None and s.pin is not None:
            _write_text(s.pin_file, s.pin + "\n", 0o600)
            written.append(s.pin_file)
        _write_text(out / f"{s.name}.yaml", header + yaml.safe_dump(s.config), 0o640)
        written.append(out / f"{s.name}.yaml")
    if plan.tls_dir is not None:
        written.extend(_signer_pki(plan.tls_dir, plan))
    _validate(plan, out)
    return written


def _signer_pki(directory: Path, plan: Plan) -> list[Path]:
    """A CA for the gateway<->signer link alone, and its three certificates."""
    from signer.common.pki import LocalCA

    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)  # holds the CA key; hand each service its own files
    made = not (directory / "ca.pem").exists()
    ca = LocalCA.load_or_create(directory, "Keyward Signer API CA")
    ca.issue(directory, "gateway-client", common_name=GATEWAY_CLIENT_CN, client=True)
    hosts = sorted({s.listen.rpartition(":")[0].strip("[]") for s in plan.signers})
    ips = tuple(h for h in hosts if _is_ip(h)) or ("127.0.0.1",)
    dns = (*(h for h in hosts if not _is_ip(h)), "localhost")
    ca.issue(directory, "signer", common_name="keyward-signer", dns=dns, ips=ips, server=True)
    if made:
        plan.notes.append(
            f"Signer API: a new CA in {directory} (ca-key.pem: keep it offline once the "
            "certificates are issued); signer.pem names " + ", ".join((*dns, *ips))
        )
    return [directory]


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _write_text(path: Path, text: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, mode)  # O_CREAT's mode does not apply to a file that already existed


def _validate(plan: Plan, out: Path) -> None:
    """Load what was written with the services' own loader: a bug here, not at start."""
    from gateway.config import GatewayConfig
    from signer.common.config import load_config
    from signer.config import SignerConfig

    env: dict[str, str] = {}  # the files alone, whatever this shell's KEYWARD_* say
    load_config(GatewayConfig, path=out / "gateway.yaml", env=env, section="gateway")
    for s in plan.signers:
        load_config(SignerConfig, path=out / f"{s.name}.yaml", env=env, section="signer")


def _import_argv(imp: KeyImport, out: Path) -> list[str]:
    return [
        "keyward", "keys", "import", "--pem", str(imp.pem), "--label", imp.label,
        "--config", str(out / f"{imp.signer}.yaml"),
    ]  # fmt: skip


def run_imports(plan: Plan, out: Path) -> int:
    from signer.common.process import keyward_argv

    failed = 0
    for imp in plan.imports:
        argv = keyward_argv(*_import_argv(imp, out)[1:])
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            print(f"  imported {imp.pem} as {imp.label!r}")
        elif "is already on the token" in proc.stderr:
            print(f"  {imp.pem}: already on the token; not imported again")
        else:
            failed += 1
            print(f"  {imp.pem}: import failed: {proc.stderr.strip()}", file=sys.stderr)
    return 1 if failed else 0
