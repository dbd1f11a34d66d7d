"""Unit tests of the per-device supervision state machine, driven by a fake clock."""

from __future__ import annotations

import random
import signal
from dataclasses import dataclass

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from devmgr._supervisor import (
    JITTER_LOW,
    Action,
    ExitInfo,
    Idle,
    Kill,
    Reason,
    Spawn,
    State,
    Supervisor,
    SupervisorError,
    Terminate,
    Wait,
)


@dataclass(frozen=True)
class Restart:
    """Stand-in for devmgr._spec.RestartSpec (the supervisor only reads these attributes)."""

    policy: str = "always"
    backoff_initial: float = 0.1
    backoff_max: float = 30.0
    max_restarts: int = 10
    window: float = 60.0


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


WALL_START = 1_700_000_000.0


class Harness:
    """One supervisor with fake clocks and a pid counter, plus helpers to play a child."""

    def __init__(self, stable_after: float = 1.0, seed: int = 7, **restart: object) -> None:
        self.clock = FakeClock()
        self.wall = FakeClock(WALL_START)
        self.next_pid = 100
        self.sup = Supervisor(
            "orders",
            Restart(**restart),  # type: ignore[arg-type]
            clock=self.clock,
            wall_clock=self.wall,
            rng=random.Random(seed),
            stable_after=stable_after,
        )

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.wall.advance(seconds)

    def spawn(self) -> int:
        self.next_pid += 1
        self.sup.spawned(self.next_pid)
        return self.next_pid

    def start_running(self) -> int:
        """Manually start the device and bring its child to RUNNING."""
        assert self.sup.start() == Spawn()
        pid = self.spawn()
        self.sup.ready()
        assert self.sup.state is State.RUNNING
        return pid

    def crash_loop_step(self) -> Action:
        """Restart after a backoff and crash before ready; return the exit's decision."""
        assert self.sup.state is State.BACKOFF
        assert self.sup.backoff_elapsed() == Spawn()
        self.spawn()
        return self.sup.exited(1, None)


# -- backoff ---------------------------------------------------------------------------


def test_backoff_sequence_doubles_with_jitter_within_bounds() -> None:
    h = Harness(backoff_initial=0.1, backoff_max=100.0, max_restarts=1000)
    h.start_running()
    delays = []
    decision = h.sup.exited(1, None)  # crashed at once: unstable
    for _ in range(8):
        assert isinstance(decision, Wait)
        assert h.sup.state is State.BACKOFF
        assert h.sup.backoff_delay == decision.delay
        delays.append(decision.delay)
        decision = h.crash_loop_step()
    for n, delay in enumerate(delays):
        nominal = 0.1 * 2**n
        assert JITTER_LOW * nominal <= delay <= nominal, (n, delay)
    # Jitter is really applied: a seeded rng does not give the nominal values.
    assert any(delay < 0.1 * 2**n for n, delay in enumerate(delays))


def test_backoff_is_reproducible_with_a_seeded_rng() -> None:
    def delays(seed: int) -> list[float]:
        h = Harness(seed=seed, max_restarts=100)
        h.start_running()
        out = []
        decision = h.sup.exited(1, None)
        for _ in range(5):
            assert isinstance(decision, Wait)
            out.append(decision.delay)
            decision = h.crash_loop_step()
        return out

    assert delays(3) == delays(3)
    assert delays(3) != delays(4)


def test_backoff_is_capped_at_backoff_max() -> None:
    h = Harness(backoff_initial=1.0, backoff_max=5.0, max_restarts=10_000, window=1.0)
    h.start_running()
    decision = h.sup.exited(1, None)
    seen = []
    for _ in range(200):
        assert isinstance(decision, Wait)
        seen.append(decision.delay)
        h.advance(2.0)  # keep the window empty so the loop never turns FATAL
        decision = h.crash_loop_step()
    assert max(seen) <= 5.0
    assert all(JITTER_LOW * 5.0 <= d <= 5.0 for d in seen[3:])  # 1, 2, 4, then the cap


