"""The site's one place that reaches into Flower's internals.

Everything the site's transport needs of Flower beyond its public API (``flwr.app``,
``flwr.clientapp``, the names ``flwr.common`` exports) is here: the SuperNode loop's attributes the
shell replaces, the Runtime API calls the warm worker's task loop makes in place of a
``flwr-clientapp`` process, and Flower's protobuf form of a message for the worker's socket.
``tests/test_layers.py`` fails when a Flower internal is imported anywhere else on the site's
side; ``tests/test_flower_adapter.py`` fails when the installed Flower no longer has what a
function here relies on (a module attribute, a signature, a private field).

Written against flwr 1.41 (``pyproject.toml`` allows ``>=1.41,<1.43``); each piece is unchanged
in flwr 1.42. Flower is imported inside the functions: the forwarder's per-message process
imports this module and must stay light (``tests/test_worker.py``).

Patches change one attribute of one Flower module, in the process that asks for it (the
SuperNode shell's), after checking the module still has the shape it was written for; if it
does not, they change nothing and return False, and the caller logs it. Nothing fails.
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable

from dicomfl.common.flowerpatch import module_function_taking

#: The keywords of Flower's ``pull_objects`` (``flwr.supercore.inflatable.inflatable_utils``)
#: that the patches set: its back-off and its limits.
PULL_KEYWORDS = ("initial_backoff", "backoff_cap", "max_tries_per_object", "max_time")

#: The Runtime API's method that the SuperExec secret signs (flwr 1.41: ``protected_methods`` of
#: ``SuperExecAuthHttpInterceptor`` names the gRPC path).
_ACQUIRE = "/flwr.proto.Runtime/AcquireTask"


# ------------------------------------------------------------------------ the SuperNode loop
def _supernode_loop():
    # flwr 1.41/1.42: the SuperNode's main loop, with its module-level ``time`` and its own
    # ``pull_objects`` name (imported from inflatable_utils), is this module.
    import flwr.supernode.start_client_internal as loop

    return loop


def patch_supernode_waits(clock, pull_defaults: dict) -> bool:
    """Give the SuperNode loop's module ``clock`` as its ``time`` and Flower's own
    ``pull_objects`` with ``pull_defaults`` as keyword defaults; False (nothing changed) if the
    module does not have the expected shape.

    Why: the loop sleeps a fixed ``time.sleep(3)`` between asks for a message when idle and
    0.5 s between looks for a reply in its own memory, and pulls a message's objects with
    ``pull_objects``' defaults (1 s back-off, doubling to 10 s); flwr 1.41 has no flag, config
    key or environment variable for any of them. Replacing the module's ``time`` and
    ``pull_objects`` names changes them for this loop only: ``time`` itself and Flower's
    function, for every other user, stay as they are. Relies on (flwr 1.41): a module-level
    ``time`` that is the ``time`` module, ``start_client_internal`` in the module, and a
    module-level ``pull_objects`` taking :data:`PULL_KEYWORDS`.
    """
    loop = _supernode_loop()
    if getattr(loop, "time", None) is not time or not callable(getattr(loop, "start_client_internal", None)):
        return False
    pull = module_function_taking(loop, "pull_objects", PULL_KEYWORDS)
    if pull is None:
        return False
    loop.time = clock
    loop.pull_objects = functools.partial(pull, **pull_defaults)
    loop.pull_objects._dicomfl_wrapper = True
    return True


def call_after_stored_message(callback: Callable[[], object], marker: object) -> bool:
    """Call ``callback()`` each time the SuperNode loop has stored a message and pulled all of its
    objects; False (nothing changed) if the loop has no such function or ``callback`` was
    installed already (``marker``: what the installed wrapper carries).

    Why: the warm worker learns of a message at once instead of at its next ask. Flower 1.41 has
    no hook for it; the loop's private ``_pull_and_store_message`` returns the run id of a stored
    message (None: none), which is the moment. Relies on (flwr 1.41): that function, module-level,
    looked up by name from the loop on each iteration.
    """
    loop = _supernode_loop()
    pulled = getattr(loop, "_pull_and_store_message", None)
    if not callable(pulled) or getattr(pulled, "_dicomfl_wakes", None) is not None:
        return False

    def pull_and_store_then_call(*args, **kwargs):
        run_id = pulled(*args, **kwargs)
        if run_id is not None:  # a message is in the SuperNode's memory, with all of its objects
            callback()
        return run_id

    pull_and_store_then_call._dicomfl_wakes = marker
    loop._pull_and_store_message = pull_and_store_then_call
    return True


def run_flower_supernode(args: list[str]) -> int:
    """Flower's own ``flower-supernode`` entry point with ``args`` (in this process, so that the
    patches above hold). Relies on (flwr 1.41): ``flwr.supernode.cli.flower_supernode`` reading
    ``sys.argv``; it is the console script ``flower-supernode`` itself."""
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *args]
    return flower_supernode() or 0


# ---------------------------------------------------------------------- the Runtime API calls
# What a ``flwr-clientapp`` process does with its SuperNode's Runtime API (flwr 1.41,
# ``flwr/supernode/runtime/run_clientapp.py`` and ``flwr/supercore/runtime``), made by the warm
# worker's task loop (:mod:`dicomfl.client.transport.tasks`) in its own long-lived process.
def runtime_client(address: str, interceptors: list):
    """A Runtime API client for ``address`` (``host:port``, loopback, plain HTTP), with
    Flower's version header and ``interceptors``.

    No Flower retry invoker: on a 401 it sends SIGINT to its own process (right for a
    flwr-clientapp process, fatal for the worker). A failed call raises; the task loop retries
    with its own back-off. Relies on (flwr 1.41): ``RuntimeHttpClient.from_server_address`` with
    these keywords and ``RuntimeVersionHttpInterceptor(component_name=...)``."""
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"), *interceptors],
        retry_invoker=None)


def acquire_auth(secret: bytes):
    """The interceptor that signs ``AcquireTask`` with the SuperExec secret (what a SuperExec
    does; the SuperNode was started with ``--superexec-auth-secret-file``)."""
    from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor

    return SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={_ACQUIRE})


def token_auth(token: str):
    """The interceptor that carries one task's token (every call about that task)."""
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor

    return RuntimeTokenHttpInterceptor(token)


