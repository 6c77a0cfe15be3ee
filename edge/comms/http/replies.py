"""What the HTTP handlers answer with when they cannot go on, and the status of a submission."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ...service import Answer


class HttpError(Exception):
    """Answer the request with this status and JSON body."""

    def __init__(self, status: int, body: dict[str, Any]):
        super().__init__(body.get("error"))
        self.status, self.body = status, body


def answer_status(answer: Answer) -> int:
    """The HTTP status of the service's answer to a submission: 202 new, 200 duplicate, or the refusal's."""
    if answer.stopping:
        return 503
    if answer.busy:
        return 429
    if not answer.accepted or (answer.record is not None and answer.record.state == "rejected"):
        return 400  # bad input, or refused by the content policy (journaled as rejected all the same)
    return 202 if answer.created else 200
