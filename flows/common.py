"""What the pipeline and sweep flows share: the repo they run in, the compute slot they take turns
on, which failures they retry, and the current flow run's id."""
from __future__ import annotations

import flows  # noqa: F401  (sets PREFECT_HOME & co. before prefect is imported)

import contextlib
from functools import partial
from typing import Any, Callable, Iterator

from prefect.concurrency.sync import concurrency
from prefect.runtime import flow_run as runtime_flow_run

from mtdiff.config import ConfigError
from mtdiff.pipeline import dvc_runner
from mtdiff.pipeline.dvc_runner import StageConfigError, StagePreempted

# One global slot shared by the pipeline and sweep flows: the nightly run and the weekly sweep never
# compete for the machine (each waits for the other). Raise the limit's slots on a bigger machine.
COMPUTE_LIMIT = "mtdiff-compute"


def ensure_concurrency_limit(name: str = COMPUTE_LIMIT, slots: int = 1) -> None:
    """Create the global concurrency limit when the Prefect server lacks it: ``concurrency`` does not
    create one (it warns and runs unguarded, or raises with ``strict``), so a fresh server gets it on
    the first run. An existing limit is left as configured."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # another flow created it meanwhile
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))


def standing_server() -> bool:
    """Whether flows talk to a standing Prefect server (``PREFECT_API_URL``), which renews slot leases
    and revokes those of a killed holder. Without one each process starts its own ephemeral server,
    whose leases die with it while the slot stays taken in .prefect's database: a run killed while
    holding it left the next one waiting past the 300 s lease (measured), for ever."""
    from prefect.settings import get_current_settings

    return bool(get_current_settings().api.url)


@contextlib.contextmanager
def compute_slot(log: Callable[[str], Any] = print) -> Iterator[None]:
    """Hold one slot of :data:`COMPUTE_LIMIT` (waiting while another flow holds it) when a standing
    Prefect server keeps the leases (deployments, schedules); without one, runs of a checkout are
    kept apart by its pipeline lock (`python -m flows.pipeline`) instead."""
    if not standing_server():
        log(f"no Prefect server configured (PREFECT_API_URL): '{COMPUTE_LIMIT}' not used, so a killed "
            f"run cannot leave its slot taken")
        yield
        return
    ensure_concurrency_limit()
    log(f"waiting for a '{COMPUTE_LIMIT}' slot (the pipeline and sweeps take turns)")
    with concurrency(COMPUTE_LIMIT, occupy=1, strict=True):
        yield


# the working directory if it has dvc.yaml, else this checkout
find_repo = partial(dvc_runner.find_repo, default_root=flows.REPO_ROOT)


def retryable(task_obj, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry anything but bad params / a bad pipeline definition."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception as err:  # noqa: BLE001 - unreadable result: be conservative and retry
            exc = err
    return not isinstance(exc, (ConfigError, StageConfigError, StagePreempted, TimeoutError))


def current_flow_run_id() -> str:
    try:
        return str(runtime_flow_run.id or "")
    except Exception:  # noqa: BLE001 - outside a flow run
        return ""
