"""Failover with real processes under load: signers and HSMs come and go, the edge
notices nothing.

Every scenario runs a steady keyless load (``gateway.bench.SteadyLoad``: real mutual-TLS
connections to a real gateway, each answer accounted for and a sample verified) in a
background thread while the test breaks something: kill -9, an HSM fault through the
signer's ``test_fault_file``, injected HSM latency, a network partition made with a
network namespace, a rolling restart. What is asserted is what the edge would see:
no failed request, and traffic moving (read from the gateway's
``keyward_signer_answers`` counter on its /metrics endpoint). The only timing bounds
are generous ones ("within the 5 s request budget", "within 20 s").
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2
from harness import Cluster, Pki, make_pki, split
from softhsm import SoftHsmToken

from gateway.bench import SteadyResult, run_steady
from gateway.client import KeylessClient, KeylessError
from gateway.discovery import Discovery
from gateway.protocol import ErrorCode, Op
from gateway.router import Router, RouterSettings, SignerTLS
from gateway.selfcheck import PublicKey, ski_of, verify
from signer.client import SignerClient, SignerError
from signer.common.process import Service
from signer.common.tls import keyless_client_context
from signer.faults import FileFaultInjector
from signer.hsm import admin
from signer.hsm.errors import HsmError
from signer.hsm.pool import Job, Token
from signer.v1 import signer_pb2 as pb

pytestmark = pytest.mark.slow

DIGEST = hashlib.sha256(b"Hello!").digest()
# Every load is bounded: at most this long, whatever the test does.
LOAD_LIMIT = 40.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def token(softhsm: SoftHsmToken) -> SoftHsmToken:
    with Token(softhsm.uri(), sessions=1) as tok:
        admin.generate_key(tok, "p256", "fo-p256")
    return softhsm


@pytest.fixture(scope="module")
def public_key(token: SoftHsmToken) -> PublicKey:
    with Token(token.uri(), sessions=1) as tok:
        key = tok.resolve_key(label="fo-p256")
        return key.public_key()


@pytest.fixture
def cluster(token: SoftHsmToken, pki: Pki, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "cluster", pki, token)
    c.directory.mkdir()
    yield c
    c.stop_all()


# -- helpers -----------------------------------------------------------------------------


class Load:
    """A steady keyless load on a gateway, in a thread of its own (the test thread
    blocks on process starts and signals meanwhile)."""

    def __init__(self, gw: Service, pki: Pki, key: PublicKey, *, rate: float = 300) -> None:
        self._stop = threading.Event()
        self.result: SteadyResult | None = None
        self.error: BaseException | None = None
        host, port = split(gw.address)
        ctx = keyless_client_context(pki.ca_pem, pki.client.cert, pki.client.key)

        def run() -> None:
            try:
                self.result = asyncio.run(
                    run_steady(host, port, ctx, operation="ecdsa-sha256", public_key=key,
                               connections=4, rate=rate, duration=LOAD_LIMIT,
                               server_name="localhost", stop=self._stop)
                )
            except BaseException as e:
                self.error = e

        self._thread = threading.Thread(target=run, name="keyless load", daemon=True)
        self._thread.start()

    def finish(self) -> SteadyResult:
        self._stop.set()
        self._thread.join(LOAD_LIMIT + 30)
        if self.error is not None:
            raise self.error
        assert self.result is not None, "the load did not finish"
        return self.result


def answers(gw: Service) -> dict[str, float]:
    """Successful answers per signer address, from the gateway's /metrics."""
    with urllib.request.urlopen(f"http://{gw.fields['metrics']}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("keyward_signer_answers{") and 'outcome="ok"' in line:
            labels, value = line.rsplit(" ", 1)
            signer = labels.split('signer="', 1)[1].split('"', 1)[0]
            out[signer] = out.get(signer, 0.0) + float(value)
    return out


def wait_for(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout:.0f}s: {what}")


def grows(gw: Service, address: str, by: float = 20) -> Callable[[], bool]:
    """A check that the signer at ``address`` answered ``by`` more requests since now."""
    start = answers(gw).get(address, 0.0)
    return lambda: answers(gw).get(address, 0.0) >= start + by


def log_has(svc: Service, text: str, after: int = 0) -> Callable[[], bool]:
    return lambda: text in svc.log.read_text(errors="replace")[after:]


def log_size(svc: Service) -> int:
    return len(svc.log.read_text(errors="replace"))


def assert_clean(result: SteadyResult, minimum: int = 100) -> None:
    """What the edge saw: every request answered, correctly, within the 5 s budget."""
    assert result.failed == 0, result.text()
    assert result.ok >= minimum, result.text()
    assert result.verified > 0, result.text()
    assert result.max_ms < 5000, result.text()


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def config_path(cluster: Cluster, svc: Service) -> Path:
    return cluster.directory / f"{svc.name}.yaml"


def rewrite(cluster: Cluster, svc: Service, **changes: Any) -> None:
    path = config_path(cluster, svc)
    cfg = yaml.safe_load(path.read_text())
    cfg.update(changes)
    path.write_text(yaml.safe_dump(cfg))


def client_ctx(pki: Pki) -> ssl.SSLContext:
    return keyless_client_context(pki.ca_pem, pki.client.cert, pki.client.key)


async def sign_once(gw: Service, pki: Pki, ski: bytes) -> bytes:
    host, port = split(gw.address)
    async with await KeylessClient.connect(host, port, client_ctx(pki),
                                           server_hostname="localhost") as c:
        return await c.sign(Op.ECDSA_SIGN_SHA256, ski, DIGEST)


# -- the six scenarios -------------------------------------------------------------------


def test_kill_9_of_one_signer_mid_load_fails_no_request(
    cluster: Cluster, pki: Pki, public_key: PublicKey
) -> None:
    a = cluster.start_signer()
    b = cluster.start_signer()
    gw = cluster.start_gateway([a.address, b.address])
    load = Load(gw, pki, public_key)
    wait_for("both signers answer", lambda: len(answers(gw)) == 2 and min(answers(gw).values()) > 20)
    b.kill()  # SIGKILL: no drain, no NOT_SERVING; its stream just breaks
    wait_for("the survivor carries the load", grows(gw, a.address, 200))
    result = load.finish()
    assert_clean(result)
    assert "unavailable; reconnecting" in gw.log.read_text()


def test_hsm_fault_in_one_signer_moves_traffic_and_it_comes_back(
    cluster: Cluster, pki: Pki, public_key: PublicKey, tmp_path: Path
) -> None:
    faults = tmp_path / "faults.json"
    faults.write_text("")
    a = cluster.start_signer(test_fault_file=str(faults))
    b = cluster.start_signer()
    gw = cluster.start_gateway([a.address, b.address])
    load = Load(gw, pki, public_key)
    wait_for("the signer with the faulty HSM answers", grows(gw, a.address))
    mark = log_size(gw)
    # The HSM breaks: every call into it fails with CKR_DEVICE_ERROR, recovery included.
    faults.write_text(json.dumps({"error": "CKR_DEVICE_ERROR",
                                  "calls": ["sign", "probe", "discover", "find_objects"]}))
    wait_for("the gateway sees it NOT_SERVING",
             log_has(gw, f"signer {a.address} not serving", mark))
    wait_for("the other signer takes the traffic", grows(gw, b.address, 200))
    mark = log_size(gw)
    faults.write_text("")  # the HSM is back
    wait_for("it reports SERVING again", log_has(gw, f"signer {a.address} serving", mark))
    wait_for("it serves traffic again", grows(gw, a.address))
    result = load.finish()
    assert_clean(result)
    signer_log = a.log.read_text()
    assert "HSM fault: not serving" in signer_log and "HSM recovered: serving" in signer_log


def test_slow_signer_gets_less_traffic(
    cluster: Cluster, pki: Pki, public_key: PublicKey, tmp_path: Path
) -> None:
    faults = tmp_path / "faults.json"
    faults.write_text("")
    a = cluster.start_signer(test_fault_file=str(faults))
    b = cluster.start_signer()
    gw = cluster.start_gateway([a.address, b.address])
    load = Load(gw, pki, public_key, rate=300)
    wait_for("both signers answer", lambda: len(answers(gw)) == 2 and min(answers(gw).values()) > 50)
    # 5 ms more per signature: slow, but with 2 sessions still able to carry the whole
    # 300 ops/s, so only latency-aware balancing moves traffic away.
    faults.write_text(json.dumps({"delay_ms": 5, "calls": ["sign"]}))
    time.sleep(1.0)  # the signer reads the fault file every 100 ms; let the change settle
    before = answers(gw)
    time.sleep(3.0)
    after = answers(gw)
    result = load.finish()
    assert_clean(result)
    slow = after[a.address] - before[a.address]
    fast = after[b.address] - before[b.address]
    assert slow + fast > 300
    assert slow / (slow + fast) < 0.25, f"slow signer kept {slow:.0f} of {slow + fast:.0f}"


def test_new_signer_and_new_key_are_used_without_a_gateway_restart(
    cluster: Cluster, pki: Pki, public_key: PublicKey, token: SoftHsmToken, tmp_path: Path
) -> None:
    a = cluster.start_signer()
    gw = cluster.start_gateway([a.address])
    load = Load(gw, pki, public_key)
    wait_for("the first signer answers", grows(gw, a.address))
    b = cluster.start_signer()  # during load
    rewrite(cluster, gw, signers=[a.address, b.address])
    gw.proc.send_signal(signal.SIGHUP)
    wait_for("the new signer gets traffic", grows(gw, b.address))

    # A key imported into the running token, by the operator's command.
    new_key = ec.generate_private_key(ec.SECP256R1())
    pem = tmp_path / "new.key"
    pem.write_bytes(new_key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    ski = ski_of(new_key.public_key())
    with pytest.raises(KeylessError) as e:
        asyncio.run(sign_once(gw, pki, ski))
    assert e.value.code == ErrorCode.KEY_NOT_FOUND
    subprocess.run([sys.executable, "-m", "signer.common.cli", "keys", "import", "--pem", str(pem),
                    "--label", "fo-imported", "--pkcs11-uri", token.uri()],
                   env=cluster.env(), check=True, capture_output=True, timeout=60)
    for signer in (a, b):
        signer.proc.send_signal(signal.SIGHUP)  # or wait for key_refresh_interval

    def served() -> bool:
        try:
            sig = asyncio.run(sign_once(gw, pki, ski))
        except KeylessError:
            return False
        verify(new_key.public_key(), "ecdsa-sha256", b"Hello!", sig, b"")
        return True

    wait_for("the imported key is served", served)
    result = load.finish()
    assert_clean(result)


def _netns_unavailable() -> str | None:
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "needs root to create a network namespace (ip netns); run the suite as root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    return None


class Netns:
    """A network namespace joined to this one by a veth pair, on 10.99.N.0/30 only."""

    def __init__(self) -> None:
        n = os.getpid() % 200 + 20
        self.name = f"kwfo{os.getpid()}"
        self.host_if, self.ns_if = f"kwh{n}", f"kwn{n}"
        self.host_ip, self.ns_ip = f"10.99.{n}.1", f"10.99.{n}.2"
        self.made_ns = self.made_link = False  # delete only what this test made

    def run(self, *args: str, inside: bool = False) -> None:
        argv = ["ip", "netns", "exec", self.name, *args] if inside else list(args)
        subprocess.run(argv, check=True, capture_output=True, timeout=20)

    def create(self) -> None:
        self.run("ip", "netns", "add", self.name)
        self.made_ns = True
        self.run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        self.made_link = True
        self.run("ip", "link", "set", self.ns_if, "netns", self.name)
        self.run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        self.run("ip", "link", "set", self.host_if, "up")
        self.run("ip", "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if, inside=True)
        self.run("ip", "link", "set", self.ns_if, "up", inside=True)
        self.run("ip", "link", "set", "lo", "up", inside=True)

    def partition(self) -> None:
        # The namespace's end goes down: packets both ways vanish, with no RST and no
        # ICMP, as when a switch or a firewall drops them.
        self.run("ip", "link", "set", self.ns_if, "down", inside=True)

    def heal(self) -> None:
        self.run("ip", "link", "set", self.ns_if, "up", inside=True)

    def delete(self) -> None:
        if self.made_ns:
            subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True,
                           timeout=20)
        if self.made_link:
            # Normally gone with the namespace; this catches a half-made pair.
            subprocess.run(["ip", "link", "del", self.host_if], check=False,
                           capture_output=True, timeout=20)


def test_network_partition_between_gateway_and_one_signer(
    cluster: Cluster, pki: Pki, public_key: PublicKey
) -> None:
    reason = _netns_unavailable()
    if reason is not None:
        pytest.skip(f"network partition test skipped: {reason}")
    ns = Netns()
    try:
        ns.create()
    except subprocess.CalledProcessError as e:
        ns.delete()
        pytest.skip(f"network partition test skipped: cannot create a network namespace "
                    f"({e.stderr.decode(errors='replace').strip()})")
    try:
        a = cluster.start_signer()
        far = cluster.start_signer(listen=f"{ns.ns_ip}:0", wrap=("ip", "netns", "exec", ns.name))
        # A 1 s attempt budget: a request stuck behind the partition is retried on the
        # other signer after 1 s, well inside its 5 s budget.
        gw = cluster.start_gateway([a.address, far.address], attempt_timeout="1s")
        load = Load(gw, pki, public_key)
        wait_for("the far signer answers", grows(gw, far.address))
        mark = log_size(gw)
        ns.partition()
        # Out of rotation either way: ejected after failed attempts, or dropped when
        # keepalive finds its connection dead (whichever the timing makes first).
        ejected = log_has(gw, f"signer {far.address} ejected", mark)
        dropped = log_has(gw, f"signer {far.address} unavailable", mark)
        wait_for("the far signer leaves rotation", lambda: ejected() or dropped(), timeout=40)
        wait_for("the near signer carries the load", grows(gw, a.address, 900))
        ns.heal()
        wait_for("the far signer serves again after the partition", grows(gw, far.address),
                 timeout=40)
        result = load.finish()
        assert_clean(result)
    finally:
        for svc in list(cluster.services):
            svc.kill()
        cluster.services.clear()
        ns.delete()


def test_rolling_restart_of_every_signer_under_load(
    cluster: Cluster, pki: Pki, public_key: PublicKey
) -> None:
    listens = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    signers = [cluster.start_signer(listen=listen) for listen in listens]
    gw = cluster.start_gateway([s.address for s in signers])
    load = Load(gw, pki, public_key)
    for listen in listens:
        wait_for(f"{listen} answers", grows(gw, listen))
    for i, listen in enumerate(listens):
        old = signers[i]
        assert old.stop() == 0  # SIGTERM: NOT_SERVING, finish in-flight work, exit
        cluster.services.remove(old)
        signers[i] = cluster.start_signer(listen=listen)
        wait_for(f"the restarted {listen} gets traffic", grows(gw, listen))
    result = load.finish()
    assert_clean(result)
    for svc in signers:
        assert svc.alive()


# -- discovery -----------------------------------------------------------------------


def test_dns_names_resolving_to_many_addresses_follow_the_answers(
    cluster: Cluster, pki: Pki, public_key: PublicKey
) -> None:
    """Addresses appearing and disappearing behind one name (a Kubernetes headless
    service) become and stop being replicas. The resolver is the one injected piece:
    the signers are real, on 127.0.0.2 and 127.0.0.3, same port."""
    port = free_port("127.0.0.2")
    first = cluster.start_signer(listen=f"127.0.0.2:{port}")
    second = cluster.start_signer(listen=f"127.0.0.3:{port}")
    ski = ski_of(public_key)
    answer: list[str] = ["127.0.0.2"]
    broken = [False]

    async def resolver(host: str, p: int) -> list[str]:
        assert (host, p) == ("signers.test", port)
        if broken[0]:
            raise OSError("Temporary failure in name resolution")
        return list(answer)

    async def go() -> None:
        tls = SignerTLS(pki.ca_pem, pki.gateway_signer_client.cert,
                        pki.gateway_signer_client.key, server_name="localhost")
        router = Router([], tls, RouterSettings())
        discovery = Discovery([f"dns:signers.test:{port}"], interval=0.2,
                              server_name="localhost", on_change=router.set_targets,
                              resolver=resolver)
        await discovery.refresh()
        await router.start()
        discovery.start()

        async def addresses(want: set[str]) -> None:
            for _ in range(200):
                have = {r.address for r in router.replicas if r.usable and r.keys}
                if have == want and {r.address for r in router.replicas} == want:
                    return
                await asyncio.sleep(0.05)
            raise AssertionError(f"replicas {[r.address for r in router.replicas]}, want {want}")

        async def sign_many(n: int) -> None:
            route = router.route(ski)
            assert route is not None
            loop = asyncio.get_running_loop()
            futures = []
            for _ in range(n):
                fut: asyncio.Future[pb.OperationResult] = loop.create_future()
                op = pb.Operation(sign=pb.SignRequest(key=pb.KeySelector(ski=ski),
                                                      algorithm=pb.ECDSA_SHA256, data=DIGEST))
                router.execute(route, op, fut.set_result)
                futures.append(fut)
            for result in await asyncio.gather(*futures):
                assert result.WhichOneof("result") == "output", result
                verify(public_key, "ecdsa-sha256", b"Hello!", result.output, b"")

        try:
            await addresses({f"127.0.0.2:{port}"})
            await sign_many(20)
            answer[:] = ["127.0.0.2", "127.0.0.3"]
            await addresses({f"127.0.0.2:{port}", f"127.0.0.3:{port}"})
            for _ in range(20):
                await sign_many(20)
                if all(r.answered for r in router.replicas):
                    break
            assert all(r.answered for r in router.replicas), router.snapshot()
            answer[:] = ["127.0.0.3"]
            await addresses({f"127.0.0.3:{port}"})
            await sign_many(20)
            broken[0] = True  # DNS fails: the known signers stay
            await asyncio.sleep(0.6)
            await addresses({f"127.0.0.3:{port}"})
            await sign_many(20)
        finally:
            await discovery.close()
            await router.close()

    asyncio.run(go())
    assert first.alive() and second.alive()


def test_gateway_finds_signers_through_a_real_dns_name(
    cluster: Cluster, pki: Pki, public_key: PublicKey
) -> None:
    """``dns:localhost:PORT`` through the system resolver: one signer on each address
    localhost has on this machine (127.0.0.1, and ::1 where /etc/hosts lists it)."""
    infos = socket.getaddrinfo("localhost", 0, type=socket.SOCK_STREAM)
    ips = sorted({str(info[4][0]) for info in infos})
    port = free_port(ips[0])
    signers = []
    for ip in ips:
        host = f"[{ip}]" if ":" in ip else ip
        signers.append(cluster.start_signer(listen=f"{host}:{port}"))
    gw = cluster.start_gateway([f"dns:localhost:{port}"])
    load = Load(gw, pki, public_key)
    for svc in signers:
        wait_for(f"{svc.address} answers", grows(gw, svc.address, 150))
    result = load.finish()
    assert_clean(result)
    assert "localhost resolves to" in gw.log.read_text()


def test_hedged_request_first_answer_wins_the_other_is_ignored(
    cluster: Cluster, pki: Pki, public_key: PublicKey, tmp_path: Path
) -> None:
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"delay_ms": 2000, "calls": ["sign"]}))
    slow = cluster.start_signer(test_fault_file=str(faults))
    fast = cluster.start_signer()
    ski = ski_of(public_key)

    async def go() -> None:
        tls = SignerTLS(pki.ca_pem, pki.gateway_signer_client.cert,
                        pki.gateway_signer_client.key, server_name="localhost")
        # Listed first, and never measured yet: the first request goes to the slow one.
        router = Router([slow.address, fast.address], tls,
                        RouterSettings(hedge_delay=0.05, attempt_timeout=5.0))
        await router.start()
        try:
            for _ in range(200):
                if all(r.usable and r.keys for r in router.replicas):
                    break
                await asyncio.sleep(0.05)
            route = router.route(ski)
            assert route is not None
            results: list[pb.OperationResult] = []
            t0 = time.monotonic()
            done = asyncio.Event()

            def on_result(result: pb.OperationResult) -> None:
                results.append(result)
                done.set()

            op = pb.Operation(sign=pb.SignRequest(key=pb.KeySelector(ski=ski),
                                                  algorithm=pb.ECDSA_SHA256, data=DIGEST))
            router.execute(route, op, on_result)
            await asyncio.wait_for(done.wait(), 10)
            elapsed = time.monotonic() - t0
            assert results[0].WhichOneof("result") == "output", results
            verify(public_key, "ecdsa-sha256", b"Hello!", results[0].output, b"")
            assert elapsed < 1.5, "answered by the slow signer, not the hedge"
            assert router.hedges == 1 and router.hedge_wins == 1
            by_address = {r.address: r for r in router.replicas}
            assert by_address[slow.address].hedges == 0 and by_address[fast.address].hedges == 1
            # The slow signer's answer comes later: counted for that signer, not delivered.
            for _ in range(60):
                if by_address[slow.address].answered:
                    break
                await asyncio.sleep(0.1)
            assert by_address[slow.address].answered == 1
            assert len(results) == 1
        finally:
            await router.close()

    asyncio.run(go())


