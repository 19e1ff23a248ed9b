"""Canaries for the private Celery, kombu and billiard parts glyphq relies on (``tasks.private``).

Each fails on an upgrade that removes or changes what glyphq uses, before a worker would misbehave.
The end-to-end tests (``test_continuous``, ``test_handover``, ``faults``) show that they work.
"""

from __future__ import annotations

import inspect
import json
from importlib.metadata import version
from unittest import mock

import pytest
from billiard.einfo import ExceptionInfo
from billiard.exceptions import Terminated
from celery.worker import control as celery_control
from celery.worker import state
from celery.worker import strategy as celery_strategy
from celery.worker.consumer import consumer as celery_consumer
from celery.worker.request import Request
from kombu import Message
from kombu.transport import redis as kombu_redis

from glyphq.tasks import private


def test_versions_are_the_tested_ones():
    assert version("celery").startswith("5.7."), version("celery")
    assert version("kombu").startswith("5.7."), version("kombu")
    assert version("billiard").startswith("4.3."), version("billiard")


def test_default_strategy_takes_task_app_consumer():
    parameters = list(inspect.signature(celery_strategy.default).parameters)
    assert parameters[:3] == ["task", "app", "consumer"], parameters
    # It hands each ready request to ``consumer.on_task_request``, which the scheduler replaces.
    assert "on_task_request" in inspect.getsource(celery_strategy.default)


def test_task_ready_takes_a_request_out_of_the_reserved_and_active_sets():
    class Request:  # task_ready only needs a hashable request with a name and an id
        id = "canary"
        name = "glyphq.answer"

    request = Request()
    state.reserved_requests.add(request)
    state.active_requests.add(request)
    private.request_done(request, successful=True)
    assert request not in state.reserved_requests and request not in state.active_requests
    assert "successful" in inspect.signature(state.task_ready).parameters
    assert private.shutting_down() is False


def test_worker_init_comes_before_the_pool_class_is_resolved_so_a_gpu_worker_can_choose_solo():
    """Point 3: ``worker_init`` is sent after ``-Q`` is applied and before ``pool_cls`` is resolved into
    the pool the worker starts; glyphq sets ``pool_cls`` there."""
    from celery.concurrency.solo import TaskPool
    from celery.worker.worker import WorkController

    source = inspect.getsource(WorkController.setup_instance)
    queues = source.index("self.setup_queues(")
    sent = source.index("signals.worker_init.send(sender=self)")
    resolved = source.index("self.pool_cls = _concurrency.get_implementation(self.pool_cls)")
    assert queues < sent < resolved, "the order glyphq relies on"

    class Worker:
        pool_cls = "prefork"

    worker = Worker()
    private.use_solo_pool(worker)
    assert private.pool_class(worker) is TaskPool


def test_a_request_cancelled_on_a_lost_connection_goes_to_the_scheduler_that_holds_it():
    """Point 6: Celery's cancel names the pool; a GPU job's engine child is killed by the scheduler instead."""
    parameters = list(inspect.signature(Request.cancel).parameters)
    assert parameters[:3] == ["self", "pool", "signal"], parameters

    class Holder:
        def __init__(self) -> None:
            self.cancelled: list[str] = []

        def cancel(self, request: object) -> bool:
            self.cancelled.append(request.id)  # type: ignore[attr-defined]
            return True

        def terminate(self, request: object) -> bool:
            return False

    acks: list[object] = []
    request = _started_request(private.CancelledForRedelivery, acks)
    holder = Holder()
    private.set_request_handler(holder)
    try:
        pool = mock.Mock()
        request.cancel(pool)
        assert holder.cancelled == [request.id]
        pool.terminate_job.assert_not_called()
    finally:
        private.set_request_handler(None)


def test_kombu_close_reads_the_pending_brpop_reply():
    """celery/kombu#1733: the close that can raise on a lost connection, which the fix retries."""
    source = inspect.getsource(kombu_redis.Channel.close)
    if "glyphq_fix" in source or getattr(kombu_redis.Channel.close, "glyphq_fix", False):
        pytest.skip("the fix is installed in this process already")
    assert "_in_poll" in source and "_brpop_read" in source
    private.fix_kombu_close()
    fixed = kombu_redis.Channel.close
    private.fix_kombu_close()
    assert kombu_redis.Channel.close is fixed, "installed once"


def _started_request(request_class: type, acks: list[object]) -> Request:
    """A started ``glyphq.answer`` request of ``request_class``, on child pid 1234; its acks go to ``acks``."""
    import glyphq.tasks  # noqa: F401  (registers the tasks)
    from glyphq.tasks.app import app

    task = app.tasks["glyphq.answer"]
    sent = app.amqp.as_task_v2("canary-cancel", task.name, args=(), kwargs={"job": {}})
    message = Message(body=json.dumps(sent.body), headers=sent.headers, content_type="application/json",
                      content_encoding="utf-8", delivery_info={"routing_key": "gpu"}, properties=sent.properties,
                      channel=mock.Mock())
    request = request_class(message, app=app, task=task, on_ack=lambda *args: acks.append(args))
    request.on_accepted(1234, 0.0)
    return request


def _cancel_then_terminated(request: Request) -> tuple[mock.Mock, list[object]]:
    """Cancel ``request`` as a lost connection does, then end it as its killed child does: (pool, stores)."""
    pool = mock.Mock()
    with mock.patch.object(request.task.backend, "store_result") as store:
        request.cancel(pool)
        try:
            raise Terminated(-15)
        except Terminated:
            request.on_failure(ExceptionInfo())
    return pool, store.call_args_list


