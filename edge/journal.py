"""The durable journal: every accepted job, where it stands and what came of it, in SQLite.

Every accepted job is committed here before any front end acknowledges it, so a job that was
acknowledged survives a crash or a power cut. SQLite in WAL mode with synchronous=FULL: each
commit is fsynced, so the last acknowledged job survives power loss too (NORMAL only survives a
process crash).

Submissions are group-committed: :meth:`Journal.submit_later` queues one and returns a future; one
committer thread takes every submission queued meanwhile into one transaction (one fsync) and
completes their futures only after its COMMIT, so more jobs per second are taken at the same
durability. When SQLite cannot write (disk full, I/O error) every future of that batch gets the
``sqlite3.Error`` and nothing of it is in the journal.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import EdgeError
from .jobs import FINISHED, STATES, Job, JobRecord


log = logging.getLogger(__name__)


class BusyError(EdgeError):
    """The queue is full; the job was not accepted (the client may try again later)."""


@dataclass
class _Submission:
    job: Job
    source: str
    reply: dict[str, Any]
    dedup_key: str | None
    redelivery: bool
    state: str
    error: str | None
    peer: dict[str, int] | None
    future: Future = field(default_factory=Future)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    dedup_key TEXT,
    priority INTEGER NOT NULL,
    state TEXT NOT NULL,
    job TEXT NOT NULL,
    source TEXT NOT NULL,
    reply TEXT NOT NULL,
    submitted REAL NOT NULL,
    started REAL,
    finished REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    run_at TEXT,
    result TEXT,
    error TEXT,
    delivered INTEGER NOT NULL DEFAULT 0,
    peer TEXT
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (state, priority DESC, seq);
CREATE INDEX IF NOT EXISTS jobs_dedup ON jobs (dedup_key) WHERE dedup_key IS NOT NULL;
"""
_COLUMNS = ("id", "job", "state", "seq", "source", "reply", "submitted", "started", "finished", "attempts",
            "run_at", "result", "error", "delivered", "peer")
# columns added after the first release: (name, declaration) for ALTER TABLE on older journals
_ADDED_COLUMNS = (("peer", "TEXT"),)


def _record(row: tuple) -> JobRecord:
    values = dict(zip(_COLUMNS, row))
    values["job"] = Job.from_dict(json.loads(values["job"]))
    values["reply"] = json.loads(values["reply"])
    values["result"] = json.loads(values["result"]) if values["result"] else None
    values["delivered"] = bool(values["delivered"])
    values["peer"] = json.loads(values["peer"]) if values["peer"] else None
    return JobRecord(**values)


