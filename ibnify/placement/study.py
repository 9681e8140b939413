"""A search as one Optuna study: the candidates are trials in a storage that many workers share.

One study per search, in a storage (a journal file in ``--out`` by default, an RDB URL or a
journal file on shared disk for many machines). The command that starts a search records the
study's fingerprint (what makes results comparable) and enqueues the control and every candidate
once; each worker, here or on another machine (``--join``), takes waiting trials until none is
left. A trial is one candidate: fine-tuned in one uninterrupted run, reporting its objective at
the pruner's rungs (successive halving or Hyperband stop it there), told its final objective,
its result kept in the trial's user attributes. A worker beats a heartbeat into its trial; a
trial whose heartbeat stops (a killed worker) is failed by whichever worker sees it first and
re-enqueued (``RetryFailedTrialCallback``), and its rerun continues from the dead run's last
epoch checkpoint. The report is built from the study.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import socket
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.storages import BaseStorage, JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock
from optuna.trial import TrialState

from ..errors import IbnifyError, InvalidOptionError, first_line
from .candidates import CONTROL, Candidate, parse_candidates
from .runs import Pruned, Search, rung_epochs
from .search_report import CONTROL_NAME, CandidateResult
from .search_state import differences
from .space import SpaceItem, sample_candidate

__all__ = [
    "DEFAULT_STUDY",
    "PRUNERS",
    "STUDY_FILE",
    "SearchInterrupted",
    "StudyOptions",
    "StudyRun",
    "make_pruner",
    "open_storage",
    "open_study",
    "run_study",
    "study_results",
]

STUDY_FILE = "study.journal"
"""The study's journal file in ``--out`` when no ``--storage`` is given."""
DEFAULT_STUDY = "ibnify-search"
PRUNERS = ("none", "halving", "hyperband")
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
_LIVE = (TrialState.WAITING, TrialState.RUNNING)
_POLL_S = 0.5

optuna.logging.set_verbosity(optuna.logging.WARNING)


class SearchInterrupted(KeyboardInterrupt):
    """Ctrl-C during a search: which candidates the study keeps and how to continue."""


@dataclass(frozen=True)
class StudyOptions:
    """How a search runs as a study (the CLI's options map one to one).

    Attributes:
        storage: an RDB URL (``sqlite:///s.db``, ``postgresql://…``) or a journal file path;
            default ``OUT/study.journal`` (in memory without an output folder).
        study: the study's name in the storage.
        workers: worker processes on this machine (1: the calling process works).
        devices: devices given to the workers in turn (a tuple, or text ``"cuda:0,cuda:1"``);
            default the fine-tune's.
        threads: torch CPU threads per worker (default: cores // workers when workers > 1).
        join: add workers to a study another command started; write no report.
        pruner: ``none``, ``halving`` or ``hyperband`` (default halving with > 3 candidates).
        space: a search space (:mod:`ibnify.placement.space`) instead of a list; ``trials``
            candidates are sampled from it with seeded TPE.
        analyze_first: with a space, the first trial is the stages ``analyze`` suggests.
        heartbeat_s, grace_s: a running trial records a heartbeat every ``heartbeat_s``; one
            silent for ``grace_s`` is failed and retried.
        join_wait_s: how long ``join`` waits for the study to be started.
    """

    storage: str | None = None
    study: str = DEFAULT_STUDY
    workers: int = 1
    devices: tuple[str, ...] = ()
    threads: int | None = None
    join: bool = False
    pruner: str | None = None
    space: str | None = None
    trials: int | None = None
    analyze_first: bool = True
    heartbeat_s: float = 10.0
    grace_s: float = 60.0
    join_wait_s: float = 300.0

    def __post_init__(self) -> None:
        if isinstance(self.devices, str):  # "cuda:0,cuda:1", as the command line gives them
            devices = tuple(d.strip() for d in self.devices.split(",") if d.strip())
            object.__setattr__(self, "devices", devices)

    def validate(self) -> None:
        """Raise InvalidOptionError for values that cannot work (before anything loads)."""
        if self.workers < 1:
            raise InvalidOptionError(f"workers must be at least 1, got {self.workers}")
        if self.pruner is not None and self.pruner not in PRUNERS:
            raise InvalidOptionError(
                f"unknown pruner {self.pruner!r}; choose from: {', '.join(PRUNERS)}"
            )
        if (self.space is None) != (self.trials is None):
            raise InvalidOptionError("give `space` and `trials` together")
        if self.trials is not None and self.trials < 1:
            raise InvalidOptionError(f"trials must be at least 1, got {self.trials}")
        if not 0 < self.heartbeat_s < self.grace_s:
            raise InvalidOptionError("the heartbeat interval must be positive and below the grace")
        if not self.study.strip():
            raise InvalidOptionError("the study name is empty")