def acquire_request():
    """The ``AcquireTask`` request for a ClientApp task."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module
    from flwr.supercore.constant import TaskType

    return AcquireTaskRequest(supported_task_types=[str(TaskType.CLIENT_APP)])


def acquire_task(client, request) -> str | None:
    """Ask for a task: its token, or None when none is waiting."""
    res = client.AcquireTask(request)
    return res.token if res.HasField("task") and res.token else None


def pull_task_message(client, initial_backoff: float, backoff_cap: float):
    """The task's ``(message, context)``: Flower's ``pull_task_input`` (flwr 1.41), with a
    back-off for objects not yet at the SuperNode that starts at ``initial_backoff`` seconds
    (instead of 1 s) and never exceeds ``backoff_cap``.

    The number of asks is not limited (Flower's 500 asks would be 2 min at this back-off: a large
    model still arriving over a slow hospital link would fail); Flower's overall limit
    (``PULL_MAX_TIME``, 2 h) stays, and the SuperNode gives up sooner
    (:data:`dicomfl.client.transport.supernode.PULL_MAX_S`), which ends this wait too.

    As ``pull_task_input`` does, it sets Flower's ``TaskIdentity`` (a ``Message`` built in this
    process reads its ids there) and stamps the message id into the metadata's private
    ``_message_id`` (it is not in the content). Relies on (flwr 1.41): the Runtime API's
    ``PullTaskInput``/``PullMessages``/``PullObject``/``ConfirmMessageReceived``, the inflatable
    helpers' signatures, ``TaskIdentity``'s settable ids and ``Metadata.__dict__["_message_id"]``.
    """
    from flwr.app import Message
    from flwr.common.serde import context_from_proto
    from flwr.proto.node_pb2 import Node  # pylint: disable=no-name-in-module
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest  # pylint: disable=no-name-in-module
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (make_confirm_message_received_fn_protobuf,
                                                                     make_pull_object_fn_protobuf)
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = res.task_id, res.run.run_id, res.context.node_id
    context = context_from_proto(res.context)
    msgs = client.PullMessages(PullAppMessagesRequest())
    if not msgs.messages_list:
        raise RuntimeError("no message for this task from the Runtime API")
    tree = msgs.message_object_trees[0]
    node = Node(node_id=context.node_id)
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, initial_backoff=min(max(0.01, float(initial_backoff)), backoff_cap),
        backoff_cap=backoff_cap, max_tries_per_object=None)  # bounded by Flower's max_time (2 h), as before
    message.metadata.__dict__["_message_id"] = tree.object_id  # what pull_task_input does: not in the content
    return message, context


def push_reply(client, reply, context) -> None:
    """Push the task's reply (Flower's own ``push_message``)."""
    from flwr.supernode.runtime.run_clientapp import push_message

    push_message(client, reply, context)


def report_task(client, context, completed: bool, details: str) -> None:
    """Report the task's end, completed or failed (Flower's own ``push_task_output``, which also
    pushes the context; ``context`` None when the task's input never arrived)."""
    from flwr.common.constant import SubStatus
    from flwr.supernode.runtime.run_clientapp import push_task_output

    push_task_output(client=client, context=context, sub_status=SubStatus.COMPLETED if completed else SubStatus.FAILED,
                     details=details)


def send_heartbeat(client) -> bool:
    """One heartbeat for the task being handled; False when the SuperNode no longer knows it.
    (Flower's own sender raises SIGINT in its process then, which would stop the whole worker.)"""
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=no-name-in-module

    return bool(client.SendTaskHeartbeat(SendTaskHeartbeatRequest()).success)


# ------------------------------------------------------------------- a message as bytes
def message_to_bytes(msg) -> bytes:
    """``msg`` (content included) as Flower's own protobuf, for the warm worker's socket.
    Relies on (flwr 1.41): ``flwr.common.serde.message_to_proto``, not among ``flwr.common``'s
    exported names."""
    from flwr.common.serde import message_to_proto

    return message_to_proto(msg).SerializeToString()


def message_from_bytes(payload: bytes):
    """The message :func:`message_to_bytes` made; raises whatever the parser raises for bytes
    that are not one."""
    from flwr.common.serde import message_from_proto
    from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=E0611

    return message_from_proto(ProtoMessage.FromString(payload))
