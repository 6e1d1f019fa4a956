"""The task registry: built-in tasks and those other packages add through entry points.

A package adds a task with one entry point in the ``sarmae.tasks`` group, named as the task
(model.json's ``"task"``) and pointing at its ``Task`` subclass::

    [project.entry-points."sarmae.tasks"]
    cfar = "sarmae_cfar.task:CfarTask"

A METHOD of a task (a detector with no network, such as CFAR, for the task ``detect``) is
registered as ``<task>.<method>`` (``detect.cfar``); a card selects it with its architecture name
(``"task": "detect", "architecture": {"name": "cfar", ...}``), and ``task_for(card)`` returns it (the
task itself when no such method is registered). Methods are not listed among the task names.

Tasks are imported when first looked up (``get_task``), so that listing them stays cheap. A name
registered twice, a class that is not a ``Task`` or lacks a required method, is refused with a
``TaskRegistryError`` that names the entry point(s).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from ..errors import SarmaeError
from .base import Task

if TYPE_CHECKING:
    from ..card import ModelCard

ENTRY_POINT_GROUP = "sarmae.tasks"
BUILTIN = {
    "embed": "engine.tasks.embed:EmbedTask",
    "reconstruct": "engine.tasks.reconstruct:ReconstructTask",
    "classify": "engine.tasks.classify:ClassifyTask",
    "segment": "engine.tasks.segment:SegmentTask",
    "detect": "engine.tasks.detect:DetectTask",
    "detect.cfar": "engine.tasks.cfar:CfarTask",
    "zeroshot": "engine.tasks.zeroshot:ZeroshotTask",
    "textquery": "engine.tasks.textquery:TextqueryTask",
}


class TaskRegistryError(SarmaeError):
    """A task is unknown, registered twice, or its plug-in does not implement the task protocol."""


_specs: dict[str, list[tuple[str, str]]] | None = None  # name -> [(source, "module:Class"), ...]
_loaded: dict[str, Task] = {}


def _all_specs() -> dict[str, list[tuple[str, str]]]:
    global _specs
    if _specs is None:
        from importlib.metadata import entry_points

        specs: dict[str, list[tuple[str, str]]] = {n: [("sarmae (built in)", t)] for n, t in BUILTIN.items()}
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(ep, "dist", None)
            source = f"entry point '{ep.name} = {ep.value}' of {dist.name if dist else 'an installed package'}"
            specs.setdefault(ep.name, []).append((source, ep.value))
        _specs = specs
    return _specs


def reset_registry() -> None:
    """Forget the registry (read the entry points again on the next look-up), e.g. after installing a plug-in."""
    global _specs
    _specs = None
    _loaded.clear()


def task_names() -> list[str]:
    """Every registered task name (built in and plug-ins), sorted; methods (``detect.cfar``) are not tasks."""
    return sorted(n for n in _all_specs() if "." not in n)


def method_names(task: str) -> list[str]:
    """The methods registered for ``task`` (``detect`` -> ``["cfar"]``), sorted."""
    return sorted(n.partition(".")[2] for n in _all_specs() if n.startswith(task + "."))


def _load(name: str, source: str, target: str) -> Task:
    module, _, attr = target.partition(":")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise TaskRegistryError(f"task '{name}': {source} cannot be loaded ({type(e).__name__}: {e}); "
                                "reinstall that package or remove it") from e
    return check_task(obj, name, source)


def check_task(obj: object, name: str, source: str) -> Task:
    """``obj`` (a ``Task`` subclass or instance) as an instance, after checking it implements the protocol."""
    cls = obj if isinstance(obj, type) else type(obj)
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TaskRegistryError(f"task '{name}': {source} points at {obj!r}, which is not a subclass of "
                                "engine.tasks.Task; see DESIGN.md, 'Adding a task'")
    required = Task.REQUIRED if cls.windowed else ("run_raster",)
    missing = [m for m in required if not callable(getattr(cls, m, None)) or getattr(cls, m) is getattr(Task, m)]
    problems = [f"does not define {', '.join(missing)}"] if missing else []
    if cls.key() != name:
        problems.append(f"its name is {cls.key()!r} but it is registered as {name!r}")
    if not cls.outputs:
        problems.append("it lists no 'outputs' (what its model returns, e.g. ('logits', 'probabilities'))")
    if problems:
        raise TaskRegistryError(f"task '{name}': {source} ({cls.__module__}.{cls.__qualname__}) "
                                f"{'; '.join(problems)}; a task must implement engine.tasks.Task "
                                "(DESIGN.md, 'Adding a task')")
    return obj if isinstance(obj, Task) else cls()


def get_task(name: str, method: str | None = None) -> Task:
    """The registered task ``name``; a clear error when it is unknown or registered twice. With
    ``method`` (a card's architecture name): the task's method ``name.method`` when one is
    registered (``get_task("detect", "cfar")``), else the task itself."""
    if method and "." not in name and f"{name}.{method}" in _all_specs():
        name = f"{name}.{method}"
    if name in _loaded:
        return _loaded[name]
    specs = _all_specs()
    if name not in specs:
        raise TaskRegistryError(f"unknown task '{name}'; registered tasks: {', '.join(task_names())} "
                                f"(more come from packages with '{ENTRY_POINT_GROUP}' entry points)")
    if len(specs[name]) > 1:
        raise TaskRegistryError(f"task '{name}' is registered more than once: "
                                + "; ".join(src for src, _ in specs[name])
                                + ". Uninstall one of these packages (or rename its task)")
    (source, target), = specs[name]
    _loaded[name] = task = _load(name, source, target)
    return task


def task_for(card: ModelCard) -> Task:
    """The task that runs ``card``: its task, or the task's method named by its architecture."""
    return get_task(card.task, card.architecture.name)


class _Registry(Mapping):
    """``TASKS``: the registry read as a mapping of names to tasks (loaded on access)."""

    def __getitem__(self, name: str) -> Task:
        return get_task(name)

    def __iter__(self) -> Iterator[str]:
        return iter(task_names())

    def __len__(self) -> int:
        return len(task_names())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and "." not in name and name in _all_specs()


TASKS = _Registry()
