"""What every SARMAE Processing algorithm shares: group, icon, help, engine calls, errors.

An algorithm translates Processing parameters into one engine request (through the shared
:func:`~sarmae_qgis.toolbelt.engine.get_client`) or one engine command line, and engine events
into feedback: ``progress`` events -> ``setProgress``/``setProgressText``, ``log`` events ->
``pushInfo``, ``feedback.isCanceled()`` -> the engine's cancel. Engine and plugin errors become
:class:`QgsProcessingException` with the engine's message (what, which file, what to do).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qgis.core import (
    QgsApplication,
    QgsProcessingAlgorithm,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFile,
)
from qgis.PyQt.QtCore import QVariant
from qgis.PyQt.QtGui import QIcon

from ..engine_client import EngineClient, EngineError
from ..errors import SarmaePluginError
from ..model_cards import PackageCard, check_task, list_packages, read_card
from ..toolbelt import engine, settings
from ..toolbelt.resources import ICON_PATH

GROUPS = {"inference": "Inference", "training": "Training", "packages": "Model packages"}


def is_set(parameters: dict, name: str) -> bool:
    """Whether an optional parameter was given (not missing, None, NULL, "" or [])."""
    value = parameters.get(name)
    if value is None or (isinstance(value, QVariant) and value.isNull()):
        return False
    if isinstance(value, (str, list, tuple)):
        return bool(value.strip() if isinstance(value, str) else value)
    return True


def advanced(param: QgsProcessingParameterDefinition) -> QgsProcessingParameterDefinition:
    """Mark a parameter as advanced (collapsed in the dialog)."""
    param.setFlags(param.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
    return param


def package_parameter(name: str = "MODEL", description: str = "Model package",
                      optional: bool = False) -> QgsProcessingParameterFile:
    """A model package: its folder (picked with a folder dialog) or the path of its .zip."""
    return QgsProcessingParameterFile(name, description, behavior=QgsProcessingParameterFile.Folder,
                                      optional=optional)


NO_INSTALLED = "(none: use the package path below)"


def installed_cards(tasks: tuple[str, ...] | None = None) -> list[PackageCard]:
    """The packages installed in the plugin's models folder (of ``tasks``), by name."""
    return [c for c in list_packages(settings.models_folder()) if tasks is None or c.task in tasks]


def installed_text(card: PackageCard) -> str:
    """An installed package as a Processing option: its name and task, and its folder in the models
    folder (which is unique there)."""
    return f"{card.name} ({card.task}) [{Path(card.path).name}]"


class EngineFeedback:
    """Engine callbacks bound to a Processing feedback object."""

    def __init__(self, feedback: QgsProcessingFeedback | None, log_progress: bool = False):
        self.feedback = feedback or QgsProcessingFeedback()
        self.log_progress = log_progress  # training: every progress message (an epoch, a step) is a log line
        self._text = ""
        # qgis_process prints progress text in the middle of its "0...10...20" line: keep it quiet
        self.show_text = QgsApplication.platform() != "qgis_process"

    def progress(self, fraction: float, message: str) -> None:
        if fraction < 0:
            if message:
                self.feedback.pushInfo(message)
            return
        self.feedback.setProgress(100.0 * min(1.0, fraction))
        if message and message != self._text:
            self._text = message
            if self.log_progress:
                self.feedback.pushInfo(message)
            elif self.show_text:
                self.feedback.setProgressText(message)

    def on_event(self, msg: dict) -> None:
        """For ``EngineClient.request``: progress and log events of any run task."""
        if msg.get("event") == "progress":
            self.progress(float(msg.get("fraction", 0.0)), msg.get("message", ""))
        elif msg.get("event") == "log":
            self.progress(-1.0, msg.get("message", ""))

    def line(self, text: str) -> None:
        self.feedback.pushInfo(text)

    def is_cancelled(self) -> bool:
        return self.feedback.isCanceled()