def test_zero_backoff_initial_gives_zero_delay() -> None:
    h = Harness(backoff_initial=0.0, backoff_max=0.0)
    h.start_running()
    assert h.sup.exited(1, None) == Wait(0.0)


# -- window and FATAL ------------------------------------------------------------------


@pytest.mark.parametrize("max_restarts", [0, 1, 3, 10])
def test_fatal_after_exactly_max_restarts_in_window(max_restarts: int) -> None:
    h = Harness(max_restarts=max_restarts, window=60.0)
    h.start_running()
    decision = h.sup.exited(1, None)
    for made in range(max_restarts):
        assert isinstance(decision, Wait), made
        decision = h.crash_loop_step()
        assert h.sup.restarts == made + 1
    assert decision == Idle()
    assert h.sup.state is State.FATAL
    assert h.sup.restarts == max_restarts
    assert h.sup.pid is None
    assert h.sup.backoff_elapsed() == Idle()  # a stale timer does not revive it
    assert h.sup.state is State.FATAL


def test_window_slides_old_restarts_fall_out() -> None:
    h = Harness(max_restarts=2, window=10.0)
    h.start_running()
    assert isinstance(h.sup.exited(1, None), Wait)
    assert isinstance(h.crash_loop_step(), Wait)  # restart 1 at t=0 fails: 1 in the window
    h.advance(11.0)
    assert isinstance(h.crash_loop_step(), Wait)  # restart 2 at t=11; restart 1 fell out
    h.advance(1.0)
    assert h.crash_loop_step() == Idle()  # restart 3 at t=12 fails: 2 and 3 in the window
    assert h.sup.state is State.FATAL
    assert h.sup.restarts == 3


def test_window_without_sliding_goes_fatal() -> None:
    h = Harness(max_restarts=2, window=10.0)
    h.start_running()
    assert isinstance(h.sup.exited(1, None), Wait)
    assert isinstance(h.crash_loop_step(), Wait)  # restart 1 at t=0
    h.advance(9.0)
    assert h.crash_loop_step() == Idle()  # restart 2 at t=9 fails, restart 1 still inside
    assert h.sup.state is State.FATAL


def test_window_lets_a_slow_crash_loop_go_on() -> None:
    h = Harness(max_restarts=3, window=10.0)
    h.start_running()
    assert isinstance(h.sup.exited(1, None), Wait)
    for _ in range(20):
        h.advance(6.0)  # at most 2 restarts in any 10 s, fewer than 3
        assert isinstance(h.crash_loop_step(), Wait)
    assert h.sup.restarts == 20


def test_manual_start_clears_fatal_and_window_keeps_restarts() -> None:
    h = Harness(max_restarts=2)
    h.start_running()
    h.sup.exited(1, None)
    h.crash_loop_step()
    h.crash_loop_step()
    assert h.sup.state is State.FATAL
    assert h.sup.restarts == 2
    fatal_exit = h.sup.last_exit

    assert h.sup.start() == Spawn()
    assert h.sup.state is State.STARTING
    assert h.sup.restarts == 2  # manual starts are not counted
    assert h.sup.last_exit == fatal_exit
    h.spawn()
    # The window is empty again: two more automatic restarts before FATAL.
    decision = h.sup.exited(1, None)
    assert isinstance(decision, Wait)
    assert decision.delay <= 0.1  # the backoff was reset too
    assert isinstance(h.crash_loop_step(), Wait)
    assert h.crash_loop_step() == Idle()
    assert h.sup.state is State.FATAL
    assert h.sup.restarts == 4


def test_immediate_restarts_count_in_the_window() -> None:
    h = Harness(max_restarts=3, window=60.0, stable_after=1.0)
    h.start_running()
    for _ in range(3):
        h.advance(2.0)
        assert h.sup.exited(None, signal.SIGKILL) == Spawn()
        h.spawn()
        h.sup.ready()
    h.advance(2.0)
    assert h.sup.exited(None, signal.SIGKILL) == Idle()
    assert h.sup.state is State.FATAL
    assert h.sup.last_exit is not None
    assert h.sup.last_exit.reason is Reason.KILLED


