"""Behaviour of the stop signals (vitaclip.engine.stopping) and of the torchrun / torch.distributed
set-up helpers (vitaclip.engine.distributed) that mutation testing found unpinned by the other tests."""
import os
import signal
import warnings
from datetime import timedelta

import pytest
import torch

from vitaclip.engine import distributed, stopping
from vitaclip.engine.distributed import DistEnv
from vitaclip.engine.stopping import StopRequest, parse_signal, shield_workers

CPU = torch.device("cpu")


@pytest.fixture
def usr2_as_before():
    """SIGUSR2's disposition in this process, put back after the test."""
    before = signal.getsignal(signal.SIGUSR2)
    yield
    signal.signal(signal.SIGUSR2, signal.SIG_DFL if before is None else before)


# --- stopping -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,why", [("SIGURG", "in ordinary work"), ("BUS", "a fault of the process"),
                                      ("sigfpe", "a fault of the process"), ("ILL", "a fault of the process")])
def test_the_other_signals_the_system_sends_for_other_reasons_are_no_stop_signals(name, why):
    """SIGURG comes with a socket's out-of-band data (the rendezvous and NCCL's sockets), and SIGBUS,
    SIGFPE and SIGILL are faults of the process: as stop signals they would stop runs at random, or
    loop for ever in the faulting instruction. The review test covers the others of the list only."""
    with pytest.raises(ValueError, match=f"{why}.*not a warning to stop"):
        parse_signal(name)


def test_a_repeat_exactly_the_grace_after_the_first_is_still_the_same_stop():
    """"Repeats within `repeat_grace_s` of it" are the same stop: one exactly that late is within it
    (the other tests check 4.9 and 5.1 s, either side, never the limit itself)."""
    seen, now = [], [100.0]
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    request = StopRequest(["SIGUSR1"], repeat_grace_s=2.0, clock=lambda: now[0]).install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        now[0] += 2.0  # (exact in floating point)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert request.received == "SIGUSR1" and seen == []
    finally:
        request.uninstall()
        signal.signal(signal.SIGUSR1, previous)


def test_a_previous_handler_python_cannot_put_back_becomes_the_default_on_uninstall(monkeypatch, usr2_as_before):
    """signal.signal reports a handler a C library or an embedding program set as None, which cannot
    be set again: uninstall gives the signal its default action, where signal.signal(sig, None) would
    raise a TypeError as the run ends."""
    real = signal.signal

    def reports_none(sig, handler):  # as for a handler set outside Python
        real(sig, handler)
        return None

    monkeypatch.setattr(signal, "signal", reports_none)
    with warnings.catch_warnings():  # (a fork server an earlier test started, not ignoring SIGUSR2)
        warnings.simplefilter("ignore")
        request = StopRequest(["SIGUSR2"]).install()
    request.uninstall()
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL


def test_ignore_signals_ignores_them(usr2_as_before):
    """After a stop, `vitaclip train` ignores more of the same stop while it reports and exits."""
    signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    stopping.ignore_signals(["usr2"])
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_IGN


