"""The plugin's exceptions; each message says what was wrong, with which layer or file, and what to
do. Failures of the engine itself arrive as :class:`sarmae_qgis.engine_client.EngineError`."""

from __future__ import annotations


class SarmaePluginError(Exception):
    """Base class of the errors the plugin raises on purpose (shown to the user as they are)."""


class ModelCardError(SarmaePluginError, ValueError):
    """A model package is missing, or its model.json cannot be read or does not fit the job."""


class LayerError(SarmaePluginError, ValueError):
    """A layer cannot be given to the engine (not a file on disk, wrong band count, ...)."""


class RequestError(SarmaePluginError, ValueError):
    """A dialog's choices do not make a valid request (no layer, no model, ...)."""