# -- stable runs -----------------------------------------------------------------------


def test_crash_after_stable_run_restarts_at_once_and_resets_backoff() -> None:
    h = Harness(backoff_initial=0.1, max_restarts=100)
    h.start_running()
    decision = h.sup.exited(1, None)
    for _ in range(4):  # build up the backoff: 0.1, 0.2, 0.4, 0.8, 1.6
        decision = h.crash_loop_step()
    assert isinstance(decision, Wait)
    assert decision.delay > 0.8
    assert h.sup.backoff_elapsed() == Spawn()
    h.spawn()
    h.sup.ready()
    h.advance(1.0)  # exactly stable_after
    restarts = h.sup.restarts
    assert h.sup.exited(None, signal.SIGSEGV) == Spawn()
    assert h.sup.state is State.STARTING
    assert h.sup.restarts == restarts + 1
    h.spawn()
    decision = h.sup.exited(1, None)  # unstable again: backoff starts over
    assert isinstance(decision, Wait)
    assert JITTER_LOW * 0.1 <= decision.delay <= 0.1


def test_short_run_is_not_stable() -> None:
    h = Harness(stable_after=1.0)
    h.start_running()
    h.advance(0.5)
    assert isinstance(h.sup.exited(1, None), Wait)


def test_paused_time_counts_as_running() -> None:
    h = Harness()
    h.start_running()
    h.sup.paused()
    h.advance(5.0)
    assert h.sup.exited(None, signal.SIGKILL) == Spawn()


# -- policies ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "sig"), [(0, None), (1, None), (None, signal.SIGKILL), (None, signal.SIGTERM)]
)
def test_policy_never_stops_after_any_exit(code: int | None, sig: int | None) -> None:
    h = Harness(policy="never")
    h.start_running()
    h.advance(3.0)
    assert h.sup.exited(code, sig) == Idle()
    assert h.sup.state is State.STOPPED
    assert h.sup.last_exit is not None
    assert (h.sup.last_exit.code, h.sup.last_exit.signal) == (code, sig)
    assert h.sup.restarts == 0


def test_policy_never_after_failed_start_is_stopped_not_fatal() -> None:
    h = Harness(policy="never")
    h.sup.start()
    h.spawn()
    h.sup.start_failed("tcp://127.0.0.1:5559: Address already in use")
    assert h.sup.exited(1, None) == Idle()
    assert h.sup.state is State.STOPPED
    assert h.sup.last_exit is not None
    assert h.sup.last_exit.reason is Reason.START_FAILED


def test_policy_on_failure_stops_after_clean_exit() -> None:
    h = Harness(policy="on-failure")
    h.start_running()
    h.advance(0.1)
    assert h.sup.exited(0, None) == Idle()
    assert h.sup.state is State.STOPPED
    assert h.sup.last_exit is not None
    assert h.sup.last_exit.reason is Reason.EXITED
    assert h.sup.last_exit.code == 0


@pytest.mark.parametrize(("code", "sig"), [(1, None), (None, signal.SIGKILL), (None, 15)])
def test_policy_on_failure_restarts_after_failure(code: int | None, sig: int | None) -> None:
    h = Harness(policy="on-failure")
    h.start_running()
    assert isinstance(h.sup.exited(code, sig), Wait)
    assert h.sup.state is State.BACKOFF


def test_policy_on_failure_restarts_after_clean_exit_before_ready() -> None:
    h = Harness(policy="on-failure")
    h.sup.start()
    h.spawn()
    assert isinstance(h.sup.exited(0, None), Wait)  # never became ready: a failed start


def test_policy_on_failure_restarts_after_unhealthy_even_with_code_0() -> None:
    h = Harness(policy="on-failure")
    h.start_running()
    assert h.sup.unhealthy(Reason.MEMORY) == Kill()
    assert isinstance(h.sup.exited(0, None), Wait)


