"""Exactly-once claims of conditions, kept in the study's own storage.

Several workers (processes on one machine, or hosts sharing a PostgreSQL study) walk the
same conditions. Before computing one, a worker *claims* its condition key; the claim
names the Optuna trial that computes it, and the trial's liveness is the claim's:

* a claim is a record ``(key, epoch)``; exactly one insert of a given ``(key, epoch)``
  wins. With an RDB study (PostgreSQL, MySQL, SQLite URL) that is the primary key of the
  ``lmlab_claims`` table in the study's database; with the journal file (the
  single-machine default) it is the first record of that ``(key, epoch)`` in an
  append-only claims journal written under the journal's file lock.
* a claim is *held* while its trial is RUNNING (or, in the instant before its trial
  exists, while it is younger than the grace period and its owner may be alive). When
  the trial ends FAIL (error, interruption, a heartbeat that stopped) or COMPLETE, or
  the claim was released, the condition can be claimed again at ``epoch + 1``, again by
  exactly one worker. The runner re-checks for a FINISHED MLflow run after every won
  claim, so a finished condition is never computed twice.

Liveness: on one host a dead owner is seen from its pid; across hosts an RDB study
records Optuna heartbeats for every running trial (``heartbeat_interval``,
``grace_period``) and a trial whose heartbeat stopped is failed by
``optuna.storages.fail_stale_trials`` (its MLflow run is then closed FAILED by the
runner's stale-trial callback) and its condition is retried by a live worker. The
journal has no heartbeats: use it on one machine only.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
import warnings
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import optuna
from optuna.trial import FrozenTrial, TrialState

from lmlab.errors import LmlabError
from lmlab.tracking import mask_url, owner_is_dead, owner_tags

TOKEN_TAG = "lmlab.worker"
_TOKEN: tuple[int, str] = (-1, "")
#: ``trial_id`` of a claim its winner gave back without computing (the run was finished).
RELEASED = -1
CLAIMS_TABLE = "lmlab_claims"
WORKERS_TABLE = "lmlab_workers"


def worker_token() -> str:
    """One random token per worker process (a forked child gets its own): tells its
    claims from those of another process, even one that reuses its pid."""
    global _TOKEN
    if _TOKEN[0] != os.getpid():
        _TOKEN = (os.getpid(), uuid.uuid4().hex)
    return _TOKEN[1]


def worker_owner() -> dict[str, str]:
    return {**owner_tags(), TOKEN_TAG: worker_token()}


@dataclass(frozen=True)
class HeartbeatSettings:
    """Optuna trial heartbeats (RDB studies): every ``interval_s`` seconds a running trial
    records a heartbeat; one silent for ``grace_s`` seconds is failed and retried.

    Read from ``LMLAB_HEARTBEAT_INTERVAL`` and ``LMLAB_HEARTBEAT_GRACE`` (seconds)."""

    interval_s: int = 10
    grace_s: int = 60

    def __post_init__(self) -> None:
        if self.interval_s < 1 or self.grace_s <= self.interval_s:
            raise LmlabError("heartbeat interval must be >= 1 s and the grace period longer "
                             f"than it (got {self.interval_s} s and {self.grace_s} s)")

    @classmethod
    def from_env(cls) -> "HeartbeatSettings":
        def read(name: str, default: int) -> int:
            raw = os.environ.get(name)
            if raw is None or raw == "":
                return default
            try:
                return int(raw)
            except ValueError as error:
                raise LmlabError(f"{name} must be a whole number of seconds, got {raw!r}") from error

        interval = read("LMLAB_HEARTBEAT_INTERVAL", cls.interval_s)
        return cls(interval, read("LMLAB_HEARTBEAT_GRACE", max(cls.grace_s, 3 * interval)))


@dataclass(frozen=True)
class ClaimRecord:
    key: str
    epoch: int
    owner: Mapping[str, str]
    trial_id: int | None
    age_s: float  # seconds since the claim was made

    @property
    def mine(self) -> bool:
        return self.owner.get(TOKEN_TAG) == worker_token()


class ClaimBoard(ABC):
    """Where claims live; ``insert`` is the one exactly-once step."""

    @abstractmethod
    def latest(self, key: str) -> ClaimRecord | None:
        """The claim with the highest epoch for ``key``."""

    @abstractmethod
    def insert(self, key: str, epoch: int, owner: Mapping[str, str]) -> bool:
        """Record a claim; True when this call is the one that made ``(key, epoch)``."""

    @abstractmethod
    def attach(self, key: str, epoch: int, trial_id: int) -> None:
        """Name the trial that computes the claim (or RELEASED)."""

    def beat_worker(self, parent_run_id: str) -> None:
        """Record that this worker (and its parent run) is alive (RDB studies only)."""

    def silent_workers(self, grace_s: float) -> list[str]:
        """Parent runs of workers whose last beat is older than ``grace_s`` (RDB only)."""
        return []

    def forget_worker(self, parent_run_id: str) -> None:
        """Drop a worker's beat record (it ended, or it was closed as dead)."""


