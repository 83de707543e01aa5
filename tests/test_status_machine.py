"""Property-based test of the task status machine on a real pool.

Hypothesis drives random sequences of what producers, workers, zombies, beat and
admins do to a few tasks (create, claim, fetch, heartbeat, commit done/part_done,
fail, recover with a clock far in the future, reset_waiting, retry_failed, a stale
worker's commit) and checks after every step, on the stored documents, that:

* every status is one of ``status.ALL``;
* every observed change of status is listed in ``status.TRANSITIONS`` (or is the
  admin reset that ``reset_waiting`` performs);
* ``attempt`` never decreases;
* a commit, fail or heartbeat by a worker that no longer holds the lease changes
  nothing and says so;
* a task is ``failed`` only once ``max_attempts`` attempts of its phase were used.

The machine runs once per claim path of ``qcelery.lease``.
"""

from __future__ import annotations

import datetime as dt
import uuid

from claims_support import each_claim_path, with_claim_path
from hypothesis import HealthCheck
from hypothesis import settings as hsettings
from hypothesis import strategies as hs
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from qcelery import status as st
from qcelery.manage import TaskManager, utcnow
from qcelery.settings import Settings


def _far_future() -> dt.datetime:
    return utcnow() + dt.timedelta(days=365)


class PoolMachine(RuleBasedStateMachine):
    """One pool per example (dropped in teardown); ``held`` are the task dicts workers
    got from their claims, kept after the lease is gone so zombies can try to use them."""

    SETTINGS: Settings  # set by the test

    ids = Bundle("ids")

    def __init__(self):
        super().__init__()
        self.tm = TaskManager(f"machine_{uuid.uuid4().hex[:10]}", self.SETTINGS)
        self.held: list[dict] = []
        self.seen: dict = {}
        self.admin_reset = False
        self.created = 0

    def teardown(self):
        self.tm.task_pool.drop()

    # ------------------------------------------------------------------ helpers
    def doc(self, task_id) -> dict:
        return self.tm.get_raw(task_id)

    def _leases(self) -> dict:
        return {d["_id"]: (d["status"], d["attempt"]) for d in self.tm.task_pool.find({}, {"status": 1, "attempt": 1})}

    def holders(self) -> list[dict]:
        """Claimed copies whose worker still holds the lease, newest first."""
        leases = self._leases()
        return [t for t in reversed(self.held) if leases[t["_id"]] == (st.RUNNING, t["attempt"])]

    def stale(self) -> list[dict]:
        """Claimed copies whose lease is gone (committed, failed, recovered, reset, taken over)."""
        leases = self._leases()
        return [t for t in reversed(self.held) if leases[t["_id"]] != (st.RUNNING, t["attempt"])]

    # -------------------------------------------------------------------- rules
    @initialize(target=ids)
    def first_tasks(self):
        return self.create(2)

    @precondition(lambda self: self.created < 5)
    @rule(target=ids, n=hs.integers(1, 2))
    def create(self, n):
        defs = [{"model": "m", "i": self.created + k} for k in range(n)]
        self.created += n
        return multiple(*self.tm.create_task(defs))

    @rule(task_id=ids, phase=hs.sampled_from(st.CLAIMABLE))
    def claim(self, task_id, phase):
        before = self.doc(task_id)
        task = self.tm.claim(task_id, worker="w", before_status=phase)
        assert (task is not None) == (before["status"] == phase)
        if task is not None:
            assert task["attempt"] == before["attempt"] + 1
            self.held.append(task)

    @rule(phase=hs.sampled_from(st.CLAIMABLE))
    def fetch(self, phase):
        task = self.tm.fetch_task(status=phase)
        if task is None:
            assert self.tm.task_pool.count_documents({"status": phase}) == 0
        else:
            self.held.append(task)

    @precondition(lambda self: self.holders())
    @rule(data=hs.data())
    def heartbeat(self, data):
        task = data.draw(hs.sampled_from(self.holders()))
        assert self.tm.heartbeat(task["_id"], task["attempt"]) is True

    @precondition(lambda self: self.holders())
    @rule(data=hs.data(), status=hs.sampled_from([st.DONE, st.PART_DONE]))
    def commit(self, data, status):
        task = data.draw(hs.sampled_from(self.holders()))
        assert self.tm.commit(task, {"by": task["attempt"]}, status) is True
        d = self.doc(task["_id"])
        assert d["status"] == status and d["attempt"] == task["attempt"] and d["lease_until"] is None

    @precondition(lambda self: self.holders())
    @rule(data=hs.data())
    def fail(self, data):
        task = data.draw(hs.sampled_from(self.holders()))
        used = task["attempt"] - task["attempt_base"]
        expected = st.FAILED if used >= task["max_attempts"] else task["claimed_from"]
        assert self.tm.fail(task, "Traceback: boom") == expected
        assert self.doc(task["_id"])["status"] == expected

    @precondition(lambda self: self.stale())
    @rule(data=hs.data(), action=hs.sampled_from(["commit", "part_done", "fail", "heartbeat"]))
    def zombie(self, data, action):
        """A worker whose lease is gone tries to write: refused, and nothing changes."""
        task = data.draw(hs.sampled_from(self.stale()))
        before = self.doc(task["_id"])
        if action == "commit":
            assert self.tm.commit(task, {"zombie": True}) is False
        elif action == "part_done":
            assert self.tm.commit(task, {"zombie": True}, st.PART_DONE) is False
        elif action == "fail":
            assert self.tm.fail(task, "zombie") is None
        else:
            assert self.tm.heartbeat(task["_id"], task["attempt"]) is False
        assert self.doc(task["_id"]) == before

    @precondition(lambda self: self.holders())
    @rule(data=hs.data())
    def lease_taken_over(self, data):
        """A worker stalls past its lease: beat recovers the task, another worker claims it."""
        task = data.draw(hs.sampled_from(self.holders()))
        back = self.tm.recover_expired(now=_far_future())
        if task["_id"] in back:
            again = self.tm.claim(task["_id"], worker="other", before_status=task["claimed_from"])
            assert again is not None and again["attempt"] == task["attempt"] + 1
            self.held.append(again)
        else:  # its attempts were used up
            assert self.doc(task["_id"])["status"] == st.FAILED

    @rule(action=hs.sampled_from(["recover", "reset_waiting", "retry_failed"]))
    def beat_or_admin(self, action):
        """One rule for the pool-wide operations, so they do not crowd out the workers'."""
        if action == "recover":
            running = {d["_id"] for d in self.tm.task_pool.find({"status": st.RUNNING}, {"_id": 1})}
            back = self.tm.recover_expired(now=_far_future())
            assert set(back) <= running
            for i in back:
                assert self.doc(i)["status"] in st.CLAIMABLE
        elif action == "reset_waiting":
            self.tm.reset_waiting()
            self.admin_reset = True
        else:
            failed = {d["_id"]: d.get("claimed_from") for d in self.tm.task_pool.find({"status": st.FAILED}, {"claimed_from": 1})}
            assert set(self.tm.retry_failed()) == set(failed)
            for i, claimed_from in failed.items():  # back to the phase that failed
                assert self.doc(i)["status"] == (claimed_from or st.WAITING)

    # --------------------------------------------------------------- invariants
    @invariant()
    def documents_follow_the_status_machine(self):
        now = {d["_id"]: d for d in self.tm.task_pool.find({}, {"def": 0, "filter": 0, "res": 0})}
        for _id, d in now.items():
            assert d["status"] in st.ALL, d
            if d["status"] == st.FAILED:
                assert d["attempt"] - d["attempt_base"] >= d["max_attempts"], d
            prev = self.seen.get(_id)
            if prev is None:
                assert d["status"] == st.WAITING and d["attempt"] == 0
                continue
            assert d["attempt"] >= prev["attempt"], (prev, d)
            change = (prev["status"], d["status"])
            if change[0] != change[1]:
                admin = self.admin_reset and change == (st.RUNNING, st.WAITING)
                assert change in st.TRANSITIONS or admin, change
        self.seen = now
        self.admin_reset = False


@each_claim_path
def test_status_machine(settings, mongo_db, claim_strategy):
    class Machine(PoolMachine):
        SETTINGS = with_claim_path(settings, claim_strategy).model_copy(update={"max_attempts": 2})

    run_state_machine_as_test(
        Machine,
        settings=hsettings(max_examples=30, stateful_step_count=20, deadline=None, suppress_health_check=[HealthCheck.too_slow]),
    )