def test_a_backlog_larger_than_one_stream_message_is_sent_in_several(
    cluster: Cluster, pki: Pki, public_key: PublicKey
) -> None:
    """A signer that falls behind (it just took over a dead one's traffic) lets the
    gateway's outbox grow past what the signer takes in one StreamRequest (1024
    operations); the stream must split it, not have the whole batch refused."""
    signer = cluster.start_signer()
    ski = ski_of(public_key)

    async def go() -> None:
        async with SignerClient(signer.address, ca=pki.ca_pem, cert=pki.gateway_signer_client.cert,
                                key=pki.gateway_signer_client.key, server_name="localhost") as c:
            stream = c.stream()
            await stream.start()
            loop = asyncio.get_running_loop()
            futures: list[asyncio.Future[pb.OperationResult]] = []
            for _ in range(2500):  # in one event-loop iteration: one outbox
                fut: asyncio.Future[pb.OperationResult] = loop.create_future()
                stream.submit(pb.Operation(sign=pb.SignRequest(
                    key=pb.KeySelector(ski=ski), algorithm=pb.ECDSA_SHA256, data=DIGEST)),
                    fut.set_result)
                futures.append(fut)
            results = await asyncio.wait_for(asyncio.gather(*futures), 60)
            await stream.close()
        failed = [r for r in results if r.WhichOneof("result") != "output"]
        assert not failed, failed[:3]
        assert stream.messages_sent >= 3
        verify(public_key, "ecdsa-sha256", b"Hello!", results[-1].output, b"")

    asyncio.run(go())