def test_policy_always_restarts_after_clean_exit() -> None:
    h = Harness(policy="always")
    h.start_running()
    assert isinstance(h.sup.exited(0, None), Wait)
    assert h.sup.backoff_elapsed() == Spawn()
    assert h.sup.restarts == 1


def test_unknown_policy_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown restart policy"):
        Supervisor("x", Restart(policy="sometimes"))


# -- exit reasons ------------------------------------------------------------------------


def test_reason_exited_records_code() -> None:
    h = Harness()
    h.start_running()
    h.advance(0.25)
    h.sup.exited(3, None)
    assert h.sup.last_exit == ExitInfo(3, None, Reason.EXITED, WALL_START + 0.25)
    assert h.sup.last_exit.as_dict() == {
        "code": 3,
        "signal": None,
        "reason": "exited",
        "at": WALL_START + 0.25,
    }


def test_reason_killed_records_signal_and_no_code() -> None:
    h = Harness()
    h.start_running()
    h.sup.exited(-9, signal.SIGKILL)
    assert h.sup.last_exit is not None
    assert h.sup.last_exit.reason is Reason.KILLED
    assert h.sup.last_exit.signal == signal.SIGKILL
    assert h.sup.last_exit.code is None


@pytest.mark.parametrize("state", ["starting", "running", "paused"])
def test_reason_stopped_after_stop_whatever_the_code(state: str) -> None:
    h = Harness(policy="always")
    h.start_running()
    if state == "starting":
        h.sup.stop()
        h.sup.exited(0, None)
        h.sup.start()
        h.spawn()
    if state == "paused":
        h.sup.paused()
        assert h.sup.state is State.PAUSED
    assert h.sup.stop() == Terminate()
    assert h.sup.state is State.STOPPING
    assert h.sup.pid is not None  # still there until it exits
    assert h.sup.exited(None, signal.SIGKILL) == Idle()  # escalated to SIGKILL: still a stop
    assert h.sup.state is State.STOPPED
    assert h.sup.last_exit is not None
    assert h.sup.last_exit.reason is Reason.STOPPED
    assert h.sup.last_exit.signal == signal.SIGKILL
    assert h.sup.restarts == 0


@pytest.mark.parametrize("reason", [Reason.MEMORY, Reason.UNRESPONSIVE])
def test_unhealthy_kills_and_sets_reason(reason: Reason) -> None:
    h = Harness()
    h.start_running()
    assert h.sup.unhealthy(reason) == Kill()
    assert h.sup.unhealthy(Reason.UNRESPONSIVE) == Idle()  # a second verdict: already killing
    assert h.sup.state is State.RUNNING  # until the exit is seen
    decision = h.sup.exited(None, signal.SIGKILL)
    assert isinstance(decision, Wait)
    assert h.sup.last_exit is not None
    assert h.sup.last_exit.reason is reason
    assert h.sup.last_exit.signal == signal.SIGKILL
    assert h.sup.backoff_elapsed() == Spawn()
    assert h.sup.restarts == 1


def test_unhealthy_rejects_other_reasons() -> None:
    h = Harness()
    h.start_running()
    with pytest.raises(ValueError, match="MEMORY or UNRESPONSIVE"):
        h.sup.unhealthy(Reason.KILLED)
    assert h.sup.state is State.RUNNING


def test_unhealthy_without_a_live_child_is_ignored() -> None:
    h = Harness()
    assert h.sup.unhealthy(Reason.MEMORY) == Idle()
    h.start_running()
    h.sup.stop()
    assert h.sup.unhealthy(Reason.UNRESPONSIVE) == Idle()  # the stop escalation handles it
    h.sup.exited(0, None)
    assert h.sup.last_exit is not None
    assert h.sup.last_exit.reason is Reason.STOPPED


def test_start_failed_reason_and_message() -> None:
    h = Harness()
    h.sup.start()
    h.spawn()
    h.sup.start_failed("tcp://127.0.0.1:5559: [Errno 98] Address already in use")
    decision = h.sup.exited(1, None)
    assert isinstance(decision, Wait)
    assert h.sup.last_exit is not None
    assert h.sup.last_exit.reason is Reason.START_FAILED
    assert h.sup.last_exit.code == 1
    assert h.sup.last_error == "tcp://127.0.0.1:5559: [Errno 98] Address already in use"