class SarmaeAlgorithm(QgsProcessingAlgorithm):
    """Base class: subclasses set NAME, DISPLAY, GROUP and HELP and implement the parameters."""

    NAME = ""
    DISPLAY = ""
    GROUP = "inference"
    HELP = ""

    def name(self) -> str:
        return self.NAME

    def displayName(self) -> str:  # noqa: N802  # Qt/QGIS API names
        return self.DISPLAY

    def group(self) -> str:
        return GROUPS[self.GROUP]

    def groupId(self) -> str:  # noqa: N802
        return self.GROUP

    def shortHelpString(self) -> str:  # noqa: N802
        return self.HELP

    def icon(self) -> QIcon:
        return QIcon(str(ICON_PATH))

    def createInstance(self):  # noqa: N802
        return type(self)()

    # ---- helpers for subclasses -----------------------------------------------------------------
    def add_package_parameters(self, name: str, description: str, tasks: tuple[str, ...] | None = None,
                               optional: bool = False) -> None:
        """Two parameters for one package: ``<name>_INSTALLED``, an enum of the packages installed in
        the models folder (the first preselected), and ``<name>``, a package folder or .zip from
        elsewhere (it wins when given). A required package is checked in :meth:`check_package`."""
        self._installed = getattr(self, "_installed", {})
        cards = installed_cards(tasks)
        # the option's text is its value (static strings): a saved model, batch or qgis_process call
        # keeps naming the same package when others are installed or deleted (an index would shift)
        self._installed[name] = {installed_text(c): c.path for c in cards}
        options = [NO_INSTALLED, *self._installed[name]]
        self.addParameter(QgsProcessingParameterEnum(f"{name}_INSTALLED", f"{description}: installed", options,
                                                     defaultValue=options[0 if optional or not cards else 1],
                                                     optional=True, usesStaticStrings=True))
        self.addParameter(package_parameter(name, f"{description}: or a package folder / .zip (overrides the "
                                                  "list)", optional=True))

    def package_path(self, parameters: dict, context: QgsProcessingContext, name: str) -> str:
        """The package chosen for ``name``: the path when given, else the installed one ("" if none)."""
        path = self.parameterAsFile(parameters, name, context) if is_set(parameters, name) else ""
        if path:
            return path
        installed = getattr(self, "_installed", {}).get(name, {})
        key = f"{name}_INSTALLED"
        if installed and self.parameterDefinition(key) is not None:
            return installed.get(self.parameterAsEnumString(parameters, key, context), "")
        return ""

    def package_card(self, parameters: dict, context: QgsProcessingContext, name: str = "MODEL",
                     tasks: tuple[str, ...] | None = None) -> PackageCard:
        """Read (and check the task of) the package chosen in parameter ``name``."""
        path = self.package_path(parameters, context, name)
        if not path:
            raise QgsProcessingException(f"no model package given in {name}: choose an installed model, or a package "
                                         f"folder or .zip (models folder: {settings.models_folder()})")
        try:
            card = read_card(path)
            if tasks:
                check_task(card, tasks)
        except SarmaePluginError as e:
            raise QgsProcessingException(str(e)) from e
        return card

    def check_package(self, parameters: dict, context: QgsProcessingContext, name: str,
                      tasks: tuple[str, ...] | None, required: bool = False) -> tuple[bool, str]:
        """For ``checkParameterValues``: (ok, message) about the package in ``name``."""
        if not self.package_path(parameters, context, name):
            if required:
                return False, (f"choose a model: an installed one, or a package folder / .zip (nothing is installed "
                               f"in {settings.models_folder()} for this algorithm)")
            return True, ""
        try:
            self.package_card(parameters, context, name, tasks)
        except QgsProcessingException as e:
            return False, str(e)
        return True, ""

    def engine_request(self, feedback: QgsProcessingFeedback | None,
                       call: Callable[[EngineClient, EngineFeedback], Any], log_progress: bool = False) -> Any:
        """Run ``call(client, bridge)`` holding the plugin's run slot; errors -> QgsProcessingException."""
        bridge = EngineFeedback(feedback, log_progress)
        try:
            with engine.exclusive_run(bridge.is_cancelled,
                                      lambda: bridge.line("waiting for another SARMAE run to finish...")):
                return call(engine.get_client(), bridge)
        except EngineError as e:
            raise QgsProcessingException(self.parameter_text(engine_message(e))) from e
        except SarmaePluginError as e:
            raise QgsProcessingException(self.parameter_text(str(e))) from e

    def parameter_text(self, message: str) -> str:
        """An engine message worded for this algorithm: a command-line flag it has a parameter for
        ("--batch-size") becomes that parameter's name ("BATCH_SIZE")."""
        def name(m: re.Match) -> str:
            param = m.group(1).upper().replace("-", "_")
            return param if self.parameterDefinition(param) is not None else m.group(0)

        # a command suggested to run in a terminal ('sarmae export ... --precision int8') keeps its flags
        parts = re.split(r"('sarmae [^']*')", message)
        return "".join(part if i % 2 else re.sub(r"--([a-z][a-z0-9-]*)", name, part) for i, part in enumerate(parts))

    def engine_cli(self, args: list[str], feedback: QgsProcessingFeedback | None) -> str:
        """Run ``python -m engine.cli *args`` with the configured interpreter."""
        bridge = EngineFeedback(feedback)
        bridge.line("sarmae " + " ".join(args))
        try:
            return engine.run_cli(args, on_line=bridge.line, is_cancelled=bridge.is_cancelled)
        except EngineError as e:
            raise QgsProcessingException(self.parameter_text(engine_message(e))) from e


def engine_message(e: EngineError) -> str:
    """The user-facing text of an engine error."""
    if e.cancelled:
        return "Cancelled by the user; no output was written."
    text = str(e)
    if e.kind == "start" and "Settings" not in text:
        text += (" -- The engine runs with the Python interpreter set in Raster > SARMAE > Settings (or "
                 "$SARMAE_PYTHON): choose the one where sarmae is installed, e.g. <sarmae>/.venv/bin/python.")
    if e.details:
        text += f"\n\nEngine traceback:\n{e.details}"
    return text


def to_json(value: Any) -> str:
    """Compact JSON for string outputs (statistics, metrics)."""
    return json.dumps(value, separators=(",", ":"), default=str)
