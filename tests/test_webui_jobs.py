"""Background jobs for the HTTP API: progress, results, interrupt, failures, and the host's lock held throughout."""

import threading
import time

import pytest

from lib_copier.errors import CopierError, Interrupted
from lib_copier.train.trainer import Cancelled, Progress, TrainResult
from lib_copier.webui.jobs import JobRunner, in_own_thread


class RecordingLock:
    def __init__(self):
        self.lock, self.held = threading.Lock(), False

    def __enter__(self):
        self.lock.acquire()
        self.held = True

    def __exit__(self, *exc):
        self.held = False
        self.lock.release()


def fake_training(steps: int, seen_lock: list | None = None, lock: RecordingLock | None = None):
    """Stands in for run_job: reports progress through the state's callbacks and honours interrupts."""

    def work(state):
        callbacks = state.callbacks()
        state.on_stage("copier")
        for step in range(1, steps + 1):
            if callbacks.cancelled():
                raise Cancelled(TrainResult(network=None, steps=step - 1, seconds=0.0))
            if seen_lock is not None:
                seen_lock.append(lock.held)
            callbacks.progress(Progress(step, steps, 0.5 / step, 1e-3, 0.01 * step))
        return [{"name": "cat-copier", "lora": "/loras/cat-copier.safetensors"}]

    return work


def test_a_job_reports_progress_and_results_under_the_lock():
    lock = RecordingLock()
    runner, seen = JobRunner(lock), []
    state = runner.wait(runner.submit(fake_training(5, seen, lock)).id, timeout=10)
    report = state.as_dict()
    assert report["status"] == "done" and report["stage"] == "copier"
    assert (report["step"], report["total"], report["eta"]) == (5, 5, None)  # an ended job has no time left
    assert report["results"][0]["name"] == "cat-copier" and report["error"] == ""
    assert seen == [True] * 5 and not lock.held


def test_an_interrupted_job_stops_between_steps():
    lock, stopped = RecordingLock(), []
    runner = JobRunner(lock, stop_host=lambda: stopped.append("the WebUI's work"))
    with lock:  # another WebUI task holds the queue: the job waits, then is interrupted before it starts
        state = runner.submit(fake_training(1000))
        runner.interrupt(state.id)
    assert runner.wait(state.id, timeout=10).status == "interrupted" and state.step == 0
    assert stopped == []  # what held the queue was not the job's to stop
    gate = threading.Event()

    def slow(state):
        state.callbacks().progress(Progress(1, 3, 0.1, 1e-3, 0.1))
        gate.wait(5)
        if state.callbacks().cancelled():
            raise Cancelled(TrainResult(network=None, steps=1, seconds=0.1))
        return []

    running = runner.submit(slow)
    for _ in range(500):
        if running.step == 1:
            break
        threading.Event().wait(0.01)
    runner.interrupt(running.id)
    gate.set()
    assert runner.wait(running.id, timeout=10).status == "interrupted" and running.results == []
    # A running job holds the WebUI's queue: what the WebUI draws then (the job's original, a grid image) stops too
    assert stopped == ["the WebUI's work"]


def test_an_interrupted_job_says_where_it_stopped_and_what_it_kept():
    """Interrupted while drawing the grids, with its LoRAs kept: it read "failed", with no word of the files."""
    runner = JobRunner(threading.Lock())

    def stopped(state):
        raise Interrupted("interrupted while drawing the strength grids; kept cat-copier")

    state = runner.wait(runner.submit(stopped).id, timeout=10)
    assert (state.status, state.error) == (
        "interrupted",
        "interrupted while drawing the strength grids; kept cat-copier",
    )


def test_failures_are_recorded_in_one_sentence():
    runner = JobRunner(threading.Lock())

    def bad_input(state):
        raise CopierError("the image is not a PNG, JPEG or WebP file")

    def bug(state):
        raise ValueError("shape mismatch")

    assert runner.wait(runner.submit(bad_input).id, 10).error == "the image is not a PNG, JPEG or WebP file"
    failed = runner.wait(runner.submit(bug).id, 10)
    assert failed.status == "failed" and failed.error == "ValueError: shape mismatch"
    with pytest.raises(CopierError, match="there is no job 'nope'"):
        runner.get("nope")


