"""``keyward signer-bench``: Signer API throughput beside direct PKCS#11 calls.

One run makes a fresh SoftHSM2 token in a temporary directory, generates an RSA-2048
and a P-256 key on it, and measures, for each key:

* **direct** -- python-pkcs11 ``key.sign`` in a tight loop on sessions opened by
  :class:`~signer.hsm.pool.Token`: one thread, two threads of one process, and N
  processes (N = ``--signers``) signing at once. The N-process figure is the fair
  ceiling for N signer processes: SoftHSM2's ECDSA does not scale with threads of one
  process, only with processes.
* **through the Signer API** -- real ``keyward signer`` processes (mutual TLS, YAML
  config, the ``ready`` line), 1 and N of them, driven by this process with
  (a) unary ``Sign`` calls, a fixed number outstanding per signer, and (b) the
  ``Stream`` method through :class:`~signer.client.OperationStream`, a fixed number of
  operations in flight per signer.

Every mode runs a warm-up and then ``--duration`` seconds; only operations that
complete inside the measured window count, and latency is the time from submitting
an operation to its answer (for direct calls: the ``C_Sign`` call). A sample of the
signatures (every 100th) is verified with ``cryptography`` after the window; a
failed verification or an error answer counts as an error, never as throughput.
CPU time of the load generator and of the signing processes is read from the kernel
over the same window, so the report can say where the cycles went.

Why the load comes from this one process, measured on the 2-core machine this was
written on: on the Stream method the client costs about 25-30 µs of CPU per ECDSA
operation (a third of a core at 10,000 signatures/s) and its event loop is never the
bottleneck; load-generator subprocesses would only compete with the signers for the
same two cores. Unary calls cost the client 250-400 µs each, but the signers, at
600-800 µs per call, saturate first. The "client" CPU column of the report keeps this
checked on every run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import functools
import hashlib
import json
import logging
import os
import platform
import resource
import secrets
import select
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import IO, Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from signer.common.benchdoc import percentile, write_section
from signer.common.cli import CommandError, add_logging_flags
from signer.common.pki import Issued, LocalCA
from signer.common.process import Service, keyward_argv
from signer.v1 import signer_pb2 as pb

log = logging.getLogger("keyward.signer.bench")

START_MARKER: Final = "<!-- signer-bench:start -->"
END_MARKER: Final = "<!-- signer-bench:end -->"

SOFTHSM_CANDIDATES: Final = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
)
TOKEN_LABEL: Final = "keyward-bench"  # noqa: S105 - a label, not a secret
MESSAGE: Final = b"keyward signer-bench"
DIGEST: Final = hashlib.sha256(MESSAGE).digest()
VERIFY_EVERY: Final = 100

# The targets of the issue that asked for this benchmark, as fractions of the fair
# direct figure (N processes signing directly, N = the number of signers).
RSA_TARGET: Final = 0.85
ECDSA_STREAM_TARGET: Final = 0.40

# Other processes busier than this (in cores) during a mode make the report say so.
NOISY_CORES: Final = 0.25

DEFAULT_DURATION: Final = 5.0
# Each re-measurement costs one mode (about 6 s by default); 4 keep a disturbed
# default run under 2.5 minutes.
DEFAULT_RETRIES: Final = 4
QUICK_DURATION: Final = 0.6


@dataclass(frozen=True, slots=True)
class KeyKind:
    kind: str  # the admin.generate_key kind
    title: str
    algorithm: pb.Algorithm


KINDS: Final[dict[str, KeyKind]] = {
    "rsa2048": KeyKind("rsa2048", "RSA-2048", pb.RSA_PKCS1V15_SHA256),
    "p256": KeyKind("p256", "ECDSA P-256", pb.ECDSA_SHA256),
}


@dataclass(frozen=True, slots=True)
class LoadShape:
    """How hard the API modes push one signer (chosen by measurement, see the docs)."""

    sessions: int  # HSM sessions (worker threads) per signer
    unary_window: int  # unary calls outstanding per signer
    stream_window: int  # operations in flight per signer on the Stream method
    streams: int  # OperationStreams (Stream calls) per signer sharing that window


# Chosen by measurement on the 2-core machine (docs/benchmarks.md): one Stream call per
# signer, as the gateway uses, since the client's adaptive batching and the signer's
# per-session split keep every session busy without more; RSA gets 2 sessions so that
# one signer can use both cores, and a window of 32 so each message carries enough
# operations to amortise gRPC's per-message cost; ECDSA gets 1 session, because a
# second worker thread in the same process only adds GIL hand-offs (SoftHSM2's ECDSA
# does not scale with threads of one process).
DEFAULT_SHAPES: Final[dict[str, LoadShape]] = {
    "rsa2048": LoadShape(sessions=2, unary_window=8, stream_window=32, streams=1),
    "p256": LoadShape(sessions=1, unary_window=32, stream_window=128, streams=1),
}


@dataclass(slots=True)
class ModeResult:
    algorithm: str
    mode: str
    path: str  # "direct", "unary" or "stream"
    processes: int  # signing processes (direct) or signer processes (API)
    sessions: int  # threads / HSM sessions per process
    window: int  # operations outstanding in total (API modes); 0 for direct
    streams: int  # Stream calls in total (stream mode); 0 otherwise
    duration_s: float
    ops: int
    errors: int
    verified: int
    ops_per_s: float
    p50_ms: float
    p99_ms: float
    client_cpu_us_per_op: float | None  # this process (the API load generator)
    server_cpu_us_per_op: float  # the signer processes, or the direct signing
    cpu_cores_busy: float  # all of the above, in cores, over the window
    other_cores_busy: float  # CPU the rest of the machine used meanwhile, in cores
    # API modes: the signers' CPU per operation by thread (see thread_cpu).
    signer_cpu_us_by_thread: dict[str, float] | None = None
    baseline: str | None = None
    ratio: float | None = None


@dataclass(slots=True)
class Target:
    name: str
    mode: str
    baseline: str
    ratio: float  # throughput, API mode / baseline: what the target is judged on
    goal: float
    # Direct CPU per signature / API CPU per signature (client + signers). On a machine
    # that both modes saturate this predicts the throughput ratio, and it is far less
    # disturbed by other processes taking cores away (see ``noisy``).
    cpu_ratio: float | None = None
    noisy: bool = False  # other load above NOISY_CORES during either mode

    @property
    def met(self) -> bool:
        return self.ratio >= self.goal


@dataclass(slots=True)
class Report:
    command: str
    date: str
    machine: dict[str, Any]
    settings: dict[str, Any]
    results: list[ModeResult] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    remeasured: int = 0  # modes measured again because other processes disturbed them

    def to_json(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "date": self.date,
            "machine": self.machine,
            "settings": self.settings,
            "results": [asdict(r) for r in self.results],
            "targets": [dict(asdict(t), met=t.met) for t in self.targets],
            "remeasured": self.remeasured,
        }


# -- statistics -----------------------------------------------------------------------


@dataclass(slots=True)
class Samples:
    """What one mode measured, before it becomes a :class:`ModeResult`."""

    latencies: array[float] = field(default_factory=lambda: array("d"))
    errors: int = 0
    signatures: list[bytes] = field(default_factory=list)  # every VERIFY_EVERY-th
    client_cpu_s: float | None = None
    server_cpu_s: float = 0.0
    server_roles: dict[str, float] | None = None  # signer CPU by thread role (API)
    other_cores: float = 0.0


def _result(
    kind: KeyKind,
    mode: str,
    path: str,
    samples: Samples,
    duration: float,
    *,
    spki: bytes,
    raw_ecdsa: bool,
    processes: int,
    sessions: int,
    window: int = 0,
    streams: int = 0,
) -> ModeResult:
    bad = sum(1 for sig in samples.signatures if not verify(spki, sig, raw_ecdsa=raw_ecdsa))
    ms = sorted(x * 1e3 for x in samples.latencies)
    ops = len(ms)
    client = samples.client_cpu_s
    total_cpu = samples.server_cpu_s + (client or 0.0)
    return ModeResult(
        algorithm=kind.title,
        mode=mode,
        path=path,
        processes=processes,
        sessions=sessions,
        window=window,
        streams=streams,
        duration_s=round(duration, 3),
        ops=ops,
        errors=samples.errors + bad,
        verified=len(samples.signatures) - bad,
        ops_per_s=round(ops / duration, 1) if duration else 0.0,
        p50_ms=round(percentile(ms, 0.50), 3),
        p99_ms=round(percentile(ms, 0.99), 3),
        client_cpu_us_per_op=round(client / ops * 1e6, 1) if client is not None and ops else None,
        server_cpu_us_per_op=round(samples.server_cpu_s / ops * 1e6, 1) if ops else 0.0,
        cpu_cores_busy=round(total_cpu / duration, 2) if duration else 0.0,
        other_cores_busy=round(samples.other_cores, 2),
        signer_cpu_us_by_thread=(
            {role: round(cpu / ops * 1e6, 1) for role, cpu in samples.server_roles.items()}
            if samples.server_roles is not None and ops
            else None
        ),
    )


# -- verification ---------------------------------------------------------------------


def verify(spki: bytes, signature: bytes, *, raw_ecdsa: bool = False) -> bool:
    """Whether ``signature`` is a valid signature of :data:`DIGEST` under ``spki``
    (RSA PKCS#1 v1.5 with SHA-256, or ECDSA; ``raw_ecdsa``: PKCS#11's ``r || s``)."""
    public_key = serialization.load_der_public_key(spki)
    try:
        if isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(
                signature, DIGEST, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256())
            )
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            if raw_ecdsa:
                half = len(signature) // 2
                signature = utils.encode_dss_signature(
                    int.from_bytes(signature[:half], "big"),
                    int.from_bytes(signature[half:], "big"),
                )
            public_key.verify(signature, DIGEST, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        else:
            return False
    except (InvalidSignature, ValueError):
        return False
    return True


# -- the token ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BenchToken:
    """A throw-away SoftHSM2 token: its configuration, and a URI with a PIN file."""

    conf: Path
    uri: str

    def env(self) -> dict[str, str]:
        return {**os.environ, "SOFTHSM2_CONF": str(self.conf)}


def find_softhsm() -> str:
    override = os.environ.get("SOFTHSM2_MODULE")
    for candidate in (override,) if override else SOFTHSM_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    raise CommandError(
        "SoftHSM2 is not installed (apt-get install softhsm2), "
        "or set SOFTHSM2_MODULE to libsofthsm2.so"
    )


def make_token(directory: Path) -> BenchToken:
    """Initialise a SoftHSM2 token in ``directory`` (its own SOFTHSM2_CONF)."""
    module = find_softhsm()
    util = shutil.which("softhsm2-util")
    if util is None:
        raise CommandError("softhsm2-util not found (apt-get install softhsm2)")
    tokens = directory / "tokens"
    tokens.mkdir(parents=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
    )
    pin, so_pin = secrets.token_hex(8), secrets.token_hex(8)
    pin_file = directory / "token-pin"
    fd = os.open(pin_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(pin + "\n")
    # softhsm2-util takes PINs only as arguments; these guard a token that lives for
    # this run only, in a directory only we can read, and are never printed.
    subprocess.run(
        [util, "--init-token", "--free", "--label", TOKEN_LABEL, "--pin", pin, "--so-pin", so_pin],
        env={**os.environ, "SOFTHSM2_CONF": str(conf)},
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=60,
    )
    uri = f"pkcs11:token={TOKEN_LABEL}?module-path={module}&pin-source=file:{pin_file}"
    return BenchToken(conf, uri)


@dataclass(frozen=True, slots=True)
class BenchKey:
    kind: KeyKind
    ski: bytes
    spki: bytes


def generate_keys(token: Any, kinds: Sequence[str]) -> dict[str, BenchKey]:
    from signer.hsm import admin

    keys: dict[str, BenchKey] = {}
    for name in kinds:
        info = admin.generate_key(token, name, f"bench-{name}")  # type: ignore[arg-type]
        keys[name] = BenchKey(KINDS[name], info.ski, info.spki)
    return keys


# -- direct python-pkcs11 -------------------------------------------------------------


def _sign_loop(
    session: Any, ski: bytes, algorithm: int, start_at: float, end_at: float
) -> tuple[array[float], list[bytes]]:
    """Sign :data:`DIGEST` on ``session`` until ``end_at``; runs on a Token worker.

    Signs (uncounted) until ``start_at`` as warm-up, which also lines up several
    threads or processes on one window: ``time.monotonic`` is CLOCK_MONOTONIC,
    shared by all processes. Returns latencies and sampled raw signatures.
    """
    from pkcs11 import Attribute, ObjectClass

    from signer.hsm.mechanisms import sign_spec

    spec = sign_spec(algorithm)
    found = list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: ski}))
    if len(found) != 1:
        raise RuntimeError(f"expected one private key with SKI {ski.hex()}, found {len(found)}")
    # The bare python-pkcs11 call, no Keyward code in the loop: the mechanism and the
    # DigestInfo prefix are the ones the signer uses (ECDSA stays raw r || s here).
    sign = found[0].sign
    mechanism = spec.mechanism
    data = spec.prefix + DIGEST
    monotonic = time.monotonic
    while monotonic() < start_at:
        sign(data, mechanism=mechanism)
    latencies: array[float] = array("d")
    signatures: list[bytes] = []
    t0 = monotonic()
    n = 0
    while True:
        signature = sign(data, mechanism=mechanism)
        t1 = monotonic()
        if t1 > end_at:
            break
        latencies.append(t1 - t0)
        n += 1
        if n % VERIFY_EVERY == 0:
            signatures.append(bytes(signature))
        t0 = t1
    return latencies, signatures


