"""The durable journal: idempotent submission, order, the queue bound, crash recovery."""

import sqlite3
import threading

import pytest

from edge.jobs import Job
from edge.journal import BusyError, Journal


def job(job_id, priority=0, prompt="a gear"):
    return Job(prompt=prompt, id=job_id, priority=priority, seed=1)


@pytest.fixture
def journal(tmp_path):
    j = Journal(tmp_path / "state" / "jobs.sqlite3", max_queue=5)
    yield j
    j.close()


def test_wal_and_full_sync_are_on(journal):
    # synchronous is per connection, so check our own connection's setting
    assert journal._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert journal._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_resubmitted_id_returns_the_existing_job(journal):
    first, created = journal.submit(job("a", prompt="first"), "mqtt", {"fleet": False})
    again, created_again = journal.submit(job("a", prompt="second"), "socket")
    assert created and not created_again
    assert again.job.prompt == "first" and again.source == "mqtt" and again.seq == first.seq
    assert journal.counts()["queued"] == 1


def test_dedup_key_only_matches_redeliveries(journal):
    a, _ = journal.submit(job("a"), "mqtt", dedup_key="k1")
    same, created = journal.submit(job("b"), "mqtt", dedup_key="k1", redelivery=True)
    assert not created and same.id == "a"
    # the same packet id and payload later, as a new message (packet ids are reused): a new job
    new, created = journal.submit(job("c"), "mqtt", dedup_key="k1", redelivery=False)
    assert created and new.id == "c"


def test_claims_by_priority_then_arrival(journal):
    for job_id, priority in [("low", -1), ("n1", 0), ("high", 5), ("n2", 0), ("high2", 5)]:
        journal.submit(job(job_id, priority), "socket")
    order = []
    while (record := journal.claim_next()) is not None:
        assert record.state == "running" and record.attempts == 1 and record.run_at
        order.append(record.id)
        journal.finish(record.id, "done", result={"paths": []})
    assert order == ["high", "high2", "n1", "n2", "low"]


def test_bounded_queue_refuses_with_busy_but_not_duplicates(journal):
    for i in range(5):
        journal.submit(job(f"j{i}"), "socket")
    with pytest.raises(BusyError, match="busy: the queue is full .5 jobs, the limit is 5"):
        journal.submit(job("one-too-many"), "socket")
    assert journal.submit(job("j0"), "socket")[1] is False  # a duplicate is answered, not refused
    assert journal.submit(job("blocked"), "socket", state="rejected", error="rejected: policy")[1]  # takes no room
    record = journal.claim_next()
    journal.finish(record.id, "done", result={})
    assert journal.submit(job("fits-now"), "socket")[1]


def test_position_counts_jobs_ahead(journal):
    for job_id, priority in [("a", 0), ("b", 0), ("urgent", 3)]:
        journal.submit(job(job_id, priority), "socket")
    assert [journal.position(i) for i in ("urgent", "a", "b")] == [0, 1, 2]
    assert journal.position("nope") is None


def test_cancel_only_touches_queued_jobs(journal):
    journal.submit(job("a"), "socket")
    journal.submit(job("b"), "socket")
    running = journal.claim_next()
    record, cancelled = journal.cancel("b")
    assert cancelled and record.state == "cancelled"
    record, cancelled = journal.cancel(running.id)
    assert not cancelled and record.state == "running"
    assert journal.cancel("b")[1] is False
    assert journal.cancel("unknown") == (None, False)


