"""A tab run withdrawn while it waits for the WebUI's queue lock stops waiting at once (gradio 3 ignored every later
press of Train while its call was pending), keeps the order of the others, and leaves the running job's state be."""

import sys
import threading
import time
import types
from collections import deque

import pytest

from lib_copier.webui.turns import wait_for_turn


class FifoLock:
    """The WebUIs' queue lock, as it behaves: no timeout, and the waiters get it in the order they came."""

    def __init__(self):
        self._guard = threading.Condition()
        self._waiting: deque = deque()
        self.held = False

    def acquire(self, blocking: bool = True) -> bool:
        with self._guard:
            if not blocking:
                if self.held or self._waiting:
                    return False
                self.held = True
                return True
            ticket = object()
            self._waiting.append(ticket)
            self._guard.wait_for(lambda: not self.held and self._waiting[0] is ticket)
            self._waiting.popleft()
            self.held = True
            return True

    def release(self) -> None:
        with self._guard:
            self.held = False
            self._guard.notify_all()

    __enter__ = acquire

    def __exit__(self, *exc):
        self.release()


def _hold(lock: FifoLock):
    """A run holding the lock (an API job, another page's run) until the returned event is set."""
    holding, done = threading.Event(), threading.Event()

    def run():
        with lock:
            holding.set()
            done.wait(20)

    threading.Thread(target=run, daemon=True).start()
    assert holding.wait(10)
    return done


def _in_thread(fn, *args) -> dict:
    outcome: dict = {}

    def run():
        outcome["value"] = fn(*args)
        outcome["when"] = time.monotonic()

    outcome["thread"] = threading.Thread(target=run, daemon=True)
    outcome["thread"].start()
    return outcome


def test_a_free_lock_is_the_callers_at_once():
    lock = FifoLock()
    assert wait_for_turn(lock, lambda: False) is True and lock.held
    lock.release()


def test_a_waiter_that_gives_up_returns_at_once_and_the_next_in_the_queue_still_gets_its_turn():
    lock = FifoLock()
    done = _hold(lock)
    given_up = threading.Event()
    withdrawn = _in_thread(wait_for_turn, lock, given_up.is_set, 0.05)
    time.sleep(0.2)  # it waits in the lock first
    following = _in_thread(wait_for_turn, lock, lambda: False, 0.05)
    time.sleep(0.2)
    given_up.set()
    pressed = time.monotonic()
    withdrawn["thread"].join(5)
    assert withdrawn["value"] is False and withdrawn["when"] - pressed < 1  # while the run ahead still holds the lock
    assert "value" not in following  # the others keep waiting, in their order
    done.set()
    following["thread"].join(5)
    assert following["value"] is True and lock.held  # the withdrawn one's turn came first and was handed on
    lock.release()
    assert lock.acquire(blocking=False)  # nothing holds it now
    lock.release()


@pytest.fixture
def webui(monkeypatch):
    """A1111's `modules` as `gpu_call` uses them: the queue lock, the job state, the progress bar's task lists, and
    the gradio wrapper that resets the job state after a call."""
    state = types.SimpleNamespace(interrupted=False, job="", log=[])
    state.begin = lambda job: (state.log.append(("begin", job)), setattr(state, "interrupted", False))
    state.end = lambda: state.log.append(("end",))
    progress = types.SimpleNamespace(pending_tasks={}, log=[])
    progress.add_task_to_queue = lambda task: progress.pending_tasks.__setitem__(task, time.time())
    progress.start_task = lambda task: (progress.log.append(("start", task)), progress.pending_tasks.pop(task, None))
    progress.record_results = lambda task, res: progress.log.append(("results", task))
    progress.finish_task = lambda task: progress.log.append(("finish", task))

    def wrap_gradio_call(fn, extra_outputs=None, add_stats=False):
        def call(*args):
            try:
                res = fn(*args)
                return [*res[:-1], res[-1] + "<div>time taken</div>"]
            finally:
                state.interrupted = False

        return call

    call_queue = types.SimpleNamespace(queue_lock=FifoLock(), wrap_gradio_call=wrap_gradio_call)
    modules = types.ModuleType("modules")
    modules.call_queue, modules.progress, modules.shared = call_queue, progress, types.SimpleNamespace(state=state)
    monkeypatch.setitem(sys.modules, "modules", modules)
    return modules


def test_the_tabs_train_runs_where_the_webui_records_no_results_for_a_reloaded_page(webui):
    """reForge's progress module has no record_results: its Train raised AttributeError."""
    from lib_copier.webui.extension import gpu_call

    del webui.progress.record_results
    train = gpu_call(lambda task, *args: ["grids", "results", "pick", "trained"], lambda task: False)
    assert train("task(1)") == ["grids", "results", "pick", "trained<div>time taken</div>"]
    assert webui.progress.log == [("start", "task(1)"), ("finish", "task(1)")]


def test_the_tabs_train_given_up_answers_at_once_without_touching_the_running_jobs_state(webui):
    from lib_copier.webui.extension import gpu_call

    withdrawn, called = set(), []

    def start(task, *args):  # the tab's: a withdrawn run ends at its call, untrained
        called.append((task, webui.call_queue.queue_lock.held))
        return ["grids", "results", "pick", "withdrawn" if task in withdrawn else "trained"]

    train = gpu_call(start, lambda task: task in withdrawn)
    done = _hold(webui.call_queue.queue_lock)  # an API job runs
    webui.shared.state.interrupted = True  # and its Interrupt was just pressed
    waiting = _in_thread(train, "task(1)", "an image")
    time.sleep(0.5)
    assert "value" not in waiting and list(webui.progress.pending_tasks) == ["task(1)"]  # "In queue: 1/1"
    withdrawn.add("task(1)")
    waiting["thread"].join(5)
    assert waiting["value"][-1] == "withdrawn" and called == [("task(1)", True)]  # the API job still holds the lock
    assert webui.shared.state.interrupted and webui.shared.state.log == []  # the API job's Interrupt still stands
    assert webui.progress.pending_tasks == {} and webui.progress.log == []  # no longer counted in the queue
    # Train pressed again while the API job goes: it waits for its turn, then trains as the WebUI's wrapper does
    again = _in_thread(train, "task(2)", "an image")
    time.sleep(0.5)
    assert "value" not in again
    done.set()
    again["thread"].join(10)
    assert again["value"] == ["grids", "results", "pick", "trained<div>time taken</div>"]
    assert called[-1] == ("task(2)", True) and webui.shared.state.log == [("begin", "task(2)"), ("end",)]
    assert webui.progress.log == [("start", "task(2)"), ("results", "task(2)"), ("finish", "task(2)")]
    assert not webui.call_queue.queue_lock.held  # released after the call, an exception's too
    failing = gpu_call(lambda task, *args: 1 / 0, lambda task: False)
    with pytest.raises(ZeroDivisionError):
        failing("task(3)")
    assert not webui.call_queue.queue_lock.held
