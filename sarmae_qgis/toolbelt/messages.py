"""SARMAE lines in QGIS's message bar, without stale errors.

A failure stays in the bar until closed (duration 0), so that the analyst reads it; a later
SARMAE success or information line removes the failures SARMAE pushed before it: an old critical
message must not keep coming back over later successes (issue 16, item 4). Lines of other plugins
are never touched. Main thread only.
"""

from __future__ import annotations

from qgis.core import Qgis

_criticals: list = []  # (bar, item) pushed by SARMAE and not yet cleared


def clear_failures(bar=None) -> int:
    """Remove the failure lines SARMAE pushed (to ``bar``, or to any bar); returns how many."""
    kept, removed = [], 0
    for b, item in _criticals:
        if bar is not None and b is not bar:
            kept.append((b, item))
            continue
        try:
            b.popWidget(item)
            removed += 1
        except RuntimeError:  # the user closed it, or the bar went away
            pass
    _criticals[:] = kept
    return removed


def push(bar, title: str, text: str, level=Qgis.Info, duration: int | None = None):
    """Push a line (criticals stay until closed, others ``duration`` s, default 10); a non-critical
    line first clears SARMAE's earlier failures. Returns the item (None when the bar is gone)."""
    if bar is None:
        return None
    critical = level == Qgis.Critical
    if not critical:
        clear_failures(bar)
    try:
        item = bar.createMessage(title, text)
        bar.pushWidget(item, level, 0 if critical else (10 if duration is None else duration))
    except RuntimeError:  # the bar was deleted (e.g. with its dialog): the log has the message
        return None
    if critical:
        _criticals.append((bar, item))
    return item
