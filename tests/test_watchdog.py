"""The watchdog: a wait past --timeout is reported in the engine's terms, with the silent rank found."""

import json

import pytest

from plait import watchdog
from plait.errors import TrainingError
from plait.watchdog import Watchdog


class Work:
    """A stand-in for a dist.Work whose completion the test decides."""

    def __init__(self, done=False, error=None):
        self.done, self.error = done, error

    def is_completed(self):
        return self.done

    def wait(self):
        if self.error:
            raise RuntimeError(self.error)
        return True


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


class Store:
    def __init__(self):
        self.keys = {}

    def set(self, key, value):
        self.keys[key] = value.encode()

    def get(self, key):
        return self.keys[key]

    def check(self, keys):
        return all(k in self.keys for k in keys)

    def delete_key(self, key):
        return self.keys.pop(key, None) is not None


def describe(peer):
    return lambda s: f"rank 0 (dp=0, pp=0) waited {s:.0f} s to receive backward gradients of micro-batch 0 from rank {peer}"


def make(rank=0, store=None):
    clock, exits = Clock(), []
    return Watchdog(10.0, rank=rank, store=store, exit=exits.append, now=clock), clock, exits


def test_an_overdue_wait_is_reported_with_its_peer_and_the_process_exits(capsys, tmp_path, monkeypatch):
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    dog, clock, exits = make()
    dog.watch(Work(), describe(1), peer=1)
    clock.t += 9.9
    assert dog.check() == pytest.approx(0.1) and exits == []  # it sleeps exactly until the deadline
    clock.t += 0.1
    dog.check()
    assert exits == [1]
    assert capsys.readouterr().err == ("plait: error: rank 0 (dp=0, pp=0) waited 10 s to receive backward gradients "
                                       "of micro-batch 0 from rank 1: no answer within --timeout 10 s\n")
    assert json.loads(error_file.read_text())["plait"] == {"silent_rank": 1}


def test_completed_waits_are_dropped_and_never_reported():
    dog, clock, exits = make()
    work = Work()
    dog.watch(work, describe(1), peer=1)
    work.done = True
    clock.t += 60
    dog.check()
    assert exits == [] and dog._waits == []


def test_the_silent_rank_is_found_by_following_published_waits(tmp_path, monkeypatch):
    """rank 0 waits on 1, 1 on 2, 2 on 3; rank 3 (stopped) publishes nothing: rank 3 is named."""
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    store = Store()
    for rank, peer in [(1, 2), (2, 3)]:  # their watchdogs published their waits at half the timeout
        other, clock_other, _ = make(rank, store)
        other.watch(Work(), describe(peer), peer=peer)
        clock_other.t += 5
        other.check()
    assert store.keys == {"plait-waits/1": b"2", "plait-waits/2": b"3"}
    dog, clock, exits = make(0, store)
    dog.watch(Work(), describe(1), peer=1)
    clock.t += 10
    dog.check()
    assert exits == [1]
    assert json.loads(error_file.read_text())["plait"] == {"silent_rank": 3}


def test_a_slow_wait_that_ends_is_unpublished():
    store = Store()
    dog, clock, _ = make(1, store)
    work = Work()
    dog.watch(work, describe(2), peer=2)
    clock.t += 6
    dog.check()
    assert store.keys == {"plait-waits/1": b"2"}
    work.done = True
    dog.check()
    assert store.keys == {}


def test_a_collective_waiter_speaks_a_second_later(capsys):
    dog, clock, exits = make()
    dog.watch(Work(), lambda s: f"rank 0 (dp=0, pp=0) waited {s:.0f} s in the loss all-reduce over all 4 ranks")
    clock.t += 10.5
    dog.check()
    assert exits == []
    clock.t += 0.5
    dog.check()
    assert exits == [1]
    assert capsys.readouterr().err == ("plait: error: rank 0 (dp=0, pp=0) waited 11 s in the loss all-reduce over "
                                       "all 4 ranks: no answer within --timeout 10 s\n")


def test_a_failed_wait_raises_in_the_engine_terms(monkeypatch):
    monkeypatch.setattr(watchdog, "_ACTIVE", None)
    with pytest.raises(TrainingError) as e:
        watchdog.wait(Work(error="[../gloo/transport/tcp/pair.cc:537] Connection closed by peer [127.0.0.1]:123"),
                      describe(2), peer=2)
    assert str(e.value) == ("rank 0 (dp=0, pp=0) waited 0 s to receive backward gradients of micro-batch 0 from "
                            "rank 2: Connection closed by peer [127.0.0.1]:123")
