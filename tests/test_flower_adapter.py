"""What each Flower adapter relies on, checked against the installed Flower.

The three adapters (``client/transport/flower_adapter.py``, ``server/flower_adapter.py``,
``workbench/flower_adapter.py``) reach into Flower's internals: module attributes they replace,
private functions they wrap, signatures they call with keywords, private fields they set. Each
test here names one of those and fails when a Flower upgrade changes it, so the upgrade is
reviewed there (the adapters themselves never fail: they change nothing and the site log says
so). The patches' effect, end to end, is in test_tasks.py, test_worker.py and test_deployment.py.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dicomfl.client.transport import flower_adapter as site
from dicomfl.common import flowerpatch
from dicomfl.server import flower_adapter as coordinator

ROOT = Path(__file__).resolve().parents[1]


def _params(func) -> set[str]:
    return set(inspect.signature(func).parameters)


def _run(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_the_pinned_flower_is_the_one_installed():
    """The adapters were written against flwr 1.41 and hold for 1.42; pyproject.toml allows no other."""
    version = tuple(int(p) for p in importlib.metadata.version("flwr").split(".")[:2])
    assert (1, 41) <= version < (1, 43)


# ----------------------------------------------------------------------- the shared probe
def test_the_probe_reads_signatures_and_unwraps_only_an_adapters_own_wrapper():
    def pull(ids, fn, *, initial_backoff=1.0, backoff_cap=10.0):
        return ids

    assert flowerpatch.takes_keywords(pull, ["initial_backoff", "backoff_cap"])
    assert not flowerpatch.takes_keywords(pull, ["initial_backoff", "max_time"])
    assert not flowerpatch.takes_keywords(None, []) and not flowerpatch.takes_keywords(42, [])
    wrapped = functools.partial(pull, backoff_cap=1.0)
    assert flowerpatch.original(wrapped) is wrapped  # someone else's partial is left as it is
    wrapped._dicomfl_wrapper = True
    assert flowerpatch.original(wrapped) is pull

    class Module:
        pull_objects = wrapped

    assert flowerpatch.module_function_taking(Module, "pull_objects", ["backoff_cap"]) is pull
    assert flowerpatch.module_function_taking(Module, "pull_objects", ["max_time"]) is None
    assert flowerpatch.module_function_taking(Module, "push_objects", []) is None


# ------------------------------------------------------------- the site: the SuperNode loop
def test_the_supernode_loop_still_has_the_attributes_the_shell_replaces():
    """patch_supernode_waits replaces the loop module's ``time`` and ``pull_objects``;
    call_after_stored_message wraps its ``_pull_and_store_message``. Each must be a module-level
    name that the loop looks up when it runs (so that replacing it has an effect)."""
    import flwr.supernode.start_client_internal as loop
    from flwr.supercore.inflatable import inflatable_utils

    assert loop.time is time and callable(loop.start_client_internal)
    assert loop.pull_objects is inflatable_utils.pull_objects
    assert set(site.PULL_KEYWORDS) <= _params(loop.pull_objects)
    assert callable(loop._pull_and_store_message)
    source = inspect.getsource(loop)
    assert "time.sleep(3)" in source and "time.sleep(0.5)" in source  # the idle wait and the local looks
    assert "pull_objects(" in inspect.getsource(loop._pull_and_store_message)
    assert "_pull_and_store_message(" in inspect.getsource(loop.start_client_internal)


def test_the_supernode_loop_returns_a_run_id_once_a_message_is_stored():
    """call_after_stored_message calls back when ``_pull_and_store_message`` returns a run id."""
    import flwr.supernode.start_client_internal as loop

    ret = inspect.signature(loop._pull_and_store_message).return_annotation
    assert "int" in str(ret) and "None" in str(ret)


def test_both_shell_patches_apply_to_the_installed_flower():
    """In a fresh process (nothing else is patched): the probes find the shape they know."""
    out = _run("""
        import time
        from dicomfl.client.transport import supernode as shell
        import flwr.supernode.start_client_internal as loop
        print(shell.cap_idle_wait(0.25), shell.wake_worker_on_message("/tmp/none.sock"),
              loop.time.cap, loop._pull_and_store_message._dicomfl_wakes)
    """)
    assert out == "True True 0.25 /tmp/none.sock"


def test_the_supernode_entry_point_is_the_function_the_shell_runs():
    """run_flower_supernode calls ``flwr.supernode.cli.flower_supernode`` with ``sys.argv``: the
    ``flower-supernode`` console script itself."""
    from flwr.supernode.cli import flower_supernode

    (ep,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "flower-supernode"]
    assert ep.value == "flwr.supernode.cli:flower_supernode"
    assert _params(flower_supernode) == set()


# ------------------------------------------------------------ the site: the Runtime API calls
def test_the_runtime_api_client_and_its_interceptors_build_as_the_task_loop_builds_them():
    client = site.runtime_client("127.0.0.1:1", [site.acquire_auth(bytes(32)), site.token_auth("t")])
    try:
        for method in ("AcquireTask", "PullTaskInput", "PullMessages", "PullObject", "ConfirmMessageReceived",
                       "SendTaskHeartbeat"):
            assert callable(getattr(client, method)), method
    finally:
        client.close()
    from flwr.supercore.runtime import RuntimeHttpClient

    assert {"server_address", "insecure", "root_certificates", "interceptors", "retry_invoker"} <= _params(
        RuntimeHttpClient.from_server_address)


def test_the_acquire_path_the_secret_signs_is_the_one_the_supernode_checks():
    """The SuperNode checks the SuperExec signature on the Runtime API's AcquireTask, named by
    its path; the client calls it by the same path."""
    import importlib

    from flwr.supercore.runtime import RuntimeHttpClient

    router = importlib.import_module("flwr.supercore.routers.runtime.router")  # the package re-exports a `router` object
    assert f'SuperExecAuthDependency("{site._ACQUIRE}")' in inspect.getsource(router)
    assert f'rpc_method="{site._ACQUIRE}"' in inspect.getsource(RuntimeHttpClient)
    assert list(site.acquire_request().supported_task_types) == ["flwr-clientapp"]


def test_the_runtime_api_messages_have_the_fields_the_task_loop_reads():
    from flwr.proto import runtime_pb2

    def fields(name):
        return set(getattr(runtime_pb2, name).DESCRIPTOR.fields_by_name)

    assert {"task", "token"} <= fields("AcquireTaskResponse")
    assert {"task_id", "run", "context"} <= fields("PullTaskInputResponse")
    assert {"messages_list", "message_object_trees"} <= fields("PullAppMessagesResponse")
    assert "success" in fields("SendTaskHeartbeatResponse")


def test_the_functions_the_task_loop_calls_take_what_it_passes():
    from flwr.common.constant import SubStatus
    from flwr.supercore.inflatable import inflatable_protobuf_utils as proto_utils
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supernode.runtime import run_clientapp

    assert {"return_type", "initial_backoff", "backoff_cap", "max_tries_per_object"} <= _params(
        pull_and_inflate_object_from_tree)
    assert len(_params(proto_utils.make_pull_object_fn_protobuf)) == 3
    assert len(_params(proto_utils.make_confirm_message_received_fn_protobuf)) == 3
    assert list(_params(run_clientapp.push_message)) and list(inspect.signature(
        run_clientapp.push_message).parameters) == ["client", "message", "context"]
    assert {"client", "context", "sub_status", "details"} == _params(run_clientapp.push_task_output)
    assert SubStatus.COMPLETED and SubStatus.FAILED


def test_pull_task_message_still_mirrors_flowers_pull_task_input():
    """pull_task_message does what ``pull_task_input`` does (the task identity, the message id
    from the object tree), with another back-off. If Flower's function changes, review it."""
    from flwr.supernode.runtime.run_clientapp import pull_task_input

    source = inspect.getsource(pull_task_input)
    for step in ("PullTaskInput(", "TaskIdentity.task_id", "TaskIdentity.run_id", "TaskIdentity.node_id",
                 "PullMessages(", "message_object_trees[0]", "pull_and_inflate_object_from_tree(",
                 '__dict__["_message_id"]'):
        assert step in source, step