def open_storage(storage: str | None, out: Path | None, grace_s: float = 60.0) -> BaseStorage:
    """The study's storage: an RDB URL, a journal file, ``OUT/study.journal``, or memory.

    A journal file is written under a lock file; a worker killed while it holds the lock
    leaves it behind, and the others break it after half the heartbeat grace (so that the
    wait never makes a live worker's heartbeat look stale).
    """
    if storage is None:
        if out is None:
            return optuna.storages.InMemoryStorage()
        storage = str(out / STUDY_FILE)
    if "://" in storage:
        return _rdb_storage(storage)
    Path(storage).parent.mkdir(parents=True, exist_ok=True)
    lock = JournalFileSymlinkLock(storage, grace_period=max(3, int(grace_s / 2)))
    return JournalStorage(JournalFileBackend(storage, lock_obj=lock))


def _rdb_storage(url: str, tries: int = 5) -> BaseStorage:
    """An RDB storage; processes that open a new database at once race to create its tables,
    and the loser retries (the winner has made them by then)."""
    # several processes write to one SQLite file: wait for its lock instead of failing
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(tries):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine)
        except Exception as exc:  # SQLAlchemy's errors: the driver, the URL, the race
            if attempt == tries - 1:
                message = f"cannot open the storage {url}: {first_line(exc, '')}"
                raise InvalidOptionError(message) from exc
            time.sleep(0.5 + attempt)
    raise AssertionError("unreachable")


def make_pruner(
    name: str, first: int, epochs: int
) -> tuple[optuna.pruners.BasePruner, dict[str, Any] | None, list[int]]:
    """The pruner, its fingerprint entry and the epochs it decides at.

    Successive halving (asynchronous, factor 2) and Hyperband (factor 3) start at epoch
    ``first`` (after the LR warmup); both decide at ``first × factor^k`` only.
    """
    factor = 2 if name == "halving" else 3
    rungs = rung_epochs(epochs, first, factor)
    if name == "none" or not rungs:  # a schedule too short for a rung prunes nothing
        return optuna.pruners.NopPruner(), None, []
    if name == "halving":
        pruner: optuna.pruners.BasePruner = optuna.pruners.SuccessiveHalvingPruner(
            min_resource=first, reduction_factor=2, min_early_stopping_rate=0
        )
        return pruner, {"name": name, "rungs": rungs, "factor": 2}, rungs
    pruner = optuna.pruners.HyperbandPruner(
        min_resource=first, max_resource=epochs, reduction_factor=3
    )
    return pruner, {"name": name, "rungs": rungs, "factor": 3}, rungs


@dataclass
class StudyRun:
    """What a worker needs: the search, the candidates, the rungs and the study's options."""

    search: Search
    queue: list[Candidate]
    options: StudyOptions
    settings: dict[str, Any]
    rungs: list[int]
    pruner: optuna.pruners.BasePruner
    items: list[SpaceItem] | None = None
    seed_params: dict[str, Any] | None = None
    budget_min: float | None = None
    started: float = field(default_factory=time.perf_counter)
    budget_hit: bool = False

    def sampler(self) -> optuna.samplers.BaseSampler:
        """Seeded TPE: the same seed proposes the same trials (one worker)."""
        return optuna.samplers.TPESampler(seed=self.search.config.seed)


def _where(options: StudyOptions, out: Path | None) -> str:
    if options.storage is not None:
        return options.storage
    return str(out / STUDY_FILE) if out is not None else "memory"


def open_study(run: StudyRun, storage: BaseStorage, force: bool = False) -> optuna.Study:
    """Create (or load) the study and check its fingerprint; ``join`` waits for it to exist.

    Raises:
        InvalidOptionError: the study was made with other settings (the line names them), or
            ``join`` found no study in time.
    """
    options, where = run.options, _where(run.options, run.search.out)
    if options.join:
        study = _wait_for_study(run, storage, where)
    else:
        if force:
            _delete_study(options.study, storage)
        study = optuna.create_study(
            study_name=options.study,
            storage=storage,
            direction="maximize",
            load_if_exists=True,
            sampler=run.sampler(),
            pruner=run.pruner,
        )
    recorded = study.user_attrs.get("fingerprint")
    if recorded is None:
        study.set_user_attr("fingerprint", run.settings)
    elif recorded != run.settings:
        changed = ", ".join(differences(recorded, run.settings))
        advice = (
            "give this worker the options of the command that started the study"
            if options.join
            else "pass `force=True` to start over, or choose another `out_dir` or `study`"
        )
        raise InvalidOptionError(
            f"study {options.study!r} in {where} was made with other settings (differs in: "
            f"{changed}); {advice}"
        )
    return study


