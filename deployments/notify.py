"""Tell people when a replay waits for approval: a Prefect automation that sends a
notification whenever a pipeline run pauses or suspends. And, with
``--live-silent-after S``, when no live runner has been at work for S seconds (no
``zdr.live.heartbeat`` event, see ``zdr.flows.standby``): a second automation that
notifies and starts a new run of the live-projection deployment.

    python -m zdr.deployments.notify --block slack-webhook/zdr-approvals
    python -m zdr.deployments.notify --block slack-webhook/zdr-ops --live-silent-after 60

``--block`` names a notification block as ``<block type>/<name>``: a Slack webhook,
a Microsoft Teams webhook, a custom webhook, an email block... made in the UI
(*Blocks*) or in Python::

    from prefect.blocks.notifications import SlackWebhook
    SlackWebhook(url="https://hooks.slack.com/services/...").save("zdr-approvals")

Running it again replaces the automation (one per name), so it is safe in a deploy
script. The automation runs in the Prefect server (its triggers and actions
services): nothing of zdr needs to run for a notification to go out.
"""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any

import httpx
from prefect.automations import Automation
from prefect.blocks.abstract import NotificationBlock
from prefect.blocks.core import Block
from prefect.events.actions import RunDeployment, SendNotification
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.settings import get_current_settings

from zdr.errors import ConfigurationError
from zdr.flows.approval import PIPELINE_FLOW_NAME

AUTOMATION_NAME = "zdr: a replay waits for approval"
LIVE_AUTOMATION_NAME = "zdr: no live runner at work"
LIVE_DEPLOYMENT = "live-projection/live-projection"
LIVE_SUBJECT = "No zdr live runner at work"
LIVE_BODY = (
    "No zdr live runner has sent a heartbeat (zdr.live.<database tag>) for a while: "
    "the live read models and dual-writing replays stand still; the application's "
    "events are not lost (they wait in the log). Check the live-projection runs and "
    "the workers of their pool; `zdr status` shows the live read models and whether "
    "a live runner runs."
)

SUBJECT = "Replay {{ flow_run.parameters.replay_key }} waits for approval"
BODY = """\
The zero-downtime-replay run {{ flow_run.name }} waits for approval of replay \
{{ flow_run.parameters.replay_key }} (projectors: {{ flow_run.parameters.projectors }}).
Read the report and answer in the run's Resume form: {{ flow_run|ui_url }}
or on the command line: zdr approve {{ flow_run.parameters.replay_key }} --approver NAME
Unanswered until its timeout, the run fails and live stays as it is."""


def pause_trigger() -> EventTrigger:
    """A pipeline run paused (a run started from Python) or suspended (a deployment's)."""
    return EventTrigger(
        expect={"prefect.flow-run.Paused", "prefect.flow-run.Suspended"},
        match={"prefect.resource.id": "prefect.flow-run.*"},
        match_related={
            "prefect.resource.role": "flow",
            "prefect.resource.name": PIPELINE_FLOW_NAME,
        },
        posture=Posture.Reactive,
        threshold=1,
    )


def notify_on_approval(block: str, *, name: str = AUTOMATION_NAME) -> Automation:
    """Create (or replace) the automation sending ``block`` a notification each time a
    pipeline run waits for approval."""
    block_id = _block_document_id(block)
    return _save(
        Automation(
            name=name,
            description="Sends a notification when a zero-downtime-replay run waits for approval.",
            trigger=pause_trigger(),
            actions=[SendNotification(block_document_id=block_id, subject=SUBJECT, body=BODY)],
        )
    )


def silence_trigger(after_s: float) -> EventTrigger:
    """No ``zdr.live.heartbeat`` of a database's live runner for ``after_s`` seconds."""
    return EventTrigger(
        # Each heartbeat opens a window in which the next one is expected (for each
        # database's live runner), as Prefect's own missing-heartbeat automation does.
        after={"zdr.live.heartbeat"},
        expect={"zdr.live.heartbeat"},
        match={"prefect.resource.id": "zdr.live.*"},
        for_each={"prefect.resource.id"},
        posture=Posture.Proactive,
        threshold=1,
        within=dt.timedelta(seconds=after_s),
    )


