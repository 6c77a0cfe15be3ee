"""Supervised threads: a thread that dies is logged, restarted with back-off, shown as degraded until
it is back, and given up (no more watchdog pings) when it cannot come back."""

import logging
import threading
import time

from daemon_harness import wait_until
from edge.supervise import Supervisor


def test_a_dying_thread_is_restarted_with_back_off_and_shown_degraded_until_it_is_back(caplog):
    supervisor = Supervisor(min_delay=0.2, max_delay=1.0, max_restarts=5)
    changes, starts, stop = [], [], threading.Event()
    supervisor.on_change(lambda: changes.append(supervisor.degraded))

    def flaky():
        starts.append(time.monotonic())
        if len(starts) <= 2:
            raise OSError("the listening socket broke")
        stop.wait()

    with caplog.at_level(logging.WARNING, logger="edge.supervise"):
        thread = supervisor.spawn("flaky", flaky, stop)
        wait_until(lambda: len(starts) == 3, 10, "the second restart")
        wait_until(lambda: supervisor.degraded == [], 5, "flaky to be back")
    assert changes == [["flaky"], [], ["flaky"], []]  # degraded while down, healthy once restarted
    assert starts[1] - starts[0] >= 0.2 and starts[2] - starts[1] >= 0.4  # back-off doubles
    assert supervisor.healthy()
    assert sum("thread flaky died" in r.message for r in caplog.records) == 2
    stop.set()
    thread.join(5)
    assert not thread.is_alive()


def test_a_thread_that_cannot_come_back_is_given_up():
    supervisor = Supervisor(min_delay=0.01, max_delay=0.02, max_restarts=3)
    stop = threading.Event()

    def broken():
        raise OSError("no such socket")

    supervisor.spawn("broken", broken, stop).join(5)
    assert supervisor.degraded == ["broken"] and not supervisor.healthy()