class Journal:
    """Jobs in SQLite: submit, claim the next one, finish; requeue interrupted ones at start-up.

    Thread-safe: the front ends (MQTT network thread, socket connections) and the worker share
    one connection behind a lock, each operation being one short IMMEDIATE transaction.
    """

    def __init__(self, path: Path | str, max_queue: int = 100):
        self.path = Path(path)
        self.max_queue = max_queue
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # isolation_level=None: transactions are ours (BEGIN IMMEDIATE takes the write lock up front,
        # so a check-then-insert such as the queue bound cannot race)
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise EdgeError(f"{self.path}: SQLite refused WAL mode (got {mode}); put the state "
                                f"directory on a local filesystem")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._migrate()
        except sqlite3.Error as exc:
            raise EdgeError(f"{self.path}: cannot open the journal ({exc})") from None
        self._queue: list[_Submission] = []
        self._queue_cond = threading.Condition()
        self._closed = False
        self._committer: threading.Thread | None = None
        self.group_commits = 0  # transactions that committed submissions (jobs per commit, for the benchmark)

    def _migrate(self) -> None:
        have = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for name, declaration in _ADDED_COLUMNS:
            if name not in have:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {declaration}")
                log.info("%s: added the journal column %s", self.path, name)

    def close(self) -> None:
        with self._queue_cond:
            self._closed = True
            self._queue_cond.notify_all()
        if self._committer is not None:
            self._committer.join()
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                # SQLite may have rolled back on its own (SQLITE_FULL, SQLITE_IOERR): the original
                # error is the one to report, not "no transaction is active"
                if self._db.in_transaction:
                    with suppress(sqlite3.Error):
                        self._db.execute("ROLLBACK")
                raise

    def _get(self, db: sqlite3.Connection, where: str, *args: Any) -> JobRecord | None:
        row = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE {where}", args).fetchone()
        return _record(row) if row else None

    # --- front ends ---------------------------------------------------------------------------
    def submit(self, job: Job, source: str = "", reply: dict[str, Any] | None = None,
               dedup_key: str | None = None, redelivery: bool = False, state: str = "queued",
               error: str | None = None, peer: dict[str, int] | None = None) -> tuple[JobRecord, bool]:
        """Commit a job and wait for the commit; see :meth:`submit_later`."""
        return self.submit_later(job, source, reply, dedup_key, redelivery, state, error, peer).result()

    def submit_later(self, job: Job, source: str = "", reply: dict[str, Any] | None = None,
                     dedup_key: str | None = None, redelivery: bool = False, state: str = "queued",
                     error: str | None = None, peer: dict[str, int] | None = None) -> Future:
        """Queue a job for the next group commit; the future gives (record, created) once committed.

        A job whose id is already in the journal is not added again: the existing record is
        returned with created False. ``dedup_key`` identifies a message without an id (e.g. an MQTT
        packet id and payload); it is stored, and looked up only when ``redelivery`` says the
        transport is delivering the message again (packet ids are reused later on). A new
        queued job beyond ``max_queue`` active jobs raises :class:`BusyError`. ``state="rejected"``
        records a job refused by the content policy (it never runs and takes no queue room).
        ``peer``: who submitted it (the socket's SO_PEERCRED), kept with the job.
        """
        if job.id is None:
            raise ValueError("the journal needs jobs with an id")
        assert state in ("queued", "rejected")
        item = _Submission(job, source, reply or {}, dedup_key, redelivery, state, error, peer)
        with self._queue_cond:
            if self._closed:
                raise EdgeError(f"{self.path}: the journal is closed")
            self._queue.append(item)
            if self._committer is None:
                self._committer = threading.Thread(target=self._commit_loop, name="journal-commit", daemon=True)
                self._committer.start()
            self._queue_cond.notify()
        return item.future

    def _commit_loop(self) -> None:
        while True:
            with self._queue_cond:
                while not self._queue and not self._closed:
                    self._queue_cond.wait()
                if not self._queue:
                    return
                batch, self._queue = self._queue, []
            self._commit(batch)

    def _commit(self, batch: list[_Submission]) -> None:
        outcomes: list[tuple[_Submission, Any, BaseException | None]] = []
        try:
            with self._tx() as db:
                for item in batch:
                    try:
                        outcomes.append((item, self._insert(db, item), None))
                    except BusyError as exc:
                        outcomes.append((item, None, exc))
        except Exception as exc:  # nothing of the batch was committed
            for item in batch:
                item.future.set_exception(exc)
            return
        self.group_commits += 1
        for item, result, exc in outcomes:  # only now: each is acknowledged after its commit
            if exc is not None:
                item.future.set_exception(exc)
            else:
                item.future.set_result(result)

    def _insert(self, db: sqlite3.Connection, item: _Submission) -> tuple[JobRecord, bool]:
        job = item.job
        existing = self._get(db, "id = ?", job.id)
        if existing is None and item.dedup_key is not None and item.redelivery:
            existing = self._get(db, "seq = (SELECT max(seq) FROM jobs WHERE dedup_key = ?)", item.dedup_key)
        if existing is not None:
            return existing, False
        if item.state == "queued":
            active = self._active(db)
            if active >= self.max_queue:
                raise BusyError(f"busy: the queue is full ({active} jobs, the limit is {self.max_queue}); "
                                f"try again later")
        now = time.time()
        db.execute("INSERT INTO jobs (id, dedup_key, priority, state, job, source, reply, submitted, finished, "
                   "error, peer) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (job.id, item.dedup_key, job.priority, item.state, json.dumps(job.to_dict()), item.source,
                    json.dumps(item.reply), now, now if item.state != "queued" else None, item.error,
                    json.dumps(item.peer) if item.peer else None))
        return self._get(db, "id = ?", job.id), True

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            return self._get(self._db, "id = ?", job_id)

    def cancel(self, job_id: str) -> tuple[JobRecord | None, bool]:
        """Cancel a queued job; a running one is the worker's to stop.

        Returns (the record after, whether this call cancelled it).
        """
        with self._tx() as db:
            changed = db.execute("UPDATE jobs SET state = 'cancelled', finished = ?, error = 'cancelled' "
                                 "WHERE id = ? AND state = 'queued'", (time.time(), job_id)).rowcount
            return self._get(db, "id = ?", job_id), bool(changed)

    def depth(self) -> int:
        """Jobs queued or running."""
        with self._lock:
            return self._active(self._db)

    @staticmethod
    def _active(db: sqlite3.Connection) -> int:
        return db.execute("SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')").fetchone()[0]

    def position(self, job_id: str) -> int | None:
        """How many queued jobs run before this one (0: next), or None when it is not queued."""
        with self._lock:
            row = self._db.execute("SELECT priority, seq FROM jobs WHERE id = ? AND state = 'queued'",
                                   (job_id,)).fetchone()
            if row is None:
                return None
            return self._db.execute("SELECT count(*) FROM jobs WHERE state = 'queued' AND "
                                    "(priority > ? OR (priority = ? AND seq < ?))", (row[0], row[0], row[1])).fetchone()[0]

    def history(self, limit: int = 50, before: str | None = None) -> list[JobRecord]:
        """Jobs newest first, at most ``limit``; ``before``: only those that arrived before that id
        (the last id of the previous page). An unknown ``before`` gives an empty page."""
        with self._lock:
            if before is None:
                rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs ORDER BY seq DESC LIMIT ?",
                                        (limit,)).fetchall()
            else:
                rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE seq < "
                                        f"(SELECT seq FROM jobs WHERE id = ?) ORDER BY seq DESC LIMIT ?",
                                        (before, limit)).fetchall()
        return [_record(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall()
        return {state: dict(rows).get(state, 0) for state in STATES}

    # --- the worker ---------------------------------------------------------------------------
    def claim_next(self) -> JobRecord | None:
        """Mark the next job (highest priority, then earliest) running and return it."""
        with self._tx() as db:
            row = db.execute("SELECT seq FROM jobs WHERE state = 'queued' ORDER BY priority DESC, seq LIMIT 1").fetchone()
            if row is None:
                return None
            now = time.time()
            # run_at is fixed once: a replay after a crash writes the very same file names
            run_at = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(now))
            db.execute("UPDATE jobs SET state = 'running', started = ?, attempts = attempts + 1, "
                       "run_at = COALESCE(run_at, ?) WHERE seq = ?", (now, run_at, row[0]))
            return self._get(db, "seq = ?", row[0])

    def finish(self, job_id: str, state: str, result: dict[str, Any] | None = None,
               error: str | None = None) -> JobRecord:
        assert state in FINISHED
        with self._tx() as db:
            db.execute("UPDATE jobs SET state = ?, finished = ?, result = ?, error = ? WHERE id = ?",
                       (state, time.time(), json.dumps(result) if result is not None else None, error, job_id))
            return self._get(db, "id = ?", job_id)

    def requeue(self, job_id: str) -> JobRecord:
        """Put a running job back in the queue (a stop that could not wait for it)."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET state = 'queued' WHERE id = ? AND state = 'running'", (job_id,))
            return self._get(db, "id = ?", job_id)

    def recover(self, max_attempts: int) -> tuple[list[str], list[str]]:
        """At start-up: requeue jobs a crash left running; fail those interrupted ``max_attempts`` times.

        Returns (requeued ids, failed ids).
        """
        with self._tx() as db:
            rows = db.execute("SELECT id, attempts FROM jobs WHERE state = 'running' ORDER BY seq").fetchall()
            requeued, failed = [], []
            for job_id, attempts in rows:
                if attempts >= max_attempts:
                    db.execute("UPDATE jobs SET state = 'error', finished = ?, error = ? WHERE id = ?",
                               (time.time(), f"interrupted: the daemon stopped during this job {attempts} times "
                                f"(daemon.max_attempts); not retried", job_id))
                    failed.append(job_id)
                else:
                    db.execute("UPDATE jobs SET state = 'queued' WHERE id = ?", (job_id,))
                    requeued.append(job_id)
        return requeued, failed

    # --- results ------------------------------------------------------------------------------
    def mark_delivered(self, job_id: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET delivered = 1 WHERE id = ?", (job_id,))

    def undelivered(self, source: str, limit: int = 1000) -> list[JobRecord]:
        """Finished jobs from ``source`` whose result was not confirmed delivered, oldest first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE source = ? AND delivered = 0 AND "
                f"state IN ('done', 'error', 'cancelled', 'rejected') ORDER BY seq LIMIT ?", (source, limit)).fetchall()
        return [_record(r) for r in rows]

    def all_jobs(self) -> list[Job]:
        """Every journaled job, finished or not (the housekeeping looks for the input images they name)."""
        with self._lock:
            rows = self._db.execute("SELECT job FROM jobs").fetchall()
        return [Job.from_dict(json.loads(row[0])) for row in rows]

    def prune(self, older_than: float) -> int:
        """Forget finished jobs that finished before ``older_than`` (Unix time); returns how many."""
        with self._tx() as db:
            return db.execute("DELETE FROM jobs WHERE state IN ('done', 'error', 'cancelled', 'rejected') "
                              "AND finished < ?", (older_than,)).rowcount
