"""Issue 15, items 5 and 7: resuming pretraining. The README's ``sarmae pretrain --output RUN --resume``
continues with the run's own config; an empty or truncated ``last.pt`` is a sentence naming the file
and the checkpoint to resume from instead, never a traceback."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import rasterio

from engine.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")

TINY = ["model.img_size=32", "model.in_chans=1", "model.depth=2", "model.decoder_dim=32", "model.decoder_depth=1",
        "model.decoder_heads=2", "optim.batch_size=8", "optim.warmup_epochs=1", "run.log_every_steps=1",
        "run.checkpoint_every_epochs=1", "run.preview_samples=2", "run.epoch_size=8"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A one-epoch pretraining run (checkpoint-0001.pt and last.pt) on 16 tiny chips."""
    root = tmp_path_factory.mktemp("pretrain")
    rng = np.random.default_rng(0)
    (root / "chips").mkdir()
    for i in range(16):
        with rasterio.open(root / "chips" / f"c{i}.tif", "w", driver="GTiff", width=32, height=32, count=1,
                           dtype="uint8") as d:
            d.write(rng.integers(0, 255, (1, 32, 32), dtype=np.uint8))
    run = root / "run"
    assert main(["pretrain", "-q", "--data", str(root / "chips"), "--output", str(run), *TINY, "optim.epochs=1"]) == 0
    assert (run / "last.pt").is_file() and list(run.glob("checkpoint-*.pt"))
    return run


def test_resume_with_only_output_uses_the_runs_config(finished_run, tmp_path, capsys):
    run = shutil.copytree(finished_run, tmp_path / "run")
    assert main(["pretrain", "-q", "--output", str(run), "--resume"]) == 0  # as the README says
    assert "epoch" in capsys.readouterr().out
    rc = main(["pretrain", "-q", "--output", str(run), "--resume", "optim.lr=5e-4"])
    err = capsys.readouterr().err
    assert rc == 2 and f"'sarmae pretrain --output {run} --resume'" in err and "Traceback" not in err


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_damaged_last_pt_is_a_sentence(finished_run, tmp_path, capsys, damage):
    run = shutil.copytree(finished_run, tmp_path / "run")
    last = run / "last.pt"
    last.write_bytes(b"" if damage == "empty" else last.read_bytes()[: last.stat().st_size // 3])
    assert main(["pretrain", "-q", "--output", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(last) in err
    assert ("is empty (0 bytes)" if damage == "empty" else "is truncated or damaged") in err
    assert "copy the latest good one over it (e.g. cp " in err and "checkpoint-0001.pt" in err
