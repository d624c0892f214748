"""Waiting for the WebUI's queue lock in a way the waiter can give up.

The WebUIs' queue lock (A1111's and Forge's `FIFOLock`) takes no timeout, and a thread waiting in it waits until its
turn. A tab run withdrawn while it waited therefore kept its gradio call pending until then, and gradio 3 ignores a
click on an event whose call is pending: Train did nothing until the run ahead ended. Here a thread of its own waits
in the lock, keeping the run's place in the order; the caller stops waiting once `given_up()` says so, and that
thread then hands the lock on as soon as it gets it.

Plain Python: the WebUI passes its lock; tests pass any lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

POLL = 0.2  # seconds between two readings of given_up()


def wait_for_turn(lock, given_up: Callable[[], bool], poll: float = POLL) -> bool:
    """True once `lock` is held for the caller, who releases it; False as soon as `given_up()` is true first."""
    turn = threading.Event()
    decided = threading.Lock()  # the turn and the giving up: whichever comes first holds
    abandoned = False

    def wait() -> None:
        lock.acquire()
        with decided:
            if not abandoned:
                turn.set()
                return
        lock.release()  # its turn came after the caller gave up: the next in the queue goes

    threading.Thread(target=wait, name="copier-lora-turn", daemon=True).start()
    while not turn.wait(poll):
        if given_up():
            with decided:
                if not turn.is_set():
                    abandoned = True
                    return False
    return True
