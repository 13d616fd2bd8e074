"""Retention decisions: hand-worked PBS prune results and properties over random histories."""

from __future__ import annotations

import os
import random
import time
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmdp.engine.retention import RULES, Decision, KeepPolicy, decide

BERLIN = ZoneInfo("Europe/Berlin")

# Periods as PBS formats them (strftime_local in prune.rs): an oracle independent of the module's keys.
PBS_FORMATS = {
    "hourly": "%Y/%m/%d/%H",
    "daily": "%Y/%m/%d",
    "weekly": "%G/%V",
    "monthly": "%Y/%m",
    "yearly": "%Y",
}


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def pbs_period(rule: str, backup_id: str, when: datetime, tz: tzinfo | None) -> str:
    return backup_id if rule == "last" else when.astimezone(tz).strftime(PBS_FORMATS[rule])


def kept(decisions: list[Decision]) -> dict[str, tuple[str, ...]]:
    return {d.backup_id: d.reasons for d in decisions if d.keep}


def named(times: list[datetime]) -> list[tuple[str, datetime]]:
    """Versions named by their position newest first: v0 is the newest (ids are then also in order)."""
    ordered = sorted(times, reverse=True)
    return [(f"v{i:02d}", when) for i, when in enumerate(ordered)]


# Three versions a day, 06:00, 12:00 and 18:00 UTC, on 2024-05-01 .. 05-05.
FIVE_DAYS = [(f"{day}-{hour}", utc(f"2024-05-0{day}T{hour:02d}:00")) for day in range(1, 6) for hour in (6, 12, 18)]


# ---- hand-worked cases --------------------------------------------------------------------------------------------