def test_the_signals_of_every_installed_request_are_the_installed_ones(usr2_as_before):
    """installed_signals() is the union over all installed requests (which the fork server ignores
    and the workers are shielded from), not the last one's."""
    before = signal.getsignal(signal.SIGUSR1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first, second = StopRequest(["SIGUSR1"]).install(), StopRequest(["SIGUSR2"]).install()
    try:
        assert set(stopping.installed_signals()) >= {signal.SIGUSR1, signal.SIGUSR2}
    finally:
        second.uninstall()
        first.uninstall()
        signal.signal(signal.SIGUSR1, before)


def test_the_fork_server_starts_ignoring_an_installed_stop_signal_never_declared(monkeypatch, usr2_as_before):
    """A StopRequest installed for a signal that declare_stop_signals never named (a script calling
    train() with its own stop_signals): the fork server started after it must ignore that signal too,
    or the job's stop ends the server and its workers look dead to their loaders."""
    from multiprocessing import forkserver

    during_start = []
    monkeypatch.setattr(stopping, "_job_stop_signals", set())  # nothing declared
    monkeypatch.setattr(forkserver, "ensure_running", lambda: during_start.append(signal.getsignal(signal.SIGUSR2)))
    monkeypatch.setattr(stopping, "_fork_server_running", lambda: False)  # (nothing recorded of a server)
    request = StopRequest(["SIGUSR2"]).install()
    try:
        stopping.start_fork_server()
        assert during_start == [signal.SIG_IGN] and signal.getsignal(signal.SIGUSR2) == request._handle
    finally:
        request.uninstall()


@pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="sigwaitinfo is Linux-only")
def test_a_shielded_worker_takes_back_only_the_ignored_signals_that_are_no_stop_signals(monkeypatch):
    """The shield gives the fork server's ignored signals their default action again only where they are
    not this run's stop signals: a stop signal set to its default before the shield blocks it would let
    another process's signal end the worker in between (the race the shield blocks first to avoid)."""
    ignored = {signal.SIGTERM, signal.SIGUSR1}
    monkeypatch.setattr(stopping, "_fork_server_ignores", set(ignored))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        request = StopRequest(["SIGUSR1"]).install()
    try:
        init = shield_workers()
    finally:
        request.uninstall()
    assert init.func is stopping._shield_worker
    assert set(init.keywords["taken"]) == ignored - {signal.SIGUSR1}


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads a process's ignored signals in /proc")
def test_the_ignored_signals_of_a_process_are_read_from_its_mask_by_signal_number(usr2_as_before):
    """SigIgn's bit n-1 is signal n: a fork server started by another is recorded as ignoring exactly
    what it ignores (read off by one, SIGUSR2 is taken for SIGPIPE, which Python ignores)."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    asked = [signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGPIPE, signal.SIGINT]
    expected = {sig for sig in asked if signal.getsignal(sig) is signal.SIG_IGN}
    assert signal.SIGUSR2 in expected
    assert stopping._ignored_by(os.getpid(), asked) == expected


def test_a_pid_of_another_users_process_is_no_live_owner(monkeypatch):
    """An owner's pid that signals answer with PermissionError belongs to another user's process: the
    owner ended and its pid was taken again, so its workers end (without pidfd, asked every second)."""
    def another_users(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(stopping.os, "kill", another_users)
    assert stopping._alive(12345) is False


# --- distributed ----------------------------------------------------------------------------------


def test_a_timeout_too_long_for_a_timedelta_is_named(monkeypatch):
    """A timedelta holds fewer than a billion days: a longer timeout is refused naming the variable,
    not as an OverflowError from datetime."""
    too_long = timedelta.max.total_seconds() * 10
    monkeypatch.setenv(distributed.TIMEOUT_ENV, str(too_long))
    with pytest.raises(ValueError, match="VITACLIP_DIST_TIMEOUT_S must be a positive number"):
        distributed.collective_timeout()


@pytest.fixture
def eight_gpus(monkeypatch):
    """A node of 8 GPUs seen by this process (no CUDA needed), and no process group."""
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(distributed, "check_cuda_device", lambda device: None)
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 8)
    monkeypatch.setenv("WORLD_SIZE", "1")
    return monkeypatch


def test_a_single_process_may_take_any_gpu_of_the_node(eight_gpus):
    """Only processes that share a node (LOCAL_WORLD_SIZE > 1) must each take their own GPU: a lone
    process (no launcher, or torchrun with one process a node) may be given cuda:5."""
    eight_gpus.delenv("LOCAL_WORLD_SIZE", raising=False)
    eight_gpus.delenv("LOCAL_RANK", raising=False)
    assert distributed.init_distributed("cuda:5").device == torch.device("cuda", 5)
    eight_gpus.setenv("LOCAL_WORLD_SIZE", "1")
    assert distributed.init_distributed("cuda:5").device == torch.device("cuda", 5)


def test_a_script_that_initialised_the_group_itself_chooses_its_gpu(eight_gpus):
    """The check of a shared GPU is for groups the package starts: a script that initialised the group
    itself (its own device mapping) is given the device it names."""
    eight_gpus.setattr(distributed.dist, "is_initialized", lambda: True)
    eight_gpus.setattr(distributed.dist, "get_rank", lambda: 3)
    eight_gpus.setattr(distributed.dist, "get_world_size", lambda: 8)
    eight_gpus.setenv("LOCAL_WORLD_SIZE", "8")
    eight_gpus.setenv("LOCAL_RANK", "3")
    assert distributed.init_distributed("cuda:0").device == torch.device("cuda", 0)


def two_ranks(monkeypatch, others):
    """A stand-in for a group of len(`others`) ranks: all_gather_object gives each rank's object from
    `others`, and this process's own where `others` holds None (its rank)."""
    def all_gather_object(out, obj):
        out[:] = [obj if theirs is None else theirs for theirs in others]

    monkeypatch.setattr(distributed.dist, "get_world_size", lambda group=None: len(others))
    monkeypatch.setattr(distributed.dist, "all_gather_object", all_gather_object)


