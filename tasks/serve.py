"""In the GPU worker's engine child: serve the jobs the main process hands over, each answered the moment it ends.

:func:`child_main` is the child's whole life (``tasks.engine_process`` starts it): it loads the model
(``worker.runtime.Runtime``), reports "ready", and serves until it should leave. The main process
(``tasks.scheduler``) hands it each job through the channel (``tasks.channel``). The child keeps them
in a running batch (``worker.continuous``): when a slot is free it takes the jobs that
``worker.admission.decide`` picks (most urgent, then oldest), counts each one's run (the poison guard),
fetches its blobs and admits it. A turn of a session first takes the session's lock in Redis
(``worker.runtime.lock_session``), which the turns of every worker and child share; while another turn
holds it, the job waits here and is tried again every ``LOCK_RETRY_S``, and the jobs behind it start
meanwhile. Each job that ends is handled at once, here: its session turn appended, then its session's
lock released, its result stored with the result backend's ``mark_as_done`` (or ``mark_as_failure``),
its blobs released, and a report sent that lets the main process acknowledge its message and send
Flower its task-succeeded or task-failed event.

Besides jobs, the channel carries control frames: "cancel" (a ``celery revoke --terminate``: the job is
dropped, from the queue or from its row, which frees its slot while the others decode on; nothing is
stored for it, and its "revoked" report lets the main process announce it) and "last" (the main process
hands this child no more jobs: it leaves once those it holds have ended). When the worker stops, the
channel's draining flag tells the child to start nothing more; a memory guard does the same. Either
way the child leaves once the jobs it runs have ended, and what it had not started goes to the next child.

A job submitted with ``stream=True`` has its text published as it is written (``producer.stream``):
each decode chunk feeds its rows' new ids to their ``worker.streaming.TextStream``, and the text they
add goes to Redis in one round trip at most every ``PUBLISH_EVERY_S``, from a thread of its own
(``producer.stream.Publisher``), so the decode loop never waits for Redis; the rest of the text and the
stream's end follow once the job's outcome is stored. A failed append is logged, never fails a job.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, NoReturn

from celery import states
from celery.app.task import Context

from glyphq.celeryconfig import PRIORITY_LEVELS, Settings, settings
from glyphq.producer import stream
from glyphq.producer.options import celery_priority
from glyphq.tasks.answer import JOB_MESSAGE
from glyphq.tasks.app import app
from glyphq.tasks.blobs import release_finished
from glyphq.tasks.channel import Channel
from glyphq.tasks.messages import context
from glyphq.worker import admission, status

log = logging.getLogger(__name__)

#: How long an idle child waits for the channel before it looks at the draining flag again.
IDLE_S = 0.25
#: Shortest wait for the channel while jobs are queued that cannot start yet.
POLL_S = 0.01
#: How long a turn whose session's lock another turn holds waits before it tries again.
LOCK_RETRY_S = 0.1
#: The same after Redis failed to answer.
LOCK_ERROR_RETRY_S = 1.0
#: How often a busy child frees what its batch no longer uses, reads GPU memory and checks the GPU
#: guard (an idle one does at once). Emptying the CUDA cache waits for the GPU's queued steps.
TIDY_S = 30.0
#: Longest wait, as the child leaves, for the streamed text still queued to be appended.
PUBLISH_CLOSE_S = 2.0
#: The exit status of a child whose running batch failed (``os.EX_SOFTWARE``).
EXIT_BATCH_FAILED = 70


@dataclass
class _Job:
    """One handed-over job as the child holds it."""

    message: dict[str, Any]
    order: int
    fetched: Any = None  # worker.runtime.Fetched once admitted
    history: list[dict[str, str]] = field(default_factory=list)
    started: float = 0.0  # time.time() at admission
    started_monotonic: float = 0.0
    earlier_runs: int | None = None  # starts counted before this delivery (read for redelivered jobs)
    locked: str | None = None  # the session whose lock this job holds
    text: Any = None  # worker.streaming.TextStream of a job submitted with stream=True
    entries: int = 0  # text entries published in this run
    unsent: list[str] = field(default_factory=lambda: ["", ""])  # reasoning and answer text not yet published

    @property
    def id(self) -> str:
        return str(self.message.get("id"))

    @property
    def redelivered(self) -> bool:
        return bool((self.message.get("delivery_info") or {}).get("redelivered"))

    @property
    def session(self) -> str | None:
        """The session this job is a turn of, as its message names it (checked when it is fetched)."""
        kwargs = self.message.get("kwargs")
        job = kwargs.get("job") if isinstance(kwargs, dict) else None
        session = job.get("session") if isinstance(job, dict) else None
        return session if isinstance(session, str) and session else None

    @property
    def priority(self) -> int:
        priority = self.message.get("priority")
        return priority if isinstance(priority, int) else 9

    def context(self) -> Context:
        """The request as the result backend records it (``result_extended``)."""
        return context(self.message)


class Server:
    """The child's side of the channel: serve the jobs handed over until this child leaves (see the module
    docstring). ``life`` is the child's loaded ``worker.runtime.Runtime``."""

    def __init__(self, channel: Channel, life: Any) -> None:
        from glyphq.worker.continuous import Continuous

        self.channel = channel
        self.life = life
        self.engine = life.engine
        # The slots kept for urgent jobs take glyphq priority 9 (sent to Redis as 0) only.
        self.running = Continuous(self.engine, settings.max_image_size,
                                  urgent_priority=celery_priority(PRIORITY_LEVELS - 1), on_tokens=self._on_tokens)
        self.queued: list[_Job] = []
        self.sessions: set[str] = set()  # the sessions whose lock a job of this child holds
        # Sessions whose lock another job holds: when to try again (monotonic), and that job's id.
        self.locked_elsewhere: dict[str, tuple[float, str]] = {}
        self.alone: _Job | None = None  # a job whose last run died, running by itself
        self.draining = False  # the worker is stopping: start nothing more
        self.last = False  # the main process hands this child no more jobs: leave once they have ended
        self.tidied = time.monotonic()
        self.untidy = True  # a batch ran since the last tidy while idle
        self._order = 0
        self.unpublished: dict[str, _Job] = {}  # streamed jobs with text not yet published, by id
        self.ended_streams: list[tuple[str, dict[str, str]]] = []
        self.published = 0.0  # time.monotonic() of the last append
        self.publisher = stream.Publisher(self._redis)
        self.streaming_s = 0.0  # spent on streamed text: decoding, splitting, appending

    def run(self) -> str:
        """Serve until this child should leave (see the module docstring); returns why: ``tasks`` (the
        main process handed it its last job), ``drain`` (the worker stops), ``rss`` or ``gpu`` (a guard)."""
        started = time.perf_counter()
        try:
            return self._serve()
        finally:
            self.running.close()
            self.publisher.close(timeout=PUBLISH_CLOSE_S)
            if self.streaming_s:
                log.info("streamed text took %.3f s of this child's %.3f s serving", self.streaming_s,
                         time.perf_counter() - started)

    def stopping(self) -> bool:
        """Whether this child starts no new job: the worker drains, or a memory guard asked for its
        replacement (what it holds and has not started goes back to the main process)."""
        return self.draining or self.life.leaving is not None

    def _serve(self) -> str:
        while True:
            wait = self._wait()
            self.draining = self.draining or self.channel.draining()
            for message in self.channel.receive(wait):
                control = message.get("control")
                if control == "cancel":
                    self._cancel(str(message.get("id")))
                elif control == "last":
                    self.last = True
                elif control is None:
                    self._order += 1
                    self.queued.append(_Job(message, self._order))
            if not self.stopping():
                self._admit()
            if self.running.busy:
                self.untidy = True
                try:
                    ended = self.running.step()
                except Exception as exc:  # the step itself failed, not one job
                    self._leave(exc)
                for finished in ended:
                    self._finish(finished.key, finished.outcome)
                self._publish()
                if time.monotonic() - self.tidied >= TIDY_S:
                    self._tidy(idle=False)
                continue
            if self.untidy:
                self._tidy(idle=True)
                self.untidy = False
            if self.stopping():
                return "drain" if self.draining else str(self.life.leaving)
            if self.last and not self.queued:
                return "tasks"

    def _wait(self) -> float:
        """How long to wait for the channel: not at all while rows decode; with none decoding, the jobs
        still queued are turns waiting for their session's lock (``locked_elsewhere``)."""
        if self.running.busy:
            return 0.0
        if not self.queued:
            return IDLE_S
        next_try = min((at for at, _ in self.locked_elsewhere.values()), default=0.0) - time.monotonic()
        return min(IDLE_S, max(POLL_S, next_try))

    def _tidy(self, idle: bool) -> None:
        self.life.tidy(idle)
        self.tidied = time.monotonic()

    def _admit(self) -> None:
        """Start the queued jobs that ``worker.admission.decide`` picks, in its order: most urgent, then
        oldest, while the running batch has rows for them; a job whose last run died with its child alone;
        one turn of a session at a time. A lock refused by Redis here means a decision made with one job
        too many: it is recorded and the rest is decided again."""
        now = time.monotonic()
        self.locked_elsewhere = {session: held for session, held in self.locked_elsewhere.items() if held[0] > now}
        for _ in range(len(self.queued) + 1):  # each round after the first follows a refused lock, now recorded
            by_order = {job.order: job for job in self.queued}
            decision = admission.decide([self._queued(job) for job in self.queued], self._engine_state())
            for chosen in decision.start:
                job = by_order[chosen.order]
                if not self._lock_session(job):
                    break  # Redis refused or failed: decide again without it
                self.queued.remove(job)
                self._start(job)
                if chosen is decision.alone and job.fetched is not None:
                    self.alone = job
                    log.info("Task %s[%s] runs alone: its last run ended with its child", job.message.get("task"),
                             job.id)
            else:
                return

    def _queued(self, job: _Job) -> admission.Queued:
        return admission.Queued(id=job.id, priority=job.priority, order=job.order, session=job.session,
                                died_before=self._died_before(job))

    def _engine_state(self) -> admission.EngineState:
        return admission.EngineState(rows=self.running.snapshot(), alone=self.alone is not None,
                                     sessions_here=frozenset(self.sessions),
                                     locked_elsewhere={session: holder
                                                       for session, (_, holder) in self.locked_elsewhere.items()},
                                     stopping=self.stopping())

    def _lock_session(self, job: _Job) -> bool:
        """Take the lock of ``job``'s session in Redis (True for a job of no session), which
        ``worker.admission.decide`` found free here and not known to be held elsewhere; a refusal is
        recorded in ``locked_elsewhere``, with when to try again."""
        from glyphq.worker import runtime

        session = job.session
        if session is None:
            return True
        try:
            holder = runtime.lock_session(session, job.id)
        except Exception:  # noqa: BLE001  (Redis did not answer: the turn waits, the child serves on)
            log.warning("could not take the lock of session %s for %s; trying again in %.1f s", session, job.id,
                        LOCK_ERROR_RETRY_S, exc_info=True)
            self.locked_elsewhere[session] = (time.monotonic() + LOCK_ERROR_RETRY_S, "")
            return False
        if holder != job.id:
            self.locked_elsewhere[session] = (time.monotonic() + LOCK_RETRY_S, holder)
            return False
        self.locked_elsewhere.pop(session, None)
        job.locked = session
        self.sessions.add(session)
        return True

    def _unlock_session(self, job: _Job) -> None:
        """Release the lock ``job`` holds, if any: the next turn of its session may start, here or elsewhere."""
        from glyphq.worker import runtime

        session, job.locked = job.locked, None
        if session is None:
            return
        self.sessions.discard(session)
        self.locked_elsewhere.pop(session, None)  # a turn of it waiting here tries at once
        try:
            runtime.unlock_session(session, job.id)
        except Exception:  # noqa: BLE001  (it expires by itself; until then the session's next turn waits)
            log.warning("could not release the lock of session %s held by %s; it expires by itself", session,
                        job.id, exc_info=True)

    def _died_before(self, job: _Job) -> bool:
        """Whether ``job`` was started before and never ended: redelivered, with a run counted (read
        once, before this run counts). Unknown counts as yes."""
        from glyphq.worker import runtime

        if not job.redelivered:
            return False
        if job.earlier_runs is None:
            try:
                job.earlier_runs = runtime.earlier_runs(job.id)
            except Exception:  # noqa: BLE001  (Redis unreadable or a bad value: run it alone, to be safe)
                log.warning("could not read the runs of %s; it runs alone", job.id, exc_info=True)
                job.earlier_runs = 1
        return job.earlier_runs > 0

    def _start(self, job: _Job) -> None:

        if job.redelivered and self._succeeded(job.id):
            self._unlock_session(job)
            self.channel.report({"id": job.id, "event": "duplicate"})  # worker_deduplicate_successful_tasks
            return
        job.started, job.started_monotonic = time.time(), time.monotonic()
        self.channel.report({"id": job.id, "event": "started", "pid": os.getpid(), "at": job.started_monotonic})
        try:
            builder = JOB_MESSAGE[str(job.message.get("task"))]
            raw = builder(*(job.message.get("args") or ()), **(job.message.get("kwargs") or {}))
            if app.conf.task_track_started:
                app.backend.store_result(job.id, {"pid": os.getpid(), "hostname": job.message.get("hostname")},
                                         states.STARTED, request=job.context())
            job.fetched = self.life.fetch(job.id, raw)
            job.history = self.life.history(job.fetched)
        except Exception as exc:
            self._finish(job, exc)
            return
        if job.fetched.job.stream:
            from glyphq.worker.streaming import TextStream

            job.text = TextStream(self.engine.processor.tokenizer, tags=self.engine.reasoning is not None)
        self.running.add(job, self.life.engine_job(job.fetched, job.history), job.priority,
                         deadline=job.started_monotonic + settings.soft_time_limit_s)

    def _leave(self, exc: BaseException) -> NoReturn:
        """Exit this child after a failed decode step or a failed device: the jobs it holds are not
        failed but given back, as when a child dies (``tasks.scheduler``): the ones it started come
        back through Redis as redelivered, each counted as a run, and a successor with a fresh device
        context answers them."""
        held = len(self.queued) + self.running.held
        log.critical("the running batch failed (%s: %s); this child exits and its %d job(s) go to its successor",
                     type(exc).__name__, exc, held, exc_info=exc)
        _exit(self.channel, {"event": "leaving", "reason": "failed"}, EXIT_BATCH_FAILED)

    def _succeeded(self, task_id: str) -> bool:
        try:
            return bool(app.backend.get_state(task_id) == states.SUCCESS)
        except Exception:  # noqa: BLE001  (unknown: run it, as Celery's tracer would)
            return False

    def _finish(self, job: _Job, outcome: Any) -> None:
        """Store the job's result or failure, release what it held, and report it to the main process."""
        from glyphq.worker import metrics
        from glyphq.worker.continuous import DeadlinePassed

        if isinstance(outcome, DeadlinePassed):
            from billiard.exceptions import SoftTimeLimitExceeded

            outcome = SoftTimeLimitExceeded(str(outcome))
        runtime_s = time.monotonic() - job.started_monotonic if job.started_monotonic else 0.0
        name = str(job.message.get("task"))
        ok = not isinstance(outcome, BaseException)
        try:
            try:
                if ok:
                    result = self.life.output(job.fetched, outcome, job.history, job.started)
                    self.life.record_turn(job.fetched, outcome)
            finally:
                self._ended(job)  # after its turn is recorded, so the next turn of its session sees it
            if ok:
                app.backend.mark_as_done(job.id, result, request=job.context())
                metrics.job_answered(result)
                metrics.batch_answered(int(result["worker"]["batch_size"]))
                log.info("Task %s[%s] succeeded in %.3fs: %d tokens", name, job.id, runtime_s, result["tokens_out"])
            else:
                app.backend.mark_as_failure(job.id, outcome, request=job.context())
                log.info("Task %s[%s] failed in %.3fs: %s: %s", name, job.id, runtime_s, type(outcome).__name__,
                         outcome)
        except Exception:  # the backend retried and gave up: the message stays unacknowledged and comes back
            log.exception("could not store the outcome of %s[%s]", name, job.id)
            self.channel.report({"id": job.id, "event": "unstored"})
            return
        state = states.SUCCESS if ok else states.FAILURE
        if job.text is not None:
            if ok:
                self._add_text(job, job.text.finish(result.get("reasoning"), result.get("answer") or ""))
            self._end_stream(job, state)
        metrics.job_finished(name, state)
        release_finished(name, job.id, job.message.get("args") or (), job.message.get("kwargs") or {}, state)
        self.life.after_job()
        self.channel.report({"id": job.id, "event": "succeeded" if ok else "failed", "runtime": round(runtime_s, 6),
                             "exception": None if ok else f"{type(outcome).__name__}({str(outcome)[:500]!r})",
                             "successor_fits": self.life.successor_fits()})

    def _ended(self, job: _Job) -> None:
        """A started job is no longer running: the next turn of its session may start, and so may
        other jobs, if it ran alone."""
        self._unlock_session(job)
        if self.alone is job:
            self.alone = None

    def _cancel(self, task_id: str) -> None:
        """Drop a revoked job (``celery revoke --terminate``) while the others decode on, and report it
        "revoked": the main process acknowledges it, stores REVOKED and releases its blobs. A job that
        has ended already keeps its outcome; the cancel came too late and is ignored."""

        job = next((job for job in self.queued if job.id == task_id), None)
        if job is not None:
            self.queued.remove(job)
            log.info("Task %s[%s] revoked before it started", job.message.get("task"), task_id)
        else:
            job = next((key for key in self.running.in_hand() if key.id == task_id), None)
            if job is None or not self.running.cancel(job):
                return
            self._ended(job)
            self.life.after_job()  # its run was counted when it started
            log.info("Task %s[%s] revoked: its row left the running batch", job.message.get("task"), task_id)
            if job.text is not None:
                self._end_stream(job, states.REVOKED)
        self.channel.report({"id": task_id, "event": "revoked"})

    # -- streamed text --------------------------------------------------------------------------

    def _on_tokens(self, job: _Job, ids: list[int]) -> None:
        """The running batch's call per row and decode chunk: the new text of a streamed job, kept to publish."""
        if job.text is None or not ids:
            return
        started = time.perf_counter()
        try:
            self._add_text(job, job.text.feed(ids))
        except Exception:  # noqa: BLE001  (a stream never fails its job: the result still has all the text)
            log.warning("streaming the text of %s failed; the rest comes with its result", job.id, exc_info=True)
            job.text = None
        self.streaming_s += time.perf_counter() - started

    def _add_text(self, job: _Job, added: dict[str, str]) -> None:
        reasoning, answer = added.get(stream.REASONING, ""), added.get(stream.ANSWER, "")
        if reasoning or answer:
            job.unsent[0] += reasoning
            job.unsent[1] += answer
            self.unpublished[job.id] = job

    def _end_stream(self, job: _Job, state: str) -> None:
        """A streamed job ended: its last text and the stream's end go out now."""
        self.ended_streams.append((job.id, stream.end_entry(state)))
        job.text = None
        self._publish(now=True)

    def _publish(self, now: bool = False) -> None:
        """Hand the text kept since the last append to the publisher, one entry per job, at most every
        ``PUBLISH_EVERY_S``."""
        if not (self.unpublished or self.ended_streams):
            return
        if not now and time.monotonic() - self.published < stream.PUBLISH_EVERY_S:
            return
        started = time.perf_counter()
        entries = []
        for job in self.unpublished.values():
            job.entries += 1
            entries.append((job.id, stream.text_entry(job.entries, *job.unsent)))
            job.unsent = ["", ""]
        self.publisher.send(entries + self.ended_streams)
        self.unpublished, self.ended_streams = {}, []
        self.published = time.monotonic()
        self.streaming_s += time.perf_counter() - started

    def _redis(self) -> Any:
        from glyphq.producer.store import settings_client

        return settings_client(settings)