def direct_threads(
    token: Any, key: BenchKey, threads: int, warmup: float, duration: float
) -> Samples:
    """``threads`` Token workers signing at once in this process."""
    win = Window(warmup, duration, pids=(), self_is_client=False)
    with ThreadPoolExecutor(threads) as pool:
        futures = [
            pool.submit(
                token.call,
                lambda s: _sign_loop(s, key.ski, key.kind.algorithm, win.start_at, win.end_at),
                timeout=warmup + duration + 60,
            )
            for _ in range(threads)
        ]
        win.run_sync()
        parts = [f.result() for f in futures]
    samples = Samples()
    for latencies, signatures in parts:
        samples.latencies.extend(latencies)
        samples.signatures.extend(signatures)
    win.fill(samples)
    return samples


def direct_child(uri: str) -> int:
    """A direct-signing child process (``python -c``, see :class:`DirectProcesses`).

    Opens one Token session, then answers JSON lines on stdin (``ski``, ``algorithm``,
    ``start_at``, ``end_at``) with one JSON line each on stdout (latencies as a
    base64 array of doubles, sampled signatures in base64), until stdin closes.
    """
    from signer.hsm.pool import Token

    out = sys.stdout
    try:
        token = Token(uri, sessions=1)
    except Exception as exc:
        out.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
        out.flush()
        return 1
    try:
        out.write(json.dumps({"ready": True}) + "\n")
        out.flush()
        for line in sys.stdin:
            command = json.loads(line)
            job = functools.partial(
                _sign_loop,
                ski=bytes.fromhex(command["ski"]),
                algorithm=command["algorithm"],
                start_at=command["start_at"],
                end_at=command["end_at"],
            )
            latencies, signatures = token.call(
                job, timeout=command["end_at"] - time.monotonic() + 60
            )
            answer = {
                "latencies": base64.b64encode(latencies.tobytes()).decode(),
                "signatures": [base64.b64encode(sig).decode() for sig in signatures],
            }
            out.write(json.dumps(answer) + "\n")
            out.flush()
    finally:
        token.close()
    return 0


