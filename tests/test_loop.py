"""The manager's event loop: raw fds (exit sentinels) in epoll, zmq sockets, timers."""

from __future__ import annotations

import os
import threading

import zmq

from devmgr._loop import EventLoop


def _run_in_thread(loop: EventLoop) -> threading.Thread:
    thread = threading.Thread(target=loop.run, daemon=True)
    loop.thread = thread
    thread.start()
    return thread


def test_fd_readers_fire_only_for_ready_fds_and_stop_once_removed() -> None:
    loop = EventLoop()
    pipes = [os.pipe() for _ in range(300)]
    fired: list[int] = []
    done = threading.Event()

    def reader(i: int) -> None:
        fired.append(i)
        loop.remove_reader(pipes[i][0])  # as the fleet does with a sentinel that fired
        if len(fired) == 2:
            done.set()

    for i, (r, _) in enumerate(pipes):
        loop.add_reader(r, lambda i=i: reader(i))
    # raw fds are not in the zmq poller: only the loop's wake pipe and the epoll fd are
    assert len(loop._poller.sockets) == 2
    thread = _run_in_thread(loop)
    os.write(pipes[7][1], b"x")
    os.write(pipes[250][1], b"x")
    assert done.wait(5.0)
    # still readable (never read), but removed: no second call
    loop.run_sync(lambda resolve, _reject: resolve(None), timeout=5.0)
    assert sorted(fired) == [7, 250]
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5.0)
    loop.close()
    for r, w in pipes:
        os.close(r)
        os.close(w)


def test_removing_a_closed_fd_is_harmless_and_sockets_still_poll() -> None:
    loop = EventLoop()
    r, w = os.pipe()
    loop.add_reader(r, lambda: None)
    os.close(r)
    os.close(w)
    loop.remove_reader(r)  # closing it took it out of the epoll set already
    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://loop-test")
    b.connect("inproc://loop-test")
    got = threading.Event()
    loop.add_reader(a, lambda: (a.recv(), got.set()))
    thread = _run_in_thread(loop)
    b.send(b"hi")
    assert got.wait(5.0)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5.0)
    loop.close()
    a.close(linger=0)
    b.close(linger=0)