def _delete_study(name: str, storage: BaseStorage) -> None:
    with suppress(KeyError):
        optuna.delete_study(study_name=name, storage=storage)


def _wait_for_study(run: StudyRun, storage: BaseStorage, where: str) -> optuna.Study:
    """The started study (fingerprint and candidates recorded), polled for ``join_wait_s``."""
    deadline = time.monotonic() + run.options.join_wait_s
    while True:
        try:
            study = optuna.load_study(
                study_name=run.options.study,
                storage=storage,
                sampler=run.sampler(),
                pruner=run.pruner,
            )
            if "queue" in study.user_attrs:
                return study
        except KeyError:
            pass
        if time.monotonic() > deadline:
            raise InvalidOptionError(
                f"no started study {run.options.study!r} in {where} after "
                f"{run.options.join_wait_s:g} s; start it with the same options without `join`"
            )
        time.sleep(_POLL_S)


def enqueue_candidates(study: optuna.Study, run: StudyRun) -> None:
    """Enqueue the control and every candidate not finished, waiting or running in the study
    (a rerun resumes; a wider list adds only the new ones); with a space, its seed trial."""
    present = {
        t.user_attrs.get("candidate")
        for t in study.get_trials(deepcopy=False)
        if t.state in _FINISHED + _LIVE
    }
    for candidate in run.queue:
        if candidate.name not in present:
            study.enqueue_trial({}, user_attrs={"candidate": candidate.name})
    if run.seed_params is not None and not any(t.params for t in study.get_trials(deepcopy=False)):
        study.enqueue_trial(run.seed_params)
    queue = list(study.user_attrs.get("queue", []))
    queue += [c.name for c in run.queue if c.name not in queue]
    study.set_user_attr("queue", queue)


def study_results(study: optuna.Study) -> dict[str, CandidateResult]:
    """Each candidate's result, from its first finished trial, in the study's order (the
    recorded queue, then sampled candidates by trial number)."""
    found: dict[str, CandidateResult] = {}
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if trial.state in _FINISHED and "result" in trial.user_attrs:
            result = CandidateResult(**trial.user_attrs["result"])
            found.setdefault(result.name, result)
    queue = [n for n in study.user_attrs.get("queue", []) if n in found]
    return {name: found[name] for name in queue + [n for n in found if n not in queue]}


def waiting_candidates(study: optuna.Study) -> list[str]:
    """The candidates of waiting trials (not started: the budget stopped the workers)."""
    return [
        t.user_attrs.get("candidate", f"trial {t.number}")
        for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    ]


# --- a worker ------------------------------------------------------------------------------


def _retry_callback() -> Any:
    """Optuna's retry of a failed trial (renamed in Optuna 5; both take the same arguments)."""
    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    cls = cls or optuna.storages.RetryFailedTrialCallback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(max_retry=3, inherit_intermediate_values=True)


def fail_stale_trials(study: optuna.Study, grace_s: float) -> list[int]:
    """Fail every running trial whose heartbeat is older than ``grace_s`` and enqueue its retry.

    The state change is atomic in the storage, so of two workers that see the same stale
    trial one fails and retries it; the other skips it. Returns the failed trials' numbers.
    """
    now, failed = time.time(), []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        started = trial.datetime_start.timestamp() if trial.datetime_start else now
        beat = max(float(trial.user_attrs.get("heartbeat", 0.0)), started)
        if now - beat <= grace_s:
            continue
        try:  # Optuna's own fail_stale_trials works this way, for RDB storages only
            if not study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                continue
        except (optuna.exceptions.UpdateFinishedTrialError, RuntimeError):
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _retry_callback()(study, study._storage.get_trial(trial._trial_id))
        failed.append(trial.number)
    return failed


