"""The same evaluation twice gives the same bytes: the minimisation attacks (DeepFool, CW)
and PixelDefend through the whole pipeline, then the report's table1.csv."""

import json

import pandas as pd

from pdray import pipeline, report, results
from pdray.config import EvalConfig, RunOptions
from conftest import local_ray

CFG = dict(dataset="fmnist", n_images=4, shards=2, attacks=["deepfool", "cw"],
           eps_attack=[8, 25], eps_defend=16, defenses=["none", "pixeldefend"], save_images=4,
           cw_steps=100, cw_binary_search_steps=5, deepfool_steps=10)


def test_cw_and_deepfool_evaluation_repeats_byte_for_byte(tmp_path):
    local_ray()
    runs = []
    for k in range(2):
        out = pipeline.run(EvalConfig(**CFG),
                           RunOptions(out=str(tmp_path / f"run{k}")))
        report.report(out)
        df, _ = results.load_results(out)
        runs.append((df.drop(columns=["seconds", "purifier"]).sort_values(results.KEY)
                     .reset_index(drop=True), (out / "report" / "table1.csv").read_bytes()))
    (first, csv1), (second, csv2) = runs
    pd.testing.assert_frame_equal(first, second)  # images (bytes), predictions, bits/dim
    assert csv1 == csv2
    attacked = first[first.attack.isin(["deepfool", "cw"]) & (first.defense == "none")]
    assert attacked.image_input.notna().all() and len(attacked) == 4 * 2 * 2
    # Not vacuous: the random tiny classifier gets only image 0 right, and both attacks move it.
    clean = first[first.attack == "clean"].drop_duplicates("image_id").set_index("image_id")
    moved = {r.attack for r in attacked.itertuples()
             if r.image_input != clean.image_input[r.image_id]}
    assert moved == {"deepfool", "cw"}
    run = json.loads((out / "run.json").read_text())
    assert run["data"]["name"].startswith("Fashion-MNIST") and "torch kernels" in run["versions"]["cpu"]