def test_failed_starts_count_like_crashes() -> None:
    h = Harness(max_restarts=2)
    h.sup.start()
    for _ in range(3):
        h.spawn()
        h.sup.start_failed("bind error")
        decision = h.sup.exited(1, None)
        if isinstance(decision, Wait):
            h.sup.backoff_elapsed()
    assert h.sup.state is State.FATAL
    assert h.sup.restarts == 2
    assert h.sup.last_exit is not None
    assert h.sup.last_exit.reason is Reason.START_FAILED


def test_exit_before_ready_without_report_is_a_failure() -> None:
    h = Harness(policy="on-failure", max_restarts=0)
    h.sup.start()
    h.spawn()
    assert h.sup.exited(0, None) == Idle()
    assert h.sup.state is State.FATAL
    assert h.sup.last_exit is not None
    assert h.sup.last_exit.reason is Reason.EXITED


def test_spawn_failed_is_a_failed_start() -> None:
    h = Harness()
    h.sup.start()
    assert isinstance(h.sup.spawn_failed("[Errno 11] Resource temporarily unavailable"), Wait)
    assert h.sup.last_exit is not None
    assert h.sup.last_exit.reason is Reason.START_FAILED
    assert h.sup.pid is None


# -- stop ---------------------------------------------------------------------------------


def test_stop_during_backoff_cancels_it() -> None:
    h = Harness()
    h.start_running()
    assert isinstance(h.sup.exited(1, None), Wait)
    assert h.sup.stop() == Idle()
    assert h.sup.state is State.STOPPED
    assert h.sup.backoff_delay is None
    assert h.sup.backoff_elapsed() == Idle()  # the timer fired late: ignored
    assert h.sup.state is State.STOPPED
    assert h.sup.restarts == 0
    assert h.sup.last_exit is not None
    assert h.sup.last_exit.reason is Reason.EXITED  # the crash, not the stop


def test_stop_during_starting_then_late_ready_and_start_failure() -> None:
    h = Harness()
    h.sup.start()
    pid = h.spawn()
    assert h.sup.stop() == Terminate()
    assert h.sup.state is State.STOPPING
    h.sup.ready()  # it answered PING after the stop was asked: still stopping
    h.sup.start_failed("late report")
    assert h.sup.state is State.STOPPING
    assert h.sup.pid == pid
    assert h.sup.exited(1, None) == Idle()
    assert h.sup.state is State.STOPPED
    assert h.sup.last_exit is not None
    assert h.sup.last_exit.reason is Reason.STOPPED


def test_stop_between_spawn_and_spawned_has_nothing_to_terminate() -> None:
    h = Harness()
    h.sup.start()
    assert h.sup.stop() == Idle()
    assert h.sup.state is State.STOPPED
    with pytest.raises(SupervisorError, match="no spawn was pending"):
        h.sup.spawned(42)


def test_stop_is_idempotent_and_idle_when_stopped_or_fatal() -> None:
    h = Harness(max_restarts=0)
    assert h.sup.stop() == Idle()
    h.start_running()
    assert h.sup.stop() == Terminate()
    assert h.sup.stop() == Idle()  # already stopping
    h.sup.exited(0, None)
    h.start_running()
    h.sup.exited(1, None)
    assert h.sup.state is State.FATAL
    assert h.sup.stop() == Idle()
    assert h.sup.state is State.FATAL


def test_manual_start_only_from_stopped_fatal_or_backoff() -> None:
    h = Harness()
    assert h.sup.start() == Spawn()
    assert h.sup.start() == Idle()  # starting
    h.spawn()
    h.sup.ready()
    assert h.sup.start() == Idle()  # running
    h.sup.paused()
    assert h.sup.start() == Idle()  # paused
    h.sup.resumed()
    h.sup.stop()
    assert h.sup.start() == Idle()  # stopping: restart waits for the exit
    h.sup.exited(0, None)
    assert h.sup.start() == Spawn()
    h.spawn()
    h.sup.exited(1, None)
    assert h.sup.state is State.BACKOFF
    assert h.sup.start() == Spawn()  # a manual start skips the backoff, counts nothing
    assert h.sup.restarts == 0
    assert h.sup.backoff_elapsed() == Idle()  # the cancelled timer