@contextmanager
def _heartbeat(trial: optuna.Trial, interval: float) -> Iterator[None]:
    """Record ``time.time()`` in the trial every ``interval`` seconds while the body runs."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            try:
                trial.set_user_attr("heartbeat", time.time())
            except Exception:  # the trial was finished or failed elsewhere
                return
            stop.wait(interval)

    thread = threading.Thread(target=beat, name="ibnify-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _trial_candidate(trial: optuna.Trial, run: StudyRun) -> Candidate | None:
    """The candidate a taken trial stands for (enqueued by name, or sampled from the space)."""
    name = trial.user_attrs.get("candidate")
    if name == CONTROL_NAME:
        return CONTROL
    if name:
        return parse_candidates(name)[0]
    if run.items is not None:
        return sample_candidate(trial, run.items)
    return None


def _proposed(study: optuna.Study) -> int:
    """Sampled trials not failed (a retry counts once): what ``--trials`` limits."""
    return sum(
        1
        for t in study.get_trials(deepcopy=False)
        if t.state != TrialState.FAIL
        and t.user_attrs.get("candidate") != CONTROL_NAME
        and (t.params or "candidate" not in t.user_attrs)
    )


def _over_budget(study: optuna.Study, run: StudyRun) -> bool:
    """True when the elapsed time plus the mean time of a finished candidate would exceed
    ``budget_min`` (no estimate before the first candidate has finished)."""
    if run.budget_min is None:
        return False
    timings = [r.seconds for r in study_results(study).values()]
    if not timings:
        return False
    estimate = sum(timings) / len(timings)
    return time.perf_counter() - run.started + estimate > 60 * run.budget_min


def _take(study: optuna.Study, run: StudyRun) -> optuna.Trial | None:
    """The next trial to run: a waiting one, else (with a space) a new sample; None when
    there is none now."""
    trials = study.get_trials(deepcopy=False)
    if any(t.state == TrialState.WAITING for t in trials):
        trial = study.ask()
        if trial.user_attrs.get("candidate") or run.items is not None:
            return trial
        # another worker took the last waiting trial first: this one stands for nothing
        trial.set_user_attr("empty", True)
        study.tell(trial, state=TrialState.FAIL)
        return None
    limit = run.options.trials
    if run.items is not None and limit is not None and _proposed(study) < limit:
        return study.ask()
    return None


def work(study: optuna.Study, run: StudyRun, label: str = "") -> int:
    """Take trials until none is waiting or running (or the budget says stop); the number run.

    Trials running elsewhere are waited for: their worker may die, and then this one fails
    and retries its trial once the heartbeat is ``grace_s`` old.
    """
    ran = 0
    while True:
        fail_stale_trials(study, run.options.grace_s)
        if _over_budget(study, run):
            run.budget_hit = True
            return ran
        trial = _take(study, run)
        if trial is None:
            if study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                time.sleep(_POLL_S)
                continue
            if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
                continue
            return ran
        _run_trial(study, trial, run, label)
        ran += 1


def _run_trial(study: optuna.Study, trial: optuna.Trial, run: StudyRun, label: str) -> None:
    """Run one trial's candidate and tell the study how it ended (Ctrl-C: failed, kept for a
    rerun; an error: failed and raised)."""
    search = run.search
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    trial.set_user_attr("heartbeat", time.time())
    try:
        candidate = _trial_candidate(trial, run)
        if candidate is None:
            raise InvalidOptionError(f"trial {trial.number} names no candidate")
        trial.set_user_attr("candidate", candidate.name)
        done = study_results(study).get(candidate.name)
        if done is not None:  # a space proposed a finished candidate again: its result stands
            trial.set_user_attr("result", asdict(done))
            trial.set_user_attr("repeat", True)
            study.tell(trial, done.objective(search.objective))
            return
        position = _position(study, run, trial, candidate)
        search.say(f"{label}candidate {position}: {candidate.name} ...")
        state, value = _train(study, trial, run, candidate, f"{label}candidate {position}")
    except BaseException:
        study.tell(trial, state=TrialState.FAIL)
        raise
    study.tell(trial, value, state=state)


def _position(study: optuna.Study, run: StudyRun, trial: optuna.Trial, candidate: Candidate) -> str:
    """``3 of 6``: the candidate's place in the study's list (a sampled one: its trial's)."""
    queue = list(study.user_attrs.get("queue", []))
    if run.items is None and candidate.name in queue:
        return f"{queue.index(candidate.name) + 1} of {len(queue)}"
    return f"{trial.number + 1} of {len(queue) + (run.options.trials or 0)}"


def _train(
    study: optuna.Study, trial: optuna.Trial, run: StudyRun, candidate: Candidate, what: str
) -> tuple[TrialState, float | None]:
    """Fine-tune and measure ``candidate`` under a heartbeat; its result into the trial."""
    search = run.search

    def check(result: CandidateResult, epoch: int) -> bool:
        trial.report(result.objective(search.objective), epoch)
        return trial.should_prune()

    folder = search.out / "runs" / candidate.slug if search.out is not None else None
    cpu = time.process_time()
    with _heartbeat(trial, run.options.heartbeat_s):
        try:
            control = candidate == CONTROL  # the control runs to the end: the clean reference
            result = search.run(candidate, run.rungs, None if control else check, folder)
            state: TrialState = TrialState.COMPLETE
        except Pruned as stop:
            result, state = stop.result, TrialState.PRUNED
    trial.set_user_attr("result", asdict(result))
    trial.set_user_attr("cpu_s", round(time.process_time() - cpu, 3))  # this worker's CPU time
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
    value = 100 * result.objective(search.objective)
    if state == TrialState.COMPLETE:
        search.say(
            f"{what}: {candidate.name} done in {result.seconds:.1f} s: clean "
            f"{100 * result.clean:.1f}%, mean drop {100 * result.mean_drop:.1f} points"
        )
    else:
        search.say(
            f"{what}: {candidate.name} pruned after epoch {result.stopped_at} "
            f"({search.objective} objective {value:.1f}% on the rung subset)"
        )
    return state, (result.objective(search.objective) if state == TrialState.COMPLETE else None)


# --- workers on this machine ----------------------------------------------------------------


def _worker_main(run: StudyRun, index: int) -> None:
    """A forked worker: its threads and device, its own connection to the storage, then work."""
    options = run.options
    cores = os.cpu_count() or 1
    torch.set_num_threads(options.threads or max(1, cores // options.workers))
    if options.devices:
        run.search.device = options.devices[index % len(options.devices)]
    label = f"[worker {index + 1}] "
    say = run.search.say
    run.search.say = lambda line: say(f"{label}{line}")
    try:
        storage = open_storage(options.storage, run.search.out, options.grace_s)
        study = optuna.load_study(
            study_name=options.study, storage=storage, sampler=run.sampler(), pruner=run.pruner
        )
        work(study, run)
    except KeyboardInterrupt:
        _exit(130)
    except IbnifyError as exc:
        print(f"error: {label}{exc}", file=sys.stderr, flush=True)
        _exit(1)
    _exit(0)


def _exit(code: int) -> None:
    """End a forked worker without the parent's exit handlers, its output flushed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_workers(study: optuna.Study, run: StudyRun) -> None:
    """``workers`` processes on this machine work on the study until it has nothing left;
    a worker killed by a signal is replaced (its trial is retried through the heartbeat).

    Raises:
        InvalidOptionError: the study lives in memory, or CUDA is already in use here.
        IbnifyError: a worker failed with an error (its line was printed).
    """
    options = run.options
    if options.workers == 1:
        if options.threads is not None:
            torch.set_num_threads(options.threads)
        if options.devices:
            run.search.device = options.devices[0]
        work(study, run)
        return
    if isinstance(study._storage, optuna.storages.InMemoryStorage):
        raise InvalidOptionError("several workers need a study on disk: give an output folder")
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        raise InvalidOptionError("workers start by fork, which CUDA used here forbids")
    context = multiprocessing.get_context("fork")

    def start(index: int) -> Any:
        process = context.Process(target=_worker_main, args=(run, index), daemon=False)
        process.start()
        return process

    _supervise({i: start(i) for i in range(options.workers)}, study, run, start)


def _supervise(processes: dict[int, Any], study: optuna.Study, run: StudyRun, start) -> None:
    """Wait for the workers; replace one a signal killed while trials remain (at most twice
    per worker); on Ctrl-C let them fail their trials and stop."""
    restarts, failed = 0, []
    try:
        while processes:
            for index, process in list(processes.items()):
                process.join(timeout=_POLL_S / len(processes))
                if process.exitcode is None:
                    continue
                del processes[index]
                left = study.get_trials(deepcopy=False, states=_LIVE)
                if process.exitcode < 0 and left and restarts < 2 * run.options.workers:
                    run.search.say(f"worker {index + 1} was killed; a new worker takes its place")
                    processes[index] = start(index)
                    restarts += 1
                elif process.exitcode > 0:
                    failed.append(index + 1)
    except KeyboardInterrupt:
        for process in processes.values():
            process.join(timeout=30)
            if process.exitcode is None:
                process.terminate()
        raise
    if failed and study.get_trials(deepcopy=False, states=_LIVE):
        raise IbnifyError(f"worker {failed[0]} stopped with an error (see its line above)")


def run_study(study: optuna.Study, run: StudyRun) -> None:
    """Enqueue (unless joining), then work with this machine's workers."""
    if not run.options.join:
        enqueue_candidates(study, run)
    run_workers(study, run)