class SqlClaimBoard(ClaimBoard):
    """``lmlab_claims`` in the study's database; the primary key makes a claim unique."""

    def __init__(self, engine: Any) -> None:
        import sqlalchemy as sa

        self._sa = sa
        self.engine = engine
        metadata = sa.MetaData()
        self.table = sa.Table(
            CLAIMS_TABLE, metadata,
            sa.Column("condition_key", sa.String(200), primary_key=True),
            sa.Column("epoch", sa.Integer, primary_key=True),
            sa.Column("owner", sa.Text, nullable=False),
            sa.Column("trial_id", sa.Integer, nullable=True),
            sa.Column("created", sa.DateTime, nullable=False, server_default=sa.func.now()))
        self.workers = sa.Table(
            WORKERS_TABLE, metadata,
            sa.Column("parent_run_id", sa.String(64), primary_key=True),
            sa.Column("owner", sa.Text, nullable=False),
            sa.Column("beat", sa.DateTime, nullable=False, server_default=sa.func.now()))
        for attempt in range(6):
            try:
                metadata.create_all(engine, checkfirst=True)
                break
            except (sa.exc.IntegrityError, sa.exc.ProgrammingError, sa.exc.OperationalError) as error:
                # Another worker created the tables at the same moment: look again.
                if attempt == 5 or not (isinstance(error, sa.exc.IntegrityError)
                                        or "already exists" in str(error) or "locked" in str(error)):
                    raise
                time.sleep(0.2 * (attempt + 1))

    def latest(self, key: str) -> ClaimRecord | None:
        sa, t = self._sa, self.table
        with self.engine.connect() as connection:
            row = connection.execute(
                sa.select(t.c.epoch, t.c.owner, t.c.trial_id, t.c.created, sa.func.now())
                .where(t.c.condition_key == key).order_by(t.c.epoch.desc()).limit(1)).first()
        if row is None:
            return None
        return ClaimRecord(key, int(row[0]), json.loads(row[1]),
                           None if row[2] is None else int(row[2]), _seconds_between(row[3], row[4]))

    def insert(self, key: str, epoch: int, owner: Mapping[str, str]) -> bool:
        sa = self._sa
        try:
            with self.engine.begin() as connection:
                connection.execute(self.table.insert().values(
                    condition_key=key, epoch=epoch, owner=json.dumps(dict(owner))))
        except sa.exc.IntegrityError:
            return False
        return True

    def attach(self, key: str, epoch: int, trial_id: int) -> None:
        t = self.table
        with self.engine.begin() as connection:
            connection.execute(t.update().where((t.c.condition_key == key) & (t.c.epoch == epoch))
                               .values(trial_id=trial_id))

    def beat_worker(self, parent_run_id: str) -> None:
        sa, w = self._sa, self.workers
        with self.engine.begin() as connection:
            updated = connection.execute(w.update().where(w.c.parent_run_id == parent_run_id)
                                         .values(beat=sa.func.now())).rowcount
            if not updated:
                connection.execute(w.insert().values(parent_run_id=parent_run_id,
                                                     owner=json.dumps(worker_owner())))

    def silent_workers(self, grace_s: float) -> list[str]:
        sa, w = self._sa, self.workers
        with self.engine.connect() as connection:
            rows = connection.execute(sa.select(w.c.parent_run_id, w.c.beat, sa.func.now())).all()
        return [row[0] for row in rows if _seconds_between(row[1], row[2]) > grace_s]

    def forget_worker(self, parent_run_id: str) -> None:
        w = self.workers
        with self.engine.begin() as connection:
            connection.execute(w.delete().where(w.c.parent_run_id == parent_run_id))


def _seconds_between(earlier: Any, now: Any) -> float:
    """Seconds between two database timestamps, both read from the database's clock."""
    from datetime import datetime

    earlier, now = (datetime.fromisoformat(v) if isinstance(v, str) else v for v in (earlier, now))
    return (now.replace(tzinfo=None) - earlier.replace(tzinfo=None)).total_seconds()