class DirectProcesses:
    """N processes, each signing directly on its own session of the same token.

    Plain ``python -c`` children rather than multiprocessing: a spawned
    multiprocessing child re-imports the parent's ``__main__``, which is whatever
    script embeds the benchmark; a fork would inherit this process's PKCS#11 state.
    """

    def __init__(self, token: BenchToken, count: int, log_dir: Path) -> None:
        code = "import sys, signer.bench as b; sys.exit(b.direct_child(sys.argv[1]))"
        self._procs: list[subprocess.Popen[str]] = []
        self._logs: list[IO[str]] = []
        try:
            for i in range(count):
                logf = (log_dir / f"direct-{i + 1}.log").open("w")
                self._logs.append(logf)
                self._procs.append(
                    subprocess.Popen(
                        [sys.executable, "-c", code, token.uri],
                        env=token.env(),
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=logf,
                        text=True,
                    )
                )
            for proc in self._procs:
                answer = self._read(proc, 60)
                if not answer.get("ready"):
                    raise CommandError(f"a direct-signing process failed: {answer.get('error')}")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _read(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if ready else ""
        if not line:
            raise CommandError(
                f"a direct-signing process (pid {proc.pid}) did not answer within {timeout:g} s"
            )
        answer: dict[str, Any] = json.loads(line)
        return answer

    def run(self, key: BenchKey, warmup: float, duration: float) -> Samples:
        win = Window(warmup, duration, pids=[p.pid for p in self._procs], self_is_client=None)
        command = json.dumps(
            {
                "ski": key.ski.hex(),
                "algorithm": int(key.kind.algorithm),
                "start_at": win.start_at,
                "end_at": win.end_at,
            }
        )
        for proc in self._procs:
            assert proc.stdin is not None
            proc.stdin.write(command + "\n")
            proc.stdin.flush()
        win.run_sync()
        samples = Samples()
        for proc in self._procs:
            answer = self._read(proc, 60)
            latencies: array[float] = array("d")
            latencies.frombytes(base64.b64decode(answer["latencies"]))
            samples.latencies.extend(latencies)
            samples.signatures.extend(base64.b64decode(s) for s in answer["signatures"])
        win.fill(samples)
        return samples

    def close(self) -> None:
        for proc in self._procs:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()  # end of commands: the child closes its token
        for proc in self._procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        for logf in self._logs:
            logf.close()


# -- signers --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pki:
    ca: Path
    server: Issued
    client: Issued


def make_pki(directory: Path) -> Pki:
    ca = LocalCA.load_or_create(directory, "Keyward Bench CA")
    server = ca.issue(
        directory,
        "signer",
        common_name="signer",
        dns=("localhost",),
        ips=("127.0.0.1",),
        server=True,
    )
    client = ca.issue(directory, "client", common_name="signer-bench", client=True)
    return Pki(ca.cert_path, server, client)


def start_signers(
    token: BenchToken, pki: Pki, directory: Path, sessions: int, count: int, tag: str
) -> list[Service]:
    """``count`` real ``keyward signer`` processes; all start, then all are waited for."""
    import yaml

    services: list[Service] = []
    try:
        for i in range(count):
            name = f"signer-{tag}-{i + 1}"
            config = {
                "pkcs11_uri": token.uri,
                "listen": "127.0.0.1:0",
                "sessions": sessions,
                "tls": {
                    "cert": str(pki.server.cert),
                    "key": str(pki.server.key),
                    "ca": str(pki.ca),
                },
                # The key set does not change during a run; keep the refresher quiet.
                "key_refresh_interval": "1h",
                "log_level": "warning",
            }
            config.update(_side_ports())
            path = directory / f"{name}.yaml"
            path.write_text(yaml.safe_dump(config))
            services.append(
                Service(
                    name,
                    keyward_argv("signer", "--config", str(path)),
                    token.env(),
                    directory / f"{name}.log",
                )
            )
        for service in services:
            service.wait_ready(60)
    except BaseException:
        stop_services(services)
        raise
    return services


def _side_ports() -> dict[str, Any]:
    """Settings that give any side listener of the signer (metrics, ...) a free port,
    so several signers can run at once; only the ones this signer version has."""
    import dataclasses

    from signer.config import SignerConfig

    names = {f.name for f in dataclasses.fields(SignerConfig)}
    return {"metrics_listen": "127.0.0.1:0"} if "metrics_listen" in names else {}


def stop_services(services: Sequence[Service]) -> None:
    for service in services:
        service.stop(timeout=15)


_CLOCK_TICK: Final = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of another process, from /proc (0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # Fields after the ")" closing the command name; utime and stime are 14 and 15.
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICK


ROLES: Final = ("loop", "python threads", "grpc threads")


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds of each thread of a process, with its role: the main thread (a
    signer's event loop), the other threads Python started (a signer's HSM workers,
    plus gRPC's small poller thread: Python leaves their OS name at the process's),
    and the threads gRPC's core starts and names itself."""
    threads: dict[int, tuple[str, float]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
        main_name = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return threads
    for tid in tids:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue  # the thread ended meanwhile
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat.rpartition(")")[2].split()
        cpu = (int(fields[11]) + int(fields[12])) / _CLOCK_TICK
        if int(tid) == pid:
            role = "loop"
        elif name == main_name:
            role = "python threads"
        else:
            role = "grpc threads"
        threads[int(tid)] = (role, cpu)
    return threads


def _roles(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> dict[str, float]:
    spent = dict.fromkeys(ROLES, 0.0)
    for tid, (role, cpu) in after.items():
        spent[role] += cpu - before.get(tid, (role, 0.0))[1]
    return spent


def self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- API load -------------------------------------------------------------------------


def system_busy() -> float:
    """CPU seconds all processors spent busy since boot (from /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    # user nice system idle iowait irq softirq steal ...: idle and iowait are not busy.
    return (sum(fields[:8]) - fields[3] - fields[4]) / _CLOCK_TICK


class Window:
    """The measured window, and CPU readings at its edges.

    ``pids`` are the signing processes (signers, direct children). This process is
    the load generator (``self_is_client``), or itself signing (False), or idle
    (None). Whatever else the machine did meanwhile is reported as other load, so a
    noisy run shows as one.
    """

    def __init__(
        self, warmup: float, duration: float, pids: Sequence[int], self_is_client: bool | None
    ) -> None:
        self.start_at = time.monotonic() + warmup
        self.end_at = self.start_at + duration
        self.pids = list(pids)
        self.self_is_client = self_is_client
        self._start: tuple[float, float, float, float] | None = None
        self._threads: dict[int, dict[int, tuple[str, float]]] = {}
        self.client_cpu: float | None = None
        self.server_cpu = 0.0
        self.server_roles: dict[str, float] | None = None
        self.other_cores = 0.0

    def _read(self) -> tuple[float, float, float, float]:
        return (time.monotonic(), self_cpu(), sum(process_cpu(p) for p in self.pids), system_busy())

    def begin(self) -> None:
        if self.self_is_client:
            self._threads = {pid: thread_cpu(pid) for pid in self.pids}
        self._start = self._read()

    def finish(self) -> None:
        assert self._start is not None
        t0, me0, them0, busy0 = self._start
        t1, me1, them1, busy1 = self._read()
        if self.self_is_client:
            self.server_roles = dict.fromkeys(ROLES, 0.0)
            for pid, before in self._threads.items():
                for role, cpu in _roles(before, thread_cpu(pid)).items():
                    self.server_roles[role] += cpu
        me, them = me1 - me0, them1 - them0
        self.server_cpu = them + (me if self.self_is_client is False else 0.0)
        self.client_cpu = me if self.self_is_client else None
        elapsed = t1 - t0
        ours = me + them
        self.other_cores = max(0.0, (busy1 - busy0 - ours) / elapsed) if elapsed > 0 else 0.0

    def run_sync(self) -> None:
        time.sleep(max(0.0, self.start_at - time.monotonic()))
        self.begin()
        time.sleep(max(0.0, self.end_at - time.monotonic()))
        self.finish()

    async def watch(self) -> None:
        await asyncio.sleep(max(0.0, self.start_at - time.monotonic()))
        self.begin()
        await asyncio.sleep(max(0.0, self.end_at - time.monotonic()))
        self.finish()

    def fill(self, samples: Samples) -> None:
        samples.client_cpu_s = self.client_cpu
        samples.server_cpu_s = self.server_cpu
        samples.server_roles = self.server_roles
        samples.other_cores = self.other_cores


async def unary_load(clients: Sequence[Any], key: BenchKey, window: int, win: Window) -> Samples:
    """``window`` coroutines per signer, each with one ``Sign`` call outstanding."""
    from signer.client import SignerError

    samples = Samples()
    latencies = samples.latencies
    algorithm = key.kind.algorithm
    monotonic = time.monotonic
    start_at, end_at = win.start_at, win.end_at
    counter = 0

    async def caller(client: Any) -> None:
        nonlocal counter
        while True:
            t0 = monotonic()
            if t0 >= end_at:
                return
            try:
                signature = await client.sign(key.ski, algorithm, DIGEST, timeout=30.0)
            except SignerError:
                if monotonic() >= start_at:
                    samples.errors += 1
                continue
            t1 = monotonic()
            if start_at <= t1 <= end_at:
                latencies.append(t1 - t0)
                counter += 1
                if counter % VERIFY_EVERY == 0:
                    samples.signatures.append(signature)

    watcher = asyncio.create_task(win.watch())
    await asyncio.gather(*(caller(c) for c in clients for _ in range(window)))
    await watcher
    win.fill(samples)
    return samples


class _StreamDriver:
    """Keeps ``window`` operations in flight on one OperationStream: every answer
    submits the next operation from its callback, until the window closes."""

    def __init__(
        self,
        stream: Any,
        key: BenchKey,
        window: int,
        win: Window,
        samples: Samples,
        done: asyncio.Future[None],
        outstanding: list[int],
    ) -> None:
        self.stream = stream
        self.request = pb.SignRequest(
            key=pb.KeySelector(ski=key.ski), algorithm=key.kind.algorithm, data=DIGEST
        )
        self.window = window
        self.start_at = win.start_at
        self.end_at = win.end_at
        self.samples = samples
        self.done = done
        self.outstanding = outstanding  # shared by all drivers of one mode
        self.counter = 0

    def start(self) -> None:
        for _ in range(self.window):
            self._submit(time.monotonic())

    def _submit(self, now: float) -> None:
        self.outstanding[0] += 1
        self.stream.submit(pb.Operation(sign=self.request), functools.partial(self._done, now))

    def _done(self, t0: float, result: pb.OperationResult) -> None:
        t1 = time.monotonic()
        samples = self.samples
        if result.HasField("error"):
            if t1 >= self.start_at:
                samples.errors += 1
        elif self.start_at <= t1 <= self.end_at:
            samples.latencies.append(t1 - t0)
            self.counter += 1
            if self.counter % VERIFY_EVERY == 0:
                samples.signatures.append(result.output)
        self.outstanding[0] -= 1
        if t1 < self.end_at:
            self._submit(t1)
        elif self.outstanding[0] == 0 and not self.done.done():
            self.done.set_result(None)


async def stream_load(
    clients: Sequence[Any], key: BenchKey, window: int, streams: int, win: Window
) -> Samples:
    """``streams`` OperationStreams per signer sharing ``window`` operations in flight."""
    samples = Samples()
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    outstanding = [0]
    opened: list[Any] = []
    drivers: list[_StreamDriver] = []
    try:
        for client in clients:
            for i in range(streams):
                stream = client.stream()
                await stream.start()
                opened.append(stream)
                share = window // streams + (1 if i < window % streams else 0)
                if share:
                    drivers.append(
                        _StreamDriver(stream, key, share, win, samples, done, outstanding)
                    )
        watcher = asyncio.create_task(win.watch())
        for driver in drivers:
            driver.start()
        await asyncio.wait_for(done, timeout=win.end_at - time.monotonic() + 60)
        await watcher
    finally:
        for stream in opened:
            await stream.close()
    win.fill(samples)
    return samples


async def api_modes(
    services: Sequence[Service],
    pki: Pki,
    key: BenchKey,
    shape: LoadShape,
    counts: Sequence[int],
    warmup: float,
    duration: float,
    again: Remeasure,
    on_result: Callable[[ModeResult], None],
) -> None:
    from signer.client import SignerClient

    clients = [
        SignerClient(s.address, ca=pki.ca, cert=pki.client.cert, key=pki.client.key)
        for s in services
    ]
    try:
        for client in clients:
            await client.list_keys(timeout=30)  # connected, TLS done, before any window
        for n in counts:
            chosen = clients[:n]
            pids = [s.pid for s in services[:n]]
            noun = "signer" if n == 1 else "signers"

            async def unary(
                chosen: list[Any] = chosen, pids: list[int] = pids, n: int = n, noun: str = noun
            ) -> ModeResult:
                win = Window(warmup, duration, pids, self_is_client=True)
                samples = await unary_load(chosen, key, shape.unary_window, win)
                return _result(
                    key.kind,
                    f"API unary, {n} {noun}",
                    "unary",
                    samples,
                    duration,
                    spki=key.spki,
                    raw_ecdsa=False,
                    processes=n,
                    sessions=shape.sessions,
                    window=shape.unary_window * n,
                )

            async def stream(
                chosen: list[Any] = chosen, pids: list[int] = pids, n: int = n, noun: str = noun
            ) -> ModeResult:
                win = Window(warmup, duration, pids, self_is_client=True)
                samples = await stream_load(chosen, key, shape.stream_window, shape.streams, win)
                return _result(
                    key.kind,
                    f"API stream, {n} {noun}",
                    "stream",
                    samples,
                    duration,
                    spki=key.spki,
                    raw_ecdsa=False,
                    processes=n,
                    sessions=shape.sessions,
                    window=shape.stream_window * n,
                    streams=shape.streams * n,
                )

            on_result(await again.run(unary))
            on_result(await again.run(stream))
    finally:
        for client in clients:
            await client.close()


# -- the run --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Plan:
    kinds: tuple[str, ...]
    signers: int
    duration: float
    warmup: float
    shapes: dict[str, LoadShape]
    retries: int = 0  # re-measurements allowed in all, for modes disturbed by other load


class Remeasure:
    """Measures a mode again when other processes disturbed it (other load at least
    NOISY_CORES), at most ``budget`` times per run, and keeps the quieter result:
    on a shared machine other load only ever lowers a figure."""

    def __init__(self, budget: int) -> None:
        self.left = budget
        self.done = 0

    def _again(self, best: ModeResult) -> bool:
        if best.other_cores_busy < NOISY_CORES or self.left <= 0:
            return False
        self.left -= 1
        self.done += 1
        log.info(
            "%s %s: other processes used %.2f cores meanwhile; measuring again",
            best.algorithm,
            best.mode,
            best.other_cores_busy,
        )
        return True

    def sync(self, make: Callable[[], ModeResult]) -> ModeResult:
        best = make()
        while self._again(best):
            again = make()
            if again.other_cores_busy < best.other_cores_busy:
                best = again
        return best

    async def run(self, make: Callable[[], Awaitable[ModeResult]]) -> ModeResult:
        best = await make()
        while self._again(best):
            again = await make()
            if again.other_cores_busy < best.other_cores_busy:
                best = again
        return best


def run_benchmark(
    plan: Plan, *, command: str, progress: Callable[[ModeResult], None] | None = None
) -> Report:
    report = Report(
        command=command,
        date=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        machine=machine_info(),
        settings=_settings(plan),
    )

    def record(result: ModeResult) -> None:
        report.results.append(result)
        if progress is not None:
            progress(result)

    again = Remeasure(plan.retries)
    with tempfile.TemporaryDirectory(prefix="keyward-signer-bench-") as tmp:
        directory = Path(tmp)
        os.chmod(directory, 0o700)
        token = make_token(directory / "softhsm")
        pki = make_pki(directory / "pki")
        previous_conf = os.environ.get("SOFTHSM2_CONF")
        # SoftHSM2 reads SOFTHSM2_CONF when this process first initialises the module.
        os.environ["SOFTHSM2_CONF"] = str(token.conf)
        try:
            keys = _direct_in_process(plan, token, again, record)
            _direct_processes(plan, token, keys, directory, again, record)
            _through_api(plan, token, pki, keys, directory, again, record)
        finally:
            if previous_conf is None:
                os.environ.pop("SOFTHSM2_CONF", None)
            else:
                os.environ["SOFTHSM2_CONF"] = previous_conf
    report.results.sort(
        key=lambda r: (plan.kinds.index(_kind_of(r)), _ORDER[r.path], r.processes, r.sessions)
    )
    report.remeasured = again.done
    _compare(report, plan)
    return report


_ORDER: Final = {"direct": 0, "unary": 1, "stream": 2}


def _kind_of(result: ModeResult) -> str:
    return next(name for name, k in KINDS.items() if k.title == result.algorithm)


def _direct_in_process(
    plan: Plan, token: BenchToken, again: Remeasure, record: Callable[[ModeResult], None]
) -> dict[str, BenchKey]:
    from signer.hsm.pool import Token

    with Token(token.uri, sessions=2) as hsm:
        keys = generate_keys(hsm, plan.kinds)
        for name in plan.kinds:
            key = keys[name]
            for threads in (1, 2):

                def measure(key: BenchKey = key, threads: int = threads) -> ModeResult:
                    samples = direct_threads(hsm, key, threads, plan.warmup, plan.duration)
                    noun = "thread" if threads == 1 else "threads"
                    return _result(
                        key.kind,
                        f"direct, {threads} {noun}",
                        "direct",
                        samples,
                        plan.duration,
                        spki=key.spki,
                        raw_ecdsa=True,
                        processes=1,
                        sessions=threads,
                    )

                record(again.sync(measure))
    return keys


def _direct_processes(
    plan: Plan,
    token: BenchToken,
    keys: dict[str, BenchKey],
    log_dir: Path,
    again: Remeasure,
    record: Callable[[ModeResult], None],
) -> None:
    n = plan.signers
    if n < 2:
        return  # "direct, 1 thread" already is the one-process figure
    procs = DirectProcesses(token, n, log_dir)
    try:
        for name in plan.kinds:

            def measure(key: BenchKey = keys[name]) -> ModeResult:
                samples = procs.run(key, plan.warmup, plan.duration)
                return _result(
                    key.kind,
                    f"direct, {n} processes",
                    "direct",
                    samples,
                    plan.duration,
                    spki=key.spki,
                    raw_ecdsa=True,
                    processes=n,
                    sessions=1,
                )

            record(again.sync(measure))
    finally:
        procs.close()


def _through_api(
    plan: Plan,
    token: BenchToken,
    pki: Pki,
    keys: dict[str, BenchKey],
    directory: Path,
    again: Remeasure,
    record: Callable[[ModeResult], None],
) -> None:
    counts = (1,) if plan.signers == 1 else (1, plan.signers)
    # Signers are started per session count, so kinds that want the same count share
    # one set of processes and start-up is paid once.
    by_sessions: dict[int, list[str]] = {}
    for name in plan.kinds:
        by_sessions.setdefault(plan.shapes[name].sessions, []).append(name)
    for sessions, names in by_sessions.items():
        services = start_signers(token, pki, directory, sessions, plan.signers, f"s{sessions}")
        try:
            for name in names:
                asyncio.run(
                    api_modes(
                        services,
                        pki,
                        keys[name],
                        plan.shapes[name],
                        counts,
                        plan.warmup,
                        plan.duration,
                        again,
                        record,
                    )
                )
        finally:
            stop_services(services)


def _baseline_for(
    result: ModeResult, direct: dict[tuple[str, str], ModeResult]
) -> ModeResult | None:
    """The direct figure with the same parallelism: N signers against N processes
    signing directly, one signer with S sessions against S threads of one process."""
    if result.processes > 1:
        return direct.get((result.algorithm, f"direct, {result.processes} processes"))
    threads = min(result.sessions, 2)
    noun = "thread" if threads == 1 else "threads"
    return direct.get((result.algorithm, f"direct, {threads} {noun}"))


def _compare(report: Report, plan: Plan) -> None:
    direct = {(r.algorithm, r.mode): r for r in report.results if r.path == "direct"}
    for result in report.results:
        if result.path == "direct":
            continue
        base = _baseline_for(result, direct)
        if base is not None and base.ops_per_s:
            result.baseline = base.mode
            result.ratio = round(result.ops_per_s / base.ops_per_s, 3)
    n = plan.signers
    noun = "signer" if n == 1 else "signers"
    fair = f"direct, {n} processes" if n > 1 else "direct, 1 thread"
    by_mode = {(r.algorithm, r.mode): r for r in report.results}

    def target(name: str, algorithm: str, mode: str, goal: float) -> None:
        r, b = by_mode.get((algorithm, mode)), by_mode.get((algorithm, fair))
        if r is None or b is None or not b.ops_per_s:
            return
        api_cpu = (r.client_cpu_us_per_op or 0.0) + r.server_cpu_us_per_op
        report.targets.append(
            Target(
                name,
                mode,
                fair,
                round(r.ops_per_s / b.ops_per_s, 3),
                goal,
                cpu_ratio=round(b.server_cpu_us_per_op / api_cpu, 3) if api_cpu else None,
                noisy=max(r.other_cores_busy, b.other_cores_busy) >= NOISY_CORES,
            )
        )

    if "rsa2048" in plan.kinds:
        for path in ("stream", "unary"):
            target(
                f"RSA-2048 through the API ({path})",
                "RSA-2048",
                f"API {path}, {n} {noun}",
                RSA_TARGET,
            )
    if "p256" in plan.kinds:
        target(
            f"ECDSA P-256 streaming, {n} {noun}",
            "ECDSA P-256",
            f"API stream, {n} {noun}",
            ECDSA_STREAM_TARGET,
        )


def _settings(plan: Plan) -> dict[str, Any]:
    return {
        "duration_s": plan.duration,
        "warmup_s": plan.warmup,
        "signers": plan.signers,
        "load_generator": "this process: one asyncio event loop, signer.client",
        "shapes": {name: asdict(plan.shapes[name]) for name in plan.kinds},
    }


def machine_info() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        nproc = os.cpu_count() or 0

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "?"

    softhsm = "?"
    util = shutil.which("softhsm2-util")
    if util:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            softhsm = (
                subprocess.run(
                    [util, "--version"], capture_output=True, text=True, timeout=10, check=False
                ).stdout.strip()
                or "?"
            )
    return {
        "nproc": nproc,
        "cpu": model or platform.processor() or "?",
        "python": platform.python_version(),
        "grpcio": version("grpcio"),
        "protobuf": version("protobuf"),
        "python-pkcs11": version("python-pkcs11"),
        "softhsm": softhsm,
    }


# -- output ---------------------------------------------------------------------------


_COLUMNS: Final = (
    "algorithm",
    "mode",
    "ops/s",
    "p50 ms",
    "p99 ms",
    "errors",
    "verified",
    "client CPU µs/op",
    "signer CPU µs/op",
    "cores busy",
    "other load",
    "vs direct",
)


def _row(r: ModeResult) -> list[str]:
    vs = f"{r.ratio:.0%} of {r.baseline}" if r.ratio is not None else ""
    return [
        r.algorithm,
        r.mode + _shape_note(r),
        f"{r.ops_per_s:,.0f}",
        f"{r.p50_ms:.2f}",
        f"{r.p99_ms:.2f}",
        str(r.errors),
        str(r.verified),
        "" if r.client_cpu_us_per_op is None else f"{r.client_cpu_us_per_op:.0f}",
        f"{r.server_cpu_us_per_op:.0f}",
        f"{r.cpu_cores_busy:.2f}",
        f"{r.other_cores_busy:.2f}",
        vs,
    ]


def _shape_note(r: ModeResult) -> str:
    if r.path == "unary":
        return f" ({r.sessions} sess., {r.window} calls out)"
    if r.path == "stream":
        streams = "1 stream" if r.streams == 1 else f"{r.streams} streams"
        return f" ({r.sessions} sess., {r.window} in flight, {streams})"
    return ""


_CPU_COLUMNS: Final = (
    "algorithm",
    "mode",
    "client",
    "signer: loop",
    "signer: Python threads",
    "signer: gRPC threads",
    "signer: all",
    "direct",
    "API overhead",
)


def _cpu_rows(report: Report) -> list[list[str]]:
    """Per-operation CPU of each API mode, split by process and thread, beside the CPU
    one direct signature costs with the same parallelism: where the cycles go."""
    direct = {(r.algorithm, r.mode): r for r in report.results if r.path == "direct"}
    rows = []
    for r in report.results:
        by_thread = r.signer_cpu_us_by_thread
        if r.path == "direct" or by_thread is None:
            continue
        base = direct.get((r.algorithm, r.baseline or ""))
        client = r.client_cpu_us_per_op or 0.0
        overhead = (
            f"{client + r.server_cpu_us_per_op - base.server_cpu_us_per_op:.0f}" if base else ""
        )
        rows.append(
            [
                r.algorithm,
                r.mode,
                f"{client:.0f}",
                *(f"{by_thread.get(role, 0.0):.0f}" for role in ROLES),
                f"{r.server_cpu_us_per_op:.0f}",
                f"{base.server_cpu_us_per_op:.0f}" if base else "",
                overhead,
            ]
        )
    return rows


def _plain_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    table = [list(columns), *(list(r) for r in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    numeric = [not _is_text_column(i, c) for i, c in enumerate(columns)]
    lines = []
    for k, row in enumerate(table):
        cells = [
            c.rjust(w) if k and numeric[i] else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def _is_text_column(index: int, name: str) -> bool:
    return index < 2 or name == "vs direct"


def _markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    align = ["---" if _is_text_column(i, c) else "---:" for i, c in enumerate(columns)]
    return [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join(align) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def _noise_note(report: Report) -> str | None:
    worst = max((r.other_cores_busy for r in report.results), default=0.0)
    if worst < NOISY_CORES:
        return None
    return (
        f"other processes used up to {worst:.2f} cores during some modes (column "
        "'other load'): those figures are low and their ratios unreliable; run again "
        "on a quiet machine"
    )


def render_text(report: Report) -> str:
    lines = _plain_table(_COLUMNS, [_row(r) for r in report.results])
    cpu = _cpu_rows(report)
    if cpu:
        lines += ["", "CPU per operation, µs:", *_plain_table(_CPU_COLUMNS, cpu)]
    lines.append("")
    lines.extend(_target_lines(report))
    note = _noise_note(report)
    if note:
        lines.append(f"warning: {note}")
    return "\n".join(lines)


def _target_lines(report: Report) -> list[str]:
    return [f"target: {_target_text(t, bold=False)}" for t in report.targets]


def _target_text(t: Target, *, bold: bool) -> str:
    verdict = "met" if t.met else ("not met" if bold else "NOT met")
    if bold:
        verdict = f"**{verdict}**"
    text = f"{t.name}: {t.mode} at {t.ratio:.0%} of {t.baseline} (target {t.goal:.0%}): {verdict}"
    if t.cpu_ratio is not None:
        estimate = "met" if t.cpu_ratio >= t.goal else "not met"
        text += f"; by CPU cost per signature {t.cpu_ratio:.0%} ({estimate})"
    if t.noisy:
        text += "; other processes were busy meanwhile, so the throughput ratio is unreliable"
    return text


def render_markdown(report: Report) -> str:
    m = report.machine
    s = report.settings
    shapes = "; ".join(
        f"{KINDS[name].title}: {sh['sessions']} HSM session(s) per signer, "
        f"{sh['unary_window']} unary calls outstanding and {sh['stream_window']} stream "
        f"operations in flight per signer over {sh['streams']} Stream call(s) each"
        for name, sh in s["shapes"].items()
    )
    lines = [
        START_MARKER,
        "## Signer API against direct PKCS#11 (`keyward signer-bench`)",
        "",
        f"- Command: `{report.command}`",
        f"- Date: {report.date}",
        f"- Machine: {m['nproc']} CPUs (nproc), {m['cpu']}; Python {m['python']}, "
        f"grpcio {m['grpcio']}, protobuf {m['protobuf']}, python-pkcs11 "
        f"{m['python-pkcs11']}, SoftHSM {m['softhsm']}",
        f"- Each mode: {s['warmup_s']:g} s warm-up, then {s['duration_s']:g} s measured, on a "
        "fresh SoftHSM2 token. Direct: python-pkcs11 `sign` in a loop on sessions opened by "
        "`Token`. API: `keyward signer` processes over mutual TLS on 127.0.0.1, driven from "
        f"{s['load_generator']}.",
        f"- Load: {shapes}.",
        "- Latency: submit to answer as the caller sees it (direct: one signature). CPU: user "
        "+ system time of the load generator (client) and of the signing processes "
        "(signer), per operation, over the measured window; other load: what the rest of "
        "the machine used meanwhile.",
        "",
        *_markdown_table(_COLUMNS, [_row(r) for r in report.results]),
    ]
    cpu = _cpu_rows(report)
    if cpu:
        lines += [
            "",
            "Where the CPU goes, µs per operation: the load generator (client); the signers' "
            "event-loop thread, their other Python threads (the HSM workers, signing, and "
            "gRPC's poller) and gRPC's own threads; against one direct signature with the "
            "same parallelism (API overhead = client + signer - direct).",
            "",
            *_markdown_table(_CPU_COLUMNS, cpu),
        ]
    lines += [
        "",
        "Targets, against the direct figure that uses as many processes as there are "
        "signers. The verdict is on throughput; the CPU-cost ratio (direct CPU per "
        "signature / client + signer CPU per signature) predicts it on a machine both "
        "modes saturate, and holds up better when other processes take cores away:",
        "",
        *(f"- {_target_text(t, bold=True)}" for t in report.targets),
    ]
    if report.remeasured:
        lines += [
            "",
            f"{report.remeasured} mode(s) were measured again because other processes were "
            "busy during the first attempt; the quieter attempt is shown.",
        ]
    note = _noise_note(report)
    if note:
        lines += ["", f"Warning: {note}."]
    lines.append(END_MARKER)
    return "\n".join(lines) + "\n"


# -- the command ----------------------------------------------------------------------


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "signer-bench",
        help="signs per second and latency through the Signer API beside direct PKCS#11",
        description="Make a throw-away SoftHSM2 token with an RSA-2048 and a P-256 key and "
        "measure direct python-pkcs11 signing (1 thread, 2 threads, N processes) against "
        "real signer processes driven with unary Sign calls and the Stream method.",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="SECONDS",
        help=f"measured time per mode (default {DEFAULT_DURATION:g})",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: {QUICK_DURATION:g} s per mode, about 20 s in all",
    )
    p.add_argument(
        "--signers",
        type=int,
        default=2,
        help="signer processes (and direct-signing processes) for the "
        "multi-process figures (default 2)",
    )
    p.add_argument(
        "--algorithms", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}"
    )
    p.add_argument(
        "--ecdsa-sessions",
        type=int,
        default=None,
        help=f"HSM sessions per signer for P-256 (default {DEFAULT_SHAPES['p256'].sessions})",
    )
    p.add_argument(
        "--rsa-sessions",
        type=int,
        default=None,
        help=f"HSM sessions per signer for RSA (default {DEFAULT_SHAPES['rsa2048'].sessions})",
    )
    p.add_argument(
        "--unary-window",
        type=int,
        default=None,
        help="unary calls outstanding per signer (default per algorithm)",
    )
    p.add_argument(
        "--stream-window",
        type=int,
        default=None,
        help="Stream operations in flight per signer (default per algorithm)",
    )
    p.add_argument(
        "--streams",
        type=int,
        default=None,
        help="Stream calls per signer sharing that window (default per algorithm)",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=DEFAULT_RETRIES,
        help="modes measured again, in all, when other processes used more than "
        f"{NOISY_CORES:g} cores meanwhile (default {DEFAULT_RETRIES}; --quick: 0)",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--write",
        type=Path,
        metavar="FILE",
        help="write the report as the signer-bench section of FILE "
        "(e.g. docs/benchmarks.md), keeping its other sections",
    )
    add_logging_flags(p)
    p.set_defaults(handler=run_signer_bench)


def _positive(value: int | None, flag: str) -> None:
    if value is not None and value < 1:
        raise CommandError(f"{flag} must be at least 1")


def plan_from_args(args: argparse.Namespace) -> Plan:
    kinds = tuple(k.strip() for k in args.algorithms.split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise CommandError(f"--algorithms: use a subset of {','.join(KINDS)}")
    for flag in (
        "signers",
        "ecdsa_sessions",
        "rsa_sessions",
        "unary_window",
        "stream_window",
        "streams",
    ):
        _positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    if args.retries < 0:
        raise CommandError("--retries must be 0 or more")
    if args.duration is not None and args.duration <= 0:
        raise CommandError("--duration must be positive")
    duration = args.duration or (QUICK_DURATION if args.quick else DEFAULT_DURATION)
    warmup = 0.2 if args.quick else min(1.0, max(0.2, duration / 5))
    shapes: dict[str, LoadShape] = {}
    for name in kinds:
        base = DEFAULT_SHAPES[name]
        sessions = args.ecdsa_sessions if name == "p256" else args.rsa_sessions
        shapes[name] = LoadShape(
            sessions=sessions or base.sessions,
            unary_window=args.unary_window or base.unary_window,
            stream_window=args.stream_window or base.stream_window,
            streams=args.streams or base.streams,
        )
    # A quick run is a smoke test: never spend time measuring again.
    retries = 0 if args.quick else args.retries
    return Plan(kinds, args.signers, duration, warmup, shapes, retries)


def command_line(args: argparse.Namespace) -> str:
    """The command as typed when this process is ``keyward signer-bench ...``."""
    argv = sys.argv
    if "signer-bench" in argv:
        return "keyward " + shlex.join(argv[argv.index("signer-bench") :])
    # Run some other way (python -m signer.bench, tests): an equivalent command.
    parts = ["keyward", "signer-bench"]
    if args.quick:
        parts.append("--quick")
    for flag in (
        "duration",
        "signers",
        "algorithms",
        "ecdsa_sessions",
        "rsa_sessions",
        "unary_window",
        "stream_window",
        "streams",
        "retries",
    ):
        value = getattr(args, flag)
        default = {
            "signers": 2,
            "algorithms": ",".join(KINDS),
            "retries": DEFAULT_RETRIES,
        }.get(flag)
        if value is not None and value != default:
            parts += ["--" + flag.replace("_", "-"), str(value)]
    if args.json:
        parts.append("--json")
    if args.write is not None:
        parts += ["--write", str(args.write)]
    return shlex.join(parts)


def run_signer_bench(args: argparse.Namespace) -> int:
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        raise CommandError(
            "python-pkcs11 is not installed: install keyward[signer] to benchmark signers"
        ) from None
    plan = plan_from_args(args)
    started = time.monotonic()

    def progress(result: ModeResult) -> None:
        log.info(
            "%s %s: %s ops/s, p50 %.2f ms, p99 %.2f ms, %d errors",
            result.algorithm,
            result.mode,
            f"{result.ops_per_s:,.0f}",
            result.p50_ms,
            result.p99_ms,
            result.errors,
        )

    report = run_benchmark(plan, command=command_line(args), progress=progress)
    log.info("signer-bench took %.0f s", time.monotonic() - started)
    if args.write is not None:
        write_section(args.write, render_markdown(report), START_MARKER, END_MARKER)
        log.info("wrote the signer-bench section of %s", args.write)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(render_text(report))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m signer.bench ...``: the same command without the ``keyward`` wrapper."""
    from signer.common.logs import setup_logging

    parser = argparse.ArgumentParser(prog="keyward")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    register(sub)
    args = parser.parse_args(["signer-bench", *(argv if argv is not None else sys.argv[1:])])
    setup_logging(args.log_level or "info", args.log_format or "text")
    try:
        return int(args.handler(args))
    except CommandError as e:
        print(f"keyward signer-bench: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
