"""Ray Train runs for a few steps: every recipe's code path, checkpoints and resume."""

import pytest
import torch

from pdray import data, train, zoo
from pdray.errors import PdrayError
from pdray.files import sha256


def test_adv_bim_trains_and_resumes(ray_local, tmp_path):
    scaling = train.Scaling(runs_dir=str(tmp_path))
    cfg = train.ClassifierConfig(dataset="fmnist", recipe="adv-bim", epochs=1, max_steps=2,
                                 batch_size=16, eval_images=50)
    first = train.train_classifier(cfg, scaling)
    assert first["epochs"] == 1 and 0 <= first["metrics"]["test_accuracy"] <= 1
    cfg.epochs = 2  # the same run again, longer: it must continue, not restart
    second = train.train_classifier(cfg, scaling)
    assert second["epochs"] == 2 and second["wall_time_s"] > first["wall_time_s"]


def test_a_mid_epoch_state_resumes_exactly(ray_local, tmp_path):
    """Stopped after 2 of 4 steps and resumed from the mid-epoch state, a run ends with the
    weights of the run that was never stopped (same batches, eps draws and RNG)."""
    cfg = train.ClassifierConfig(dataset="fmnist", recipe="adv-fgsm", epochs=1, max_steps=4,
                                 batch_size=16, eval_images=20, checkpoint_every=2)
    whole = train.train_classifier(cfg, train.Scaling(runs_dir=str(tmp_path / "whole")))
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


def test_label_smoothing_and_export(ray_local, tmp_path, monkeypatch):
    monkeypatch.setenv("PDRAY_WEIGHTS_DIR", str(tmp_path / "weights"))
    cfg = train.ClassifierConfig(dataset="fmnist", recipe="label-smoothing", epochs=1,
                                 max_steps=2, batch_size=16, eval_images=50)
    entry = train.train_classifier(cfg, train.Scaling(runs_dir=str(tmp_path / "runs")), ship=True)
    assert entry["name"] == "fmnist-resnet-label-smoothing" and entry["recipe"] == "label-smoothing"
    model, ckpt = zoo.load(entry["name"])
    assert ckpt["arch"] == "resnet" and model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
    assert zoo.manifest()[0]["sha256"] == sha256(zoo.weights_dir() / entry["file"])
    assert entry["data"]["sha256"] == data.load("fmnist").sha256  # what its metric was measured on


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


def test_pixelcnn_trains_and_resumes(ray_local, tmp_path):
    scaling = train.Scaling(runs_dir=str(tmp_path))
    cfg = train.PixelCNNConfig(dataset="fmnist", filters=8, blocks=2, dilations=(1, 2), steps=2,
                               batch_size=8, compile=False, report_every=2, eval_images=20)
    first = train.train_pixelcnn(cfg, scaling)
    assert first["metrics"]["step"] == 2 and first["metrics"]["test_bpd"] > 0
    assert cfg.name == "fmnist-pixelcnn-dil1-2"
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
