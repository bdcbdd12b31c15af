"""Timing marks: the host clock on the CPU; a collective's completion stamped without a wait."""

import time

import torch

from plait.timing import Clock


def test_cpu_marks_are_the_host_clock():
    clock = Clock("cpu")
    a = clock.mark()
    time.sleep(0.02)
    b = clock.mark()
    assert 0.015 < clock.seconds(a, b) < 0.5


def test_a_collective_completion_is_stamped_by_its_future():
    clock = Clock(torch.device("cpu"))

    class Work:
        def __init__(self):
            self.future = torch.futures.Future()

        def get_future(self):
            return self.future

    work = Work()
    start = clock.mark()
    done = clock.mark_done(work)  # stamps nothing yet: the collective is still running
    time.sleep(0.02)
    work.future.set_result(None)
    later = clock.mark()
    assert 0.015 < clock.seconds(start, done) <= clock.seconds(start, later)
