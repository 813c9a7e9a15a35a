"""The flows' parameters as a person fills them in the Custom run form.

Each flow's docstring has an ``Args:`` section: Prefect shows those lines under the
fields of the form. The constraints here go into the form's schema too, so a
replay key the database would refuse is flagged in the form, before a run exists.

The database: ``database_url`` is a plain parameter, and a plain parameter shows in
the UI and the API to anyone who can read the run. A deployment names the database
instead by ``database_secret`` (a Prefect Secret block holding the URL) or leaves
both empty (the worker's ``ZDR_DATABASE_URL``). A plain URL stays for local use.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

import sqlalchemy as sa
from pydantic import Field

from zdr.config import resolve_url, to_sqlalchemy_url
from zdr.errors import ConfigurationError
from zdr.names import KEY_PATTERN

#: A replay key as the form checks it (``zdr.names.validate_key`` checks it again).
ReplayKey = Annotated[str, Field(pattern=KEY_PATTERN.pattern, min_length=1, max_length=40)]


def database(url: str | None, secret: str | None) -> str:
    """The run's database URL: ``url``, else the Secret block ``secret``, else the
    worker's ``ZDR_DATABASE_URL``, else the embedded PostgreSQL. Both given is refused:
    which one was meant cannot be told."""
    if url and secret:
        raise ConfigurationError(
            "give database_url or database_secret, not both: which database was meant "
            "cannot be told"
        )
    if secret:
        return resolve_url(_secret_value(secret))
    if url and _has_password(url):
        from prefect import get_run_logger

        get_run_logger().warning(
            "database_url holds a password, and a parameter shows in the UI and the API to "
            "anyone who can read this run: name a Prefect Secret block in database_secret "
            "instead, or leave both empty for the worker's ZDR_DATABASE_URL"
        )
    return resolve_url(url or None)


def dask_task_runner(workers: int, address: str | None) -> Any:
    """prefect-dask's task runner on a local cluster of ``workers`` processes or on the
    scheduler at ``address``; None for neither (the flow's own, threads)."""
    if not workers and not address:
        return None
    if workers and address:
        raise ConfigurationError("give dask workers or a dask address, not both")
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise ConfigurationError(
            "running tasks on Dask needs prefect-dask where the flow runs: "
            "pip install 'zero-downtime-replays[dask]'"
        ) from None
    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1})


def _has_password(url: str) -> bool:
    try:
        return bool(sa.make_url(to_sqlalchemy_url(url)).password)
    except Exception:  # not a URL: the engine says so, in zdr's words
        return False


def _secret_value(name: str) -> str:
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(name).get()
    except ValueError as exc:  # Prefect's "Unable to find block document named ..."
        raise ConfigurationError(
            f"no Prefect Secret block named {name!r}: create one with "
            "`Secret(value='postgresql://...').save('zdr-database')` (from "
            "prefect.blocks.system import Secret) or in the UI under Blocks, and give its "
            "name as database_secret"
        ) from exc
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError(
            f"the Prefect Secret block {name!r} does not hold a database URL (a string)"
        )
    return value.strip()


#: The live runner's projectors when a run names none: comma-separated import paths.
LIVE_PROJECTORS_ENV = "ZDR_LIVE_PROJECTORS"


def live_projectors() -> list[str]:
    """The worker's ``ZDR_LIVE_PROJECTORS``, else the bank example's live projectors.

    Read when a run starts, on the worker: a deployment (served or from prefect.yaml)
    leaves ``projectors`` empty, so both follow the worker's setting alike."""
    configured = os.environ.get(LIVE_PROJECTORS_ENV, "")
    paths = [p.strip() for p in configured.split(",") if p.strip()]
    if paths:
        return paths
    from zdr.examples.bank.projectors import LIVE

    return [cls.import_path() for cls in LIVE]