def test_recover_requeues_running_jobs_and_fails_poison_jobs(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    j = Journal(path)
    j.submit(job("crashy"), "socket")
    j.submit(job("other"), "socket")
    first = j.claim_next()
    run_at = first.run_at
    j._db.close()  # as if the process died here: no finish, no clean close

    for attempt in (2, 3):
        j = Journal(path)
        assert j.recover(max_attempts=3) == (["crashy"], [])
        again = j.claim_next()
        assert again.id == "crashy" and again.attempts == attempt
        assert again.run_at == run_at  # the output names stay the same across replays
        j._db.close()

    j = Journal(path)
    requeued, failed = j.recover(max_attempts=3)
    assert (requeued, failed) == ([], ["crashy"])
    record = j.get("crashy")
    assert record.state == "error" and "interrupted" in record.error and "3 times" in record.error
    assert j.claim_next().id == "other"
    j.close()


def test_results_survive_reopening(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    j = Journal(path)
    j.submit(job("a"), "mqtt", {"response_topic": "r/1", "correlation": "00ff"})
    j.claim_next()
    j.finish("a", "done", result={"paths": ["/x.png"], "seeds": [1], "timings": {"total": 0.1}})
    j.close()
    j = Journal(path)
    record = j.get("a")
    assert record.state == "done" and record.result["paths"] == ["/x.png"]
    assert record.reply == {"response_topic": "r/1", "correlation": "00ff"}
    assert [r.id for r in j.undelivered("mqtt")] == ["a"]
    j.mark_delivered("a")
    assert j.undelivered("mqtt") == []
    j.close()


def test_requeue_and_prune(journal):
    journal.submit(job("a"), "socket")
    journal.submit(job("b"), "socket")
    journal.requeue(journal.claim_next().id)
    assert journal.get("a").state == "queued"
    record = journal.claim_next()
    journal.finish(record.id, "done", result={})
    assert journal.prune(older_than=record.started - 10) == 0
    assert journal.prune(older_than=record.started + 1e6) == 1
    assert journal.get("a") is None and journal.get("b").state == "queued"  # active jobs are never pruned


def test_concurrent_submits_from_threads_are_all_committed(tmp_path):
    j = Journal(tmp_path / "jobs.sqlite3", max_queue=1000)
    errors = []

    def submit(start):
        try:
            for i in range(start, start + 50):
                j.submit(job(f"t{i}"), "socket")
        except Exception as exc:  # pragma: no cover - shown by the assert
            errors.append(exc)

    threads = [threading.Thread(target=submit, args=(k * 50,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and j.depth() == 200
    j.close()
    # and another process's view (a fresh connection) sees them all
    db = sqlite3.connect(tmp_path / "jobs.sqlite3")
    assert db.execute("SELECT count(*) FROM jobs").fetchone()[0] == 200
    db.close()


def test_submit_needs_an_id(journal):
    with pytest.raises(ValueError):
        journal.submit(Job(prompt="x"), "socket")


def test_history_pages_newest_first(tmp_path):
    j = Journal(tmp_path / "jobs.sqlite3", max_queue=1000)
    for i in range(25):
        j.submit(Job(prompt="x", id=f"h{i:02d}", seed=1), "socket")
    pages, before = [], None
    while page := j.history(limit=10, before=before):
        pages.append([r.id for r in page])
        before = page[-1].id
    assert [len(p) for p in pages] == [10, 10, 5]
    assert sum(pages, []) == [f"h{i:02d}" for i in reversed(range(25))]
    assert j.history(before="nope") == []


def test_group_commit_takes_many_submissions_per_transaction_and_answers_each_after_its_commit(tmp_path):
    j = Journal(tmp_path / "jobs.sqlite3", max_queue=10_000)
    reader = sqlite3.connect(tmp_path / "jobs.sqlite3", check_same_thread=False)
    seen_committed, lock = [], threading.Lock()

    def committed(future):  # runs once the future is done: its row must be visible to another connection
        record, created = future.result()
        visible = reader.execute("SELECT count(*) FROM jobs WHERE id = ?", (record.id,)).fetchone()[0]
        with lock:
            seen_committed.append((created, visible))

    def submit(start):
        for i in range(start, start + 100):
            j.submit_later(job(f"g{i}"), "mqtt").add_done_callback(committed)

    threads = [threading.Thread(target=submit, args=(k * 100,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    j.close()  # drains the queue: every submission is committed before close returns
    reader.close()
    assert len(seen_committed) == 400 and all(c == (True, 1) for c in seen_committed)
    assert j.group_commits < 400 / 2  # batched: on average more than two jobs per fsync


def test_a_batch_that_cannot_commit_fails_every_submission_in_it_and_stores_none(tmp_path):
    j = Journal(tmp_path / "jobs.sqlite3", max_queue=5)
    j.submit(job("first"), "socket")
    locker = sqlite3.connect(tmp_path / "jobs.sqlite3", isolation_level=None, timeout=0)
    locker.execute("BEGIN IMMEDIATE")  # another writer holds the lock past the journal's busy timeout
    j._db.execute("PRAGMA busy_timeout = 50")
    futures = [j.submit_later(job(f"x{i}"), "socket") for i in range(3)]
    for future in futures:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            future.result(10)
    locker.execute("ROLLBACK")
    locker.close()
    assert j.submit(job("after"), "socket")[1] is True  # the journal takes jobs again by itself
    assert [r.id for r in j.history()] == ["after", "first"]
    j.close()


def test_an_old_journal_gets_the_peer_column_and_keeps_its_rows(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, dedup_key TEXT,
            priority INTEGER NOT NULL, state TEXT NOT NULL, job TEXT NOT NULL, source TEXT NOT NULL,
            reply TEXT NOT NULL, submitted REAL NOT NULL, started REAL, finished REAL,
            attempts INTEGER NOT NULL DEFAULT 0, run_at TEXT, result TEXT, error TEXT,
            delivered INTEGER NOT NULL DEFAULT 0);
        INSERT INTO jobs (id, priority, state, job, source, reply, submitted)
            VALUES ('old', 0, 'queued', '{"prompt": "a gear", "id": "old", "seed": 1}', 'socket', '{}', 1.0);
    """)
    db.close()
    j = Journal(path)
    assert j.get("old").peer is None and j.get("old").job.prompt == "a gear"
    record, _ = j.submit(job("new"), "socket", peer={"uid": 1000, "gid": 100})
    assert record.peer == {"uid": 1000, "gid": 100}
    j.close()
    assert Journal(path).get("new").peer == {"uid": 1000, "gid": 100}  # and a second open does not migrate again
