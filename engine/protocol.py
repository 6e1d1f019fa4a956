"""The engine worker's wire protocol: JSON lines over a pipe (``sarmae serve``, docs/protocol.md).

One JSON object per line, UTF-8 (in practice ASCII: non-ASCII is escaped), ``\\n``-terminated.
The client writes requests on the worker's stdin; the worker writes events on its stdout::

    client -> worker   {"id": "r1", "type": "run", "task": "infer", "inputs": [...], ...}
    worker -> client   {"event": "progress", "id": "r1", "fraction": 0.42, "message": "..."}
                       {"event": "result", "id": "r1", "result": {...}}

Every request carries a client-chosen string ``id``; every event answering it carries the same
``id`` (``null`` when the request was too broken to read one). Versioning: adding an optional
field does not change ``PROTOCOL_VERSION``; renaming or removing a field, or changing its meaning,
does. This module imports only the standard library (and the engine's error tree), so it stays
cheap to import and easy to mirror in the plugin's pure-Python client.
"""

from __future__ import annotations

import json
import math
import traceback as _traceback
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

from .errors import CancelledError, SarmaeError, describe_system_error

PROTOCOL_VERSION = 1
MAX_LINE_CHARS = 1_000_000  # a request longer than this is refused (it is a bug, not a request)

# request types (client -> worker)
INFO, MODEL_INFO, RUN, CANCEL, SHUTDOWN = "info", "model_info", "run", "cancel", "shutdown"
CLEAN = "clean"  # remove the stale temporaries a dead worker's run left in a folder
# event names (worker -> client)
HELLO, PROGRESS, LOG, RESULT, ERROR = "hello", "progress", "log", "result", "error"
# run tasks
INFER = "infer"
SIMILARITY = "similarity"
RUN_TASKS = (INFER, SIMILARITY)  # built in; other packages add theirs ("sarmae.worker_tasks" entry points)

# type -> {required field: expected JSON type(s)}; other fields are optional and passed through
REQUIRED: dict[str, dict[str, tuple[type, ...]]] = {
    INFO: {},
    MODEL_INFO: {"package": (str,)},
    RUN: {"task": (str,)},
    CANCEL: {"target": (str,)},
    CLEAN: {"folder": (str,)},
    SHUTDOWN: {},
}
REQUEST_TYPES = tuple(REQUIRED)

# error codes (machine-readable companion of the exception class name in "error.type")
BUSY, CANCELLED, PROTOCOL, FAILED, INTERNAL = "busy", "cancelled", "protocol", "failed", "internal"


class ProtocolError(SarmaeError):
    """A request line that cannot be served as written (malformed JSON, unknown type, bad field).

    ``request_id`` is the request's id when it could be read, so the error event can carry it.
    """

    def __init__(self, message: str, request_id: str | None = None):
        super().__init__(message)
        self.request_id = request_id


class BusyError(SarmaeError):
    """A run was requested while another one is active (the client queues and retries)."""


@dataclass(frozen=True)
class Request:
    """One parsed request: its id, its type and every other field of the JSON object."""

    id: str
    type: str
    params: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        return self.params.get(key, default)


def parse_request(line: str | bytes) -> Request:
    """Parse and check one request line.

    Raises:
        ProtocolError: with a message that says what is wrong and what a valid request looks like.
    """
    if isinstance(line, bytes):
        line = line.decode("utf-8", errors="replace")
    if len(line) > MAX_LINE_CHARS:
        raise ProtocolError(f"request line of {len(line)} characters is longer than the limit {MAX_LINE_CHARS}")
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ProtocolError(f"malformed JSON ({e.msg} at column {e.colno}); send one JSON object per line, "
                            'e.g. {"id": "1", "type": "info"}') from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"a request must be a JSON object, found {type(obj).__name__}")
    rid = obj.get("id")
    if not isinstance(rid, str) or not rid:
        raise ProtocolError(f"the request has no string 'id' (found {rid!r}); every request needs a "
                            "client-chosen string id")
    rtype = obj.get("type")
    if rtype not in REQUIRED:
        raise ProtocolError(f"unknown request type {rtype!r}; known types: {', '.join(REQUEST_TYPES)}", rid)
    params = {k: v for k, v in obj.items() if k not in ("id", "type")}
    for key, types in REQUIRED[rtype].items():
        if key not in params:
            raise ProtocolError(f"'{rtype}' request is missing the field '{key}'", rid)
        if not isinstance(params[key], types):
            names = " or ".join(_json_type(t) for t in types)
            raise ProtocolError(f"'{rtype}' field '{key}' must be a {names}, found {_json_type(type(params[key]))}",
                                rid)
    if rtype == RUN:
        _check_run(params, rid)
    return Request(rid, rtype, params)


