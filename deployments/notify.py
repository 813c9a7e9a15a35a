"""Tell people when a replay waits for approval: a Prefect automation that sends a
notification whenever a pipeline run pauses or suspends.

    python -m zdr.deployments.notify --block slack-webhook/zdr-approvals

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
from typing import Any

import httpx
from prefect.automations import Automation
from prefect.blocks.abstract import NotificationBlock
from prefect.blocks.core import Block
from prefect.events.actions import SendNotification
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.settings import get_current_settings

from zdr.errors import ConfigurationError
from zdr.flows.approval import PIPELINE_FLOW_NAME

AUTOMATION_NAME = "zdr: a replay waits for approval"

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
    automation = Automation(
        name=name,
        description="Sends a notification when a zero-downtime-replay run waits for approval.",
        trigger=pause_trigger(),
        actions=[SendNotification(block_document_id=block_id, subject=SUBJECT, body=BODY)],
    )
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
    args = parser.parse_args()
    try:
        automation = notify_on_approval(args.block, name=args.name)
    except ConfigurationError as exc:
        parser.error(str(exc))
    print(f"automation {automation.name!r} ({automation.id}) notifies {args.block}")


if __name__ == "__main__":
    main()