# -- lifecycle: SIGTERM drains, SIGHUP reloads ------------------------------------------


def test_gateway_sigterm_answers_everything_in_flight_then_exits(
    cluster: Cluster, pki: Pki, public_key: PublicKey, tmp_path: Path
) -> None:
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"delay_ms": 100, "calls": ["sign"]}))
    slow = cluster.start_signer(sessions=2, test_fault_file=str(faults))
    gw = cluster.start_gateway([slow.address])
    host, port = split(gw.address)
    ski = ski_of(public_key)

    async def go() -> list[bytes]:
        async with await KeylessClient.connect(host, port, client_ctx(pki),
                                               server_hostname="localhost") as c:
            pending = [asyncio.ensure_future(c.sign(Op.ECDSA_SIGN_SHA256, ski, DIGEST))
                       for _ in range(10)]
            await asyncio.sleep(0.2)  # all ten are in flight: 10 x 100 ms over 2 sessions
            gw.proc.send_signal(signal.SIGTERM)
            sigs = await asyncio.gather(*pending)
            # Then the gateway closes the connection: no new request is taken.
            await asyncio.wait_for(c.closed.wait(), 10)
            return sigs

    sigs = asyncio.run(go())
    assert len(sigs) == 10
    for sig in sigs:
        verify(public_key, "ecdsa-sha256", b"Hello!", sig, b"")
    assert gw.proc.wait(15) == 0
    assert "draining" in gw.log.read_text()


