"""dicomfl.common.workers: crash-isolated workers, on files that really crash the native decoders.

Each crasher is first shown to kill, hang or over-allocate a bare ``pydicom`` decode in a
subprocess (so a test cannot pass because a decoder got fixed and the file became harmless);
then the pool runs it next to good files and must give every good file its result, every
crasher a ``WorkerFailure`` with the right reason, print nothing, and leave no process behind.
"""

from __future__ import annotations

import os
import time
from multiprocessing import resource_tracker
from pathlib import Path

import pytest

from dicomfl.common.codestream import CODESTREAM_MISMATCH
from dicomfl.common.workers import (
    DECODER_CRASH,
    TIMEOUT,
    WORKER_ERROR,
    WORKER_MEMORY,
    IsolatedPool,
    PoolStartError,
    WorkerFailure,
    WorkerTask,
    default_workers,
    imap_isolated,
)

from . import crashers as C

GiB = 1 << 30


def children() -> set[int]:
    """Pids of this process's children, zombies included (an unreaped child is a leftover)."""
    me, out = os.getpid(), set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == me:
            out.add(int(d.name))
    return out


@pytest.fixture(autouse=True)
def no_leftover_processes():
    """Every test must leave exactly the children it found (the stdlib's resource tracker, a
    singleton that the first spawned process starts, is started up front)."""
    resource_tracker.ensure_running()
    before = children()
    yield
    assert children() <= before


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("crashers")
    return C.all_crashers(d)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict[Path, object]:
    """Good files and their results, decoded in this process (they are known to be safe)."""
    d = tmp_path_factory.mktemp("good")
    return {p: C.decode(p) for p in C.good_files(d)}


#: What a bare decode does to each crasher: a signal name, or the type of what it raises.
BARE_EXPECTED = {
    "j2k_rgb": "SIGABRT",
    "j2k_ybr_full_422": "SIGABRT",
    "jpeg_lossless_bs7": "SIGABRT",
    "rle_offset": "PanicException",
    "rle_rows": "PanicException",
    "jpeg_sof_p255": "SIGSEGV",
    "jp2_zero_box": "Alarm",  # still decoding when the child's 3 s alarm went off
}


@pytest.fixture(scope="module")
def bare(files) -> dict[str, C.Bare]:
    """Bare decodes of every crasher, each in its own process, all at once (bounded)."""
    jobs = {name: C.BareJob(files[name], alarm_s=3 if name == "jp2_zero_box" else 0) for name in BARE_EXPECTED}
    jobs["j2k_bomb"] = C.BareJob(files["j2k_bomb"], as_limit=C.BOMB_AS_LIMIT)
    jobs["pristine_j2k"] = C.BareJob(C.testfile("MR_small_jp2klossless.dcm"), as_limit=C.BOMB_AS_LIMIT)
    return C.run_bare(jobs)


@pytest.mark.parametrize("name", sorted(BARE_EXPECTED))
def test_crasher_really_crashes_a_bare_decode(bare, name):
    outcome = bare[name]
    assert outcome.returncode is not None, "the subprocess did not finish"
    got = outcome.signal or outcome.result.get("type")
    assert got == BARE_EXPECTED[name], f"{name} no longer reproduces with the installed decoders: {outcome}"
    if got == "PanicException":
        assert outcome.result["is_exception"] is False  # a BaseException: `except Exception` misses it


def test_bomb_really_over_allocates_a_bare_decode(bare):
    # Under the address-space limit the decode fails, after the decoder has grown the resident
    # set by hundreds of MB for a 6 kB file; the untouched file decodes under the same limit
    # with no growth to speak of. (Without the limit: 8.7 GB peak RSS.)
    bomb, pristine = bare["j2k_bomb"], bare["pristine_j2k"]
    assert bomb.returncode == 0 and bomb.result["outcome"] == "raised", bomb
    assert bomb.result["hwm_growth"] > 200 * 2**20, bomb
    assert pristine.result["outcome"] == "ok", pristine
    assert pristine.result["hwm_growth"] < 64 * 2**20, pristine


