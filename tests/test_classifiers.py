import torch
import torch.nn as nn

from pdray import classifiers


def count_layers(model):
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())


def test_resnet_is_the_62_layer_network_of_appendix_g():
    for shape in ((28, 28, 1), (32, 32, 3)):
        m = classifiers.build("resnet", shape, [0.0] * shape[2], [1.0] * shape[2])
        assert count_layers(m) == 62
        assert 0.9e6 < sum(p.numel() for p in m.parameters()) < 1.0e6
        x = torch.rand(2, shape[2], shape[0], shape[1]) * 255
        assert m(x).shape == (2, 10)


def test_vgg_follows_appendix_g():
    m = classifiers.build("vgg", (28, 28, 1), [0.0], [1.0])
    convs = [c.out_channels for c in m.modules() if isinstance(c, nn.Conv2d)]
    assert convs == [16, 128, 128, 512, 512, 512, 512, 512, 512]
    assert any(isinstance(c, nn.Dropout) for c in m.modules())
    assert m.eval()(torch.rand(2, 1, 28, 28) * 255).shape == (2, 10)
    assert classifiers.build("vgg", (32, 32, 3), [0.0] * 3, [1.0] * 3).eval()(
        torch.rand(2, 3, 32, 32) * 255).shape == (2, 10)


def test_inputs_are_pixels_normalised_inside():
    m = classifiers.build("resnet", (28, 28, 1), [100.0], [50.0]).eval()
    assert torch.allclose(m.normalize(torch.full((1, 1, 2, 2), 150.0)), torch.ones(1, 1, 2, 2))


def test_large_weights_ship_in_float16_and_load_into_float32(tmp_path, monkeypatch, fmnist_samples):
    import numpy as np

    from pdray import zoo
    from pdray.classifiers import predict
    from conftest import tiny_classifier

    monkeypatch.setenv("PDRAY_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setattr(zoo, "FLOAT32_LIMIT_MB", 0.0)
    model = tiny_classifier(1)
    entry = zoo.export({"kind": "classifier", "dataset": "fmnist", "arch": "resnet",
                        "recipe": "normal", "arch_options": {"units": 1}, "config": {},
                        "metrics": {}, "state_dict": model.state_dict()},
                       "fmnist-resnet-half", epochs=0, wall_time_s=0.0)
    assert entry["stored_as"] == "float16"
    loaded, ckpt = zoo.load("fmnist-resnet-half")
    assert ckpt["state_dict"]["stem.weight"].dtype == torch.float16
    assert next(loaded.parameters()).dtype == torch.float32
    images, _ = fmnist_samples
    assert (predict(loaded, images) == predict(model, images)).mean() >= 0.9
