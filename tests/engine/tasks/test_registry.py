"""The task registry: built-in tasks, tasks of other packages through real ``sarmae.tasks`` entry
points (a ``*.dist-info`` folder on ``sys.path``, as pip installs one), and the clear errors for a
name registered twice or a plug-in that does not implement the protocol."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from engine.tasks import TASKS, Task, TaskRegistryError, get_task, reset_registry, task_names

# a task that needs no network and no weights (as a CFAR detector will): one file, one entry point
PLUGIN = textwrap.dedent('''
    import json, os
    import numpy as np
    from engine.tasks.base import PixelSink, Task
    from engine.types import InferenceResult


    class BrightBackend:
        name = "bright"

        def run(self, x):  # (B, C, S, S) -> fraction of pixels above 0 per window
            return (x[:, 0] > 0).mean(axis=(1, 2))

        def describe(self):
            return "bright-pixel counter"


    class BrightTask(Task):
        name = "bright"
        outputs = ("fraction",)
        needs_weights = False
        default_overlap = 0.0

        def backend(self, package, options):
            return BrightBackend()

        def make_sink(self, ctx):
            return BrightSink(self, ctx)

        def merge(self, job):
            raise NotImplementedError("not distributed in this test")


    class BrightSink(PixelSink):
        def __init__(self, task, ctx):
            super().__init__(task, ctx)
            self.values = []

        def consume(self, windows, outputs, valid):
            self.values += [float(v) for v in outputs]

        def finish(self):
            tmp = self.ctx.output.with_name("." + self.ctx.output.name + ".tmp")
            tmp.write_text(json.dumps(self.values))
            os.replace(tmp, self.ctx.output)
            return InferenceResult(task="bright", outputs={"fractions": str(self.ctx.output)},
                                   statistics={"windows": len(self.values)})

        def abort(self):
            pass


    class NoSink(Task):
        name = "nosink"
        outputs = ("x",)
''')


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """Install a package of tasks: ``plugin(entries, dist=...)`` writes the module and a dist-info
    folder with ``entry_points.txt`` on ``sys.path``; the registry is read again, and after the test."""
    counter = iter(range(100))

    def install(entries: dict[str, str], dist: str = "sarmae-test-tasks") -> str:
        mod = f"sarmae_test_tasks_{tmp_path.name.replace('-', '_')}_{next(counter)}"
        root = tmp_path / mod
        root.mkdir()
        (root / f"{mod}.py").write_text(PLUGIN)
        info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text("[sarmae.tasks]\n" + "".join(
            f"{name} = {mod}:{target}\n" for name, target in entries.items()))
        monkeypatch.syspath_prepend(str(root))
        reset_registry()
        return mod

    yield install
    reset_registry()


def test_builtin_tasks_are_registered():
    assert set(task_names()) >= {"embed", "reconstruct", "classify", "segment", "detect"}
    assert isinstance(get_task("segment"), Task) and TASKS["segment"] is get_task("segment")
    assert get_task("classify").vector_output and not get_task("embed").vector_output
    assert [n for n in TASKS if TASKS[n].onnx] == ["classify", "embed", "segment", "textquery", "zeroshot"]


def test_unknown_task_lists_the_registered_ones():
    with pytest.raises(TaskRegistryError, match="unknown task 'paint'.*segment.*sarmae.tasks"):
        get_task("paint")


def test_a_task_registered_twice_names_both_entry_points(plugin):
    plugin({"segment": "BrightTask"}, dist="sarmae-other-seg")
    with pytest.raises(TaskRegistryError) as e:
        get_task("segment")
    msg = str(e.value)
    assert "registered more than once" in msg and "sarmae (built in)" in msg
    assert "entry point 'segment = " in msg and "sarmae-other-seg" in msg and "Uninstall one" in msg
    assert get_task("embed").name == "embed"  # the other tasks still work


def test_a_plugin_missing_a_method_names_its_entry_point(plugin):
    mod = plugin({"nosink": "NoSink"}, dist="sarmae-broken")
    with pytest.raises(TaskRegistryError) as e:
        get_task("nosink")
    msg = str(e.value)
    assert f"entry point 'nosink = {mod}:NoSink' of sarmae-broken" in msg
    assert "does not define make_sink, merge" in msg and "Adding a task" in msg


def test_a_plugin_registered_under_another_name_or_not_a_task_is_refused(plugin):
    plugin({"wrongname": "BrightTask", "notatask": "json"})
    with pytest.raises(TaskRegistryError, match="its name is 'bright' but it is registered as 'wrongname'"):
        get_task("wrongname")
    with pytest.raises(TaskRegistryError, match="notatask.*cannot be loaded|notatask.*not a subclass"):
        get_task("notatask")


def test_a_plugin_task_runs_through_run_inference_without_torch_or_weights(plugin, tmp_path):
    """Adding a task is one file: a no-weights task with its own backend runs end to end."""
    from helpers.rasters import write_raster

    from engine.inference import InferenceOptions, run_inference
    from engine.package import default_input

    plugin({"bright": "BrightTask"})
    pkg = tmp_path / "bright.pkg"
    pkg.mkdir()
    card = {"format": "sarmae-model", "format_version": 2, "name": "bright", "task": "bright",
            "architecture": {"name": "none", "encoder": {"in_chans": 1, "img_size": 32, "patch_size": 16,
                                                         "embed_dim": 1, "depth": 1, "num_heads": 1}},
            "classes": [], "input": default_input(1, "db", ["VV"]), "output": "fraction", "provenance": {},
            "weights": {}}
    (pkg / "model.json").write_text(json.dumps(card))
    data = np.full((1, 64, 96), -20.0, np.float32)
    data[:, :32, :32] = 5.0  # only the first window is bright (above the contract's mid-point)
    src = write_raster(tmp_path / "in.tif", data, descriptions=["VV"])
    res = run_inference(str(src), tmp_path / "out.json", pkg, InferenceOptions(batch_size=4))
    assert res.task == "bright" and res.statistics == {"windows": 6}
    fractions = json.loads(Path(res.outputs["fractions"]).read_text())
    assert fractions[0] == 1.0 and fractions[1:] == [0.0] * 5
    assert "bright-pixel counter" in res.provenance["backend"]