def test_pool_survives_every_crasher(files, good, capfd):
    """One pool runs each crasher decoded bare, the good files, and the check-then-decode
    pipeline that ingestion runs, on the crashers that the check can see."""
    crash = ["j2k_rgb", "j2k_ybr_full_422", "jpeg_lossless_bs7", "rle_offset", "rle_rows",
             "jpeg_sof_p255", "j2k_bomb"]
    caught = ["j2k_rgb", "j2k_ybr_full_422", "jpeg_sof_p255", "j2k_bomb", "jp2_zero_box"]
    goods = list(good)
    jobs = [("decode", goods[0]), *(("decode", files[n]) for n in crash[:4]),
            *(("decode", g) for g in goods[1:4]), *(("decode", files[n]) for n in crash[4:]),
            *(("decode", g) for g in goods[4:]), *(("check", files[n]) for n in caught)]
    start = time.monotonic()
    with IsolatedPool(C.run_job, workers=2, timeout_s=60, memory_bytes=GiB, initializer=C.warm_up) as pool:
        outcomes = dict(pool.imap(jobs))
        spawned = list(pool.spawned_pids)
    assert sorted(outcomes) == list(range(len(jobs)))
    got = {jobs[i]: o for i, o in outcomes.items()}

    for path, expected in good.items():
        assert got["decode", path] == expected, path.name
    expected_failures = {
        "j2k_rgb": WorkerFailure(DECODER_CRASH, "SIGABRT"),
        "j2k_ybr_full_422": WorkerFailure(DECODER_CRASH, "SIGABRT"),
        "jpeg_lossless_bs7": WorkerFailure(DECODER_CRASH, "SIGABRT"),
        "rle_offset": WorkerFailure(DECODER_CRASH, "PanicException"),
        "rle_rows": WorkerFailure(DECODER_CRASH, "PanicException"),
        "jpeg_sof_p255": WorkerFailure(DECODER_CRASH, "SIGSEGV"),
    }
    for name, failure in expected_failures.items():
        assert got["decode", files[name]] == failure, name
    # The bomb's allocation is refused by the worker's address-space limit; OpenJPEG reports that
    # as a decode error (RuntimeError from pydicom), or Python as MemoryError.
    bomb = got["decode", files["j2k_bomb"]]
    assert isinstance(bomb, WorkerFailure) and bomb.reason in (WORKER_ERROR, WORKER_MEMORY), bomb
    # The pipeline rejects these before any decoder sees them.
    for name in caught:
        assert got["check", files[name]].reason == CODESTREAM_MISMATCH, name

    # Dead workers were replaced: 2 at the start, one per death (3 SIGABRT, 1 SIGSEGV, each file
    # run twice before it is charged; the PanicExceptions, the bomb and the rejections are caught
    # in the worker, which lives on).
    # (9 or more: the last replacement is not started when nothing is left to do; at most one
    # idle worker stopped per file run again, to give it a fresh worker)
    assert 2 * 4 + 1 <= len(spawned) <= 2 + 2 * 4 + 4
    assert not set(spawned) & children()
    assert time.monotonic() - start < 90
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""  # GDCM's "terminate called ..." stayed in the workers


def test_a_hung_decode_times_out(files, good):
    # pydicom's own JP2 header walker loops forever on this file, before any native decoder.
    path = next(iter(good))
    with IsolatedPool(C.decode, workers=2, timeout_s=3, initializer=C.warm_up) as pool:
        outcomes = dict(pool.imap([path, files["jp2_zero_box"]]))
        spawned = list(pool.spawned_pids)
        assert len(pool.pids) == 1  # the hung worker was killed (and nothing was left to replace it for)
    assert outcomes == {0: good[path], 1: WorkerFailure(TIMEOUT, "over 3 s")}
    assert not set(spawned) & children()


def test_every_failure_kind_is_a_code_never_exception_text(capfd):
    specs = [
        ("ok", 1),
        ("raise", "ValueError"),
        ("panic",),
        ("reject", "too-large", "Rows*Columns"),
        ("signal", "SIGSEGV"),
        ("signal", "SIGKILL"),
        ("exit", 3),
        ("alloc", 4 * GiB),
        ("unpicklable",),
        ("print",),
        ("ok", 2),
    ]
    outcomes = dict(imap_isolated(C.behave, specs, workers=2, timeout_s=60, memory_bytes=256 * 2**20))
    assert [outcomes[i] for i in range(len(specs))] == [
        1,
        WorkerFailure(WORKER_ERROR, "ValueError"),
        WorkerFailure(DECODER_CRASH, "FakePanic"),
        WorkerFailure("too-large", "Rows*Columns"),
        WorkerFailure(DECODER_CRASH, "SIGSEGV"),
        WorkerFailure(WORKER_MEMORY, "SIGKILL"),
        WorkerFailure(DECODER_CRASH, "exit 3"),
        WorkerFailure(WORKER_MEMORY, "MemoryError"),
        WorkerFailure(WORKER_ERROR, "result not picklable (AttributeError)"),  # a lambda
        0,
        2,
    ]
    captured = capfd.readouterr()
    assert C.LEAK not in captured.out + captured.err
    assert captured.out == "" and captured.err == ""