def _issue_server_cert(pki: Pki, name: str, cn: str) -> Any:
    return pki.ca.issue(pki.directory, name, common_name=cn, dns=("localhost",),
                        ips=("127.0.0.1",), server=True, reuse=False)


def _peer_cn(host: str, port: int, pki: Pki, alpn: list[str] | None = None) -> str:
    ctx = ssl.create_default_context(cafile=str(pki.ca_pem))
    ctx.load_cert_chain(str(pki.gateway_signer_client.cert), str(pki.gateway_signer_client.key))
    if alpn:
        ctx.set_alpn_protocols(alpn)
    with socket.create_connection((host, port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as s:
        der = s.getpeercert(binary_form=True)
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    return str(cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)


def test_gateway_sighup_new_certificate_for_new_connections_keeps_old_ones(
    cluster: Cluster, pki: Pki, public_key: PublicKey
) -> None:
    signer = cluster.start_signer()
    gw = cluster.start_gateway([signer.address])
    host, port = split(gw.address)
    ski = ski_of(public_key)
    renewed = _issue_server_cert(pki, "gateway-renewed", "localhost-renewed")

    async def go() -> None:
        old = await KeylessClient.connect(host, port, client_ctx(pki), server_hostname="localhost")
        async with old:
            await old.sign(Op.ECDSA_SIGN_SHA256, ski, DIGEST)
            mark = log_size(gw)
            rewrite(cluster, gw, auth_cert=str(renewed.cert), auth_key=str(renewed.key))
            gw.proc.send_signal(signal.SIGHUP)
            for _ in range(100):
                if "configuration reloaded" in gw.log.read_text()[mark:]:
                    break
                await asyncio.sleep(0.1)
            # The connection made before the reload is still there and still works.
            assert not old.closed.is_set()
            sig = await old.sign(Op.ECDSA_SIGN_SHA256, ski, DIGEST)
            verify(public_key, "ecdsa-sha256", b"Hello!", sig, b"")
        assert _peer_cn(host, port, pki) == "localhost-renewed"

    asyncio.run(go())
    # A broken file on the next reload changes nothing.
    mark = log_size(gw)
    rewrite(cluster, gw, auth_cert=str(cluster.directory / "missing.pem"))
    gw.proc.send_signal(signal.SIGHUP)
    wait_for("the failed reload is reported", log_has(gw, "keeping the running configuration",
                                                      mark))
    assert _peer_cn(host, port, pki) == "localhost-renewed"
    assert asyncio.run(sign_once(gw, pki, ski))


def test_signer_sighup_reloads_certificate_and_allowed_clients_without_dropping_streams(
    cluster: Cluster, pki: Pki, public_key: PublicKey
) -> None:
    signer = cluster.start_signer()
    gw = cluster.start_gateway([signer.address])
    load = Load(gw, pki, public_key)
    wait_for("the signer answers", grows(gw, signer.address))
    host, port = split(signer.address)
    assert _peer_cn(host, port, pki, ["h2"]) == "signer"
    renewed = _issue_server_cert(pki, "signer-renewed", "signer-renewed")
    mark = log_size(signer)
    # Only the gateway's certificate may call from now on.
    rewrite(cluster, signer, tls={"cert": str(renewed.cert), "key": str(renewed.key),
                                  "ca": str(pki.ca_pem)},
            allowed_clients=["keyward-gateway"])
    signer.proc.send_signal(signal.SIGHUP)
    wait_for("the signer reloaded", log_has(signer, "SIGHUP: reloaded", mark))
    assert _peer_cn(host, port, pki, ["h2"]) == "signer-renewed"

    async def stranger() -> None:
        async with SignerClient(signer.address, ca=pki.ca_pem, cert=pki.client.cert,
                                key=pki.client.key, server_name="localhost") as c:
            with pytest.raises(SignerError) as e:
                await c.list_keys()
            assert e.value.code == grpc.StatusCode.PERMISSION_DENIED

    asyncio.run(stranger())
    wait_for("the gateway's stream, made before the reload, still carries traffic",
             grows(gw, signer.address, 100))
    result = load.finish()
    assert_clean(result)
    assert f"signer {signer.address} unavailable" not in gw.log.read_text()


# -- a stuck HSM call does not hold a session forever -----------------------------------


def test_stuck_hsm_call_is_abandoned_and_its_session_replaced(
    token: SoftHsmToken, public_key: PublicKey, tmp_path: Path
) -> None:
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"delay_ms": 2500, "calls": ["sign"]}))
    ski = ski_of(public_key)
    with Token(token.uri(), sessions=1, fault_injector=FileFaultInjector(faults),
               call_timeout=0.3) as tok:
        t0 = time.monotonic()
        [result] = tok.submit([Job.sign(ski, pb.ECDSA_SHA256, DIGEST)]).result(timeout=10)
        # Answered long before the stuck call returns, and retryable elsewhere.
        assert isinstance(result, HsmError) and result.code == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - t0 < 2.0, "the caller waited for the stuck call"
        faults.write_text("")  # the HSM answers promptly again
        time.sleep(0.3)
        # A fresh session serves while the stuck call is still running.
        sig = tok.run(Job.sign(ski, pb.ECDSA_SHA256, DIGEST), timeout=10)
        verify(public_key, "ecdsa-sha256", b"Hello!", sig, b"")
        assert tok.healthy and tok.session_count == 1 and tok.stuck_calls == 1
        wait_for("the stuck call returns and its thread ends", lambda: tok.stuck_calls == 0, 10)
        assert tok.abandoned_calls == 1


