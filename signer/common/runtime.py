"""Process-wide tuning both services apply once they are up."""

from __future__ import annotations

import gc

# Python's default first-generation threshold (700 container allocations) runs a
# collection every few dozen requests on the hot path, and each one walks every
# young object; a request's objects are freed by reference counting long before
# that, so collections find almost nothing. A larger threshold keeps cycle collection
# (it still runs) at a fraction of the cost.
GC_THRESHOLD = (50_000, 20, 100)


def settle_heap() -> None:
    """After start-up: move what is loaded so far (modules, protobuf descriptors, the
    configuration) out of the collector's sight and collect less often.

    ``gc.freeze`` puts every object alive now in a permanent generation that no
    collection walks again, so the periodic full collections cost what the live
    request state costs rather than the whole interpreter.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)
