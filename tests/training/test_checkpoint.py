"""training.checkpoint: a checkpoint is read back before it replaces the last one; a full disk keeps it."""

from __future__ import annotations

import errno

import pytest
import torch

from engine.errors import OutputError
from training.checkpoint import load_checkpoint, save_checkpoint


def test_disk_full_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "last.pt", {"model": {}, "step": torch.tensor(1)})
    before = path.read_bytes()
    real_save = torch.save

    def save(obj, f, *a, **kw):
        real_save(obj, f, *a, **kw)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(OutputError, match=r"disk full while writing \S*last\.pt"):
        save_checkpoint(path, {"model": {}, "step": torch.tensor(2)})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    monkeypatch.setattr(torch, "save", real_save)
    save_checkpoint(path, {"model": {}, "step": torch.tensor(3)})
    assert int(load_checkpoint(path)["step"]) == 3


def test_a_truncated_checkpoint_is_not_published(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "last.pt", {"w": torch.zeros(1000)})
    before = path.read_bytes()
    real_save = torch.save

    def save(obj, f, *a, **kw):  # the disk "accepted" a short file
        real_save(obj, f, *a, **kw)
        with open(f, "r+b") as fh:
            fh.truncate(100)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(OutputError, match=r"last\.pt"):
        save_checkpoint(path, {"w": torch.ones(1000)})
    assert path.read_bytes() == before