def test_signer_with_a_stuck_hsm_call_answers_unavailable_and_keeps_serving(
    cluster: Cluster, pki: Pki, public_key: PublicKey, tmp_path: Path
) -> None:
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"delay_ms": 3000, "calls": ["sign"]}))
    signer = cluster.start_signer(sessions=1, test_fault_file=str(faults),
                                  hsm_call_timeout="300ms")
    ski = ski_of(public_key)

    async def go() -> None:
        async with SignerClient(signer.address, ca=pki.ca_pem, cert=pki.client.cert,
                                key=pki.client.key, server_name="localhost") as c:
            # Over the Stream, as the gateway sends (unary calls would be retried by
            # gRPC's own retry policy, into the same slow HSM).
            stream = c.stream()
            await stream.start()
            t0 = time.monotonic()
            fut: asyncio.Future[pb.OperationResult] = asyncio.get_running_loop().create_future()
            stream.submit(pb.Operation(sign=pb.SignRequest(
                key=pb.KeySelector(ski=ski), algorithm=pb.ECDSA_SHA256, data=DIGEST)),
                fut.set_result)
            result = await asyncio.wait_for(fut, 10)
            await stream.close()
            assert result.error.code == grpc.StatusCode.UNAVAILABLE.value[0], result
            assert time.monotonic() - t0 < 2.5, "the call waited for the stuck HSM call"
            faults.write_text("")
            await asyncio.sleep(0.3)
            # Its only session is stuck, yet it serves, on a new session, and never
            # went NOT_SERVING.
            assert await c.health() == health_pb2.HealthCheckResponse.SERVING
            sig = await c.sign(ski, pb.ECDSA_SHA256, DIGEST, timeout=10)
            verify(public_key, "ecdsa-sha256", b"Hello!", sig, b"")

    asyncio.run(go())
    log = signer.log.read_text()
    assert "stuck in one call" in log and "HSM fault: not serving" not in log