def test_only_the_newest_finished_jobs_are_kept():
    runner = JobRunner(threading.Lock(), keep=3)
    ids = [runner.wait(runner.submit(fake_training(1)).id, 10).id for _ in range(5)]
    assert set(runner.jobs) == set(ids[-3:])


def test_jobs_posted_at_once_from_many_threads_are_all_accepted():
    """FastAPI runs the routes in a thread pool: forgetting old jobs while another request added one raised a
    KeyError, which the client got as a 500."""
    import sys

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch as often as they can
    runner, errors = JobRunner(threading.Lock(), keep=3), []

    def client():
        for _ in range(200):
            try:
                runner.submit(lambda state: [])
            except Exception as exc:  # noqa: BLE001 - what the route would answer with a 500
                errors.append(exc)

    try:
        clients = [threading.Thread(target=client) for _ in range(8)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    for state in runner.states():
        runner.wait(state.id, 10)
    runner.wait(runner.submit(lambda state: []).id, 10)
    assert len(runner.states()) == 3  # the newest finished ones


def test_queued_jobs_say_their_place_and_an_interrupted_one_says_so_at_once():
    lock = RecordingLock()
    runner = JobRunner(lock)
    with lock:  # a generation holds the WebUI's queue
        first, second = runner.submit(fake_training(1)), runner.submit(fake_training(1))
        assert runner.describe(first.id)["queue_position"] == 0
        assert runner.describe(second.id)["queue_position"] == 1
        runner.interrupt(first.id)
        said = runner.describe(first.id)
        assert said["status"] == "interrupted"  # before the lock is free
        assert said["error"] == "interrupted while it waited for its turn: nothing was trained"  # not empty
        assert runner.describe(second.id)["queue_position"] == 0
    assert runner.wait(second.id, timeout=10).status == "done"
    assert runner.wait(first.id, timeout=10).status == "interrupted" and first.results == []
    assert "queue_position" not in runner.describe(second.id)


def test_a_failed_job_says_so_on_the_console(capsys):
    runner = JobRunner(threading.Lock())

    def broken(state):
        raise RuntimeError("the GPU fell off")

    runner.wait(runner.submit(broken).id, timeout=10)
    err = capsys.readouterr().err
    assert "Copier LoRA: job" in err and "failed: RuntimeError: the GPU fell off" in err and "Traceback" in err


def test_the_tab_trains_in_a_thread_of_its_own_that_has_ended_when_it_returns():
    """Not in gradio's long-lived worker threads, each of which would keep the memory a training freed."""
    seen = []

    def work():
        seen.append(threading.current_thread())
        return ["result"]

    assert in_own_thread(work) == ["result"]
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()

    def fails():
        raise CopierError("the original is 8x8 px")

    with pytest.raises(CopierError, match="the original is 8x8 px"):
        in_own_thread(fails)


def test_the_tab_knows_when_an_api_job_waits_or_runs(monkeypatch):
    # The 🧬 button then says a run is going instead of queueing one more behind it.
    from lib_copier.webui import extension

    runner, release = JobRunner(threading.Lock()), threading.Event()
    monkeypatch.setattr(extension, "_runner", runner)
    assert not extension.busy()
    first = runner.submit(lambda state: release.wait() and [])
    second = runner.submit(lambda state: [])
    assert extension.busy()  # one running, one queued
    release.set()
    for state in (first, second):
        assert runner.wait(state.id, timeout=10).status == "done"
    assert not extension.busy()


def test_reload_ui_ends_the_queued_jobs_and_stops_the_running_one(monkeypatch):
    """A queued job stayed "queued" after Reload UI, forever: counted ahead of new jobs, and the 🧬 button said a
    run was going until the WebUI restarted."""
    from lib_copier.webui import extension

    stopped = []
    runner = JobRunner(threading.Lock(), stop_host=lambda: stopped.append(True))
    monkeypatch.setattr(extension, "_runner", runner)
    started = threading.Event()

    def training(state):
        started.set()
        while not state.interrupted.is_set():
            time.sleep(0.01)
        raise Interrupted("interrupted at step 1/100")

    running, queued = runner.submit(training), runner.submit(fake_training(1))
    started.wait(10)
    extension.on_before_reload()
    assert runner.describe(queued.id)["status"] == "interrupted" and stopped == [True]
    assert runner.wait(running.id, timeout=10).status == "interrupted"
    assert runner.wait(queued.id, timeout=10).results == [] and not extension.busy()