def test_restarts_cumulative_across_manual_start() -> None:
    h = Harness(max_restarts=5)
    h.start_running()
    h.sup.exited(1, None)
    h.crash_loop_step()
    h.sup.backoff_elapsed()
    h.spawn()
    h.sup.ready()
    assert h.sup.restarts == 2
    h.sup.stop()
    h.sup.exited(0, None)
    h.start_running()
    assert h.sup.restarts == 2
    h.sup.exited(1, None)
    h.sup.backoff_elapsed()
    assert h.sup.restarts == 3


# -- invalid and late events ----------------------------------------------------------------


def test_late_events_are_ignored() -> None:
    h = Harness()
    h.sup.ready()
    h.sup.paused()
    h.sup.resumed()
    h.sup.start_failed("nobody")
    assert h.sup.exited(1, None) == Idle()
    assert h.sup.backoff_elapsed() == Idle()
    assert h.sup.spawn_failed("no spawn pending") == Idle()
    assert h.sup.state is State.STOPPED
    assert h.sup.last_exit is None


def test_exit_of_a_stale_pid_is_ignored() -> None:
    h = Harness()
    pid = h.start_running()
    assert h.sup.exited(1, None, pid=pid + 999) == Idle()
    assert h.sup.state is State.RUNNING
    assert h.sup.pid == pid


def test_spawned_twice_raises() -> None:
    h = Harness()
    h.sup.start()
    h.spawn()
    with pytest.raises(SupervisorError):
        h.sup.spawned(7)


def test_pause_resume() -> None:
    h = Harness()
    h.start_running()
    h.sup.resumed()
    assert h.sup.state is State.RUNNING
    h.sup.paused()
    h.sup.paused()
    assert h.sup.state is State.PAUSED
    h.sup.resumed()
    assert h.sup.state is State.RUNNING


# -- uptime ---------------------------------------------------------------------------------


def test_uptime() -> None:
    h = Harness()
    assert h.sup.uptime() is None
    h.sup.start()
    assert h.sup.uptime() is None  # no process yet
    h.spawn()
    h.advance(0.3)
    assert h.sup.uptime() == 0.0  # a process, not ready yet
    h.sup.ready()
    h.advance(2.5)
    assert h.sup.uptime() == pytest.approx(2.5)
    h.sup.paused()
    h.advance(1.0)
    assert h.sup.uptime() == pytest.approx(3.5)
    h.sup.stop()
    assert h.sup.uptime() == pytest.approx(3.5)  # draining: still the same process
    h.sup.exited(0, None)
    assert h.sup.uptime() is None


# -- random event sequences ------------------------------------------------------------------


