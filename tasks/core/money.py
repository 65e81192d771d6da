"""Dollar amounts as people read them: cents for most, more digits for fractions of a cent."""

from __future__ import annotations


def usd(x: float) -> str:
    """$12.34; $0.0042 below a cent (a tiny run is not "$0.00"); <$0.0001 below that."""
    if x == 0 or abs(x) >= 0.01:
        return f"${x:,.2f}"
    if abs(x) < 0.0001:
        return "<$0.0001"
    return f"${x:.4f}"


def duration(hours: float) -> str:
    """A time estimate as people read it: "40 s", "2.5 min", "14 min", "3.2 h" (a short run is not "0 min")."""
    seconds = hours * 3600
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{hours:.1f} h"