CASES = [
    pytest.param(
        FIVE_DAYS,
        KeepPolicy(daily=3),
        UTC,
        {"5-18": ("daily 1",), "4-18": ("daily 2",), "3-18": ("daily 3",)},
        id="daily-3-over-5-days",
    ),
    pytest.param(
        FIVE_DAYS,
        KeepPolicy(last=2, daily=2),
        UTC,
        # 05-05 is covered by the last rule: its day takes none of the daily slots.
        {"5-18": ("last 1",), "5-12": ("last 2",), "4-18": ("daily 1",), "3-18": ("daily 2",)},
        id="last-2-daily-2",
    ),
    pytest.param(
        FIVE_DAYS,
        KeepPolicy(last=1, hourly=2),
        UTC,
        {"5-18": ("last 1",), "5-12": ("hourly 1",), "5-6": ("hourly 2",)},
        id="last-1-hourly-2",
    ),
    pytest.param(
        [
            ("a", utc("2024-03-04T18:00")),  # Mon, 2024-W10
            ("b", utc("2024-03-04T09:00")),
            ("c", utc("2024-03-03T18:00")),  # Sun, 2024-W09
            ("d", utc("2024-03-02T18:00")),
            ("e", utc("2024-02-26T18:00")),  # Mon, 2024-W09
            ("f", utc("2024-02-20T18:00")),  # 2024-W08
        ],
        KeepPolicy(last=1, daily=2, weekly=2),
        UTC,
        {"a": ("last 1",), "c": ("daily 1",), "d": ("daily 2",), "f": ("weekly 1",)},
        id="docstring-example-covered-periods-take-no-slot",
    ),
    pytest.param(
        [
            ("2021-01-04", utc("2021-01-04T12:00")),  # Mon, 2021-W01
            ("2021-01-03", utc("2021-01-03T12:00")),  # Sun, 2020-W53
            ("2021-01-01", utc("2021-01-01T12:00")),  # 2020-W53
            ("2020-12-31", utc("2020-12-31T12:00")),  # 2020-W53
            ("2020-12-27", utc("2020-12-27T12:00")),  # Sun, 2020-W52
            ("2020-12-21", utc("2020-12-21T12:00")),  # Mon, 2020-W52
            ("2020-12-20", utc("2020-12-20T12:00")),  # 2020-W51
        ],
        KeepPolicy(weekly=3),
        UTC,
        {"2021-01-04": ("weekly 1",), "2021-01-03": ("weekly 2",), "2020-12-27": ("weekly 3",)},
        id="weekly-across-iso-year-boundary",
    ),
    pytest.param(
        [
            ("2024-02-15", utc("2024-02-15T12:00")),
            ("2024-02-01", utc("2024-02-01T12:00")),
            ("2024-01-31", utc("2024-01-31T12:00")),
            ("2024-01-10", utc("2024-01-10T12:00")),
            ("2023-12-31", utc("2023-12-31T12:00")),
            ("2023-06-30", utc("2023-06-30T12:00")),  # 2023 is covered by 2023-12-31 (monthly)
            ("2022-12-31", utc("2022-12-31T12:00")),
            ("2022-01-01", utc("2022-01-01T12:00")),
            ("2021-07-01", utc("2021-07-01T12:00")),
        ],
        KeepPolicy(monthly=3, yearly=3),
        UTC,
        {
            "2024-02-15": ("monthly 1",),
            "2024-01-31": ("monthly 2",),
            "2023-12-31": ("monthly 3",),
            "2022-12-31": ("yearly 1",),
            "2021-07-01": ("yearly 2",),
        },
        id="monthly-3-yearly-3",
    ),
    pytest.param(
        [
            ("04-02", utc("2021-04-02T12:00")),  # Fri, 2021-W13
            ("03-31", utc("2021-03-31T12:00")),  # Wed, 2021-W13: marked remove by the weekly rule
            ("03-20", utc("2021-03-20T12:00")),  # Sat, 2021-W11
            ("02-10", utc("2021-02-10T12:00")),
        ],
        KeepPolicy(weekly=1, monthly=3),
        UTC,
        # PBS: a version the weekly rule removed is not reconsidered, so March is kept by 03-20, not 03-31.
        # (borg would keep 03-31 for March.)
        {"04-02": ("weekly 1",), "03-20": ("monthly 1",), "02-10": ("monthly 2",)},
        id="weekly-removal-hides-version-from-monthly",
    ),
    pytest.param(
        [
            ("03:30", utc("2021-10-31T02:30")),  # 03:30 CET
            ("02:30b", utc("2021-10-31T01:30")),  # 02:30 CET, the second 02:xx hour
            ("02:30a", utc("2021-10-31T00:30")),  # 02:30 CEST, the first one: same local hour
            ("01:45", utc("2021-10-30T23:45")),  # 01:45 CEST
        ],
        KeepPolicy(hourly=3),
        BERLIN,
        {"03:30": ("hourly 1",), "02:30b": ("hourly 2",), "01:45": ("hourly 3",)},
        id="dst-fall-back-berlin-hourly",
    ),
    pytest.param(
        [
            ("03:30", utc("2021-10-31T02:30")),
            ("02:30b", utc("2021-10-31T01:30")),
            ("02:30a", utc("2021-10-31T00:30")),
            ("01:45", utc("2021-10-30T23:45")),
        ],
        KeepPolicy(hourly=3),
        UTC,
        {"03:30": ("hourly 1",), "02:30b": ("hourly 2",), "02:30a": ("hourly 3",)},
        id="dst-fall-back-same-versions-in-utc",
    ),
    pytest.param(
        [
            ("28-14:00", utc("2021-03-28T12:00")),  # 14:00 CEST
            ("28-00:30", utc("2021-03-27T23:30")),  # 00:30 CET on the 28th
            ("27-23:30", utc("2021-03-27T22:30")),  # 23:30 CET on the 27th
        ],
        KeepPolicy(daily=2),
        BERLIN,
        {"28-14:00": ("daily 1",), "27-23:30": ("daily 2",)},
        id="dst-spring-forward-berlin-daily",
    ),
    pytest.param(
        [
            ("28-14:00", utc("2021-03-28T12:00")),
            ("28-00:30", utc("2021-03-27T23:30")),
            ("27-23:30", utc("2021-03-27T22:30")),
        ],
        KeepPolicy(daily=2),
        UTC,
        {"28-14:00": ("daily 1",), "28-00:30": ("daily 2",)},
        id="dst-spring-forward-same-versions-in-utc",
    ),
    pytest.param(
        [("a", utc("2024-01-01T00:00")), ("b", utc("2024-01-01T00:00")), ("c", utc("2023-12-31T00:00"))],
        KeepPolicy(daily=1),
        UTC,
        {"b": ("daily 1",)},
        id="equal-times-larger-id-is-newer",
    ),
    pytest.param(
        [("old", utc("2020-01-01T00:00")), ("new", utc("2024-01-01T00:00"))],
        KeepPolicy(last=10, yearly=10),
        UTC,
        {"new": ("last 1",), "old": ("last 2",)},
        id="counts-larger-than-history",
    ),
]


@pytest.mark.parametrize(("versions", "policy", "tz", "expected"), CASES)
def test_known_pbs_results(
    versions: list[tuple[str, datetime]], policy: KeepPolicy, tz: tzinfo, expected: dict[str, tuple[str, ...]]
) -> None:
    decisions = decide(versions, policy, tz)
    assert kept(decisions) == expected
    assert [d.backup_id for d in decisions] == [
        backup_id for backup_id, _ in sorted(versions, key=lambda v: (v[1], v[0]), reverse=True)
    ]
    assert all(d.reasons == () for d in decisions if not d.keep)