def test_on_every_rank_gives_each_rank_its_own_value(monkeypatch):
    """on_every_rank gathers every rank's outcome (to raise everywhere where one failed) and returns
    this rank's own value, not rank 0's."""
    two_ranks(monkeypatch, [(True, "rank 0's"), None])
    assert distributed.on_every_rank(DistEnv(1, 2, 1, CPU), lambda: "rank 1's", "loading") == "rank 1's"


def test_the_failing_rank_raises_its_own_error_and_the_others_name_it(monkeypatch):
    """The rank where work raised raises that error itself (its traceback, its kind); the others raise
    one of its kind naming the failing rank."""
    disk_full = OSError(28, "No space left on device")

    def fails():
        raise disk_full

    two_ranks(monkeypatch, [None, (True, "fine")])  # this process is rank 0
    with pytest.raises(OSError) as raised:
        distributed.gathered_on_every_rank(fails, "writing the checkpoint")
    assert raised.value is disk_full
    two_ranks(monkeypatch, [(True, "fine"), None, (False, (OSError, "OSError: disk full"))])  # rank 1 of 3
    with pytest.raises(OSError, match="^writing the checkpoint failed on rank 2: OSError: disk full$"):
        distributed.gathered_on_every_rank(lambda: "fine", "writing the checkpoint")


def test_an_error_whose_kind_takes_other_arguments_reaches_the_others_as_a_runtime_error(monkeypatch):
    """UnicodeDecodeError cannot be made from a message alone: the other ranks raise a RuntimeError with
    the message instead of a TypeError about the constructor."""
    two_ranks(monkeypatch, [(False, (UnicodeDecodeError, "UnicodeDecodeError: bad list")), None])
    with pytest.raises(RuntimeError, match="reading the list failed on rank 0: UnicodeDecodeError: bad list"):
        distributed.gathered_on_every_rank(lambda: "fine", "reading the list")


def test_the_weights_digest_tells_the_same_bytes_in_another_shape_apart():
    """The digest covers each tensor's name, dtype and shape as well as its bytes: two models of one
    set of numbers laid out otherwise (2 x 3 vs 3 x 2), or under another name, hold other weights."""
    first, second = torch.nn.Module(), torch.nn.Module()
    first.w = torch.nn.Parameter(torch.arange(6.0).reshape(2, 3))
    second.w = torch.nn.Parameter(torch.arange(6.0).reshape(3, 2))
    assert torch.equal(first.w.flatten(), second.w.flatten())
    assert distributed.weights_digest(first) != distributed.weights_digest(second)
    renamed = torch.nn.Module()
    renamed.v = torch.nn.Parameter(torch.arange(6.0).reshape(2, 3))
    assert distributed.weights_digest(first) != distributed.weights_digest(renamed)


def test_every_rank_gets_rank_0s_object(monkeypatch):
    """broadcast_object sends rank 0's object (its choice of checkpoint, its evaluation's problem)."""
    sources = []

    def broadcast_object_list(box, src=None):
        sources.append(src)
        box[0] = "rank 0's" if src == 0 else "another rank's"

    monkeypatch.setattr(distributed.dist, "broadcast_object_list", broadcast_object_list)
    assert distributed.broadcast_object(DistEnv(1, 3, 1, CPU), "mine") == "rank 0's"
    assert sources == [0]


def test_sums_across_ranks_keep_float64(monkeypatch):
    """The ranks' sums (loss totals, clip counts) are taken in float64: 2**24 + 1 clips, which float32
    rounds to 2**24, are counted exactly."""
    def all_reduce(t):  # two ranks of the same values
        t.mul_(2)

    monkeypatch.setattr(distributed.dist, "all_reduce", all_reduce)
    many = float(2 ** 24 + 1)
    assert float(torch.tensor(many, dtype=torch.float32)) != many  # (what float32 would make of it)
    assert distributed.sum_across_ranks(DistEnv(0, 2, 0, CPU), [many, 0.5]) == [2 * many, 1.0]
