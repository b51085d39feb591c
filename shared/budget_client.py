"""Requests to the budget accountant over `toolbus.budget.<verb>` (plumbing for router, executors, CLI)."""

from __future__ import annotations

from typing import TypeVar

from nats.aio.client import Client as NatsClient
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from pydantic import BaseModel

from shared.codec import pack, unpack
from shared.contracts import (
    AdminReply,
    LedgerReply,
    RebuildRequest,
    ReleaseRequest,
    ReserveReply,
    ReserveRequest,
    SetLimitRequest,
    SettleRequest,
    StatusReply,
    StatusRequest,
)
from shared.subjects import Subjects

ReplyT = TypeVar("ReplyT", bound=BaseModel)
REBUILD_TIMEOUT_S = 120.0


class AccountantUnavailable(Exception):
    """No budget service answered in time (none running, or too slow)."""


class BudgetClient:
    """Typed request-reply calls to whichever budget replica answers first."""

    def __init__(self, nc: NatsClient, subjects: Subjects, timeout_s: float = 2.0) -> None:
        self._nc = nc
        self._subjects = subjects
        self.timeout_s = timeout_s

    async def _ask(self, verb: str, request: BaseModel, reply_type: type[ReplyT],
                   timeout_s: float | None = None) -> ReplyT:
        subject, wait_s = self._subjects.budget(verb), timeout_s or self.timeout_s
        try:
            msg = await self._nc.request(subject, pack(request), timeout=wait_s)
        except NoRespondersError:
            raise AccountantUnavailable("no budget service is running") from None
        except NatsTimeoutError:
            raise AccountantUnavailable(f"the budget service did not answer {verb} in time") from None
        if reply_type is not AdminReply:
            try:
                return unpack(reply_type, msg.data)
            except ValueError:
                failure = unpack(AdminReply, msg.data)  # the service's generic error answer
                raise AccountantUnavailable(failure.message) from None
        return unpack(reply_type, msg.data)

    async def reserve(self, request: ReserveRequest) -> ReserveReply:
        return await self._ask("reserve", request, ReserveReply)

    async def settle(self, request: SettleRequest) -> LedgerReply:
        return await self._ask("settle", request, LedgerReply)

    async def release(self, request: ReleaseRequest) -> LedgerReply:
        return await self._ask("release", request, LedgerReply)

    async def status(self, request: StatusRequest) -> StatusReply:
        return await self._ask("status", request, StatusReply)

    async def set_limit(self, request: SetLimitRequest) -> AdminReply:
        return await self._ask("set", request, AdminReply)

    async def rebuild(self) -> AdminReply:
        return await self._ask("rebuild", RebuildRequest(), AdminReply, REBUILD_TIMEOUT_S)