def test_more_stuck_calls_than_allowed_is_an_hsm_fault_recovered_after_they_return(
    token: SoftHsmToken, public_key: PublicKey, tmp_path: Path
) -> None:
    faults = tmp_path / "faults.json"
    faults.write_text(json.dumps({"delay_ms": 1500, "calls": ["sign"]}))
    ski = ski_of(public_key)
    with Token(token.uri(), sessions=1, fault_injector=FileFaultInjector(faults),
               call_timeout=0.2, max_stuck=1) as tok:
        for _ in range(2):
            [result] = tok.submit([Job.sign(ski, pb.ECDSA_SHA256, DIGEST)]).result(timeout=10)
            assert isinstance(result, HsmError) and result.code == grpc.StatusCode.UNAVAILABLE
            time.sleep(0.2)  # let the replacement worker start
        wait_for("the token is marked faulty", lambda: not tok.healthy, 5)
        assert tok.last_fault is not None and "stuck" in tok.last_fault.message
        faults.write_text("")
        if tok.stuck_calls:
            # Re-initialising the module under a running call is never done.
            with pytest.raises(HsmError, match="not returned"):
                tok.recover()
        wait_for("the stuck calls return", lambda: tok.stuck_calls == 0, 10)
        tok.recover()
        assert tok.healthy
        verify(public_key, "ecdsa-sha256", b"Hello!",
               tok.run(Job.sign(ski, pb.ECDSA_SHA256, DIGEST), timeout=10), b"")


def test_keyward_bench_steady_rate_mode(cluster: Cluster, pki: Pki, public_key: PublicKey,
                                        tmp_path: Path) -> None:
    """``keyward bench --rate``: the open-loop mode failure drills are measured with."""
    signer = cluster.start_signer()
    gw = cluster.start_gateway([signer.address])
    pub = tmp_path / "key.pubkey"
    pub.write_bytes(public_key.public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo))
    out = subprocess.run(
        [sys.executable, "-m", "signer.common.cli", "bench", "--keyserver", gw.address,
         "--operation", "ecdsa-sha256", "--public-key", str(pub), "--rate", "200",
         "--duration", "1.5", "--connections", "2", "--ca", str(pki.ca_pem),
         "--cert", str(pki.client.cert), "--key", str(pki.client.key),
         "--server-name", "localhost", "--json"],
        env=cluster.env(), capture_output=True, text=True, timeout=60, check=True)
    result = json.loads(out.stdout)
    assert result["failed"] == 0 and result["errors"] == {}
    assert 250 <= result["sent"] <= 310 and result["ok"] == result["sent"]
    assert result["verified"] > 0
