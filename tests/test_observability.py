"""Observability across real processes: traces, metrics, health endpoints, logs.

Signers and gateways run as ``keyward`` processes on a real SoftHSM2 token and export
their spans over OTLP/gRPC to a TraceService receiver run by the test
(``tests/otlp_receiver.py``); a real Prometheus scrapes their ``/metrics``. The keys
are imported with ``signer.hsm.admin.import_pem``, so the test knows the private
numbers and the PIN and can search everything the services exported or wrote for them.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.client
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from harness import Cluster, Pki, eventually, http_get, make_pki, split
from otlp_receiver import (
    KIND_CLIENT,
    KIND_SERVER,
    STATUS_ERROR,
    OtlpReceiver,
    ReceivedSpan,
)
from softhsm import SoftHsmToken, create_token, unavailable_reason

from gateway.client import KeylessClient
from gateway.protocol import Op, Operation, Response
from signer.common.process import Service
from signer.common.tls import keyless_client_context
from signer.hsm import admin
from signer.hsm.pool import Token

pytestmark = pytest.mark.slow


GATEWAY = "keyward-gateway"
SIGNER = "keyward-signer"
# BatchSpanProcessor exports every 5 s by default; the tests want spans promptly.
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "100"}


def tracing(receiver: OtlpReceiver, ratio: float = 1.0) -> dict[str, Any]:
    return {"enabled": True, "exporter": "otlp-grpc", "endpoint": receiver.endpoint,
            "insecure": True, "sample_ratio": ratio}


def instance(name: str) -> dict[str, str]:
    return {**FAST_EXPORT, "OTEL_RESOURCE_ATTRIBUTES": f"service.instance.id={name}"}


# -- the token, with keys whose private numbers the test knows -------------------------


@dataclass
class KnownKeys:
    token: SoftHsmToken
    pin: str
    rsa: rsa.RSAPrivateKey
    ec: ec.EllipticCurvePrivateKey
    rsa_ski: bytes
    ec_ski: bytes


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KnownKeys]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    # A PIN that cannot turn up in a log by coincidence (a random 8-digit one could,
    # among timestamps and counters), so that finding it means it leaked.
    token = create_token(tmp_path_factory.mktemp("softhsm"), label="obs",
                         user_pin=f"Pn{secrets.token_hex(10)}")
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(token.conf_path)
    rsa_key = rsa.generate_private_key(65537, 2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    try:
        with Token(token.uri(), sessions=1) as tok:
            rsa_info = admin.import_pem(tok, _pem(rsa_key), "obs-rsa")
            ec_info = admin.import_pem(tok, _pem(ec_key), "obs-p256")
        yield KnownKeys(token, token.pin_file.read_text().strip(), rsa_key, ec_key,
                        rsa_info.ski, ec_info.ski)
    finally:
        if previous is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = previous


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


# -- the cluster: one traced signer (PIN in its URI) and one traced gateway, JSON logs --


@dataclass
class Obs:
    cluster: Cluster
    receiver: OtlpReceiver
    keys: KnownKeys
    signer: Service
    gateway: Service

    @property
    def pki(self) -> Pki:
        return self.cluster.pki


@pytest.fixture(scope="module")
def obs(keys: KnownKeys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Obs]:
    receiver = OtlpReceiver().start()
    cluster = Cluster(tmp_path_factory.mktemp("cluster"), make_pki(tmp_path_factory.mktemp("pki")),
                      keys.token)
    try:
        # The PIN travels in the URI here (pin-value), the hardest case for "never logged".
        signer = cluster.start_signer(
            sessions=2, pkcs11_uri=keys.token.uri(pin_value=keys.pin),
            tracing=tracing(receiver), log_format="json", env=instance("signer-a"))
        gateway = cluster.start_gateway([signer.address], tracing=tracing(receiver),
                                        log_format="json", env=instance("gateway-a"))
        yield Obs(cluster, receiver, keys, signer, gateway)
    finally:
        cluster.stop_all()
        receiver.stop()


# -- helpers ---------------------------------------------------------------------------


def keyless(obs: Obs, gateway: Service, ops: list[Operation]) -> list[Response]:
    """Send ``ops`` one after another on one connection; the raw answers."""
    host, port = split(gateway.address)
    ctx = keyless_client_context(obs.pki.ca_pem, obs.pki.client.cert, obs.pki.client.key)

    async def go() -> list[Response]:
        async with await KeylessClient.connect(host, port, ctx,
                                               server_hostname="localhost") as c:
            return [await c.request(op) for op in ops]

    return asyncio.run(go())


def ecdsa(obs: Obs, digest: bytes, request_id: str = "", jaeger: bytes = b"",
          **fields: Any) -> Operation:
    ctx = json.dumps({"request_id": request_id}).encode() if request_id else b""
    return Operation(opcode=Op.ECDSA_SIGN_SHA256, ski=obs.keys.ec_ski, payload=digest,
                     req_context=ctx, jaeger_span=jaeger, **fields)


def verify_ecdsa(obs: Obs, digest: bytes, resp: Response) -> None:
    assert resp.opcode == Op.RESPONSE, resp
    obs.keys.ec.public_key().verify(resp.payload, digest,
                                    ec.ECDSA(utils.Prehashed(hashes.SHA256())))


def status_becomes(address: str, path: str, status: int) -> None:
    eventually(lambda: True if http_get(address, path)[0] == status else None,
               f"{path} on {address} to answer {status}")


def gateway_span(spans: list[ReceivedSpan], request_id: str) -> ReceivedSpan | None:
    for s in spans:
        if s.service == GATEWAY and s.attributes.get("keyless.request_id") == request_id:
            return s
    return None


def whole_trace(obs: Obs, request_id: str, signer_spans: int = 1) -> list[ReceivedSpan]:
    """The trace of the keyless request tagged ``request_id`` once its signer side
    (``signer_spans`` server spans, each with its HSM span) has arrived."""

    def found(spans: list[ReceivedSpan]) -> list[ReceivedSpan] | None:
        gw = gateway_span(spans, request_id)
        if gw is None:
            return None
        mine = [s for s in spans if s.trace_id == gw.trace_id]
        servers = [s for s in mine if s.service == SIGNER and s.kind == KIND_SERVER]
        hsm = [s for s in mine if s.service == SIGNER and s.name == "hsm operation"]
        return mine if len(servers) >= signer_spans and len(hsm) >= signer_spans else None

    return obs.receiver.wait_for(found)


def only(spans: list[ReceivedSpan], **match: Any) -> ReceivedSpan:
    found = [s for s in spans if all(getattr(s, k) == v for k, v in match.items())]
    assert len(found) == 1, f"expected one span with {match}, got {found}"
    return found[0]


def under_gateway_span(span: ReceivedSpan, gw: ReceivedSpan,
                       trace: list[ReceivedSpan]) -> ReceivedSpan | None:
    """The gateway span ``span``'s parent is, directly or through a client span per
    attempt: returns the client span in between, or None when the parent is ``gw``."""
    if span.parent_span_id == gw.span_id:
        return None
    parent = only(trace, span_id=span.parent_span_id)
    assert parent.service == GATEWAY and parent.kind == KIND_CLIENT, parent
    assert parent.parent_span_id == gw.span_id
    return parent


def jaeger_binary(trace_id: int, span_id: int, flags: int) -> bytes:
    """jaeger-client-go's binary SpanContext: trace id high, low, span id, parent span
    id, flags, then a baggage count of zero."""
    return (trace_id.to_bytes(16, "big") + span_id.to_bytes(8, "big") + bytes(8)
            + bytes([flags]) + bytes(4))


# -- traces ----------------------------------------------------------------------------


def test_one_keyless_request_yields_one_trace_through_gateway_signer_and_hsm(obs: Obs) -> None:
    digest = hashlib.sha256(b"one request, one trace").digest()
    [resp] = keyless(obs, obs.gateway, [ecdsa(obs, digest, "obs-one-trace",
                                              sni=b"www.example.com",
                                              client_ip=bytes([192, 0, 2, 7]),
                                              server_ip=bytes([198, 51, 100, 1]))])
    verify_ecdsa(obs, digest, resp)
    trace = whole_trace(obs, "obs-one-trace")

    gw = only(trace, service=GATEWAY, kind=KIND_SERVER)
    assert gw.name == "keyless OpECDSASignSHA256"
    assert gw.parent_span_id == ""  # a root: no 0x15 context came with the request
    assert gw.attributes["keyless.ski"] == obs.keys.ec_ski.hex()
    assert gw.attributes["keyless.opcode"] == "OpECDSASignSHA256"
    assert gw.attributes["keyless.sni"] == "www.example.com"
    assert gw.attributes["keyless.client_ip"] == "192.0.2.7"
    assert gw.attributes["keyless.server_ip"] == "198.51.100.1"
    assert gw.attributes["keyless.result"] == "ok"
    assert "keyless-client" in gw.attributes["tls.client.identity"]

    server = only(trace, service=SIGNER, kind=KIND_SERVER)
    under_gateway_span(server, gw, trace)
    assert server.attributes["signer.key.ski"] == obs.keys.ec_ski.hex()
    assert server.attributes["signer.key.label"] == "obs-p256"
    hsm = only(trace, service=SIGNER, name="hsm operation")
    assert hsm.parent_span_id == server.span_id
    assert hsm.attributes["hsm.mechanism"] == "CKM_ECDSA"
    assert hsm.attributes["hsm.token"].startswith("obs ")
    assert server.resource["service.instance.id"] == "signer-a"
    # One trace: every span of this request shares the gateway span's trace id, and
    # nothing else landed in it.
    assert {s.trace_id for s in trace} == {gw.trace_id}
    assert all(s.service in (GATEWAY, SIGNER) for s in trace)
    assert len([s for s in trace if s.kind == KIND_SERVER]) == 2


@pytest.mark.parametrize("form", ["binary", "text"])
def test_a_jaeger_parent_in_tag_0x15_is_continued(obs: Obs, form: str) -> None:
    span_id = secrets.randbits(64) | 1
    if form == "binary":
        trace_id = secrets.randbits(128) | 1 << 127
        context = jaeger_binary(trace_id, span_id, flags=1)
    else:
        # The text form, as jaeger-client writes it: hex without leading zeros, a
        # 64-bit trace id, parent span id 0, flags 1 (sampled).
        trace_id = secrets.randbits(64) | 1 << 63
        context = f"{trace_id:x}:{span_id:x}:0:1".encode()
    rid = f"obs-jaeger-{form}"
    digest = hashlib.sha256(rid.encode()).digest()
    [resp] = keyless(obs, obs.gateway, [ecdsa(obs, digest, rid, jaeger=context)])
    verify_ecdsa(obs, digest, resp)
    trace = whole_trace(obs, rid)
    gw = only(trace, service=GATEWAY, kind=KIND_SERVER)
    assert gw.trace_id == f"{trace_id:032x}"
    assert gw.parent_span_id == f"{span_id:016x}"
    server = only(trace, service=SIGNER, kind=KIND_SERVER)
    under_gateway_span(server, gw, trace)
    assert only(trace, name="hsm operation").parent_span_id == server.span_id


def test_sample_ratio_zero_and_no_parent_means_no_spans_anywhere(obs: Obs) -> None:
    # This gateway samples nothing of its own; the signer behind it samples every root
    # it sees (ratio 1.0), so it must follow the gateway's decision, not make its own.
    gw0 = obs.cluster.start_gateway([obs.signer.address], tracing=tracing(obs.receiver, 0.0),
                                    env=instance("gateway-unsampled"))
    try:
        unsampled = secrets.randbits(128) | 1
        ops = [ecdsa(obs, hashlib.sha256(b"%d" % i).digest(), f"obs-unsampled-{i}")
               for i in range(5)]
        # An edge context that says "not sampled" is obeyed too.
        ops.append(ecdsa(obs, hashlib.sha256(b"x").digest(), "obs-unsampled-parent",
                         jaeger=jaeger_binary(unsampled, 77, flags=0)))
        # Then one request the edge does sample. Spans leave each process in order,
        # so once this one's spans have arrived, any of the requests before it would
        # have arrived too.
        marker = secrets.randbits(128) | 1
        ops.append(ecdsa(obs, hashlib.sha256(b"y").digest(), "obs-sampled-marker",
                         jaeger=jaeger_binary(marker, 78, flags=1)))
        answers = keyless(obs, gw0, ops)
        assert all(a.opcode == Op.RESPONSE for a in answers)
        trace = whole_trace(obs, "obs-sampled-marker")
        assert {s.trace_id for s in trace} == {f"{marker:032x}"}
    finally:
        gw0.stop()
        obs.cluster.services.remove(gw0)
    spans = obs.receiver.spans()
    assert not [s for s in spans
                if str(s.attributes.get("keyless.request_id", "")).startswith("obs-unsampled")]
    assert not [s for s in spans if s.trace_id == f"{unsampled:032x}"]
    # Every signer span the gateways caused has a parent; a root one here would be a
    # request the gateway chose not to trace, traced anyway by the signer.
    assert not [s for s in spans if s.service == SIGNER and s.parent_span_id == ""]


def test_a_retried_request_shows_both_attempts(obs: Obs, tmp_path: Path) -> None:
    faults = tmp_path / "faults.json"
    faults.write_text("")
    broken = obs.cluster.start_signer(sessions=1, test_fault_file=str(faults),
                                      tracing=tracing(obs.receiver), env=instance("signer-b"))
    # The broken signer first: on a tie in load the router takes the first one.
    gw = obs.cluster.start_gateway([broken.address, obs.signer.address],
                                   tracing=tracing(obs.receiver), env=instance("gateway-retry"))
    try:
        faults.write_text(json.dumps({"error": "CKR_DEVICE_ERROR", "calls": ["sign"]}))
        time.sleep(0.3)  # the signer rereads the fault file at most every 100 ms

        def retried() -> list[ReceivedSpan] | None:
            # Wait until the gateway has both signers up, so the first attempt can go
            # to either; a request that happened to go to the good one first is not
            # retried, and then the next one is tried.
            eventually(lambda: True if _signer_up(gw, broken.address) else None,
                       "the broken signer to be back in the gateway's rotation")
            rid = f"obs-retry-{secrets.token_hex(4)}"
            digest = hashlib.sha256(rid.encode()).digest()
            [resp] = keyless(obs, gw, [ecdsa(obs, digest, rid)])
            verify_ecdsa(obs, digest, resp)  # the retry on the good signer answered
            trace = whole_trace(obs, rid)
            gws = only(trace, service=GATEWAY, kind=KIND_SERVER)
            attempts = [s for s in trace if s.kind == KIND_CLIENT and s.parent_span_id == gws.span_id]
            if len(attempts) < 2:
                return None
            return whole_trace(obs, rid, signer_spans=2)

        trace = eventually(retried, "a request that was retried", timeout=60)
        gws = only(trace, service=GATEWAY, kind=KIND_SERVER)
        attempts = sorted((s for s in trace if s.kind == KIND_CLIENT), key=lambda s: s.start_ns)
        assert len(attempts) == 2
        first, second = attempts
        assert all(s.parent_span_id == gws.span_id for s in attempts)
        assert broken.address in first.attributes.values()
        assert obs.signer.address in second.attributes.values()
        assert first.status_code == STATUS_ERROR
        assert second.status_code != STATUS_ERROR
        assert [v for k, v in first.attributes.items() if "attempt" in k] == [1]
        assert [v for k, v in second.attributes.items() if "attempt" in k] == [2]
        servers = {s.resource["service.instance.id"]: s
                   for s in trace if s.service == SIGNER and s.kind == KIND_SERVER}
        assert servers["signer-b"].parent_span_id == first.span_id
        assert servers["signer-b"].status_code == STATUS_ERROR
        assert servers["signer-a"].parent_span_id == second.span_id
        assert gws.attributes["keyless.result"] == "ok"
    finally:
        for svc in (gw, broken):
            svc.stop()
            obs.cluster.services.remove(svc)


def _signer_up(gateway: Service, signer: str) -> bool:
    _, text = http_get(gateway.fields["metrics"], "/metrics")
    return f'keyward_signer_up{{signer="{signer}"}} 1' in text


# -- Prometheus ------------------------------------------------------------------------


PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _query(port: int, promql: str) -> list[dict[str, Any]]:
    status, body = http_get(f"127.0.0.1:{port}",
                            "/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    assert status == 200, body
    data = json.loads(body)
    assert data["status"] == "success", data
    result: list[dict[str, Any]] = data["data"]["result"]
    return result


@pytest.mark.skipif(not Path(PROMETHEUS).exists(),
                    reason="the prometheus binary is absent (apt-get install prometheus)")
def test_prometheus_scrapes_both_services_and_returns_the_request_counter(
    obs: Obs, tmp_path: Path
) -> None:
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                   "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": "keyward-gateway",
             "static_configs": [{"targets": [obs.gateway.fields["metrics"]]}]},
            {"job_name": "keyward-signer",
             "static_configs": [{"targets": [obs.signer.fields["metrics"]]}]},
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    prom = subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        sent = 7
        answers = keyless(obs, obs.gateway, [ecdsa(obs, hashlib.sha256(b"p%d" % i).digest())
                                             for i in range(sent)])
        assert all(a.opcode == Op.RESPONSE for a in answers)

        def ready() -> bool | None:
            try:
                return True if http_get(f"127.0.0.1:{port}", "/-/ready")[0] == 200 else None
            except OSError:
                assert prom.poll() is None, (tmp_path / "prometheus.log").read_text()
                return None

        eventually(ready, "Prometheus to start")

        def counted(promql: str, labels: dict[str, str]) -> dict[str, Any] | None:
            for series in _query(port, promql):
                metric = series["metric"]
                if all(metric.get(k) == v for k, v in labels.items()) \
                        and float(series["value"][1]) >= sent:
                    return metric
            return None

        metric = eventually(lambda: counted("keyless_requests", {"opcode": "OpECDSASignSHA256"}),
                            "keyless_requests{opcode=OpECDSASignSHA256} in Prometheus")
        assert metric["__name__"] == "keyless_requests"
        assert metric["job"] == "keyward-gateway"
        metric = eventually(
            lambda: counted("keyward_signer_operations",
                            {"key": "obs-p256", "algorithm": "ECDSA_SHA256", "outcome": "ok"}),
            "keyward_signer_operations for obs-p256 in Prometheus")
        assert metric["job"] == "keyward-signer"
        # Both targets scraped cleanly (a malformed exposition marks a target down).
        up = {s["metric"]["job"]: s["value"][1] for s in _query(port, "up")}
        assert up == {"keyward-gateway": "1", "keyward-signer": "1"}
        histogram = _query(port, "keyless_request_total_duration_per_opcode_count")
        assert any(float(s["value"][1]) >= sent for s in histogram)
        # The Stream's batching, per signer: every operation sent is counted, and no
        # message went out empty.
        ops = {s["metric"]["signer"]: float(s["value"][1])
               for s in _query(port, "keyward_signer_stream_operations")}
        msgs = {s["metric"]["signer"]: float(s["value"][1])
                for s in _query(port, "keyward_signer_stream_messages")}
        assert ops.keys() == msgs.keys() == {obs.signer.address}
        assert ops[obs.signer.address] >= sent
        assert 1 <= msgs[obs.signer.address] <= ops[obs.signer.address]
    finally:
        prom.terminate()
        try:
            prom.wait(10)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait()
        log.close()


# -- health ----------------------------------------------------------------------------


def test_healthz_and_readyz_follow_the_hsm_and_the_signers(obs: Obs, tmp_path: Path) -> None:
    for svc in (obs.gateway, obs.signer):
        assert http_get(svc.fields["metrics"], "/healthz")[0] == 200
        assert http_get(svc.fields["metrics"], "/readyz")[0] == 200
        # A HEAD probe gets the status and headers, no body.
        host, port = split(svc.fields["metrics"])
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("HEAD", "/readyz")
        head = conn.getresponse()
        assert head.status == 200 and int(head.headers["Content-Length"]) > 0
        assert head.read() == b""
        conn.close()

    faults = tmp_path / "faults.json"
    faults.write_text("")
    signer = obs.cluster.start_signer(sessions=1, test_fault_file=str(faults))
    gw = obs.cluster.start_gateway([signer.address])
    s_ops, g_ops = signer.fields["metrics"], gw.fields["metrics"]
    try:
        assert http_get(s_ops, "/readyz")[0] == 200
        status_becomes(g_ops, "/readyz", 200)
        # The HSM breaks: the next call into it fails, and so does everything after.
        faults.write_text(json.dumps({"error": "CKR_DEVICE_ERROR",
                                      "calls": ["sign", "probe", "discover", "find_objects"]}))
        time.sleep(0.3)  # the signer rereads the fault file at most every 100 ms
        [resp] = keyless(obs, gw, [ecdsa(obs, hashlib.sha256(b"fault").digest())])
        assert resp.opcode == Op.ERROR
        status_becomes(s_ops, "/readyz", 503)
        assert http_get(s_ops, "/healthz")[0] == 200  # alive: restarting would not help
        status_becomes(g_ops, "/readyz", 503)  # its only signer cannot serve
        # The HSM comes back.
        faults.write_text("")
        status_becomes(s_ops, "/readyz", 200)
        status_becomes(g_ops, "/readyz", 200)
        digest = hashlib.sha256(b"after the fault").digest()
        verify_ecdsa(obs, digest, keyless(obs, gw, [ecdsa(obs, digest)])[0])
        # The gateway's only signer dies.
        signer.kill()
        status_becomes(g_ops, "/readyz", 503)
        assert http_get(g_ops, "/healthz")[0] == 200
    finally:
        for svc in (gw, signer):
            svc.stop()
            obs.cluster.services.remove(svc)


# -- logs ------------------------------------------------------------------------------


def test_json_logs_identify_a_failed_request_and_its_trace(obs: Obs) -> None:
    rid = f"obs-failed-{secrets.token_hex(4)}"
    # A 31-byte "SHA-256 digest": the signer refuses it, the gateway logs the failure.
    [resp] = keyless(obs, obs.gateway, [ecdsa(obs, b"\x01" * 31, rid)])
    assert resp.opcode == Op.ERROR
    gw_span = obs.receiver.wait_for(lambda spans: gateway_span(spans, rid))
    assert gw_span.status_code == STATUS_ERROR

    records = []
    for svc in (obs.gateway, obs.signer):
        for line in svc.log.read_text().splitlines():
            record = json.loads(line)  # every line is one JSON object
            assert {"ts", "level", "logger", "msg"} <= record.keys(), line
            records.append(record)
    [failed] = [r for r in records if r.get("request_id") == rid]
    assert failed["msg"] == "request failed"
    assert failed["ski"] == obs.keys.ec_ski.hex()
    assert failed["trace_id"] == gw_span.trace_id
    assert failed["span_id"] == gw_span.span_id
    assert failed["code"] == "cryptography error"


# -- no secrets anywhere ---------------------------------------------------------------


def _forms(raw: bytes) -> list[bytes]:
    """``raw`` as bytes, hex (both cases) and base64 (standard and URL-safe, with and
    without padding)."""
    out = [raw, raw.hex().encode(), raw.hex().upper().encode()]
    for enc in (base64.b64encode(raw), base64.urlsafe_b64encode(raw)):
        out += [enc, enc.rstrip(b"=")]
    return out


def _number_forms(n: int) -> list[bytes]:
    out = _forms(n.to_bytes((n.bit_length() + 7) // 8, "big"))
    return [*out, str(n).encode(), f"{n:x}".encode(), f"{n:X}".encode()]


def secret_needles(keys: KnownKeys) -> dict[str, list[bytes]]:
    needles: dict[str, list[bytes]] = {}
    r = keys.rsa.private_numbers()
    needles["RSA d"] = _number_forms(r.d)
    needles["RSA p"] = _number_forms(r.p)
    needles["RSA q"] = _number_forms(r.q)
    needles["EC private scalar"] = _number_forms(keys.ec.private_numbers().private_value)
    for name, key in (("RSA", keys.rsa), ("EC", keys.ec)):
        for fmt_name, fmt in (("PKCS#8", serialization.PrivateFormat.PKCS8),
                              ("PKCS#1/SEC1", serialization.PrivateFormat.TraditionalOpenSSL)):
            der = key.private_bytes(serialization.Encoding.DER, fmt,
                                    serialization.NoEncryption())
            needles[f"{name} private key DER ({fmt_name})"] = _forms(der)
            pem = key.private_bytes(serialization.Encoding.PEM, fmt,
                                    serialization.NoEncryption())
            needles[f"{name} private key PEM ({fmt_name})"] = [
                line for line in pem.splitlines()[1:-1] if len(line) == 64]
    needles["PIN"] = [keys.pin.encode(), *_forms(keys.pin.encode())[1:]]
    return needles


def test_no_key_material_pin_or_payload_in_spans_logs_or_metrics(obs: Obs) -> None:
    keys = obs.keys
    # Every kind of operation, on both keys, and a failing one.
    digest = hashlib.sha256(b"the payload is private too").digest()
    premaster = b"\x03\x03" + secrets.token_bytes(46)
    ciphertext = keys.rsa.public_key().encrypt(premaster, padding.PKCS1v15())
    ops = [
        ecdsa(obs, digest, "obs-secrets-1"),
        Operation(opcode=Op.RSA_SIGN_SHA256, ski=keys.rsa_ski, payload=digest,
                  req_context=b'{"request_id": "obs-secrets-2"}'),
        Operation(opcode=Op.RSA_PSS_SIGN_SHA256, ski=keys.rsa_ski, payload=digest,
                  req_context=b'{"request_id": "obs-secrets-3"}'),
        Operation(opcode=Op.RSA_DECRYPT, ski=keys.rsa_ski, payload=ciphertext,
                  req_context=b'{"request_id": "obs-secrets-4"}'),
        Operation(opcode=Op.RSA_DECRYPT, ski=keys.rsa_ski, payload=ciphertext[:-1],
                  req_context=b'{"request_id": "obs-secrets-5"}'),
    ]
    answers = keyless(obs, obs.gateway, ops)
    assert [a.opcode for a in answers] == [Op.RESPONSE] * 4 + [Op.ERROR]
    plaintext = answers[3].payload
    assert plaintext.endswith(b"\x00" + premaster)
    for i in range(1, 6):
        whole_trace(obs, f"obs-secrets-{i}")

    needles = secret_needles(keys)
    needles["payload (digest)"] = _forms(digest)
    needles["payload (ciphertext)"] = _forms(ciphertext)
    needles["answer (premaster secret)"] = _forms(premaster)
    needles["answer (signatures)"] = [f for a in answers[:3] for f in _forms(a.payload)]

    haystacks: dict[str, bytes] = {}
    for i, raw in enumerate(obs.receiver.raw()):
        haystacks[f"OTLP export #{i}"] = raw
    haystacks["spans, as received"] = "\n".join(
        repr(s) for s in obs.receiver.spans()).encode()
    for log in sorted(obs.cluster.directory.glob("*.log")):
        haystacks[f"log {log.name}"] = log.read_bytes()
    for svc in obs.cluster.services:
        if svc.alive() and svc.fields.get("metrics"):
            status, text = http_get(svc.fields["metrics"], "/metrics")
            assert status == 200
            haystacks[f"metrics of {svc.name}"] = text.encode()
    # The search covers what it claims: spans of every kind, the services' debug
    # logs, both metric endpoints.
    assert len(obs.receiver.spans()) >= 15
    assert sum(1 for name in haystacks if name.startswith("log ")) >= 2
    assert sum(1 for name in haystacks if name.startswith("metrics ")) == 2
    assert any(b'"level":"debug"' in h for h in haystacks.values())

    leaks = [f"{what} in {where}"
             for what, forms in needles.items()
             for where, hay in haystacks.items()
             if any(form in hay for form in forms)]
    assert not leaks
