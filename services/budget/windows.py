"""Budget windows: a window is part of a counter's key, so a new day or month is a new key.

No job resets anything: at midnight UTC the accountant simply starts charging
`user:alice:d20261122` instead of `user:alice:d20261121`. A hold remembers the keys it was
taken on, so a call reserved at 23:59:59.999 and settled after midnight charges the window it
was reserved in.
"""

from __future__ import annotations

from datetime import UTC, datetime

from shared.contracts.budget import Window

DAY_KEEP_S = 40 * 24 * 3600  # old day counters stay readable for a month and a bit, then expire
MONTH_KEEP_S = 400 * 24 * 3600  # old month counters stay readable for a year and a bit
TOTAL = "total"


def _utc(now_ms: int) -> datetime:
    return datetime.fromtimestamp(now_ms / 1000, tz=UTC)


def window_key(window: Window, now_ms: int) -> str:
    """The key suffix of the window containing `now_ms`: `d20261121`, `m202611` or `total`."""
    moment = _utc(now_ms)
    if window == "day":
        return moment.strftime("d%Y%m%d")
    if window == "month":
        return moment.strftime("m%Y%m")
    return TOTAL


def resets_at_ms(window: Window, now_ms: int) -> int | None:
    """Start of the next window (epoch ms); None for `total`, which never resets."""
    moment = _utc(now_ms)
    if window == "day":
        start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        following = datetime.fromordinal(start.toordinal() + 1).replace(tzinfo=UTC)
    elif window == "month":
        following = datetime(moment.year + moment.month // 12, moment.month % 12 + 1, 1, tzinfo=UTC)
    else:
        return None
    return int(following.timestamp() * 1000)


def keep_s(window: Window) -> int | None:
    """How long a window's counter is kept after its last write; None = forever."""
    return {"day": DAY_KEEP_S, "month": MONTH_KEEP_S}.get(window)
