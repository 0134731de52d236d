"""Checkpoints hold no pickled code: lr schedule and EMA go to safetensors + JSON, pickle files are refused,
and a damaged checkpoint is named (or passed over by ``latest``)."""

import json
import pickle

import pytest
import torch
from accelerate import Accelerator
from transformers import get_cosine_schedule_with_warmup

from hf_resdecay.training import CheckpointError, make_ema, resume_state, save_checkpoint


class _Payload:
    """Unpickling this writes ``marker``: what a planted checkpoint file could do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def _setup(accelerator):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    schedule = get_cosine_schedule_with_warmup(optimizer, 2, 10)
    ema = make_ema(model.parameters(), 0.9, accelerator.device)
    return model, optimizer, {"lr_schedule": schedule, "ema": ema}


def _train(model, optimizer, states, steps):
    for _ in range(steps):
        model(torch.ones(1, 3)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        states["lr_schedule"].step()
        states["ema"].step(model.parameters())


def test_schedule_and_ema_round_trip_without_pickle(tmp_path):
    accelerator = Accelerator(cpu=True)
    model, optimizer, states = _setup(accelerator)
    _train(model, optimizer, states, 3)
    saved = save_checkpoint(accelerator, tmp_path, 3, states=states)
    assert not list(saved.rglob("*.pkl"))
    assert (saved / "state-lr_schedule.json").exists() and (saved / "state-ema.safetensors").exists()
    shadow = [tensor.clone() for tensor in states["ema"].shadow_params]
    lr = states["lr_schedule"].get_last_lr()

    accelerator = Accelerator(cpu=True)
    fresh_model, _, fresh = _setup(accelerator)
    assert not torch.equal(fresh_model.weight, model.weight)
    assert resume_state(accelerator, tmp_path, "latest", fresh) == (3, {})
    assert fresh["lr_schedule"].get_last_lr() == lr and fresh["lr_schedule"].last_epoch == 3
    assert fresh["ema"].optimization_step == 3
    for mine, theirs in zip(fresh["ema"].shadow_params, shadow, strict=True):
        assert torch.equal(mine, theirs)
    assert torch.equal(fresh_model.weight, model.weight)


@pytest.mark.parametrize("planted", ["custom_checkpoint_0.pkl", "random_states_0.pkl"])
def test_a_planted_pickle_is_refused_and_never_unpickled(tmp_path, planted):
    accelerator = Accelerator(cpu=True)
    _, _, states = _setup(accelerator)
    saved = save_checkpoint(accelerator, tmp_path / "checkpoints", 2, states=states)
    marker = tmp_path / "ran"
    (saved / planted).write_bytes(pickle.dumps(_Payload(marker)))
    for resume_from in ("latest", str(saved)):
        with pytest.raises(CheckpointError, match=f"holds pickle files \\({planted}\\)"):
            resume_state(accelerator, tmp_path / "checkpoints", resume_from, states)
    assert not marker.exists()


def test_a_planted_optimizer_file_is_read_as_weights_only(tmp_path):
    """optimizer.bin is a torch pickle: Accelerate loads it with weights_only=True, so a payload fails."""
    accelerator = Accelerator(cpu=True)
    _, _, states = _setup(accelerator)
    saved = save_checkpoint(accelerator, tmp_path, 2, states=states)
    marker = tmp_path / "ran"
    torch.save({"state": _Payload(marker)}, saved / "optimizer.bin")
    record = json.loads((saved / "manifest.json").read_text())
    record["optimizer.bin"] = (saved / "optimizer.bin").stat().st_size  # a consistent plant
    (saved / "manifest.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="does not fit this run"):
        resume_state(accelerator, tmp_path, str(saved), states)
    assert not marker.exists()


def test_damaged_checkpoints_are_named_and_latest_falls_back(tmp_path, capsys):
    accelerator = Accelerator(cpu=True)
    model, optimizer, states = _setup(accelerator)
    for step in (2, 4, 6):
        _train(model, optimizer, states, 2)
        save_checkpoint(accelerator, tmp_path, step, states=states)
    weights = tmp_path / "checkpoint-6" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # truncated
    for item in (tmp_path / "checkpoint-4").iterdir():  # emptied
        item.unlink()
    assert resume_state(accelerator, tmp_path, "latest", states)[0] == 2
    out = capsys.readouterr().out
    assert "skipping checkpoint-6: checkpoint" in out and "is truncated (model.safetensors:" in out
    assert "skipping checkpoint-4:" in out and "is incomplete" in out
    with pytest.raises(CheckpointError, match="checkpoint-6 is truncated"):
        resume_state(accelerator, tmp_path, str(tmp_path / "checkpoint-6"), states)
    with pytest.raises(CheckpointError, match="checkpoint-4 is incomplete"):
        resume_state(accelerator, tmp_path, str(tmp_path / "checkpoint-4"), states)

    other = Accelerator(cpu=True)  # a checkpoint of another model
    wider = torch.nn.Linear(5, 2)
    wider, _ = other.prepare(wider, torch.optim.AdamW(wider.parameters()))
    with pytest.raises(CheckpointError, match="does not fit this run"):
        resume_state(other, tmp_path, str(tmp_path / "checkpoint-2"), {})


def test_latest_without_a_checkpoint_says_it_starts_fresh(tmp_path, capsys):
    assert resume_state(Accelerator(cpu=True), tmp_path / "checkpoints", "latest") == (0, {})
    assert f"no checkpoint in {tmp_path / 'checkpoints'}: starting from step 0" in capsys.readouterr().out
