"""Ray Train runs for a few steps: both training loops, checkpoints, resume and export.
Each recipe's step is tested without Ray (test_recipes.py): a Ray Train run costs ~20 s."""

import pytest
import torch

from pdray import ablation, data, train, zoo
from pdray.errors import PdrayError
from pdray.files import sha256


def test_a_classifier_resumes_exactly_continues_and_ships(ray_local, tmp_path, monkeypatch):
    """Stopped after 2 of 4 steps and resumed from the mid-epoch state, a run ends with the
    weights of the run that was never stopped (same batches, eps draws and RNG). Started
    again with more epochs, the same run continues from Ray's checkpoint, and ships."""
    monkeypatch.setenv("PDRAY_WEIGHTS_DIR", str(tmp_path / "weights"))
    cfg = train.ClassifierConfig(dataset="fmnist", recipe="adv-fgsm", epochs=1, max_steps=4,
                                 batch_size=16, eval_images=20, checkpoint_every=2)
    whole = train.train_classifier(cfg, train.Scaling(runs_dir=str(tmp_path / "whole")))
    assert whole["epochs"] == 1 and 0 <= whole["metrics"]["test_accuracy"] <= 1
    states = sorted((tmp_path / "whole").glob("*/checkpoint_*/state.pt"))
    assert len(states) == 2  # the step-2 state, then the epoch's end
    middle = torch.load(states[0], weights_only=True)
    assert (middle["step"], middle["batches_done"], middle["epoch"]) == (2, 2, 0)
    cfg.resume_from = str(states[0])
    resumed = train.train_classifier(cfg, train.Scaling(runs_dir=str(tmp_path / "resumed")))
    assert resumed["metrics"]["test_accuracy"] == whole["metrics"]["test_accuracy"]
    ends = [torch.load(sorted((tmp_path / run).glob("*/checkpoint_*/state.pt"))[-1],
                       weights_only=True) for run in ("whole", "resumed")]
    assert ends[0]["step"] == ends[1]["step"] == 4
    for k, v in ends[0]["model"].items():
        assert torch.equal(v, ends[1]["model"][k]), k

    cfg.resume_from, cfg.epochs = None, 2  # the first run again, longer: it must continue
    entry = train.train_classifier(cfg, train.Scaling(runs_dir=str(tmp_path / "whole")),
                                   ship=True)
    assert entry["epochs"] == 2 and entry["wall_time_s"] > round(whole["wall_time_s"], 1)
    assert entry["name"] == "fmnist-resnet-adv-fgsm" and entry["recipe"] == "adv-fgsm"
    model, ckpt = zoo.load(entry["name"])
    assert ckpt["arch"] == "resnet" and model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
    assert zoo.manifest()[0]["sha256"] == sha256(zoo.weights_dir() / entry["file"])
    assert entry["data"]["sha256"] == data.load("fmnist").sha256  # what its metric was measured on
    # A saved state at or past --epochs is reported as it is (how a committed state ships).
    cfg.resume_from = str(sorted((tmp_path / "whole").glob("*/checkpoint_*/state.pt"))[-1])
    again = train.train_classifier(cfg, train.Scaling(runs_dir=str(tmp_path / "again")))
    assert again["epochs"] == 2 and round(again["wall_time_s"], 1) == entry["wall_time_s"]
    assert again["metrics"]["test_accuracy"] == entry["metrics"]["test_accuracy"]


def test_relative_data_dir_is_the_drivers(ray_local, tmp_path, monkeypatch):
    """Ray Train workers run in another folder; --data-dir relative to where the user is."""
    import os

    cifar = os.environ["PDRAY_DATA_DIR"]
    (tmp_path / "c10").symlink_to(os.path.abspath(cifar), target_is_directory=True)
    monkeypatch.delenv("PDRAY_DATA_DIR")
    monkeypatch.setenv("PDRAY_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    cfg = train.ClassifierConfig(dataset="cifar10", epochs=1, max_steps=1, batch_size=8,
                                 eval_images=20, data_dir="c10")
    result = train.train_classifier(cfg, train.Scaling(runs_dir=str(tmp_path / "runs")))
    assert result["metrics"]["eval_images"] == 20


def test_pixelcnn_trains_resumes_and_its_state_loads(ray_local, tmp_path):
    """With every ablation knob (mixture head, JPEG data, noise, dilations) through the real
    loop; a training state loads as the model it would ship (its averaged weights)."""
    scaling = train.Scaling(runs_dir=str(tmp_path))
    cfg = train.PixelCNNConfig(dataset="fmnist", filters=8, blocks=2, dilations=(1, 2),
                               head="mixture", mixtures=2, jpeg_quality=44, noise=4.0,
                               context_noise=4.0, steps=2, batch_size=8, compile=False,
                               report_every=2, eval_images=8)
    assert cfg.name == "fmnist-pixelcnn-mixture-jpeg44-noise4-ctxnoise4-dil1-2"  # its own folder
    first = train.train_pixelcnn(cfg, scaling)
    assert first["metrics"]["step"] == 2 and first["metrics"]["test_bpd"] > 0
    state = sorted((tmp_path / cfg.name).glob("checkpoint_*/state.pt"))[-1]
    model, ckpt = zoo.load(state)
    assert model.config.head == "mixture" and ckpt["kind"] == "pixelcnn"
    last = ablation.load_density(str(state), last_weights=True)
    assert not torch.equal(last.head.weights.weight, model.head.weights.weight)  # not the average
    cfg.steps = 4
    second = train.train_pixelcnn(cfg, scaling)
    assert second["metrics"]["step"] == 4
    # A saved state at or past --steps is reported as it is (how a chosen checkpoint ships).
    state = sorted((tmp_path / cfg.name).glob("checkpoint_*/state.pt"))[-1]
    cfg.steps, cfg.resume_from = 3, str(state)
    third = train.train_pixelcnn(cfg, train.Scaling(runs_dir=str(tmp_path / "again")))
    assert third["metrics"]["step"] == 4 and third["wall_time_s"] == second["wall_time_s"]


def test_resuming_a_different_model_is_one_clear_error(tmp_path):
    scaling = train.Scaling(runs_dir=str(tmp_path / "runs"))
    state = tmp_path / "old.state.pt"
    torch.save({"config": {"channels": 1, "filters": 8, "blocks": 2, "dropout": 0.0}}, state)
    cfg = train.PixelCNNConfig(filters=8, blocks=2, resume_from=str(state))  # logistic by default
    with pytest.raises(PdrayError, match="different model"):
        train.check_resumable(cfg, scaling)
    train.check_resumable(train.PixelCNNConfig(filters=8, blocks=2, logistic=False,
                                               resume_from=str(state)), scaling)
    with pytest.raises(PdrayError, match="different model"):  # the same, dilated
        train.check_resumable(train.PixelCNNConfig(filters=8, blocks=2, logistic=False,
                                                   dilations=(1, 2), resume_from=str(state)),
                              scaling)
    state.write_bytes(b"not a checkpoint")
    with pytest.raises(PdrayError, match="Cannot read"):
        train.check_resumable(cfg, scaling)
