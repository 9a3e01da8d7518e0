"""Many threads, many batches, two sessions: no crash, every signature valid.

This is the test that crashed the process before the module was initialised with
CKF_OS_LOCKING_OK (python-pkcs11's C_Initialize(NULL) leaves SoftHSM2 unlocked).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future

import pytest
from softhsm import SoftHsmToken, verify_signature

from signer.hsm import admin
from signer.hsm.errors import HsmError
from signer.hsm.keys import KeyInfo
from signer.hsm.pool import Job, Result, Token
from signer.v1 import signer_pb2 as pb

DURATION = float(os.environ.get("KEYWARD_CONCURRENCY_SECONDS", "3"))
THREADS = 4
BATCH = 8
IN_FLIGHT = 4  # batches each thread keeps queued


@pytest.fixture(scope="module")
def token(softhsm: SoftHsmToken) -> Iterator[Token]:
    with Token(softhsm.uri(max_sessions=2)) as tok:
        assert tok.session_count == 2
        yield tok


@pytest.fixture(scope="module")
def keys(token: Token) -> tuple[KeyInfo, KeyInfo]:
    return (admin.generate_key(token, "p256", "conc-p256"),
            admin.generate_key(token, "rsa2048", "conc-rsa"))


def _batch(ec_key: KeyInfo, rsa_key: KeyInfo, seq: int) -> list[Job]:
    jobs = []
    for i in range(BATCH):
        digest = os.urandom(32)
        # Mostly ECDSA, some RSA, as a TLS front end would see them.
        if (seq + i) % 4 == 0:
            jobs.append(Job.sign(rsa_key, pb.RSA_PKCS1V15_SHA256, digest))
        elif (seq + i) % 8 == 1:
            jobs.append(Job.sign(rsa_key, pb.RSA_PSS_SHA256, digest))
        else:
            jobs.append(Job.sign(ec_key, pb.ECDSA_SHA256, digest))
    return jobs


def test_concurrent_batches(token: Token, keys: tuple[KeyInfo, KeyInfo]) -> None:
    ec_key, rsa_key = keys
    spki = {ec_key.ski: ec_key.spki, rsa_key.ski: rsa_key.spki}
    done: list[tuple[list[Job], list[Result]]] = []
    done_lock = threading.Lock()
    failures: list[BaseException] = []
    stop_at = time.monotonic() + DURATION

    def submitter(worker: int) -> None:
        try:
            pending: list[tuple[list[Job], Future[list[Result]]]] = []
            seq = worker * 1000
            while time.monotonic() < stop_at or pending:
                while time.monotonic() < stop_at and len(pending) < IN_FLIGHT:
                    jobs = _batch(ec_key, rsa_key, seq)
                    seq += 1
                    pending.append((jobs, token.submit(jobs)))
                jobs, future = pending.pop(0)
                results = future.result(60)
                with done_lock:
                    done.append((jobs, results))
        except BaseException as exc:  # reported by the main thread
            failures.append(exc)

    started = time.monotonic()
    threads = [threading.Thread(target=submitter, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DURATION + 120)
    elapsed = time.monotonic() - started
    assert not failures, failures
    assert all(not thread.is_alive() for thread in threads)

    total = ecdsa = 0
    for jobs, results in done:
        assert len(results) == len(jobs)
        for job, result in zip(jobs, results, strict=True):
            assert not isinstance(result, HsmError), result
            assert isinstance(job.key, KeyInfo)
            name = pb.Algorithm.Name(job.algorithm)
            verify_signature(spki[job.key.ski], name, job.data, result)
            total += 1
            ecdsa += name.startswith("ECDSA")
    assert total > 0
    assert token.healthy
    print(f"\n{total} signatures ({ecdsa} ECDSA P-256, {total - ecdsa} RSA-2048) in "
          f"{elapsed:.2f}s from {THREADS} threads over {token.session_count} sessions: "
          f"{total / elapsed:.0f}/s")


def test_refresh_while_signing(token: Token, keys: tuple[KeyInfo, KeyInfo]) -> None:
    """Workers pick up a new key set between batches while others keep signing."""
    ec_key, rsa_key = keys
    stop = threading.Event()
    errors: list[object] = []

    def sign_loop() -> None:
        while not stop.is_set():
            for result in token.submit(_batch(ec_key, rsa_key, 0)).result(60):
                if isinstance(result, HsmError):
                    errors.append(result)

    thread = threading.Thread(target=sign_loop)
    thread.start()
    try:
        generation = token.generation
        extra = admin.generate_key(token, "ed25519", "conc-ed")
        assert token.generation == generation + 1
        signature = token.run(Job.sign(extra, pb.ED25519, b"new key"))
        verify_signature(extra.spki, "ED25519", b"new key", signature)
        admin.delete_key(token, extra.ski)
        assert token.generation == generation + 2
    finally:
        stop.set()
        thread.join(60)
    assert not errors
    assert token.healthy