def test_a_lost_connection_cancels_each_running_request():
    """celery/celery#7185: Celery cancels the running late-ack requests when the broker connection is lost."""
    source = inspect.getsource(celery_consumer.Consumer.on_connection_error_after_connected)
    assert "worker_cancel_long_running_tasks_on_connection_loss" in source and "request.cancel(self.pool)" in source
    assert "emit_retry" in inspect.signature(Request.cancel).parameters


def test_celery_cancel_stores_retry_and_the_gpu_request_stores_nothing():
    pool, stores = _cancel_then_terminated(_started_request(Request, []))
    assert [call.args[2] for call in stores] == ["RETRY"], "Celery's own cancel writes to the result backend"

    acks: list[object] = []
    request = _started_request(private.CancelledForRedelivery, acks)
    pool, stores = _cancel_then_terminated(request)
    pool.terminate_job.assert_called_once_with(1234, mock.ANY)  # its child is stopped, as Celery does
    assert stores == [], "no RETRY, and no REVOKED once its child is gone"
    assert acks == [] and not request.acknowledged, "the message stays unacknowledged: Redis delivers it again"
    assert request not in state.active_requests


def test_revoke_terminate_flags_the_id_then_calls_request_terminate():
    """No upstream issue: Celery terminates a request by signalling its process, one process per request
    being its model. The GPU request's ``terminate`` ends one job of the running batch instead, which
    relies on the revoke control flagging the id as revoked first, so that ``Request.revoked`` announces it."""
    source = inspect.getsource(celery_control._revoke)
    flagged = source.index("worker_state.revoked.update(task_ids)")
    assert flagged < source.index("request.terminate(state.consumer.pool, signal=signum)")
    assert list(inspect.signature(Request.terminate).parameters) == ["self", "pool", "signal"]


def test_the_revoked_set_is_the_one_revoke_fills_and_requests_read():
    """No upstream issue (see point 7): the scheduler reads the set Celery's revoke control fills."""
    from celery.worker import request as celery_request

    assert celery_request.revoked_tasks is state.revoked
    assert "worker_state.revoked.update(task_ids)" in inspect.getsource(celery_control._revoke)
    state.revoked.add("canary-revoked")
    try:
        assert private.is_revoked("canary-revoked") and not private.is_revoked("canary-other")
    finally:
        state.revoked.discard("canary-revoked")


def test_a_gpu_request_no_scheduler_holds_is_terminated_as_celery_does():
    acks: list[object] = []
    request = _started_request(private.CancelledForRedelivery, acks)
    pool = mock.Mock()
    with mock.patch.object(request.task.backend, "store_result") as store:
        request.terminate(pool, signal="TERM")
    pool.terminate_job.assert_called_once_with(1234, 15)
    assert [call.args[2] for call in store.call_args_list] == ["REVOKED"]
    assert acks, "acknowledged"


def test_the_consumer_refuses_unknown_tasks_in_on_unknown_task_reading_the_id_header():
    from glyphq import celeryconfig

    assert celeryconfig.worker_consumer == "glyphq.tasks.private:GuardedConsumer"
    parameters = list(inspect.signature(celery_consumer.Consumer.on_unknown_task).parameters)
    assert parameters == ["self", "body", "message", "exc"], parameters
    source = inspect.getsource(celery_consumer.Consumer.create_task_handler)
    assert "on_unknown_task(None, message, exc)" in source
    assert "message.headers['id']" in inspect.getsource(celery_consumer.Consumer.on_unknown_task)


def test_uvicorn_h11_protocol_keeps_its_request_cycle_where_the_header_deadline_reads_it():
    """No upstream option (see point 9): uvicorn serves a real app with the protocol; a head trickled a byte at
    a time is cut off, on a new connection and on a kept-alive one, and a whole request is answered."""
    import socket
    import threading
    import time

    uvicorn = pytest.importorskip("uvicorn")
    from conftest import free_port

    assert version("uvicorn").startswith("0.54."), version("uvicorn")

    async def app(scope: dict, receive: object, send: object) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"ok"})  # type: ignore[operator]

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=private.header_deadline_protocol(1),
                                           lifespan="off", log_level="warning", timeout_keep_alive=30))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"

        def trickled_until_closed(sock: socket.socket) -> float:
            started = time.monotonic()
            sock.settimeout(0.2)
            for byte in request[:-2] * 10:
                try:
                    sock.send(bytes([byte]))
                    if sock.recv(100) == b"":
                        return time.monotonic() - started
                except TimeoutError:
                    continue
                except OSError:
                    return time.monotonic() - started
            return float("inf")

        with socket.create_connection(("127.0.0.1", port)) as fresh:
            assert trickled_until_closed(fresh) < 2.5
        with socket.create_connection(("127.0.0.1", port)) as kept:
            kept.sendall(request)
            assert kept.recv(1000).startswith(b"HTTP/1.1 200")
            time.sleep(1.5)  # longer than the deadline, idle: the keep-alive timeout's business, not the deadline's
            assert trickled_until_closed(kept) < 2.5
        with socket.create_connection(("127.0.0.1", port)) as whole:
            time.sleep(0.5)
            whole.sendall(request)
            assert whole.recv(1000).startswith(b"HTTP/1.1 200")
    finally:
        server.should_exit = True
        thread.join(10)
