"""The shipped weights score on the real data as their manifest says (on a sample of the
test images: sampling noise is the tolerance). Skipped without the real data, or where the
data here is not the kind of pixels (exact or the JPEG copy) the metric was measured on."""

import pytest

from pdray import data, zoo


@pytest.mark.parametrize("name,n_images,tolerance", [
    ("fmnist-resnet-normal", 100, 0.05), ("fmnist-resnet-adv-fgsm", 100, 0.05),
    ("fmnist-resnet-adv-bim", 100, 0.05), ("fmnist-resnet-label-smoothing", 100, 0.05),
    ("fmnist-vgg-normal", 100, 0.05), ("cifar10-resnet-normal", 100, 0.05),
    ("cifar10-resnet-adv-fgsm", 100, 0.05), ("cifar10-vgg-normal", 100, 0.05),
    ("fmnist-pixelcnn", 20, 0.25), ("cifar10-pixelcnn", 20, 0.25),
])
def test_shipped_model_scores_as_its_manifest_says(name, n_images, tolerance, request,
                                                   monkeypatch):
    real = request.getfixturevalue(f"real_{name.split('-')[0]}")
    monkeypatch.delenv("PDRAY_WEIGHTS_DIR")  # the package's weights, not the tiny test zoo
    entry = zoo.entry(name)
    trained_on = entry.get("data")
    if trained_on and ((trained_on["sha256"] == data.CIFAR10_JPEG_COPY_SHA256)
                       != (real.sha256 == data.CIFAR10_JPEG_COPY_SHA256)):
        pytest.skip(f"{name} was trained and scored on {trained_on['name']}; "
                    f"the data here is {real.name}")
    shipped = entry["metrics"]
    r = zoo.metric(name, n_images, real.source)
    if r["metric"] == "accuracy":
        assert r["value"] >= shipped["test_accuracy"] - tolerance
    else:
        assert r["value"] <= shipped["test_bpd"] + tolerance
