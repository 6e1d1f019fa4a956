"""Add model.onnx, or the int8 model (model.int8.onnx), to a package in the background.

The engine worker has no export request: export is the engine's command line (``sarmae export``),
run with the configured interpreter by :func:`~sarmae_qgis.toolbelt.engine.run_cli`, as the
Processing algorithm *Export model package to ONNX* runs it. :func:`export_args` builds that
command line for both; :class:`ExportTask` runs it in a QgsTask (holding the plugin's run slot, so
it does not compete with a model run for the CPU) and hands the outcome to ``on_done`` on the main
thread. The engine writes the package atomically and refuses an int8 model below its quality gate
with a sentence (the figure, what to try); nothing is written then.
"""

from __future__ import annotations

from collections.abc import Callable

from qgis.core import QgsTask

from ..engine_client import EngineError
from ..toolbelt import log
from ..toolbelt.engine import exclusive_run, run_cli

PRECISIONS = ("fp32", "int8")  # what 'sarmae export --precision' writes: model.onnx, or model.int8.onnx too


def export_args(package: str, precision: str = "fp32", calibration: str | None = None, force: bool = False,
                output: str | None = None, opset: int | None = None) -> list[str]:
    """``sarmae export`` arguments: model.onnx (fp32), or also model.int8.onnx (int8, gated on windows
    of ``calibration``, a raster like those the model will process; ``force`` writes it below the
    gate, recorded in model.json)."""
    if precision not in PRECISIONS:
        raise ValueError(f"export precision {precision!r}: use fp32 or int8")
    args = ["export", str(package)]
    if opset is not None:
        args += ["--opset", str(opset)]
    if output:
        args += ["--output", str(output)]
    if precision == "int8":
        args += ["--precision", "int8"]
        if calibration:
            args += ["--calibration", str(calibration)]
        if force:
            args.append("--force")
    return args


class ExportTask(QgsTask):
    """Runs ``sarmae export`` with ``args`` (:func:`export_args`); ``on_done(output, error, cancelled)`` is called
    on the main thread: the command's output, or the engine's message (None for the other)."""

    def __init__(self, title: str, args: list[str], on_done: Callable[[str | None, str | None, bool], None] | None = None):
        super().__init__(f"SARMAE: {title}", QgsTask.CanCancel)
        self.args = args
        self.on_done = on_done
        self.output: str | None = None
        self.error: str | None = None
        self.cancelled = False
        self.is_done = False

    def run(self) -> bool:
        try:
            with exclusive_run(self.isCanceled):
                self.output = run_cli(self.args, on_line=lambda line: log.info(f"sarmae export: {line}"),
                                      is_cancelled=self.isCanceled)
        except EngineError as e:
            self.error, self.cancelled = str(e), e.cancelled
            return False
        except Exception as e:  # a bug or an OS error: reported in finished(), never raised into QGIS
            self.error = f"the export failed: {e}"
            return False
        return True

    def finished(self, result: bool) -> None:  # noqa: FBT001  # QgsTask API
        self.is_done = True
        if not result and self.error is None:
            self.error, self.cancelled = "cancelled by the user; nothing was written", True
        if self.on_done is not None:
            try:
                self.on_done(self.output if result else None, None if result else self.error, self.cancelled)
            except Exception as e:  # a closed dialog or a bug must not take QGIS down
                log.critical(f"after the export: {e}")