class SupervisorMachine(RuleBasedStateMachine):
    """Play a manager and a child at random, carrying out the supervisor's decisions."""

    @initialize(
        policy=st.sampled_from(["always", "on-failure", "never"]),
        # sampled_from spreads the draws; integers() would mostly give 0 (instant FATAL).
        max_restarts=st.sampled_from([3, 0, 1, 1000]),
        window=st.sampled_from([5.0, 0.5, 60.0]),
        seed=st.integers(0, 2**16),
    )
    def setup(self, policy: str, max_restarts: int, window: float, seed: int) -> None:
        self.clock = FakeClock()
        self.policy = policy
        self.sup = Supervisor(
            "random",
            Restart(policy=policy, max_restarts=max_restarts, window=window, backoff_max=2.0),
            clock=self.clock,
            wall_clock=self.clock,
            rng=random.Random(seed),
            stable_after=1.0,
        )
        self.child_alive = False
        self.next_pid = 1
        self.automatic_spawns = 0
        self.prev_restarts = 0
        self.prev_state = self.sup.state
        self.last_call = ""

    def carry_out(self, action: object, automatic: bool) -> None:
        if isinstance(action, Spawn):
            if automatic:
                self.automatic_spawns += 1
            assert self.sup.state is State.STARTING
            self.next_pid += 1
            self.sup.spawned(self.next_pid)
            self.child_alive = True
        elif isinstance(action, Wait):
            assert self.sup.state is State.BACKOFF
            assert 0.0 <= action.delay <= 2.0
        elif isinstance(action, Terminate | Kill):
            assert self.child_alive
        else:
            assert isinstance(action, Idle)

    @rule()
    def start(self) -> None:
        self.last_call = "start"
        self.carry_out(self.sup.start(), automatic=False)

    @rule()
    def stop(self) -> None:
        self.last_call = "stop"
        self.carry_out(self.sup.stop(), automatic=False)

    @rule()
    def ready(self) -> None:
        self.last_call = "ready"
        self.sup.ready()

    @rule()
    def start_failed(self) -> None:
        self.last_call = "start_failed"
        self.sup.start_failed("bind error")

    @rule()
    def paused(self) -> None:
        self.last_call = "paused"
        self.sup.paused()

    @rule()
    def resumed(self) -> None:
        self.last_call = "resumed"
        self.sup.resumed()

    @rule(reason=st.sampled_from([Reason.MEMORY, Reason.UNRESPONSIVE]))
    def unhealthy(self, reason: Reason) -> None:
        self.last_call = "unhealthy"
        self.carry_out(self.sup.unhealthy(reason), automatic=False)

    @rule()
    def backoff_elapsed(self) -> None:
        self.last_call = "backoff_elapsed"
        self.carry_out(self.sup.backoff_elapsed(), automatic=True)

    @precondition(lambda self: self.child_alive)
    @rule(
        how=st.sampled_from([(0, None), (1, None), (None, 9), (None, 15), (-1, 11)]),
    )
    def child_exits(self, how: tuple[int | None, int | None]) -> None:
        self.last_call = "exited"
        self.child_alive = False
        self.carry_out(self.sup.exited(*how), automatic=True)

    @precondition(lambda self: not self.child_alive)
    @rule()
    def late_exit(self) -> None:
        self.last_call = "late_exit"
        before = (self.sup.state, self.sup.last_exit)
        assert self.sup.exited(1, None) == Idle()
        assert (self.sup.state, self.sup.last_exit) == before

    @rule(seconds=st.sampled_from([0.01, 0.4, 1.0, 3.0, 30.0]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @invariant()
    def pid_matches_a_live_child(self) -> None:
        assert (self.sup.pid is not None) == self.child_alive
        assert (self.sup.uptime() is not None) == self.child_alive
        if self.sup.state in (State.STOPPED, State.FATAL, State.BACKOFF):
            assert self.sup.pid is None
        if self.sup.state in (State.RUNNING, State.PAUSED, State.STOPPING):
            assert self.sup.pid is not None

    @invariant()
    def restarts_count_automatic_spawns_and_never_decrease(self) -> None:
        assert self.sup.restarts >= self.prev_restarts
        assert self.sup.restarts == self.automatic_spawns
        self.prev_restarts = self.sup.restarts

    @invariant()
    def fatal_only_after_a_failure(self) -> None:
        if self.sup.state is State.FATAL and self.prev_state is not State.FATAL:
            assert self.last_call == "exited"
            assert self.sup.last_exit is not None
            assert self.sup.last_exit.reason is not Reason.STOPPED
            assert self.policy != "never"
        if self.sup.state is not self.prev_state:
            event(f"{self.prev_state} -> {self.sup.state}")
        self.prev_state = self.sup.state

    @invariant()
    def backoff_has_a_delay(self) -> None:
        assert (self.sup.state is State.BACKOFF) == (self.sup.backoff_delay is not None)


TestSupervisorMachine = SupervisorMachine.TestCase
TestSupervisorMachine.settings = settings(max_examples=120, stateful_step_count=60, deadline=None)
