"""SARMAE lines in QGIS's message bar, without stale errors.

A failure stays in the bar until closed (duration 0), so that the analyst reads it; a later
SARMAE success or information line removes the failures SARMAE pushed before it: an old critical
message must not keep coming back over later successes (issue 16, item 4). Lines of other plugins
are never touched. A line wider than the bar gives up its title's middle first ("SARMAE: segment_Spa…labels
done: water 12 %, 15.6 s"), so that the numbers stay on one line instead of being cut by the bar's
height; the whole line is its tooltip and goes to the log. A progress line that changes
(:func:`line_updater`) also cuts its text, to stay on one line. Main thread only.
"""

from __future__ import annotations

from qgis.core import Qgis
from qgis.PyQt.QtCore import Qt
from qgis.PyQt.QtGui import QFont, QFontMetrics

CHROME_PX = 180  # the bar's icon, close and scroll buttons, margins: not for text (measured in QGIS 3.22)

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
        short_title, short_text = fit(title, text, bar.font(), bar_width(bar) - CHROME_PX)
        item = bar.createMessage(short_title, short_text)
        if (short_title, short_text) != (title, text):
            item.setToolTip(f"{title}: {text}")
        bar.pushWidget(item, level, 0 if critical else (10 if duration is None else duration))
    except RuntimeError:  # the bar was deleted (e.g. with its dialog): the log has the message
        return None
    if critical:
        _criticals.append((bar, item))
    return item


def bar_width(bar) -> int:
    """The width a line of ``bar`` gets on screen; 0 for a bar on no visible window (nothing to fit)."""
    parent = bar.parentWidget()
    if bar.isVisible():
        return bar.width()
    if parent is None or not parent.isVisible():
        return 0
    margins = parent.layout().contentsMargins() if parent.layout() is not None else None
    return parent.width() - (margins.left() + margins.right() if margins is not None else 0)


def fit(title: str, text: str, font: QFont, width: int) -> tuple[str, str]:
    """(title, text) on one line of ``width`` px where the title can give the room: the title (bold
    in the bar) elided in the middle, down to its first word ("SARMAE:"); the text is never shortened
    (a text longer than the bar scrolls in it, whole, as QGIS shows it)."""
    bold = QFont(font)
    bold.setBold(True)
    title_metrics, text_metrics = QFontMetrics(bold), QFontMetrics(font)
    room = width - text_metrics.horizontalAdvance(f"  {text}")
    if width <= 0 or title_metrics.horizontalAdvance(title) <= room:
        return title, text
    first = title.split(" ", 1)[0]
    if room >= title_metrics.horizontalAdvance(first + " …"):
        return title_metrics.elidedText(title, Qt.ElideMiddle, room), text
    return first, text


def fit_line(title: str, text: str, font: QFont, width: int) -> tuple[str, str]:
    """(title, text) on one line of ``width`` px, the text too if need be: a progress line changes
    every epoch and is read at a glance, so its text is cut at the right ("…") rather than wrapped
    onto a second line that the bar cuts in half (issue 16: a Full fine-tune's epoch line). Line
    breaks become spaces."""
    text = " ".join(text.split())
    title, text = fit(title, text, font, width)
    if width <= 0:
        return title, text
    bold = QFont(font)
    bold.setBold(True)
    metrics = QFontMetrics(font)
    room = width - QFontMetrics(bold).horizontalAdvance(title) - metrics.horizontalAdvance("  ")
    if metrics.horizontalAdvance(text) > room:
        text = metrics.elidedText(text, Qt.ElideRight, max(room, 0))
    return title, text


def line_updater(bar, item, title: str, prefix: str = ""):
    """A callable ``(text)`` that sets ``item`` (a line of ``bar``) to ``title``, ``prefix + text``,
    kept to one line (:func:`fit_line`; the whole line is its tooltip); a line the user closed is
    left alone."""
    def update(text: str) -> None:
        whole = f"{prefix}{text}"
        try:
            short_title, short_text = fit_line(title, whole, bar.font(), bar_width(bar) - CHROME_PX)
            item.setTitle(short_title)
            item.setText(short_text)
            item.setToolTip(f"{title}: {whole}" if (short_title, short_text) != (title, whole) else "")
        except RuntimeError:  # the user closed the line, or the bar went away
            pass

    return update