def test_one_worker_still_runs_in_its_own_process():
    [(index, pid)] = list(imap_isolated(C.behave, [("pid",)], workers=1, timeout_s=60))
    assert index == 0 and isinstance(pid, int) and pid != os.getpid()


def test_results_stream_with_a_bounded_number_in_flight():
    workers, pulled, seen = 2, [0], 0

    def items():
        for i in range(24):
            pulled[0] += 1
            yield ("ok", i)

    for index, result in imap_isolated(C.behave, items(), workers=workers, timeout_s=60):
        seen += 1
        assert result == index
        # in flight (two per worker: prefetch) + one waiting to be handed out + replies not yet yielded
        assert pulled[0] - seen <= 4 * workers + 1
    assert seen == 24


def test_the_item_waiting_behind_a_crash_or_a_timeout_runs_on_another_worker():
    """One worker holds two items (prefetch); when it dies or hangs on the first, only that
    item fails: the second was never started and runs on the replacement."""
    items = [("signal", "SIGSEGV"), ("pid",), ("sleep", 600), ("pid",), ("ok", 3)]
    with IsolatedPool(C.behave, workers=1, timeout_s=2, prefetch=2) as pool:
        outcomes = dict(pool.imap(items))
        spawned = list(pool.spawned_pids)
    assert outcomes[0] == WorkerFailure(DECODER_CRASH, "SIGSEGV")
    assert outcomes[2] == WorkerFailure(TIMEOUT, "over 2 s")
    assert outcomes[4] == 3 and len(outcomes) == 5
    # The items behind the crash and the hang ran on the workers that replaced them (the crash
    # killed two: its item runs once more, first on a fresh worker, before it is charged; the
    # item waiting behind it there moved on once more).
    assert outcomes[1] == spawned[2] and outcomes[3] == spawned[3] and len(spawned) == 4


def test_a_death_just_after_a_reply_is_not_charged_to_the_next_item():
    """A worker that dies just after answering item k, while on item k+1 (here: a timer the
    item k left behind), looks to the parent like a death on k+1. k+1 runs once more on a fresh
    worker and succeeds; only an item that kills its worker twice is charged."""
    items = [("die-after", 1, 0.3), ("sleep", 1.0), ("signal", "SIGSEGV"), ("ok", 2)]
    with IsolatedPool(C.behave, workers=1, timeout_s=30, prefetch=2) as pool:
        outcomes = dict(pool.imap(items))
        spawned = list(pool.spawned_pids)
    assert outcomes == {0: 1, 1: 1.0, 2: WorkerFailure(DECODER_CRASH, "SIGSEGV"), 3: 2}
    # one to start, one after the timer's death, two after the crashing item's two deaths
    assert len(spawned) == 4 and not set(spawned) & children()


@pytest.mark.parametrize("workers", [1, 2])
def test_an_item_run_again_is_the_first_item_of_a_fresh_worker(workers):
    """The item run again after a death must not sit behind another item whose worker dies after
    replying (that death would be counted as its second): it is a fresh worker's first item."""
    items = [("die-after", "a", 0.3), ("sleep", 1.0), ("die-after", "b", 0.3), ("ok", "c")] * 2
    outcomes = dict(imap_isolated(C.behave, items, workers=workers, timeout_s=30, prefetch=2))
    assert outcomes == {i: ["a", 1.0, "b", "c"][i % 4] for i in range(len(items))}


def test_the_timeout_counts_from_when_the_worker_could_start_the_item():
    # Two items of 1.2 s each in one worker's pipe: 2.4 s from hand-over to the second reply,
    # but each item took 1.2 s of its 2 s.
    outcomes = dict(imap_isolated(C.behave, [("sleep", 1.2), ("sleep", 1.2)], workers=1, timeout_s=2, prefetch=2))
    assert outcomes == {0: 1.2, 1: 1.2}


def test_a_big_item_waits_for_a_free_worker_so_a_hang_still_times_out():
    """An item too big for the pipe is not queued behind a busy worker's item: the parent's
    send would block until that item ended, and with it every timeout."""
    from dicomfl.common.workers import PREFETCH_MAX_BYTES

    big = "x" * (8 * PREFETCH_MAX_BYTES)
    t0 = time.monotonic()
    outcomes = dict(imap_isolated(C.behave, [("sleep", 120), ("ok", big)], workers=1, timeout_s=2, prefetch=2))
    assert outcomes == {0: WorkerFailure(TIMEOUT, "over 2 s"), 1: big}
    assert time.monotonic() - t0 < 60  # not the 120 s of the hang


