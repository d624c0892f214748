"""Background jobs for the HTTP API: each runs in its own thread under the host's queue lock, reports its progress
into a `JobState` that `GET /jobs/{id}` reads, and stops between training steps when interrupted.

Plain Python: the WebUI passes its `modules.call_queue.queue_lock`; tests pass any lock.
"""

from __future__ import annotations

import ctypes
import sys
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TypeVar

from lib_copier.errors import CopierError, Interrupted, reported, shown
from lib_copier.train.trainer import Callbacks, Progress

T = TypeVar("T")


@dataclass
class JobState:
    id: str
    status: str = "queued"  # then running, and at the end done, failed or interrupted
    stage: str = ""
    step: int = 0
    total: int = 0
    loss: float | None = None
    eta: float | None = None
    started: float | None = None
    finished: float | None = None
    results: list[dict] = field(default_factory=list)
    error: str = ""
    interrupted: threading.Event = field(default_factory=threading.Event, repr=False)

    def on_progress(self, progress: Progress) -> None:
        self.step, self.total, self.loss, self.eta = progress.step, progress.total, progress.loss, progress.eta

    def on_count(self, done: int, total: int) -> None:
        """Work without a loss (SVD merges): done of total, under the current stage."""
        self.step, self.total, self.loss, self.eta = done, total, None, None

    def on_stage(self, text: str) -> None:
        self.stage, self.step, self.total, self.loss, self.eta = text, 0, 0, None, None

    def callbacks(self) -> Callbacks:
        """Trainer callbacks that report here and stop when the job is interrupted."""
        return Callbacks(progress=self.on_progress, cancelled=self.interrupted.is_set, counted=self.on_count)

    def as_dict(self) -> dict:
        keys = ("id", "status", "stage", "step", "total", "loss", "eta", "started", "finished", "results", "error")
        return {key: getattr(self, key) for key in keys}


Work = Callable[[JobState], list[dict]]


class JobRunner:
    def __init__(self, lock: AbstractContextManager, keep: int = 50, stop_host: Callable[[], None] = lambda: None):
        """`stop_host` interrupts the WebUI's own work, so that an image the job is drawing stops too."""
        self.lock, self.keep, self.stop_host = lock, keep, stop_host
        self.jobs: dict[str, JobState] = {}
        self.threads: dict[str, threading.Thread] = {}
        self._status = threading.Lock()  # a job's status moves out of "queued" once, by interrupt or by start
        self._table = threading.Lock()  # the routes run in FastAPI's thread pool: one change to the job table at once

    def submit(self, work: Work) -> JobState:
        """Start `work(state)` in the background; it returns the results to publish."""
        state = JobState(uuid.uuid4().hex[:12])
        thread = threading.Thread(target=self._run, args=(state, work), name=f"copier-lora-{state.id}", daemon=True)
        with self._table:
            self._forget_old()
            self.jobs[state.id] = state
            self.threads[state.id] = thread
        thread.start()
        return state

    def get(self, job_id: str) -> JobState:
        if job_id not in self.jobs:
            raise CopierError(f"there is no job {shown(job_id)}")
        return self.jobs[job_id]

    def describe(self, job_id: str) -> dict:
        """The job as GET /jobs/{id} shows it; a queued job also says how many of our jobs are ahead of it."""
        state = self.get(job_id)
        reply = state.as_dict()
        if state.status == "queued":
            states = self.states()
            ahead = states[: states.index(state)]
            reply["queue_position"] = sum(s.status in ("queued", "running") for s in ahead)
        return reply

    def states(self) -> list[JobState]:
        """The jobs kept, oldest first."""
        with self._table:
            return list(self.jobs.values())

    def interrupt(self, job_id: str) -> JobState:
        state = self.get(job_id)
        with self._status:
            state.interrupted.set()
            if state.status == "queued":  # it never starts: say so now, not when it reaches the lock
                state.status, state.finished = "interrupted", time.time()
                state.error = "interrupted while it waited for its turn: nothing was trained"
            elif state.status == "running":  # it holds the lock: the WebUI's work now is the job's (its txt2img)
                self.stop_host()
        return state

    def interrupt_all(self) -> None:
        """Every job that has not ended (the UI reloads): a queued one ends at once, as its own interrupt ends it, or
        it stayed "queued" with a place in the queue and kept the WebUI busy for the 🧬 button."""
        for state in self.states():
            if state.finished is None:
                self.interrupt(state.id)

    def wait(self, job_id: str, timeout: float | None = None) -> JobState:
        self.threads[job_id].join(timeout)
        return self.get(job_id)

    def _run(self, state: JobState, work: Work) -> None:
        with self.lock:
            with self._status:
                if state.interrupted.is_set():  # interrupted while it waited for the lock: already said so
                    return
                state.status, state.started = "running", time.time()
            try:
                state.results = work(state)
                state.status = "done"
            except Interrupted as exc:
                state.status, state.error = "interrupted", str(exc)  # where it stopped, and what it kept
            except Exception as exc:  # a job thread must record every failure: nobody else will see it
                state.status, state.error = "failed", reported(exc)  # an unexpected error with its traceback
                print(f"Copier LoRA: job {state.id} failed: {state.error}", file=sys.stderr)  # on the console too
            finally:
                release_freed_memory()
                state.finished, state.eta = time.time(), None

    def _forget_old(self) -> None:
        ended = [s.id for s in self.jobs.values() if s.finished is not None]
        for job_id in ended[: max(0, len(ended) - self.keep + 1)]:
            del self.jobs[job_id]
            del self.threads[job_id]


def in_own_thread(work: Callable[[], T]) -> T:
    """`work()` in a thread of its own, waited for; what it raises is raised here.

    The memory a training frees stays cached in the allocator arena of the thread that used it: glibc keeps one per
    thread and hands it on only when the thread ends. Trained in gradio's long-lived worker threads, each run from
    the tab left about 2 GB cached in another one (a dozen runs filled 24 GB in a live Forge without tcmalloc); a
    thread that ends leaves its arena to the next run, as the API's jobs do."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = work()
        except BaseException as exc:  # noqa: BLE001 (re-raised in the caller's thread)
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="copier-lora-tab", daemon=True)
    thread.start()
    thread.join()
    release_freed_memory()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def release_freed_memory() -> None:
    """Give the memory a run freed back to the system. glibc keeps freed heap memory for the process: after a merge
    into an SD1.5 checkpoint 4-6 GB stayed resident, growing with each merge (a live Forge went from 7 to 16 GB),
    and `malloc_trim` returned it all (0.6 GB left). Other C libraries have no such call and need none."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (Windows, macOS, musl)
        pass