def test_equal_times_are_ordered_by_id() -> None:
    versions = [("a", utc("2024-01-01T00:00")), ("c", utc("2024-01-01T00:00")), ("b", utc("2024-01-01T00:00"))]
    decisions = decide(versions, KeepPolicy(last=1))
    assert [(d.backup_id, d.keep, d.reasons) for d in decisions] == [
        ("c", True, ("last 1",)),
        ("b", False, ()),
        ("a", False, ()),
    ]


def test_times_in_other_zones_compare_as_instants() -> None:
    # 23:30 on 2024-05-31 in Berlin is 21:30 UTC: older than 22:30 UTC, which is 00:30 on 06-01 in Berlin.
    versions = [("berlin", datetime(2024, 5, 31, 23, 30, tzinfo=BERLIN)), ("utc", utc("2024-05-31T22:30"))]
    assert [d.backup_id for d in decide(versions, KeepPolicy(last=1), UTC)] == ["utc", "berlin"]
    assert kept(decide(versions, KeepPolicy(daily=2), UTC)) == {"utc": ("daily 1",)}
    assert kept(decide(versions, KeepPolicy(daily=2), BERLIN)) == {"utc": ("daily 1",), "berlin": ("daily 2",)}


def test_default_zone_is_the_machines_local_zone() -> None:
    if not hasattr(time, "tzset"):
        pytest.skip("time.tzset is not available")
    versions = [
        ("28-14:00", utc("2021-03-28T12:00")),
        ("28-00:30", utc("2021-03-27T23:30")),
        ("27-23:30", utc("2021-03-27T22:30")),
    ]
    policy = KeepPolicy(daily=2)
    saved = os.environ.get("TZ")
    try:
        for zone, expected_tz in (("Europe/Berlin", BERLIN), ("UTC", UTC)):
            os.environ["TZ"] = zone
            time.tzset()
            assert decide(versions, policy) == decide(versions, policy, expected_tz)
    finally:
        if saved is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = saved
        time.tzset()


def test_no_versions() -> None:
    assert decide([], KeepPolicy(last=1)) == []


def test_empty_policy_is_an_error() -> None:
    assert KeepPolicy().is_empty()
    assert not KeepPolicy(yearly=1).is_empty()
    with pytest.raises(ValueError, match="empty policy"):
        decide([("a", utc("2024-01-01T00:00"))], KeepPolicy())
    with pytest.raises(ValueError, match="empty policy"):
        decide([], KeepPolicy())


@pytest.mark.parametrize("count", [-1, 1.5, True, "2"])
def test_counts_must_be_non_negative_integers(count: object) -> None:
    with pytest.raises(ValueError, match="keep daily"):
        KeepPolicy(daily=count)  # type: ignore[arg-type]


def test_naive_time_is_an_error() -> None:
    with pytest.raises(ValueError, match="no time zone"):
        decide([("a", datetime(2024, 1, 1))], KeepPolicy(last=1))


def test_repeated_id_is_an_error() -> None:
    with pytest.raises(ValueError, match="appears twice"):
        decide([("a", utc("2024-01-01T00:00")), ("a", utc("2024-01-02T00:00"))], KeepPolicy(last=1))


def test_rules_are_in_application_order() -> None:
    assert KeepPolicy(yearly=1, last=2, weekly=3).rules() == (("last", 2), ("weekly", 3), ("yearly", 1))


# ---- properties ---------------------------------------------------------------------------------------------------

# Zones whose local calendar periods are contiguous in time (no wall-clock jump back across a day boundary),
# including a fixed half-hour offset and Lord Howe's half-hour DST.
ZONES = [
    UTC,
    BERLIN,
    ZoneInfo("America/New_York"),
    ZoneInfo("Australia/Lord_Howe"),
    timezone(timedelta(hours=5, minutes=30)),
]
BASE = datetime(2019, 6, 1, tzinfo=UTC)
SPANS = [6 * 3600, 10 * 86400, 120 * 86400, 6 * 365 * 86400]  # hours, days, weeks/months, years apart

PROPERTIES = settings(max_examples=200, deadline=None)


@st.composite
def histories(draw: st.DrawFn) -> list[tuple[str, datetime]]:
    span = draw(st.sampled_from(SPANS))
    offsets = draw(st.lists(st.integers(0, span), min_size=1, max_size=40))
    offsets += draw(st.lists(st.sampled_from(offsets), max_size=3))  # some equal times
    ids = draw(st.permutations([f"v{i:02d}" for i in range(len(offsets))]))
    zones = draw(st.lists(st.sampled_from(ZONES), min_size=len(offsets), max_size=len(offsets)))
    return [
        (backup_id, (BASE + timedelta(seconds=offset)).astimezone(zone))
        for backup_id, offset, zone in zip(ids, offsets, zones, strict=True)
    ]