INFER_FIELDS = {"inputs": (list, str), "output": (str,), "model": (str,)}


def _check_run(params: dict[str, Any], rid: str) -> None:
    if params["task"] != INFER:  # other tasks check their own fields (the worker knows them)
        return
    for key, types in INFER_FIELDS.items():
        if key not in params:
            raise ProtocolError(f"'run' request for task 'infer' is missing the field '{key}'", rid)
        if not isinstance(params[key], types):
            names = " or ".join(_json_type(t) for t in types)
            raise ProtocolError(f"'run' field '{key}' must be a {names}, found {_json_type(type(params[key]))}", rid)
    if isinstance(params["inputs"], str):
        params["inputs"] = [params["inputs"]]
    if not params["inputs"] or not all(isinstance(p, str) and p for p in params["inputs"]):
        raise ProtocolError("'run' field 'inputs' must be a non-empty list of raster paths", rid)
    options = params.setdefault("options", {})
    if not isinstance(options, dict):
        raise ProtocolError(f"'run' field 'options' must be an object, found {_json_type(type(options))}", rid)


def _json_type(t: type) -> str:
    return {str: "string", list: "list", dict: "object", int: "number", float: "number", bool: "boolean",
            type(None): "null"}.get(t, t.__name__)


# --- events (worker -> client) -------------------------------------------------------------------

def hello(engine_version: str, pid: int) -> dict[str, Any]:
    return {"event": HELLO, "protocol": PROTOCOL_VERSION, "engine_version": engine_version, "pid": pid}


def progress(rid: str, fraction: float, message: str) -> dict[str, Any]:
    return {"event": PROGRESS, "id": rid, "fraction": fraction, "message": message}


def log(rid: str | None, message: str, level: str = "info") -> dict[str, Any]:
    return {"event": LOG, "id": rid, "level": level, "message": message}


def result(rid: str, value: Any, **extra: Any) -> dict[str, Any]:
    return {"event": RESULT, "id": rid, "result": value, **extra}


def error(rid: str | None, type_name: str, message: str, *, code: str = FAILED, cancelled: bool = False,
          traceback: str | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"type": type_name, "code": code, "message": message, "cancelled": cancelled}
    if traceback:
        err["traceback"] = traceback
    return {"event": ERROR, "id": rid, "error": err}


def error_from_exception(rid: str | None, e: BaseException) -> dict[str, Any]:
    """The error event for an exception: the engine's own errors carry their (actionable) message,
    so do the system's errors on bad input (``errors.describe_system_error``: a missing or locked
    file, a full disk, no memory); anything else is unexpected and also carries the last frames of
    its traceback (code ``internal``)."""
    kind = type(e).__name__
    if isinstance(e, CancelledError):
        return error(rid, kind, str(e), code=CANCELLED, cancelled=True)
    if isinstance(e, SarmaeError):
        code = BUSY if isinstance(e, BusyError) else PROTOCOL if isinstance(e, ProtocolError) else FAILED
        return error(rid, kind, str(e), code=code)
    sentence = describe_system_error(e)  # a missing file, no permission, disk full, out of memory: bad input
    if sentence is not None:
        return error(rid, kind, sentence, code=FAILED)
    tb = "".join(_traceback.format_exception(type(e), e, e.__traceback__)[-8:])
    return error(rid, kind, (str(e) or repr(e))[:2000], code=INTERNAL, traceback=tb[-4000:])


def encode(message: dict[str, Any]) -> str:
    """One protocol line (no newline): compact ASCII JSON; NaN/inf become null, numpy scalars,
    tuples and paths become plain JSON values."""
    return json.dumps(_plain(message), ensure_ascii=True, allow_nan=False, separators=(",", ":"))


def decode(line: str | bytes) -> dict[str, Any]:
    """Parse one event line (for clients and tests)."""
    obj = json.loads(line)
    if not isinstance(obj, dict) or "event" not in obj:
        raise ProtocolError(f"not a protocol event: {str(line)[:200]!r}")
    return obj


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [_plain(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if x is None or isinstance(x, (str, int, bool)):
        return x
    if isinstance(x, PurePath):
        return str(x)
    if hasattr(x, "tolist") and callable(x.tolist):  # numpy array or scalar
        return _plain(x.tolist())
    return str(x)
