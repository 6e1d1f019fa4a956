"""Log to the QGIS *Log Messages* panel under the tab "SARMAE".

Use the module functions (``log.info("...")``) or the standard :mod:`logging` logger from
:func:`get_logger`, whose records are forwarded to :class:`qgis.core.QgsMessageLog`.
"""

from __future__ import annotations

import logging

from qgis.core import Qgis, QgsMessageLog

TAG = "SARMAE"
"""Tab name of the plugin's messages in the QGIS log panel."""

_LEVELS: tuple[tuple[int, Qgis.MessageLevel], ...] = (
    (logging.CRITICAL, Qgis.Critical),
    (logging.ERROR, Qgis.Critical),
    (logging.WARNING, Qgis.Warning),
    (logging.INFO, Qgis.Info),
)


def to_qgis_level(level: int) -> Qgis.MessageLevel:
    """Map a :mod:`logging` level to the nearest QGIS message level (DEBUG -> Info)."""
    for threshold, qgis_level in _LEVELS:
        if level >= threshold:
            return qgis_level
    return Qgis.Info


def log(message: str, level: Qgis.MessageLevel = Qgis.Info, notify: bool = False) -> None:
    """Write ``message`` to the QGIS log under :data:`TAG`.

    Args:
        message: text to log.
        level: ``Qgis.Info``, ``Qgis.Warning``, ``Qgis.Critical`` or ``Qgis.Success``.
        notify: also flag the log panel's tab so the user notices.
    """
    QgsMessageLog.logMessage(message, TAG, level, notify)


def info(message: str) -> None:
    """Log an informational message."""
    log(message, Qgis.Info)


def warning(message: str) -> None:
    """Log a warning."""
    log(message, Qgis.Warning)


def critical(message: str) -> None:
    """Log an error and flag the log panel."""
    log(message, Qgis.Critical, notify=True)


class QgsMessageLogHandler(logging.Handler):
    """A :mod:`logging` handler that forwards records to :class:`QgsMessageLog`."""

    def emit(self, record: logging.LogRecord) -> None:
        """Send one formatted record to the QGIS log."""
        try:
            level = to_qgis_level(record.levelno)
            log(self.format(record), level, notify=record.levelno >= logging.ERROR)
        except Exception:  # logging must never raise into the caller
            self.handleError(record)


def get_logger(name: str = "sarmae_qgis") -> logging.Logger:
    """Return a logger whose records go to the QGIS log (handler attached once)."""
    logger = logging.getLogger(name)
    if not any(isinstance(h, QgsMessageLogHandler) for h in logger.handlers):
        logger.addHandler(QgsMessageLogHandler())
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger
