"""A kill at any point of the final save leaves the previous complete model or the new one, never a mix.

A forked process publishes a new model over an old one and SIGKILLs itself after the n-th file-system
operation, for every n; after each kill the folder must load as one whole version (config, weights, card and
results.json all old or all new), with checkpoints, logs and other files untouched."""

import json
import multiprocessing
import os
import signal

import pytest
import torch

from hf_resdecay import ViTMAEDecayConfig, ViTMAEDecayForPreTraining
from hf_resdecay.training import publish, publish_directory, recover_publish

VERSIONS = {"old": 0.3, "new": 0.5}  # shortcut_decay tells the versions apart
EXTRAS = {
    "checkpoints/checkpoint-2/model.safetensors": "checkpoint weights",
    "checkpoints/checkpoint-2/loop_state.json": "{}",
    "logs/metrics.jsonl": '{"step": 1}\n',
    "samples/epoch_0001.png": "grid",
    "notes.txt": "the user's own file",
    ".lock": "123 host",
}


def _model(version: str) -> ViTMAEDecayForPreTraining:
    torch.manual_seed(len(version))
    config = ViTMAEDecayConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=8,
        patch_size=4, decoder_hidden_size=8, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
        decoder_intermediate_size=16, shortcut_decay=VERSIONS[version],
    )  # fmt: skip
    return ViTMAEDecayForPreTraining(config)


def _stage(folder, version: str) -> None:
    _model(version).save_pretrained(folder)
    (folder / "README.md").write_text(f"card of the {version} model")
    (folder / "results.json").write_text(json.dumps({"version": version}))
    (folder / "samples").mkdir()
    (folder / "samples" / "final.png").write_text(f"final grid of the {version} model")


def _old_folder(target) -> None:
    for name, text in EXTRAS.items():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        (target / name).write_text(text)
    (target / "empty").mkdir()
    _stage(target / ".final.partial", "old")
    publish_directory(target / ".final.partial", target)


def _publish_and_die(staging, target, kill_at: int, exchange: bool) -> None:
    if not exchange:  # a system without renameat2(RENAME_EXCHANGE)
        publish._exchange = lambda first, second: False
    done = []

    def on_step(what: str) -> None:
        done.append(what)
        if len(done) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    publish_directory(staging, target, on_step=on_step)
    os._exit(0)


def _loaded_version(target) -> str:
    model = ViTMAEDecayForPreTraining.from_pretrained(target)
    version = {decay: name for name, decay in VERSIONS.items()}[model.config.shortcut_decay]
    expected = _model(version).state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), (version, name)
    assert json.loads((target / "results.json").read_text()) == {"version": version}
    assert (target / "README.md").read_text() == f"card of the {version} model"
    assert (target / "samples" / "final.png").read_text() == f"final grid of the {version} model"
    for name, text in EXTRAS.items():
        assert (target / name).read_text() == text, name
    assert (target / "empty").is_dir()
    return version


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_a_kill_at_every_step_of_publishing_leaves_one_whole_model(tmp_path, exchange):
    context = multiprocessing.get_context("fork")
    seen = []
    for kill_at in range(1, 100):
        target = tmp_path / str(kill_at) / "out"
        target.mkdir(parents=True)
        _old_folder(target)
        staging = target / ".final.partial"
        _stage(staging, "new")
        process = context.Process(target=_publish_and_die, args=(staging, target, kill_at, exchange))
        process.start()
        process.join()
        if not target.exists():  # only between the two renames of the fallback, and only for a moment
            assert not exchange
            recover_publish(target)
        seen.append(_loaded_version(target))
        if process.exitcode == 0:
            break
        assert process.exitcode == -signal.SIGKILL
    assert seen[-1] == "new" and "old" in seen and seen == sorted(seen, key=["old", "new"].index)
    assert sorted(path.name for path in target.parent.iterdir()) == ["out"]  # no leftovers
    assert not (target / "checkpoints" / "checkpoint-2" / "missing").exists()
    assert len(seen) > 10  # every operation was a kill point


def test_the_next_publish_clears_what_a_killed_one_left(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    _old_folder(target)
    _stage(target / ".final.partial", "new")
    context = multiprocessing.get_context("fork")
    process = context.Process(target=_publish_and_die, args=(target / ".final.partial", target, 3, True))
    process.start()
    process.join()
    assert process.exitcode == -signal.SIGKILL and (tmp_path / ".out.publish-new").exists()
    _stage(target / ".final.partial", "new")
    publish_directory(target / ".final.partial", target)
    assert _loaded_version(target) == "new"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]
    listed = json.loads((target / publish.PUBLISHED).read_text())
    assert {"README.md", "config.json", "model.safetensors", "results.json", "samples/final.png"} <= set(
        listed
    )
    assert not set(EXTRAS) & set(listed)


def test_an_incomplete_staging_is_never_published(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    _old_folder(target)
    (tmp_path / "staging").mkdir()
    (tmp_path / "staging" / "model.safetensors").write_text("weights without a config")
    with pytest.raises(ValueError, match=r"holds no config\.json: an incomplete model is never published"):
        publish_directory(tmp_path / "staging", target)
    assert _loaded_version(target) == "old"
