"""`astropt_tok.prefetch.Prefetch`, the one read-ahead thread of tokenise's staging and embed's token reader:
items in order, the thread's exception raised in the consumer, and close() stopping a thread that waits on a
full queue and dropping its source."""

from __future__ import annotations

import threading

import pytest

from astropt_tok.prefetch import Prefetch


def test_items_come_in_order_and_then_stop():
    with Prefetch(iter(range(50)), depth=2) as ahead:
        assert list(ahead) == list(range(50))
        assert list(ahead) == []  # finished stays finished
    assert ahead.wait_s >= 0


def test_an_exception_in_the_thread_is_raised_in_the_consumer_after_the_items_before_it():
    def items():
        yield 1
        yield 2
        raise ValueError("row group 7 is unreadable")

    ahead = Prefetch(items())
    got = []
    with pytest.raises(ValueError, match="row group 7"):
        for item in ahead:
            got.append(item)
    assert got == [1, 2]
    ahead.close()


def test_close_stops_a_thread_waiting_on_a_full_queue_and_drops_its_source():
    produced, dropped = [], threading.Event()

    def items():
        try:
            for i in range(1000):
                produced.append(i)
                yield i
        finally:
            dropped.set()  # the generator was closed: its resources (a DataLoader's workers) go with it

    ahead = Prefetch(items(), depth=2)
    assert next(ahead) == 0  # the consumer stops early, as on an error
    ahead.close()
    assert not ahead._thread.is_alive()
    assert dropped.wait(30) and len(produced) < 10  # it stopped at the full queue, not at the end
