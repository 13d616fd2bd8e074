"""Retention: which versions of one VM a keep policy keeps, with Proxmox Backup Server's prune rules.

Pure: no I/O, no clock. `decide` gets the versions of one VM and a `KeepPolicy` and says, for
each version, whether it is kept and by which rule.

The algorithm is the one of PBS (``pbs-datastore/src/prune.rs``: ``compute_prune_info`` and
``mark_selections``; the PBS prune simulator's ``pruneMark`` does the same):

1. Sort the versions newest first (equal times: the larger backup id is the newer).
2. Apply the rules one after the other, in the fixed order last, hourly, daily, weekly,
   monthly, yearly (a count of 0 skips the rule). Every version carries at most one mark,
   "keep" or "remove", set by the first rule that touches it. A rule with count N:

   - first collects the *covered* periods: the periods (of this rule) of every version
     already marked keep by an earlier rule;
   - then walks the versions newest to oldest and, for each one:

     * already marked (keep or remove) by an earlier rule: skip it;
     * its period is covered: skip it, leaving it unmarked (a later rule may still keep it);
     * its period was already taken by this rule: mark it remove;
     * its period is new and the rule has taken N periods: stop the walk;
     * otherwise: take the period and mark the version keep, reason "<rule> <k>" where k is
       the number of periods the rule has taken so far (1 for its newest).

3. Versions still unmarked at the end are removed.

Periods are calendar periods of the version's finished time in local time (`tz`, by default
the machine's local zone, as PBS's ``strftime_local``): hour (year, month, day, hour), day,
ISO week (ISO year, ISO week: 2020-12-31 and 2021-01-03 are both in week 53 of 2020), month,
year. "last" has one period per version, so ``last N`` keeps the N newest versions. Around a
DST change the local wall clock decides: the two 02:xx hours of a fall-back night are one
hourly period; a version at 00:30 local time on a spring-forward day is on that day.

Worked example (tz UTC), policy last=1, daily=2, weekly=2; versions newest first::

    a  Mon 2024-03-04 18:00   last 1     (newest)
    b  Mon 2024-03-04 09:00   removed    daily: its day is covered by a; weekly: its week by a
    c  Sun 2024-03-03 18:00   daily 1
    d  Sat 2024-03-02 18:00   daily 2    (2024-W09, like c)
    e  Mon 2024-02-26 18:00   removed    daily: two days taken, walk stops; weekly: W09 is covered
    f  Tue 2024-02-20 18:00   weekly 1   (2024-W08; the weekly rule's other slot stays unused)

A period covered by an earlier rule does not use one of the later rule's N slots, and a later
rule only ever keeps versions older than or beside those kept before ("the next option does
not take care of already covered backups", PBS docs). A version marked remove by an earlier
rule is not reconsidered by later rules. As weeks straddle months and years, this means a
monthly or yearly rule after a weekly rule may keep a version that is not the newest of its
month or year: with weekly=1, monthly=2 and versions Fri 2021-04-02, Wed 2021-03-31,
Sat 2021-03-20, the weekly rule keeps 04-02 and marks 03-31 (same ISO week) remove, and the
monthly rule then keeps 03-20 for March.

Differences from PBS, on purpose:

- An empty policy (every count 0) is an error, ``ValueError("empty policy")``; PBS keeps
  everything then. Callers that want to remove named versions do that without a policy.
- The newest version is always kept: with a non-empty policy the first rule with a count
  keeps it anyway; should that ever not hold, it is kept with the reason "newest version".
- There are no protected or unfinished snapshots here: callers pass finished versions only.
- "last" takes periods by backup id, not by the time rounded to seconds, so versions with
  equal times still count one each.

Differences from borg's ``prune`` (``prune_split``), which applies the same rules in the same
order: borg looks only at the newest version of each period and skips a period if that one
was kept by an earlier rule (PBS: if any version of the period was), never lets a "remove"
of an earlier rule hide a version, has no "remove" marks at all, and keeps the oldest version
when a rule could not fill its count. Single-rule policies without that borg fallback agree.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from datetime import datetime, tzinfo

# The rules, in the order they are applied.
RULES: tuple[str, ...] = ("last", "hourly", "daily", "weekly", "monthly", "yearly")

NEWEST_VERSION = "newest version"


@dataclass(frozen=True)
class KeepPolicy:
    """How many periods of each kind to keep; 0 disables a rule."""

    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def __post_init__(self) -> None:
        for rule in RULES:
            count = getattr(self, rule)
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"keep {rule}: {count!r} is not a non-negative integer")

    def is_empty(self) -> bool:
        return not self.rules()

    def rules(self) -> tuple[tuple[str, int], ...]:
        """The enabled rules with their counts, in the order they are applied."""
        return tuple((rule, count) for rule in RULES if (count := getattr(self, rule)) > 0)


@dataclass(frozen=True)
class Decision:
    backup_id: str
    keep: bool
    reasons: tuple[str, ...]  # ("daily 3",): the rule that keeps it, or ("newest version",); () when removed


def _hour(local: datetime) -> Hashable:
    return (local.year, local.month, local.day, local.hour)


def _day(local: datetime) -> Hashable:
    return (local.year, local.month, local.day)


def _iso_week(local: datetime) -> Hashable:
    iso = local.isocalendar()
    return (iso.year, iso.week)


def _month(local: datetime) -> Hashable:
    return (local.year, local.month)


def _year(local: datetime) -> Hashable:
    return local.year


_CALENDAR_PERIODS: dict[str, Callable[[datetime], Hashable]] = {
    "hourly": _hour,
    "daily": _day,
    "weekly": _iso_week,
    "monthly": _month,
    "yearly": _year,
}


def _period(rule: str, backup_id: str, local_time: datetime) -> Hashable:
    """The period of `rule` a version falls in: its own for "last", else a calendar period."""
    return backup_id if rule == "last" else _CALENDAR_PERIODS[rule](local_time)


def decide(versions: Sequence[tuple[str, datetime]], policy: KeepPolicy, tz: tzinfo | None = None) -> list[Decision]:
    """Decide, for each version of one VM, whether `policy` keeps it; newest first.

    `versions` are (backup id, finished time as an aware datetime), in any order, with distinct
    ids. `tz` is the zone whose calendar the periods follow; None: the machine's local zone.
    Raises ValueError for an empty policy, a naive time or a repeated backup id.
    """
    if policy.is_empty():
        raise ValueError("empty policy")
    seen: set[str] = set()
    for backup_id, when in versions:
        if when.tzinfo is None or when.utcoffset() is None:
            raise ValueError(f"version {backup_id!r}: finished time {when} has no time zone")
        if backup_id in seen:
            raise ValueError(f"backup id {backup_id!r} appears twice")
        seen.add(backup_id)
    if not versions:
        return []

    ordered = sorted(versions, key=lambda version: (version[1], version[0]), reverse=True)
    local = {backup_id: when.astimezone(tz) for backup_id, when in ordered}
    kept: dict[str, str] = {}  # backup id -> reason
    removed: set[str] = set()

    for rule, count in policy.rules():
        covered = {_period(rule, backup_id, local[backup_id]) for backup_id in kept}
        taken: set[Hashable] = set()
        for backup_id, _ in ordered:
            if backup_id in kept or backup_id in removed:
                continue
            this = _period(rule, backup_id, local[backup_id])
            if this in covered:
                continue
            if this in taken:
                removed.add(backup_id)
                continue
            if len(taken) >= count:
                break
            taken.add(this)
            kept[backup_id] = f"{rule} {len(taken)}"

    newest = ordered[0][0]
    if newest not in kept:  # unreachable for a non-empty policy; the guarantee does not rest on that
        removed.discard(newest)
        kept[newest] = NEWEST_VERSION

    return [
        Decision(backup_id, backup_id in kept, (kept[backup_id],) if backup_id in kept else ())
        for backup_id, _ in ordered
    ]
