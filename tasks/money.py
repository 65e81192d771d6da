"""Dollar amounts as people read them: cents for most, more digits for fractions of a cent."""

from __future__ import annotations


def usd(x: float) -> str:
    """$12.34; $0.0042 below a cent (a tiny run is not "$0.00"); <$0.0001 below that."""
    if x == 0 or abs(x) >= 0.01:
        return f"${x:,.2f}"
    if abs(x) < 0.0001:
        return "<$0.0001"
    return f"${x:.4f}"
