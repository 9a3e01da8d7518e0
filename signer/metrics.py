"""The signer's metrics: operations and latency per key and algorithm, the HSM's sessions
and queue, HSM errors by PKCS#11 return code, and health.

Recorded on the event loop thread when results come back from the workers, so the
workers' hot loop does no metric work.
"""

from __future__ import annotations

from collections.abc import Callable

from signer.common.metrics import Registry
from signer.v1 import signer_pb2 as pb

_ALGORITHMS = {v: k for k, v in pb.Algorithm.items()}
_MODES = {v: k for k, v in pb.DecryptMode.items()}


def algorithm_label(algorithm: int, decrypt_mode: int) -> str:
    if decrypt_mode:
        return _MODES.get(decrypt_mode, str(decrypt_mode))
    return _ALGORITHMS.get(algorithm, str(algorithm))


class SignerMetrics:
    def __init__(self) -> None:
        r = self.registry = Registry()
        self.operations = r.counter(
            "keyward_signer_operations",
            "Operations answered, by key label, algorithm and outcome (ok or a gRPC status).",
            ["key", "algorithm", "outcome"],
        )
        self.duration = r.histogram(
            "keyward_signer_operation_duration_seconds",
            "Time from an operation's arrival to its answer (queue and HSM), seconds.",
            ["algorithm"],
        )
        self.session_wait = r.histogram(
            "keyward_hsm_session_wait_seconds",
            "Time operations waited for a free HSM session, seconds.",
        )
        self.hsm_errors = r.counter(
            "keyward_hsm_errors", "HSM calls that failed, by PKCS#11 return code.", ["ckr"]
        )

    def gauges(
        self,
        serving: Callable[[], bool],
        sessions: Callable[[], int],
        busy: Callable[[], int],
        queued: Callable[[], int],
        in_flight: Callable[[], int],
        keys: Callable[[], int],
    ) -> None:
        r = self.registry
        r.gauge(
            "keyward_signer_serving",
            "1 while the signer reports SERVING.",
            read=lambda: {(): float(serving())},
        )
        r.gauge(
            "keyward_hsm_sessions",
            "PKCS#11 sessions, one per worker thread, by state.",
            ["state"],
            read=lambda: {
                ("in_use",): float(busy()),
                ("idle",): float(max(0, sessions() - busy())),
            },
        )
        r.gauge(
            "keyward_hsm_queued_operations",
            "Operations waiting for a free session.",
            read=lambda: {(): float(queued())},
        )
        r.gauge(
            "keyward_signer_in_flight",
            "Operations accepted and not yet answered.",
            read=lambda: {(): float(in_flight())},
        )
        r.gauge("keyward_signer_keys", "Keys this signer serves.", read=lambda: {(): float(keys())})
