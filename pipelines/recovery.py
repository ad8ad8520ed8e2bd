"""Runs whose process is gone: find them, fail them, free their pool slots — so a re-run after a SIGKILL (the OOM
killer, a preempted node, ``kill -9``) proceeds unattended.

A killed ``dagster asset materialize`` (or a launched run worker) leaves its run ``STARTED`` in the instance and
its ``gpu`` pool slot claimed: nothing in Dagster notices, and every later gpu step — the documented re-run too —
waits forever on "blocked by limit for pool gpu". The run monitoring of the daemon does not help local runs either:
the default run launcher cannot check a run worker's health, so monitoring only times out runs that never start.

What Dagster records, and what this module reads:

- every event stores the pid of the process that wrote it (``DagsterEvent.pid``): ``RUN_START`` is written by the
  run worker (the CLI process for ``dagster asset materialize``, ``dagster api execute_run`` for a launched run),
  ``STEP_START`` by the process running the step (a child process under the multiprocess executor);
- Dagster records no host. So every run started through this code location's executor tags itself at its start
  with ``prefmill/host`` and ``prefmill/pid`` (:func:`start_of_run`). A run without the tag counts as this host's
  when the instance storage is local (SQLite, in-memory); on shared storage (Postgres) it is left alone.

A run is **dead** when it is ``STARTING``/``STARTED``/``CANCELING``, it ran on this host, and neither its run
worker nor any of its unfinished steps' processes is alive (a zombie, or a pid that now belongs to a process
started after the event that recorded it, counts as gone). It is **alive** when one of them is, and **unknown**
when it cannot be told from here (another host, no pid recorded yet, shared storage without the tag) — unknown
runs are never touched.

:func:`recover_dead_runs` reports dead runs failed (``CANCELING`` ones canceled) and frees their pool slots and
pending claims, plus the slots still held by runs that already ended once their processes are gone too (a
canceled run's orphaned step may still be on the GPU). It runs

- at the start of every run of this code location, in the run worker before any step claims a slot
  (:func:`start_of_run`, through :data:`pipelines.definitions.recovering_executor`): so re-running the killed
  command is the whole recovery; and every 30 s while the run executes (:class:`RecoveryWatch`), for a holder
  that was still alive at the start (an orphaned step process of a killed run worker) and dies later;
- on every tick of ``corpus_refresh_sensor`` (the daemon's periodic hook for launched runs), which also ignores
  dead runs when it waits for batches still labelling;
- on demand: ``python -m pipelines.cli recover [--dry-run]``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

HOST_TAG = "prefmill/host"
PID_TAG = "prefmill/pid"
ALIVE, DEAD, UNKNOWN = "alive", "dead", "unknown"
DISABLE_ENV = "PREFMILL_RECOVER_ON_START"  # "0": no recovery by runs (start, watch); cli recover still works
INTERVAL_ENV = "PREFMILL_RECOVER_INTERVAL_S"
DEFAULT_INTERVAL_S = 30.0


def _disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off")


@dataclass(frozen=True)
class RunLiveness:
    """What can be told from this host about one run's processes."""

    run_id: str
    status: str
    state: str  # alive | dead | unknown
    reason: str
    host: str | None = None
    pids: tuple[int, ...] = ()


@dataclass
class Recovery:
    """What :func:`recover_dead_runs` found and did."""

    failed: list[RunLiveness] = field(default_factory=list)  # dead runs reported failed (or canceled)
    freed: dict[str, list[str]] = field(default_factory=dict)  # run id -> the steps whose slots were freed
    alive: list[RunLiveness] = field(default_factory=list)
    unknown: list[RunLiveness] = field(default_factory=list)
    dry_run: bool = False  # then ``failed`` and ``freed`` say what would have been done

    def to_dict(self) -> dict:
        return {"failed": [asdict(r) for r in self.failed], "freed_slots": self.freed,
                "alive": [asdict(r) for r in self.alive], "unknown": [asdict(r) for r in self.unknown]}

    def summary(self) -> str:
        would = "would be " if self.dry_run else ""
        parts = [f"{len(self.failed)} dead run(s) {would}failed"
                 + (f" ({', '.join(r.run_id[:8] for r in self.failed)})" if self.failed else ""),
                 f"slots {would}freed for {len(self.freed)} run(s)"]
        if self.unknown:
            parts.append(f"{len(self.unknown)} run(s) not judged from this host")
        return "; ".join(parts)


def _status_values(*names: str):
    from dagster import DagsterRunStatus

    return [DagsterRunStatus[name] for name in names]


def storage_is_local(instance) -> bool:
    """Whether the instance's run storage lives on this machine only (SQLite, in memory): then every run in it
    ran on this host."""
    storage = instance.run_storage
    storage = getattr(storage, "_storage", storage)  # LegacyRunStorage wraps the real one
    storage = getattr(storage, "run_storage", storage)
    return type(storage).__name__ in {"SqliteRunStorage", "InMemoryRunStorage"}


