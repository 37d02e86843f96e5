"""Checkpoints: atomic, pruned, weights_only-loadable, corrupt newest one skipped loudly."""
import logging
import random

import numpy as np
import pytest
import torch

from hpcgan.checkpoint import (REQUIRED_KEYS, capture_rng, checkpoint_path, list_checkpoints,
                               load_latest, restore_rng, save_checkpoint)


def _state(step: int) -> dict:
    torch.manual_seed(step)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters())
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    return {"step": step, "epoch": 0, "batch_in_epoch": step, "config": {"model": {"name": "x"}, "image_size": 32,
            "classes": ["a", "b"]}, "G": net.state_dict(), "D": net.state_dict(), "G_ema": None,
            "opt_G": opt.state_dict(), "opt_D": opt.state_dict(), "scaler": None, "rng": capture_rng(),
            "meta": {"world_size": 1}}


def test_save_prunes_and_loads_newest(tmp_path):
    for step in (1, 2, 3, 10):
        save_checkpoint(tmp_path, _state(step), keep_last=2)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step-00000003.pt", "step-00000010.pt"]
    state, path = load_latest(tmp_path)
    assert path == checkpoint_path(tmp_path, 10) and state["step"] == 10
    assert torch.equal(state["G"]["weight"], _state(10)["G"]["weight"])
    assert not list((tmp_path / "checkpoints").glob(".*tmp")), "temp files left behind"


def test_missing_keys_rejected(tmp_path):
    with pytest.raises(ValueError, match="missing keys"):
        save_checkpoint(tmp_path, {"step": 1})


def test_empty_run_dir(tmp_path):
    assert load_latest(tmp_path) == (None, None)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing_key"])
def test_corrupt_newest_falls_back_loudly(tmp_path, caplog, capsys, damage):
    save_checkpoint(tmp_path, _state(4))
    newest = save_checkpoint(tmp_path, _state(8))
    data = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        newest.write_bytes(b"\x00" * 100)
    else:  # a loadable dict without the expected keys
        torch.save({"step": 8}, newest)
    with caplog.at_level(logging.WARNING):
        state, path = load_latest(tmp_path)
    assert state["step"] == 4 and path.name == "step-00000004.pt"
    assert "step-00000008.pt" in caplog.text
    assert "step-00000008.pt" in capsys.readouterr().err
    assert newest.exists(), "the damaged file is kept for inspection"


def test_weights_only_rejects_code(tmp_path):
    """A checkpoint that would need arbitrary unpickling is refused, not executed."""
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    state = _state(1)
    state["meta"] = {"x": Evil()}
    path = checkpoint_path(tmp_path, 1)
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    assert load_latest(tmp_path) == (None, None)


def test_rng_roundtrip_through_checkpoint(tmp_path):
    random.seed(1); np.random.seed(2); torch.manual_seed(3)
    state = _state(1)
    state["rng"] = capture_rng()
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    save_checkpoint(tmp_path, state)
    torch.rand(5); np.random.rand(7); random.random()  # advance everything
    loaded, _ = load_latest(tmp_path)
    restore_rng(loaded["rng"])
    got = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(expected[0], got[0])
    assert np.array_equal(expected[1], got[1])
    assert expected[2] == got[2]
    assert set(REQUIRED_KEYS) <= set(loaded)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to load a checkpoint onto")
def test_rng_restores_from_a_checkpoint_loaded_onto_the_gpu(tmp_path):
    """Training loads checkpoints with map_location=<its device>: on a GPU the RNG tensors arrive there."""
    np.random.seed(2); random.seed(1)
    state = _state(1)
    state["rng"] = capture_rng()
    expected = (np.random.rand(3), random.random())
    save_checkpoint(tmp_path, state)
    np.random.rand(7); random.random()
    loaded, _ = load_latest(tmp_path, map_location="cuda")
    assert loaded["rng"]["numpy"]["keys"].is_cuda
    restore_rng(loaded["rng"])
    assert np.array_equal(expected[0], np.random.rand(3)) and expected[1] == random.random()


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    """A newer, unreadable checkpoint (skipped on resume) must not push the fresh one out of keep_last."""
    save_checkpoint(tmp_path, _state(2), keep_last=1)
    corrupt = checkpoint_path(tmp_path, 4)
    corrupt.write_bytes(b"\x00" * 100)  # e.g. copied half-way; the run resumes from step 2
    written = save_checkpoint(tmp_path, _state(3), keep_last=1)  # stopped by a signal at step 3
    assert written.exists()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000003.pt", "step-00000004.pt"]
    state, path = load_latest(tmp_path)
    assert state["step"] == 3 and path == written