def test_a_queued_item_is_timed_from_when_its_worker_started_it():
    """The consumer holds the generator for 8 s after the first outcome; the worker went on with
    the items it held. The third item (a hang) started at about 0.3 s, so it is past its 2 s when
    the consumer comes back, and times out at once, not 2 s after the parent read the reply
    before it."""
    t0 = time.monotonic()
    seen = {}
    for index, outcome in imap_isolated(C.behave, [("ok", 1), ("sleep", 0.3), ("sleep", 120)], workers=1,
                                        timeout_s=2, prefetch=2):
        seen[index] = (outcome, time.monotonic() - t0)
        if index == 0:
            time.sleep(8)
    assert seen[1][0] == 0.3 and seen[2][0] == WorkerFailure(TIMEOUT, "over 2 s")
    assert seen[2][1] < 9.5  # from the reply's own time: at once; from the parent's reading of it: 10 s


def test_stopping_early_or_raising_leaves_no_process():
    items = [("ok", 1), ("sleep", 600), ("sleep", 600)]
    before, start = children(), time.monotonic()
    it = imap_isolated(C.behave, items, workers=3, timeout_s=900)
    assert next(it) == (0, 1)
    it.close()  # what `break` does to a for loop's generator
    assert children() <= before

    with pytest.raises(KeyError):
        for _index, _result in imap_isolated(C.behave, items, workers=3, timeout_s=900):
            raise KeyError("consumer failed")
    assert time.monotonic() - start < 60


def test_pool_context_manager_stops_its_workers():
    with IsolatedPool(C.behave, workers=2, timeout_s=60) as pool:
        assert dict(pool.imap([("ok", 1), ("ok", 2), ("ok", 3)])) == {0: 1, 1: 2, 2: 3}
        assert dict(pool.imap([("ok", 4)])) == {0: 4}  # workers are reused between runs
        pids = pool.pids
        assert len(pids) == 2 and len(pool.spawned_pids) == 2
    assert not set(pids) & children()


def test_initializer_failure_is_reported_by_type_only():
    with pytest.raises(PoolStartError) as info:
        list(imap_isolated(C.behave, [("ok", 1)], workers=1, timeout_s=60,
                           initializer=C.failing_initializer))
    assert "ValueError" in str(info.value) and C.LEAK not in str(info.value)


def test_arguments():
    assert default_workers() >= 1
    with pytest.raises(ValueError):
        IsolatedPool(C.behave, workers=0, timeout_s=1)
    with pytest.raises(ValueError):
        IsolatedPool(C.behave, workers=1, timeout_s=1, prefetch=0)
    with pytest.raises(ValueError):
        IsolatedPool(C.behave, workers=1, timeout_s=0)
    with pytest.raises(ValueError):
        IsolatedPool(C.behave, workers=1, timeout_s=1, memory_bytes=0)


class _Tagged(WorkerTask):
    """A task with per-worker state: ``start`` runs in the worker, once, before its first item."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.started = 0

    def start(self) -> None:
        self.started += 1
        self.pid = os.getpid()

    def __call__(self, item: int) -> tuple:
        return self.tag, self.started, self.pid, item


class _FailsToStart(WorkerTask):
    def start(self) -> None:
        raise OSError("no slot file")

    def __call__(self, item: int) -> int:
        return item


def test_a_worker_task_keeps_its_state_in_each_worker():
    """The task object goes to each worker once and is started there (not in the parent); two
    pools with different settings share nothing."""
    task = _Tagged("a")
    with IsolatedPool(task, workers=2, timeout_s=60) as pool:
        got = dict(pool.imap(range(8)))
        pids = set(pool.spawned_pids)
    assert sorted(got) == list(range(8))
    assert {(tag, started) for tag, started, _pid, _item in got.values()} == {("a", 1)}
    assert {pid for _tag, _started, pid, _item in got.values()} <= pids
    assert task.started == 0  # the parent's copy was never started
    assert {tag for tag, *_ in dict(imap_isolated(_Tagged("b"), range(3), workers=1, timeout_s=60)).values()} == {"b"}


def test_a_worker_task_that_cannot_start_is_a_pool_start_error():
    with pytest.raises(PoolStartError, match="OSError"):
        dict(imap_isolated(_FailsToStart(), range(3), workers=1, timeout_s=60))
