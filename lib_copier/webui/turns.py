"""A tab run's turn in the WebUI's queue: waiting for the queue lock in a way the waiter can give up, and the
page's runs by task id (`PageRuns`).

The WebUIs' queue lock (A1111's and Forge's `FIFOLock`) takes no timeout, and a thread waiting in it waits until its
turn. A tab run withdrawn while it waited therefore kept its gradio call pending until then, and gradio 3 ignores a
click on an event whose call is pending: Train did nothing until the run ahead ended. Here a thread of its own waits
in the lock, keeping the run's place in the order; the caller stops waiting once `given_up()` says so, and that
thread then hands the lock on as soon as it gets it.

Plain Python: the WebUI passes its lock; tests pass any lock.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from lib_copier.webui.jobs import JobState

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


class PageRuns:
    """The tab's runs by task id, from the press of Train: withdrawn while they wait for their turn, going, or
    ended (the page learns of the end at its next poll of the progress bar)."""

    def __init__(self):
        self._withdrawn: set[str] = set()
        self._going: dict[str, JobState] = {}
        self._ended: deque[str] = deque(maxlen=64)
        self._lock = threading.Lock()  # a run's turn and its withdrawal: whichever comes first holds

    def begin(self, task: str) -> JobState | None:
        """The run's state at its turn; None for a run withdrawn before it."""
        with self._lock:
            if task in self._withdrawn:
                self._withdrawn.discard(task)
                return None
            state = self._going[task] = JobState("tab")
            return state

    def end(self, task: str) -> None:
        with self._lock:
            self._going.pop(task, None)
            self._ended.append(task)

    def withdraw(self, task: str) -> bool:
        """True where the run still waits: it will not start. A run that got its turn is interrupted instead, and
        one that has ended is left as it ended."""
        with self._lock:
            if task in self._going:
                self._going[task].interrupted.set()
                return False
            if task in self._ended:
                return False
            self._withdrawn.add(task)
            return True

    def withdrawn(self, task: str) -> bool:
        return task in self._withdrawn
