"""One interface per upstream kind: what the portal asks of a relay.

The portal speaks to three kinds of relay (pool.models.Upstream.Kind). Each kind has a driver
(`Driver` below) that does the same jobs its own way:

- issue a key for a person (`key_issue`), revoke it, switch it off and on;
- push a key's and a person's limits, mapped onto what the relay can enforce by itself;
- read usage since a cursor, as normalised records (`RelayUsage`): the portal's ingest
  (usage.services) prices, counts, quarantines and enforces limits on them the same way for
  every kind;
- health, in one sentence.

CLIProxyAPI is the odd one: its keys are made by the portal, pooled and pushed as one list
(pool.services.keys_reconcile), and its usage is popped or streamed (usage.services,
usage.stream). Its driver (pool.upstreams.cliproxyapi) hands those jobs to that code, which is
unchanged. The relays with their own keys (claude-relay-service, Claude Code Hub) share the
generic reconcile of pool.upstreams.relays.

A driver never raises anything but pool.upstream's UpstreamError family, with one sentence
that holds no secret.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from accounts.models import User
    from pool.models import ApiKey, Upstream


@dataclass(frozen=True)
class NewKey:
    """A key just made at a relay: its id there and its full value (shown once, never kept)."""

    remote_id: str
    value: str


@dataclass(frozen=True)
class RelayLimits:
    """What a relay is asked to enforce for one key, in the portal's terms (None: no limit).

    `cost_day` / `cost_month` are USD per calendar day / month; `tokens_*` the same for
    tokens. A driver maps what its relay can express and leaves the rest to the portal's
    suspension after each sync (usage.limits)."""

    cost_day: Decimal | None = None
    cost_month: Decimal | None = None
    tokens_day: int | None = None
    tokens_month: int | None = None
    expires_at: datetime | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "cost_day": None if self.cost_day is None else str(self.cost_day),
            "cost_month": None if self.cost_month is None else str(self.cost_month),
            "tokens_day": self.tokens_day,
            "tokens_month": self.tokens_month,
            "expires_at": None if self.expires_at is None else self.expires_at.isoformat(),
        }


@dataclass(frozen=True)
class RelayUsage:
    """One request as a relay reported it, in the portal's token split (usage.accounting):
    `uncached` input, `cache_read`, `cache_write`, `output` (reasoning included) and
    `reasoning`. `key` is the key's id at the relay; `record_id` is unique per request at that
    relay (the cursor uses it to count each request once); `at` is aware."""

    key: str
    record_id: str
    model: str
    at: datetime
    uncached: int = 0
    cache_read: int = 0
    cache_write: int = 0
    output: int = 0
    reasoning: int = 0
    failed: bool = False
    # The relay's own cost for it, USD, when it reports one (shown to staff beside the
    # portal's, never used to bill).
    relay_cost: Decimal | None = None


@dataclass
class UsageRead:
    """What one read gave: the records, the cursor to store with them (in the same
    transaction), and sentences for the sync's report (e.g. records lost past retention)."""

    records: list[RelayUsage] = field(default_factory=list)
    cursor: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Health:
    ok: bool
    detail: str  # one sentence, no secret
    version: str = ""


class Driver(ABC):
    """One upstream's jobs. Built per use with `driver_for(upstream)`."""

    kind: ClassVar[str]
    # True: a key works the moment it is issued (the relay makes it). False: keys are
    # pre-made into a pool and pushed (CLIProxyAPI).
    instant_keys: ClassVar[bool] = True
    # True: the relay has people of its own (Claude Code Hub users).
    has_people: ClassVar[bool] = False
    # True: a key's limits at the relay include its owner's even though the relay has people
    # (the smaller of each pair): Claude Code Hub refuses a key limit above its user's.
    folds_person_limits: ClassVar[bool] = False
    # What the portal's limits become at this relay, for docs/upstreams.md's table and the pages.
    enforces: ClassVar[str] = ""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream

    # --- keys -----------------------------------------------------------------------------

    @abstractmethod
    def key_issue(self, *, person: User, label: str, limits: RelayLimits,
                  account: str | None) -> NewKey:
        """Makes a working key for `person` at the relay. `account`: the person's id there
        when the relay has people and they have one already."""

    @abstractmethod
    def key_revoke(self, *, key: ApiKey) -> None:
        """Removes the key at the relay for good. A key already gone is no error."""

    @abstractmethod
    def key_set_active(self, *, key: ApiKey, active: bool) -> None:
        """Switches the key off (suspended, expired) or on again."""

    @abstractmethod
    def key_limits_push(self, *, key: ApiKey, limits: RelayLimits) -> None:
        """Sets the key's limits at the relay."""

    def person_create(self, *, person: User, limits: RelayLimits) -> str:
        """Relays with people: makes the person's account there; returns its id."""
        raise NotImplementedError

    def person_limits_push(self, *, account: str, limits: RelayLimits) -> None:
        """Relays with people: sets the person's own limits there."""
        raise NotImplementedError

    # --- usage and health -----------------------------------------------------------------

    @abstractmethod
    def usage_read(self, *, keys: list[ApiKey], cursor: dict[str, Any]) -> UsageRead:
        """The requests of `keys` since `cursor` (what an earlier read returned; {} at first).
        Each request must come out once across reads as long as the cursor returned is stored
        with them."""

    @abstractmethod
    def health(self) -> Health:
        """Whether the relay answers with these credentials (never raises)."""

    def close(self) -> None:
        pass


def driver_for(upstream: Upstream) -> Driver:
    """The driver of `upstream`'s kind, with its address and credentials."""
    from pool.upstreams import registry

    return registry.driver_for(upstream)