def notify_when_live_is_silent(
    block: str, after_s: float, *, name: str = LIVE_AUTOMATION_NAME
) -> Automation:
    """Create (or replace) the automation sending ``block`` a notification when no live
    runner has been at work for ``after_s`` seconds, and starting a new run of the
    live-projection deployment where there is one."""
    if after_s < 30:
        raise ConfigurationError(
            f"--live-silent-after must be 30 s or more (a heartbeat comes every 10 s), "
            f"not {after_s:g}"
        )
    block_id = _block_document_id(block)
    actions: list[Any] = [
        SendNotification(block_document_id=block_id, subject=LIVE_SUBJECT, body=LIVE_BODY)
    ]
    deployment = _deployment_id(LIVE_DEPLOYMENT)
    if deployment is not None:
        actions.append(RunDeployment(source="selected", deployment_id=deployment))
    return _save(
        Automation(
            name=name,
            description=f"Notifies when no zdr live runner has been at work for {after_s:g} s"
            + (", and starts a live-projection run" if deployment is not None else ""),
            trigger=silence_trigger(after_s),
            actions=actions,
        )
    )


def _deployment_id(name: str) -> Any:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(name).id
        except Exception:  # none of that name: notify only
            return None


def _save(automation: Automation) -> Automation:
    """Create ``automation``, or replace the one of its name (running it again is safe)."""
    name = automation.name
    try:
        existing: Any = Automation.read(name=name)
    except ValueError:  # none of that name yet
        existing = None
    if existing is not None:
        automation.id = existing.id
        automation.update()
        return automation
    return automation.create()


def _block_document_id(block: str) -> Any:
    if "/" not in block:
        raise ConfigurationError(
            f"name the notification block as <block type>/<name> (slack-webhook/{block}), "
            f"not {block!r}"
        )
    api = get_current_settings().api.url
    if not api:
        raise ConfigurationError(
            "PREFECT_API_URL is not set: the automation belongs on the Prefect server your "
            "runs use (export PREFECT_API_URL=http://HOST:4200/api)"
        )
    try:
        found = Block.load(block)
    except (ValueError, KeyError) as exc:
        raise ConfigurationError(
            f"no notification block {block!r} on {api}: make one in the UI (Blocks) or in "
            "Python (SlackWebhook(url=...).save(name)); `prefect block ls` lists them"
        ) from exc
    except httpx.HTTPError as exc:
        raise ConfigurationError(
            f"cannot reach the Prefect server at {api} ({type(exc).__name__}): is it running, "
            "is PREFECT_API_URL right?"
        ) from exc
    if not isinstance(found, NotificationBlock):
        raise ConfigurationError(
            f"{block!r} is a {type(found).__name__} block, which cannot send a notification: "
            "name a notification block (slack-webhook/..., custom-webhook/..., email/...)"
        )
    return found._block_document_id


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m zdr.deployments.notify",
        description="Send a notification each time a replay waits for approval.",
    )
    parser.add_argument(
        "--block",
        required=True,
        help="the notification block, as <block type>/<name> (e.g. slack-webhook/zdr-approvals)",
    )
    parser.add_argument("--name", default=AUTOMATION_NAME, help="the automation's name")
    parser.add_argument(
        "--live-silent-after",
        type=float,
        metavar="S",
        help="also notify (and start a live-projection run) when no live runner has been "
        "at work for S seconds (30 or more)",
    )
    args = parser.parse_args()
    try:
        made = [notify_on_approval(args.block, name=args.name)]
        if args.live_silent_after is not None:
            made.append(notify_when_live_is_silent(args.block, args.live_silent_after))
    except ConfigurationError as exc:
        parser.error(str(exc))
    for automation in made:
        print(f"automation {automation.name!r} ({automation.id}) notifies {args.block}")


if __name__ == "__main__":
    main()
