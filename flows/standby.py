"""The live runner hosted as a run with a standby beside it.

A live-projection run with ``keep_standby`` is one of two: the *active* run holds the
live runner's lock and applies events; the *standby* run (a run of the same
deployment, on another worker) waits for the lock and takes over within 50 ms of the
active run's end, whatever ended it: its time, a cancellation, its process or its
machine gone (zdr's runner sessions make the server notice a silent machine within
about 15 s, ``zdr.locks.LOST_CLIENT_SETTINGS``).

While it is active, a run:

* sends a Prefect event ``zdr.live.heartbeat`` every ``HEARTBEAT_S`` (resource
  ``zdr.live.<database tag>``): an automation that expects it
  (``python -m zdr.deployments.notify --live-silent-after S``) notifies when no live
  runner is at work, and starts a new run;
* makes sure a standby exists: when nobody has waited for the lock for
  ``STANDBY_GRACE_S`` and no run of its deployment is scheduled or pending, it starts
  one (``run_deployment``, same parameters);
* after ``max_seconds`` hands over to the standby that waits (the live runner
  itself does, ``ReplayManager.follow(hand_over_after_s=...)``, checking for the
  waiter on its own connection just before it lets go; so a run lasts hours, and the
  runs list shows a few runs a day).

Everything here runs in a thread of its own beside the live runner: the live runner
only notes the time of its latest round (``tick``), so no Prefect call ever makes a
batch wait.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import logging
import threading
import time
from typing import Any
from uuid import UUID

import sqlalchemy as sa

from zdr.locks import live_runner_wanted

log = logging.getLogger("zdr.live")

HEARTBEAT_S = 10.0
#: How long nobody may wait for the lock before the active run starts a standby: a
#: run just started needs a few seconds to come to wait.
STANDBY_GRACE_S = 30.0
#: A run whose live runner has taken the lock is at work while its rounds keep
#: coming (every poll interval, 0.2 s; one batch can take minutes): a run whose
#: rounds stopped for longer lost its lock (it reconnects) or is stuck.
AT_WORK_S = 300.0
EVENT = "zdr.live.heartbeat"
RESOURCE = "zdr.live.{}"


class Duty:
    """What an active live-projection run does besides applying events."""

    def __init__(
        self,
        engine: sa.Engine,
        database_tag: str,
        *,
        flow_run_id: UUID | None,
        deployment_id: UUID | None,
        parameters: dict[str, Any],
        check_every_s: float = 1.0,
    ) -> None:
        self.engine = engine
        self.database_tag = database_tag
        self.flow_run_id = flow_run_id
        self.deployment_id = deployment_id
        self.parameters = parameters
        self.check_every_s = check_every_s
        self.last_tick: float | None = None
        self.active_since: float | None = None
        self.last_heartbeat = 0.0
        self.nobody_waiting_since: float | None = None
        self.standbys_started: list[str] = []
        self._done = threading.Event()
        # In the run's context (its Prefect settings and API), which a thread does not
        # inherit by itself.
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run, args=(self._run,), name="zdr-live-duty", daemon=True
        )

    def tick(self) -> None:
        """Called by the live runner after each round: cheap, never blocks."""
        self.last_tick = time.monotonic()

    def __enter__(self) -> Duty:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._done.wait(self.check_every_s):
            try:
                self._check()
            except Exception as exc:  # a hiccup of Prefect's API or the database
                log.warning("the live runner's standby check failed, tried again: %s", exc)

    def _check(self) -> None:
        now = time.monotonic()
        if self.last_tick is None or now - self.last_tick > AT_WORK_S:
            return  # still waiting as a standby (or between connections)
        if self.active_since is None:
            self.active_since = now
        if now - self.last_heartbeat >= HEARTBEAT_S:
            self._heartbeat()
            self.last_heartbeat = now
        with self.engine.connect() as conn:
            waiting = live_runner_wanted(conn)
        if waiting:
            self.nobody_waiting_since = None
            return
        if self.nobody_waiting_since is None:
            self.nobody_waiting_since = now
        if now - self.nobody_waiting_since >= STANDBY_GRACE_S and self.deployment_id:
            if not self._standby_on_its_way():
                self._start_standby()
            self.nobody_waiting_since = now  # give it the grace time to come

    def _heartbeat(self) -> None:
        from prefect.events import emit_event

        related = []
        if self.flow_run_id is not None:
            related.append(
                {
                    "prefect.resource.id": f"prefect.flow-run.{self.flow_run_id}",
                    "prefect.resource.role": "flow-run",
                }
            )
        emit_event(
            EVENT,
            resource={
                "prefect.resource.id": RESOURCE.format(self.database_tag),
                "prefect.resource.name": f"zdr live runner of database {self.database_tag}",
            },
            related=related,
        )

    def _standby_on_its_way(self) -> bool:
        """Whether a run of this deployment is scheduled or pending (it will wait)."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (
            DeploymentFilter,
            DeploymentFilterId,
            FlowRunFilter,
            FlowRunFilterExpectedStartTime,
            FlowRunFilterState,
            FlowRunFilterStateType,
        )
        from prefect.client.schemas.objects import StateType

        coming = [StateType.SCHEDULED, StateType.PENDING]
        # Not the schedule's runs hours ahead: only what starts within the grace time.
        soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=STANDBY_GRACE_S)
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(
                    id=DeploymentFilterId(any_=[self.deployment_id])
                ),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=coming)),
                    expected_start_time=FlowRunFilterExpectedStartTime(before_=soon),
                ),
                limit=5,
            )
        return bool(runs)

    def _start_standby(self) -> None:
        from prefect.deployments import run_deployment

        run = run_deployment(
            self.deployment_id,
            parameters=self.parameters,
            timeout=0,
            as_subflow=False,
            tags=["zdr", f"zdr-db-{self.database_tag}", "live-standby"],
        )
        self.standbys_started.append(str(run.id))
        log.info(
            "no standby waits to take over from this live runner: started run %s (%s)",
            run.name,
            run.id,
        )