@dataclass(frozen=True)
class ChildSpec:
    """Everything an engine child starts from, passed as the argument of :func:`child_main`."""

    channel: Channel
    parent: int  # the pid of the worker's main process
    predecessor: int | None = None  # the pid of the child this one takes over from
    buckets: tuple[tuple[int, int], ...] = ()  # the predecessor's decode steps (rows, cache length) to warm
    config: Settings = settings


#: Exit statuses of an engine child: it left as asked, its model could not load, its running batch failed.
EXIT_LEFT = 0
EXIT_MODEL_ERROR = 3


def child_main(spec: ChildSpec) -> None:
    """An engine child's whole life (``tasks.engine_process``): load the model, report "ready", serve
    until it should leave, report "leaving" with the reason, and exit. A model that cannot load is
    reported ("model_error"), and the main process stops the worker: the jobs stay queued."""
    from glyphq.worker.errors import NoRoomToTakeOver
    from glyphq.worker.runtime import Runtime

    _reset_signals()
    _die_with(spec.parent)
    channel = spec.channel
    channel.child_side()
    status.send_to(lambda fields: channel.report({"event": "status", "fields": fields}))
    life = Runtime(spec.config, on_recycle=lambda reason, detail: channel.report(
        {"event": "recycle", "reason": reason, "detail": detail}))
    try:
        life.load(spec.predecessor, spec.buckets)
    except NoRoomToTakeOver as exc:
        log.warning("%s; this child leaves", exc)
        _exit(channel, {"event": "leaving", "reason": "no room"}, EXIT_LEFT)
    except Exception as exc:  # noqa: BLE001  (whatever it is, the worker cannot answer without a model)
        log.critical("model %r failed to load; stopping the worker, queued jobs stay queued", spec.config.model,
                     exc_info=True)
        _exit(channel, {"event": "model_error", "error": f"{spec.config.model}: {type(exc).__name__}: {exc}"[:2000]},
              EXIT_MODEL_ERROR)
    channel.report({"event": "ready", "pid": os.getpid()})
    reason = Server(channel, life).run()
    _exit(channel, {"event": "leaving", "reason": reason}, EXIT_LEFT)


def _exit(channel: Channel, report: dict[str, Any], code: int) -> NoReturn:
    """Send the last report, flush the log and leave at once (the main process's exit handlers are not this
    child's to run)."""
    channel.report(report)
    channel.flush(timeout=5.0)
    logging.shutdown()
    os._exit(code)


#: Signals an engine child takes back to their default (the main process's handlers are Celery's) and ignores
#: (Ctrl+C in a terminal reaches the whole process group; the main process drains the child).
_DEFAULT_SIGNALS = ("SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGTTIN", "SIGTTOU", "SIGCHLD")
_IGNORED_SIGNALS = ("SIGINT",)


def _die_with(parent: int) -> None:
    """Have the kernel kill this child when the worker's main process ends (on Linux): a child left
    behind would hold the GPU, and run jobs no process acknowledges."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it ended before the line above
        os._exit(EXIT_LEFT)


_PR_SET_PDEATHSIG = 1


def _reset_signals() -> None:
    for name in _DEFAULT_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_DFL)
    for name in _IGNORED_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)