def _run_processes(instance, run) -> tuple[list[tuple[int, float]], str | None]:
    """``[(pid, since)]`` of the run worker and every step still in progress (``since``: when the event naming
    that pid was written), and why none was found."""
    from dagster import DagsterEventType

    kinds = {DagsterEventType.RUN_START, DagsterEventType.STEP_START, DagsterEventType.STEP_RESTARTED,
             DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE, DagsterEventType.STEP_SKIPPED,
             DagsterEventType.STEP_UP_FOR_RETRY}
    entries = [r.event_log_entry for r in instance.get_records_for_run(run.run_id, of_type=kinds).records]
    processes: list[tuple[int, float]] = []
    worker = run.tags.get(PID_TAG)
    run_start = next((e for e in entries if e.dagster_event_type == DagsterEventType.RUN_START), None)
    if worker and worker.isdigit():
        processes.append((int(worker), run_start.timestamp if run_start else float("inf")))
    if run_start is not None and run_start.dagster_event and run_start.dagster_event.pid:
        processes.append((int(run_start.dagster_event.pid), run_start.timestamp))
    running: dict[str, tuple[int, float]] = {}
    for entry in entries:  # ascending: the last event of a step says whether it is still running
        step, event = entry.step_key, entry.dagster_event
        if not step or event is None:
            continue
        if entry.dagster_event_type in (DagsterEventType.STEP_START, DagsterEventType.STEP_RESTARTED):
            if event.pid:
                running[step] = (int(event.pid), entry.timestamp)
        else:
            running.pop(step, None)
    processes += list(running.values())
    if not processes:
        return [], "no process recorded yet (not started)"
    return processes, None


def run_liveness(instance, run, host: str | None = None, local: bool | None = None,
                 any_status: bool = False) -> RunLiveness:
    """Whether ``run``'s processes are alive, dead or not to be judged from this host (see the module docs).
    Only in-progress runs are judged, unless ``any_status`` (an ended run's step processes may outlive it)."""
    from pipelines.io import process_alive, this_host

    host = host or this_host()
    status = run.status.value
    if not any_status and run.status not in _status_values("STARTING", "STARTED", "CANCELING"):
        return RunLiveness(run.run_id, status, UNKNOWN, f"{status}: no process to check")
    run_host = run.tags.get(HOST_TAG)
    if run_host is None:
        if not (storage_is_local(instance) if local is None else local):
            return RunLiveness(run.run_id, status, UNKNOWN, "no host recorded, and the instance storage is shared")
        run_host = host
    if run_host != host:
        return RunLiveness(run.run_id, status, UNKNOWN, f"runs on host {run_host}", run_host)
    processes, why = _run_processes(instance, run)
    pids = tuple(sorted({pid for pid, _ in processes}))
    if not processes:
        return RunLiveness(run.run_id, status, UNKNOWN, why or "", run_host)
    alive = sorted({pid for pid, since in processes if process_alive(pid, since=since)})
    if alive:
        return RunLiveness(run.run_id, status, ALIVE, f"process {', '.join(map(str, alive))} alive", run_host, pids)
    return RunLiveness(run.run_id, status, DEAD, f"process {', '.join(map(str, pids))} gone", run_host, pids)


def run_is_dead(instance, run) -> bool:
    """True only for a run known to be dead: a live or unjudgeable run is never dead."""
    return run_liveness(instance, run).state == DEAD