def test_the_task_identity_can_be_set_and_read_as_the_adapters_do():
    out = _run("""
        from flwr.supercore.task_identity import TaskIdentity
        before = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 3, 4, 5
        print(before, (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id))
    """)
    assert out == "(None, None, None) (3, 4, 5)"


# ------------------------------------------------------------ the site: a message as bytes
def test_a_message_crosses_the_workers_socket_whole():
    import numpy as np
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

    from dicomfl.workbench.flower_adapter import stamp_message_id, task_identity

    task_identity()
    msg = Message(RecordDict({"a": ArrayRecord([np.arange(3.0)]), "c": ConfigRecord({"k": 1})}),
                  dst_node_id=7, message_type="train")
    stamp_message_id(msg, "m-1")
    back = site.message_from_bytes(site.message_to_bytes(msg))
    assert back.metadata.message_id == "m-1" and back.metadata.dst_node_id == 7
    assert back.content["c"]["k"] == 1 and back.content["a"].to_numpy_ndarrays()[0].tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(Exception):
        site.message_from_bytes(b"\xff not a message")


# ------------------------------------------------------------ the coordinator
def test_the_grids_module_still_pulls_reply_objects_by_the_name_the_round_replaces():
    import flwr.superlink.grid.http_grid as http_grid
    from flwr.supercore.inflatable import inflatable_utils

    assert http_grid.pull_objects is inflatable_utils.pull_objects
    assert set(coordinator.PULL_KEYWORDS) <= _params(http_grid.pull_objects)
    assert "pull_objects(" in inspect.getsource(http_grid.HttpGrid.pull_messages)
    grid = http_grid.HttpGrid.__new__(http_grid.HttpGrid)
    try:
        assert coordinator.quick_object_pulls(grid, 0.25) is not None
    finally:
        coordinator.restore_object_pulls(grid)
    assert http_grid.pull_objects is inflatable_utils.pull_objects


def test_the_registration_error_text_comes_from_flowers_catalog():
    assert coordinator.public_key_in_use_message() == "Public key already in use."


# ------------------------------------------------------------ the in-process grid
def test_the_message_id_lives_where_the_in_process_grid_stamps_it():
    from flwr.app import Metadata

    assert isinstance(inspect.getattr_static(Metadata, "message_id"), property)
    assert inspect.getattr_static(Metadata, "message_id").fset is None  # read-only: set through __dict__
    assert '__dict__["_message_id"]' in inspect.getsource(Metadata)
