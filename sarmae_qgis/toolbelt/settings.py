"""The plugin's settings, stored with :class:`qgis.core.QgsSettings` under ``sarmae/``.

One typed dataclass (:class:`PluginSettings`, one comment per field) read with :func:`load` and
written with :func:`save`. Empty strings mean "the default", resolved when read through
:func:`engine_python`, :func:`models_folder` and :func:`output_folder`, so that a default that
moves (another QGIS profile, a re-installed engine) is never frozen into the user's settings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from qgis.core import QgsApplication, QgsProject, QgsSettings

from ..engine_client import default_python

PREFIX = "sarmae"
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "torch", "onnxruntime")
PRECISIONS = ("auto", "fp32", "int8")  # the engine's --precision; it decides what auto means
PRECISION_HELP = ("auto: the package's int8 model (model.int8.onnx) on a CPU with int8 dot-product instructions "
                  "(VNNI / AMX), else fp32.\nfp32: the full-precision model.\nint8: the package's int8 model, on "
                  "the CPU through ONNX Runtime; a package without one is refused (Models… > Make int8 model).")


@dataclass
class PluginSettings:
    engine_python: str = ""  # interpreter that runs the engine ("" = engine_client.default_python())
    models_folder: str = ""  # installed model packages ("" = <QGIS profile>/sarmae/models)
    device: str = "auto"  # default device of runs: auto | cpu | cuda
    backend: str = "auto"  # default backend of runs: auto | torch | onnxruntime
    batch_size: int = 4  # default windows per forward pass
    precision: str = "auto"  # default precision of runs: auto | fp32 | int8 (PRECISIONS)
    output_folder: str = ""  # where runs write ("" = next to the saved project, else ~/sarmae_outputs)


def _key(name: str) -> str:
    return f"{PREFIX}/{name}"


def load() -> PluginSettings:
    """The stored settings (defaults for anything missing or unreadable)."""
    s = QgsSettings()
    values = {}
    for f in fields(PluginSettings):
        default = f.default
        raw = s.value(_key(f.name), default)
        try:
            values[f.name] = type(default)(raw) if raw is not None else default
        except (TypeError, ValueError):
            values[f.name] = default
    out = PluginSettings(**values)
    if out.device not in DEVICES:
        out.device = "auto"
    if out.backend not in BACKENDS:
        out.backend = "auto"
    if out.precision not in PRECISIONS:
        out.precision = "auto"
    out.batch_size = max(1, out.batch_size)
    return out


def save(settings: PluginSettings) -> None:
    """Store every field of ``settings``."""
    s = QgsSettings()
    for name, value in asdict(settings).items():
        s.setValue(_key(name), value)


def set_value(name: str, value: object) -> None:
    """Store one field (``name`` must be a :class:`PluginSettings` field)."""
    if name not in {f.name for f in fields(PluginSettings)}:
        raise KeyError(f"unknown SARMAE setting '{name}'")
    QgsSettings().setValue(_key(name), value)


def profile_folder() -> Path:
    """The active QGIS user profile folder (e.g. ~/.local/share/QGIS/QGIS3/profiles/default)."""
    return Path(QgsApplication.qgisSettingsDirPath())


def default_models_folder() -> Path:
    return profile_folder() / "sarmae" / "models"


def default_output_folder() -> Path:
    """<saved project's folder>/sarmae_outputs (results next to the project), else ~/sarmae_outputs."""
    home = QgsProject.instance().homePath()
    return (Path(home) if home else Path.home()) / "sarmae_outputs"


def engine_python(settings: PluginSettings | None = None) -> str:
    """The interpreter that runs the engine worker."""
    settings = settings or load()
    return settings.engine_python.strip() or default_python()


def models_folder(settings: PluginSettings | None = None) -> Path:
    settings = settings or load()
    return Path(settings.models_folder).expanduser() if settings.models_folder.strip() else default_models_folder()


def output_folder(settings: PluginSettings | None = None) -> Path:
    settings = settings or load()
    return Path(settings.output_folder).expanduser() if settings.output_folder.strip() else default_output_folder()


# ---- what a dialog or panel remembers between openings (sarmae/<section>/<key>) ---------------
def remembered(section: str, key: str, default):
    """A value a dialog stored with :func:`remember` (of ``default``'s type), else ``default``."""
    raw = QgsSettings().value(f"{PREFIX}/{section}/{key}", None)
    if raw is None:
        return default
    try:
        if isinstance(default, bool):
            return raw if isinstance(raw, bool) else str(raw).lower() in ("true", "1")
        return type(default)(raw)
    except (TypeError, ValueError):
        return default


def remember(section: str, **values) -> None:
    """Store a dialog's choices (plain str / int / float / bool values)."""
    s = QgsSettings()
    for key, value in values.items():
        s.setValue(f"{PREFIX}/{section}/{key}", value)
