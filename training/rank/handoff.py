"""Work one process does for the whole run while the others wait for its answer, with an end to every wait.

The main process runs the work and publishes its result (or its error) in the process group's own key-value store
(the c10d store every rank already connects to); while it works, a thread beats a heartbeat there. A waiting rank
returns the result, raises the main process's error, and gives up with :class:`HandoffError` when the heartbeat
stops for :data:`SILENT_LIMIT_S` (the main process died or hangs), the store is gone, or the wait passes its
timeout. A collective barrier would do none of that: it waits its fixed process-group timeout whatever happened.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from .distributed import is_distributed, is_main_process, world_size

logger = logging.getLogger(__name__)

HEARTBEAT_S = 5.0
SILENT_LIMIT_S = 120.0
POLL_S = 0.5
LOG_EVERY_S = 60.0
ACKNOWLEDGE_WAIT_S = 30.0
_handoffs = itertools.count()  # every rank calls the handoffs of a run in the same order


class HandoffError(RuntimeError):
    """A rank gave up waiting for the main process, or the main process's work failed."""


def _store():
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


class _Keys:
    def __init__(self, name: str):
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # an elastic restart starts a new round of keys
        prefix = f"dolly/{restart}/{next(_handoffs)}-{name}"
        self.result, self.error, self.beat, self.acks = (
            f"{prefix}/{part}" for part in ("result", "error", "beat", "acks")
        )


def on_main_process(name: str, work: Callable[[], Any], *, timeout_s: float, what: str) -> Any:
    """``work()`` run on the main process; its result (JSON) returned on every rank. ``what`` says, for a waiting
    rank's log and errors, what the main process is doing ("prepare the training data")."""
    if not is_distributed() or world_size() == 1:
        return work()
    keys = _Keys(name)
    store = _store()
    if is_main_process():
        return _work_and_publish(store, keys, work)
    return json.loads(_wait_for(store, keys, timeout_s=timeout_s, what=what))


def _work_and_publish(store, keys: _Keys, work: Callable[[], Any]) -> Any:
    stop = threading.Event()

    def beat() -> None:
        for count in itertools.count():
            store.set(keys.beat, str(count))
            if stop.wait(HEARTBEAT_S):
                return

    beating = threading.Thread(target=beat, name="handoff-heartbeat", daemon=True)
    beating.start()
    try:
        result = work()
    except BaseException as err:
        store.set(keys.error, f"{type(err).__name__}: {err}")
        _wait_for_acknowledgements(store, keys)
        raise
    finally:
        stop.set()
        beating.join()
    store.set(keys.result, json.dumps(result))
    return result


def _wait_for_acknowledgements(store, keys: _Keys) -> None:
    """Keep the store up (it lives in this process) until every waiting rank has read the error, or a while."""
    deadline = time.monotonic() + ACKNOWLEDGE_WAIT_S
    while store.add(keys.acks, 0) < world_size() - 1 and time.monotonic() < deadline:
        time.sleep(POLL_S)


def _wait_for(store, keys: _Keys, *, timeout_s: float, what: str) -> str:
    started = last_log = last_change = time.monotonic()
    last_beat = None
    try:
        while True:
            if store.check([keys.result]):
                return store.get(keys.result).decode()
            if store.check([keys.error]):
                message = store.get(keys.error).decode()
                store.add(keys.acks, 1)
                raise HandoffError(f"the main process failed to {what}: {message}")
            now = time.monotonic()
            beat = store.get(keys.beat) if store.check([keys.beat]) else None
            if beat != last_beat:
                last_beat, last_change = beat, now
            if now - last_change > SILENT_LIMIT_S:
                raise HandoffError(
                    f"no sign of life from the main process for {SILENT_LIMIT_S:.0f} s while it was to {what}: it "
                    "died or hangs (see its log)"
                )
            if now - started > timeout_s:
                raise HandoffError(f"waited {timeout_s:.0f} s for the main process to {what} (--wait-timeout)")
            if now - last_log >= LOG_EVERY_S:
                logger.info("Waiting for the main process to %s (%.0f s)", what, now - started)
                last_log = now
            time.sleep(POLL_S)
    except HandoffError:
        raise
    except RuntimeError as err:  # the store's errors (DistStoreError and others) when its host is gone
        raise HandoffError(f"lost the main process while it was to {what}: {err}") from None