def _claimed_steps(instance) -> dict[str, list[str]]:
    """run id -> steps holding or waiting for a pool slot."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return {}
    held: dict[str, list[str]] = {}
    for run_id in storage.get_concurrency_run_ids():
        held.setdefault(run_id, [])
    for pool in storage.get_concurrency_keys():
        info = storage.get_concurrency_info(pool)
        for slot in list(info.claimed_slots) + list(info.pending_steps):
            if slot.run_id in held and slot.step_key not in held[slot.run_id]:
                held[slot.run_id].append(slot.step_key)
    return held


def recover_dead_runs(instance, exclude: Iterable[str] = (), dry_run: bool = False,
                      log: Callable[[str], None] | None = None) -> Recovery:
    """Report every dead run (see :func:`run_liveness`) failed — ``CANCELING`` ones canceled — and free the pool
    slots of dead runs and of runs that already ended. ``exclude``: run ids not to look at (the caller's own run).
    ``dry_run``: only say what would be done."""
    from dagster import DagsterRunStatus, RunsFilter
    from dagster._core.events import JobFailureData, RunFailureReason

    from pipelines.io import this_host

    host, local = this_host(), storage_is_local(instance)
    exclude = set(exclude)
    result = Recovery(dry_run=dry_run)
    records = instance.get_run_records(RunsFilter(statuses=_status_values("STARTING", "STARTED", "CANCELING")))
    for record in records:
        run = record.dagster_run
        if run.run_id in exclude:
            continue
        liveness = run_liveness(instance, run, host, local)
        if liveness.state != DEAD:
            (result.alive if liveness.state == ALIVE else result.unknown).append(liveness)
            continue
        result.failed.append(liveness)
        message = (f"prefmill: the run's processes are gone ({liveness.reason} on {liveness.host}): killed "
                   "without a chance to report; marked failed and its pool slots freed so later runs proceed")
        if log:
            log(f"run {run.run_id}: {liveness.reason}; {'would mark' if dry_run else 'marking'} it failed")
        if dry_run:
            continue
        current = instance.get_run_by_id(run.run_id)  # another process may have recovered it meanwhile
        if current is None or current.status != run.status:
            continue
        if run.status == DagsterRunStatus.CANCELING:
            instance.report_run_canceled(current, message)
        else:
            instance.report_run_failed(current, message, JobFailureData(
                error=None, failure_reason=RunFailureReason.UNEXPECTED_TERMINATION))
    held = _claimed_steps(instance)
    if held:
        dead = {r.run_id for r in result.failed}
        others = [run_id for run_id in held if run_id not in dead and run_id not in exclude]
        ended_runs = [r.dagster_run for r in instance.get_run_records(RunsFilter(
            run_ids=others, statuses=_status_values("SUCCESS", "FAILURE", "CANCELED")))] if others else []
        # an ended run's step process can outlive it (a canceled run's orphan still on the GPU): keep its slot
        # until that process is gone too; a run not judged from here is the daemon's to free
        ended = {run.run_id for run in ended_runs
                 if run_liveness(instance, run, host, local, any_status=True).state == DEAD}
        for run_id in sorted((dead | ended) & set(held)):
            if run_id in exclude:
                continue
            if log:
                log(f"run {run_id}: {'would free' if dry_run else 'freeing'} the pool slots of "
                    f"{', '.join(held[run_id]) or 'its steps'}")
            if not dry_run:
                instance.event_log_storage.free_concurrency_slots_for_run(run_id)
            result.freed[run_id] = held[run_id]
    return result


def start_of_run(instance, run_id: str, log: Callable[[str], None] | None = None) -> Recovery | None:
    """At the start of a run, in its run worker, before any step claims a slot: tag the run with this host and
    pid (Dagster records no host), then recover the dead runs of this host. Never fails the run: a problem here
    is logged and the run goes on. Off when ``PREFMILL_RECOVER_ON_START=0``."""
    from pipelines.io import this_host

    try:
        instance.add_run_tags(run_id, {HOST_TAG: this_host(), PID_TAG: str(os.getpid())})
        if _disabled():
            return None
        recovery = recover_dead_runs(instance, exclude=[run_id], log=log)
        if log and (recovery.failed or recovery.freed):
            log(f"recovery before this run: {recovery.summary()}")
        return recovery
    except Exception as exc:  # noqa: BLE001 - recovery helps; it must never stop the run it runs in
        if log:
            log(f"recovery of dead runs skipped: {type(exc).__name__}: {exc}")
        return None


class RecoveryWatch:
    """While a run executes, :func:`recover_dead_runs` every ``interval`` seconds in a background thread. A run
    that started while a killed run's orphaned step process still held the gpu slot (the run worker killed, its
    step child not) would otherwise wait for that slot forever: once the orphan exits, the next check fails the
    dead run and frees the slot. Interval: ``PREFMILL_RECOVER_INTERVAL_S`` (default 30; 0 turns it off)."""

    def __init__(self, instance, run_id: str, log: Callable[[str], None] | None = None,
                 interval: float | None = None):
        import threading

        if interval is None:
            interval = float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL_S))
        self.instance, self.run_id, self.log, self.interval = instance, run_id, log, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="prefmill-recovery-watch", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                recovery = recover_dead_runs(self.instance, exclude=[self.run_id])
                if self.log and (recovery.failed or recovery.freed):
                    self.log(f"recovery while this run waits: {recovery.summary()}")
            except Exception:  # noqa: BLE001 - the next check tries again; never disturbs the run
                continue

    def __enter__(self) -> RecoveryWatch:
        if self.interval > 0 and not _disabled():
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


def recover_command(dry_run: bool = False) -> int:
    """``python -m pipelines.cli recover``: recover the dead runs of the instance at ``$DAGSTER_HOME``; prints
    what it did as JSON on stdout and one line per action on stderr."""
    import sys

    from dagster import DagsterInstance

    with DagsterInstance.get() as instance:
        recovery = recover_dead_runs(instance, dry_run=dry_run, log=lambda m: print(m, file=sys.stderr))
    print(json.dumps({"dry_run": dry_run, **recovery.to_dict()}, indent=2), flush=True)
    print(recovery.summary(), file=sys.stderr)
    return 0
