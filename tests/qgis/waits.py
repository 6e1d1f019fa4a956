"""Waiting on Qt in the QGIS tests: the task manager's signals arrive only while events are processed."""

from __future__ import annotations

import time

from qgis.PyQt.QtCore import QCoreApplication


def wait_until(condition, timeout: float = 120.0) -> None:
    """Process Qt events until ``condition()`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        QCoreApplication.processEvents()
        time.sleep(0.02)
    assert condition(), "timed out"
