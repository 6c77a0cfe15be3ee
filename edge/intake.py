"""Intake: a raw request becomes a journaled job (or a refusal naming the field) behind a future.

:class:`Intake` is the service's front half: decode (:func:`edge.jobs.decode_payload`), validate
(:func:`edge.jobs.parse_job`, the one validator, then the runner's model-side checks), fix the id and
seed (:func:`edge.jobs.admit`), police (the content policy), and commit to the journal's next group
commit. The ``*_later`` calls return a future of the :class:`Answer` that completes after the commit,
so a front end's thread (paho's network thread) goes on reading while the journal syncs.

The rules a SIGHUP may change (policy, limits, defaults, log level) are one :class:`Rules` object,
replaced in one assignment by :meth:`Intake.reconfigure`.
"""

from __future__ import annotations

import logging
import sqlite3
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

from .config import Config
from .errors import OutputError, ValidationError
from .inputs import InputStore
from .jobs import JobRecord, admit, decode_payload, error_body, parse_job, state_body, valid_id
from .journal import BusyError, Journal
from .policy import ContentPolicy
from .runner import Runner

log = logging.getLogger(__name__)

POLICY_ERROR = "rejected: policy"


@dataclass(frozen=True)
class Answer:
    """The reply to one submission. ``accepted``: the job is in the journal (new or a duplicate)."""

    body: dict[str, Any]
    record: JobRecord | None = None
    created: bool = False
    accepted: bool = False
    stopping: bool = False  # refused because the daemon is shutting down: do not acknowledge
    busy: bool = False  # refused for now (the queue is full, the journal cannot be written): try again later
    retry: bool = False  # not taken for now (the journal cannot be written): do not acknowledge, offer it again

    @property
    def job_id(self) -> str | None:
        return self.body.get("id")


@dataclass(frozen=True)
class Rules:
    """What a SIGHUP can change, swapped as one: the config (its policy, limits, defaults) and the
    content policy compiled from it."""

    config: Config
    policy: ContentPolicy


def _done(answer: Answer) -> Future:
    future: Future = Future()
    future.set_result(answer)
    return future


class Intake:
    """The submission half of :class:`edge.service.Service` (which calls ``_queued`` on a new job)."""

    def __init__(self, config: Config, runner: Runner, journal: Journal):
        self.runner = runner
        self.journal = journal
        self.inputs = InputStore(journal.path.parent / "inputs")  # edit jobs' images, beside the journal
        self._rules = Rules(config, ContentPolicy(config.policy.blocked_words, config.policy.blocked_patterns))
        self.accepting = True
        self._journal_failing = False

    def _queued(self, record: JobRecord, position: int | None) -> None:
        raise NotImplementedError

    @property
    def config(self) -> Config:
        return self._rules.config

    @property
    def policy(self) -> ContentPolicy:
        return self._rules.policy

    def reconfigure(self, config: Config) -> None:
        """Take the content policy, limits, defaults and log level of ``config`` (a SIGHUP); the rest
        needs a restart. One assignment: a submission sees the old rules or the new, never a mix."""
        old = self._rules.config
        merged = replace(old, policy=config.policy, limits=config.limits, defaults=config.defaults,
                         log_level=config.log_level)
        self._rules = Rules(merged, ContentPolicy(config.policy.blocked_words, config.policy.blocked_patterns))

    # --- intake (called from front-end threads) -----------------------------------------------
    def submit_payload(self, payload: bytes | str, source: str, reply: dict[str, Any] | None = None,
                       dedup_key: str | None = None, redelivery: bool = False) -> Answer:
        """Decode, validate, police and journal one raw request. Never raises for bad input."""
        try:
            data = decode_payload(payload, self.config.limits)
        except ValidationError as exc:
            return Answer(error_body(str(exc), None, exc.field))
        return self.submit_data(data, source, reply, dedup_key, redelivery)

    def submit_payload_later(self, payload: bytes | str, source: str, reply: dict[str, Any] | None = None,
                             dedup_key: str | None = None, redelivery: bool = False) -> Future:
        """As :meth:`submit_payload`, without waiting for the journal's commit: a future of the Answer."""
        try:
            data = decode_payload(payload, self.config.limits)
        except ValidationError as exc:
            return _done(Answer(error_body(str(exc), None, exc.field)))
        return self.submit_data_later(data, source, reply, dedup_key, redelivery)

    def submit_data(self, data: dict[str, Any], source: str, reply: dict[str, Any] | None = None,
                    dedup_key: str | None = None, redelivery: bool = False,
                    peer: dict[str, int] | None = None) -> Answer:
        answer, committed, job_id, rule = self._submit(data, source, reply, dedup_key, redelivery, peer)
        if answer is not None:
            return answer
        assert committed is not None
        committed.exception()  # wait for the group commit; what follows runs on this thread, not the committer's
        return self._committed(committed, job_id, source, rule)

    def submit_data_later(self, data: dict[str, Any], source: str, reply: dict[str, Any] | None = None,
                          dedup_key: str | None = None, redelivery: bool = False,
                          peer: dict[str, int] | None = None) -> Future:
        """As :meth:`submit_data`, without waiting for the journal's commit: a future of the Answer,
        completed on the journal's committer thread."""
        answer, committed, job_id, rule = self._submit(data, source, reply, dedup_key, redelivery, peer)
        if answer is not None:
            return _done(answer)
        assert committed is not None
        future: Future = Future()

        def done(result: Future) -> None:
            try:
                future.set_result(self._committed(result, job_id, source, rule))
            except BaseException as exc:  # a bug: the front end answers it as an internal error
                future.set_exception(exc)

        committed.add_done_callback(done)
        return future

    def _submit(self, data: dict[str, Any], source: str, reply: dict[str, Any] | None, dedup_key: str | None,
                redelivery: bool, peer: dict[str, int] | None) -> tuple[Answer | None, Future | None, str, str | None]:
        """Validate, police and queue for the journal: (the Answer, None, ...) for a refusal, else
        (None, the commit's future, the job id, the policy rule that matched)."""
        job_id = valid_id(data.get("id"))  # only to address the reply; parse_job decides
        if not self.accepting:
            return Answer(error_body("stopping: the daemon is shutting down; try again later", job_id),
                          stopping=True), None, "", None
        rules = self._rules  # one set of rules for the whole submission, even across a reload
        try:
            job = parse_job(data, rules.config.limits, rules.config.defaults)
            self.runner.check(job)  # every check a job can fail, before it is accepted
        except ValidationError as exc:
            return Answer(error_body(str(exc), job_id, exc.field)), None, "", None
        job = admit(job)  # id and seed fixed before the commit, so that a replay draws the very same image
        try:
            job = self.inputs.store(job)  # its images on disk (fsync'd) before the commit names them
        except OutputError as exc:
            return Answer(error_body(str(exc), job.id), busy=True), None, "", None
        verdict = rules.policy.check(job.prompt)
        state, error = ("queued", None) if verdict.allowed else ("rejected", POLICY_ERROR)
        committed = self.journal.submit_later(job, source, reply, dedup_key, redelivery, state=state, error=error,
                                              peer=peer)
        assert job.id is not None
        return None, committed, job.id, verdict.rule

    def _committed(self, future: Future, job_id: str, source: str, rule: str | None) -> Answer:
        try:
            record, created = future.result()
        except BusyError as exc:
            return Answer(error_body(str(exc), job_id), busy=True)
        except sqlite3.Error as exc:  # disk full, I/O error: not taken, the client or broker tries again
            if not self._journal_failing:
                log.error("the journal %s cannot be written (%s); refusing jobs with busy until it can",
                          self.journal.path, exc)
            self._journal_failing = True
            return Answer(error_body(f"busy: the journal cannot be written ({exc}); try again later", job_id),
                          busy=True, retry=True)
        if self._journal_failing:
            self._journal_failing = False
            log.info("the journal %s can be written again; taking jobs", self.journal.path)
        if record.state == "rejected":
            if created:
                log.warning("job %s from %s rejected by the content policy (%s)", record.id, source, rule)
            return Answer(state_body(record), record, created, accepted=True)
        position = self.journal.position(record.id)
        if created:
            log.info("job %s queued from %s (priority %d)", record.id, source, record.job.priority)
            self._queued(record, position)
        return Answer(state_body(record, position), record, created, accepted=True)