class JournalClaimBoard(ClaimBoard):
    """An append-only claims journal beside the Optuna journal (same lock, same format).

    Appends are serialised by the file lock and read back in order, so every reader
    agrees that the first ``claim`` record of a ``(key, epoch)`` is the winner."""

    def __init__(self, path: Path) -> None:
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)
        self._backend = JournalFileBackend(str(path), JournalFileOpenLock(str(path)))
        self._read = 0
        self._claims: dict[str, dict[int, dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def _refresh(self) -> None:
        with self._lock:
            for log in self._backend.read_logs(self._read):
                self._read += 1
                epochs = self._claims.setdefault(log["key"], {})
                if log["op"] == "claim" and log["epoch"] not in epochs:
                    epochs[log["epoch"]] = {"owner": log["owner"], "at": log["at"], "trial_id": None}
                elif log["op"] == "attach":
                    claim = epochs.get(log["epoch"])
                    if claim is not None and claim["owner"].get(TOKEN_TAG) == log["token"]:
                        claim["trial_id"] = log["trial_id"]

    def latest(self, key: str) -> ClaimRecord | None:
        self._refresh()
        epochs = self._claims.get(key)
        if not epochs:
            return None
        epoch = max(epochs)
        claim = epochs[epoch]
        return ClaimRecord(key, epoch, claim["owner"], claim["trial_id"], time.time() - claim["at"])

    def insert(self, key: str, epoch: int, owner: Mapping[str, str]) -> bool:
        self._backend.append_logs([{"op": "claim", "key": key, "epoch": epoch,
                                    "owner": dict(owner), "at": time.time()}])
        self._refresh()
        return self._claims[key][epoch]["owner"].get(TOKEN_TAG) == owner.get(TOKEN_TAG)

    def attach(self, key: str, epoch: int, trial_id: int) -> None:
        self._backend.append_logs([{"op": "attach", "key": key, "epoch": epoch,
                                    "token": worker_token(), "trial_id": trial_id}])


@dataclass(frozen=True)
class Claim:
    """A claim this worker won."""

    key: str
    epoch: int
    retaken: ClaimRecord | None  # the claim it replaced, if any


StaleCallback = Callable[[optuna.Study, FrozenTrial], None]


@dataclass
class StudyStorage:
    """The study's storage, the claim board in it and how liveness is judged there."""

    storage: Any  # optuna BaseStorage (RDBStorage or JournalStorage)
    board: ClaimBoard
    heartbeat: HeartbeatSettings | None  # None: no heartbeats (journal)
    description: str  # for messages, password masked


def open_storage(url: str | None, store: Path, heartbeat: HeartbeatSettings,
                 on_stale: StaleCallback) -> StudyStorage:
    """The journal file under ``store`` (``url`` None) or an RDB study at ``url``."""
    if url is None:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        store.mkdir(parents=True, exist_ok=True)
        journal = store / "optuna.journal"
        storage = JournalStorage(JournalFileBackend(str(journal)))
        return StudyStorage(storage, JournalClaimBoard(store / "claims.journal"), None,
                            f"journal {journal}")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # heartbeats are "experimental" in Optuna 5
        try:
            storage = _create_rdb_storage(url, heartbeat, on_stale)
        except ImportError as error:
            raise LmlabError(f"the study storage {mask_url(url)} needs a database driver: "
                             f"pip install 'lmlab[scale]' ({error})") from error
        except Exception as error:  # SQLAlchemy's and the driver's connection errors
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise LmlabError(f"cannot open the study storage {mask_url(url)}: "
                             f"{_mask_in(first, url)}") from error
    return StudyStorage(storage, SqlClaimBoard(storage.engine), heartbeat, f"RDB {mask_url(url)}")


def _create_rdb_storage(url: str, heartbeat: HeartbeatSettings, on_stale: StaleCallback) -> Any:
    """RDBStorage with heartbeats; workers that meet a fresh database at the same moment
    race to create its tables, and the losers see a duplicate-key error: try again."""
    import sqlalchemy as sa
    from optuna.storages import RDBStorage

    for attempt in range(6):
        try:
            return RDBStorage(url, engine_kwargs={"pool_pre_ping": True},
                              heartbeat_interval=heartbeat.interval_s, grace_period=heartbeat.grace_s,
                              heartbeat_stale_trial_callback=on_stale)
        except (sa.exc.IntegrityError, sa.exc.ProgrammingError, sa.exc.OperationalError) as error:
            racing = isinstance(error, sa.exc.IntegrityError) or "already exists" in str(error) \
                or "locked" in str(error)
            if not racing or attempt == 5:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def _mask_in(message: str, url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        password = make_url(url).password
    except Exception:  # not a URL SQLAlchemy can parse: nothing to mask
        return message
    return message.replace(str(password), "***") if password else message


class Coordinator:
    """One worker's claims and trials on a shared study."""

    def __init__(self, study: optuna.Study, opened: StudyStorage,
                 on_dead: Callable[[FrozenTrial, str], None]) -> None:
        self.study = study
        self.storage = opened.storage
        self.board = opened.board
        self.heartbeat = opened.heartbeat
        self._on_dead = on_dead  # closes the runs of a trial failed because its worker died
        self.study_id = self.storage.get_study_id_from_name(study.study_name)

    def _fail(self, trial_id: int) -> None:
        try:
            self.storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another worker failed it first

    # -------------------------------------------------------------- liveness
    def reap(self) -> None:
        """Fail RUNNING trials whose heartbeat stopped (their callback closes their runs)."""
        if self.heartbeat is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "experimental" since Optuna 2.9
                optuna.storages.fail_stale_trials(self.study)

    def _trial(self, trial_id: int) -> FrozenTrial | None:
        try:
            return self.storage.get_trial(trial_id)
        except KeyError:
            return None

    def is_free(self, record: ClaimRecord) -> bool:
        """True when nobody is computing the claimed condition any more."""
        if record.trial_id == RELEASED:
            return True
        dead = owner_is_dead(record.owner) and not record.mine
        grace = self.heartbeat.grace_s if self.heartbeat else 60.0
        if record.trial_id is None:
            return dead or record.age_s > grace
        trial = self._trial(record.trial_id)
        if trial is None:
            return True
        if trial.state == TrialState.RUNNING and dead:
            self._fail(record.trial_id)
            self._on_dead(trial, "its worker process died")
            trial = self._trial(record.trial_id)
        if trial is not None and trial.state == TrialState.RUNNING and self.heartbeat is not None:
            self.reap()
            trial = self._trial(record.trial_id)
        return trial is None or trial.state != TrialState.RUNNING

    def trial_of(self, record: ClaimRecord | None) -> FrozenTrial | None:
        if record is None or record.trial_id in (None, RELEASED):
            return None
        return self._trial(int(record.trial_id))

    # -------------------------------------------------------------- claims
    def claim(self, key: str) -> Claim | None:
        """Win the claim on ``key``, or None when a live worker holds it."""
        latest = self.board.latest(key)
        if latest is not None and not self.is_free(latest):
            return None
        epoch = 0 if latest is None else latest.epoch + 1
        if self.board.insert(key, epoch, worker_owner()):
            return Claim(key, epoch, latest)
        return None

    def release(self, claim: Claim) -> None:
        self.board.attach(claim.key, claim.epoch, RELEASED)

    def attach(self, claim: Claim, trial_number: int) -> None:
        self.board.attach(claim.key, claim.epoch, self.trial_id(trial_number))

    def trial_id(self, number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    def still_running(self, trial_number: int) -> bool:
        """False when the trial was failed under us (a heartbeat judged it dead)."""
        trial = self._trial(self.trial_id(trial_number))
        return trial is not None and trial.state == TrialState.RUNNING

    # -------------------------------------------------------------- trials
    def create_trial(self, params: Mapping[str, Any], distributions: Mapping[str, Any]) -> optuna.Trial:
        """A RUNNING trial with fixed params (a grid condition), without the sampler."""
        frozen = optuna.trial.create_trial(state=TrialState.RUNNING, params=dict(params),
                                           distributions=dict(distributions))
        trial_id = self.storage.create_new_trial(self.study_id, template_trial=frozen)
        return optuna.Trial(self.study, trial_id)

    def ask(self, distributions: Mapping[str, Any]) -> optuna.Trial:
        with warnings.catch_warnings():
            # Optuna warns that heartbeats are meant for optimize(); the runner records them
            # itself around each trial (see :meth:`beating`).
            warnings.filterwarnings("ignore", message=".*Heartbeat.*")
            return self.study.ask(dict(distributions))

    @contextmanager
    def worker_beating(self, parent_run_id: str) -> Iterator[None]:
        """Beat for this worker's parent run while the sweep runs (RDB studies), so a
        worker killed on another host has its parent closed by the others."""
        if self.heartbeat is None:
            yield
            return
        with _every(self.heartbeat.interval_s, lambda: self.board.beat_worker(parent_run_id),
                    f"worker {parent_run_id}"):
            yield
        self.board.forget_worker(parent_run_id)

    @contextmanager
    def beating(self, trial_number: int) -> Iterator[None]:
        """Record the trial's heartbeat every interval while the block runs."""
        if self.heartbeat is None:
            yield
            return
        trial_id = self.trial_id(trial_number)
        with _every(self.heartbeat.interval_s, lambda: self.storage.record_heartbeat(trial_id),
                    f"trial {trial_number}"):
            yield


@contextmanager
def _every(interval_s: float, beat: Callable[[], None], what: str) -> Iterator[None]:
    """Call ``beat`` now and every ``interval_s`` seconds in a thread while the block runs."""
    stop = threading.Event()

    def loop() -> None:
        while True:
            try:
                beat()
            except Exception as error:  # a database hiccup: try again next interval
                print(f"warning: heartbeat of {what} not recorded: {type(error).__name__}")
            if stop.wait(interval_s):
                return

    thread = threading.Thread(target=loop, name=f"heartbeat {what}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