counts = st.integers(0, 4)
policies = st.builds(
    KeepPolicy, last=counts, hourly=counts, daily=counts, weekly=counts, monthly=counts, yearly=counts
).filter(lambda policy: not policy.is_empty())
zones = st.sampled_from(ZONES)


def newest_first(versions: list[tuple[str, datetime]]) -> list[tuple[str, datetime]]:
    return sorted(versions, key=lambda v: (v[1], v[0]), reverse=True)


@PROPERTIES
@given(histories(), policies, zones)
def test_invariants(versions: list[tuple[str, datetime]], policy: KeepPolicy, tz: tzinfo) -> None:
    decisions = decide(versions, policy, tz)
    ordered = newest_first(versions)
    when = dict(versions)

    # Every version once, newest first.
    assert [d.backup_id for d in decisions] == [backup_id for backup_id, _ in ordered]

    # The newest is kept, and by a rule: a non-empty policy never needs the "newest version" fallback.
    assert decisions[0].keep
    assert decisions[0].reasons[0] != "newest version"

    # Kept versions have exactly one reason (the rule that marked them, as in PBS), removed ones none.
    for d in decisions:
        assert len(d.reasons) == (1 if d.keep else 0)

    # keep-last N keeps the N newest, as "last 1" .. "last N".
    n = min(policy.last, len(decisions))
    assert [d.reasons for d in decisions[:n]] == [(f"last {k}",) for k in range(1, n + 1)]

    kept_total = 0
    for rule, count in policy.rules():
        by_rule = [d for d in decisions if d.keep and d.reasons[0].split()[0] == rule]
        kept_total += len(by_rule)
        # At most N, numbered 1..k from the newest, each in a period of its own.
        assert len(by_rule) <= count
        assert [d.reasons[0] for d in by_rule] == [f"{rule} {k}" for k in range(1, len(by_rule) + 1)]
        periods = [pbs_period(rule, d.backup_id, when[d.backup_id], tz) for d in by_rule]
        assert len(set(periods)) == len(periods)
        # No other kept version shares its period (a period covered before takes no slot).
        for d, period in zip(by_rule, periods, strict=True):
            others = [
                o.backup_id
                for o in decisions
                if o.keep and o is not d and pbs_period(rule, o.backup_id, when[o.backup_id], tz) == period
            ]
            assert others == []
        # The newest of its period, except for monthly/yearly after weekly: weeks straddle months and years, and a
        # version the weekly rule removed is not reconsidered (see the hand-worked case).
        if rule not in ("monthly", "yearly") or policy.weekly == 0:
            for d, period in zip(by_rule, periods, strict=True):
                newest_of_period = next(
                    backup_id for backup_id, at in ordered if pbs_period(rule, backup_id, at, tz) == period
                )
                assert d.backup_id == newest_of_period
    assert sum(d.keep for d in decisions) == kept_total
    assert kept_total <= sum(count for _, count in policy.rules())


@PROPERTIES
@given(histories(), policies, zones, st.randoms(use_true_random=False))
def test_input_order_does_not_matter(
    versions: list[tuple[str, datetime]], policy: KeepPolicy, tz: tzinfo, rng: random.Random
) -> None:
    shuffled = list(versions)
    rng.shuffle(shuffled)
    assert decide(shuffled, policy, tz) == decide(versions, policy, tz)


@PROPERTIES
@given(histories(), policies, zones)
def test_pruning_again_keeps_everything(versions: list[tuple[str, datetime]], policy: KeepPolicy, tz: tzinfo) -> None:
    first = decide(versions, policy, tz)
    survivors = [(d.backup_id, dict(versions)[d.backup_id]) for d in first if d.keep]
    assert decide(survivors, policy, tz) == [d for d in first if d.keep]


@PROPERTIES
@given(histories(), st.sampled_from(RULES), st.integers(1, 5), zones)
def test_single_rule_keeps_newest_of_first_n_periods(
    versions: list[tuple[str, datetime]], rule: str, count: int, tz: tzinfo
) -> None:
    expected: dict[str, tuple[str, ...]] = {}
    periods: list[str] = []
    for backup_id, at in newest_first(versions):
        period = pbs_period(rule, backup_id, at, tz)
        if period not in periods:
            periods.append(period)
            if len(periods) > count:
                break
            expected[backup_id] = (f"{rule} {len(periods)}",)
    assert kept(decide(versions, KeepPolicy(**{rule: count}), tz)) == expected
