"""The Ray Data evaluation end to end on tiny models: rows, shards, reruns, resume, report."""

import json

import pandas as pd
import pytest

from pdray import cluster, paper, pipeline, report, results
from pdray.config import EvalConfig, RunOptions
from pdray.errors import PdrayError
from conftest import local_ray

CFG = dict(dataset="fmnist", n_images=6, shards=3, attacks=["rand", "fgsm"], eps_attack=[4, 8],
           eps_defend=16, seed=0, save_images=4)


def rows(out):
    """The rows of a run, without the provenance columns (timing, which node purified)."""
    df, _ = results.load_results(out)
    return df.drop(columns=["seconds", "purifier"]).sort_values(results.KEY).reset_index(drop=True)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    local_ray()
    out = tmp_path_factory.mktemp("full")
    pipeline.run(EvalConfig(**CFG), RunOptions(out=str(out)))
    return out


def test_rows_and_layout(full_run):
    df = rows(full_run)
    cfg = pipeline.resolve(EvalConfig(**CFG))
    assert len(df) == 6 * cfg.rows_per_image()
    assert not df.duplicated(results.KEY).any()
    assert set(df.defense) == {"none", "squeeze", "pixeldefend", "adaptive"}
    assert set(df.attack) == {"clean", "rand", "fgsm"}
    for col in ["image_id", "label", "dataset", "classifier", "recipe", "attack", "eps_attack",
                "defense", "eps_defend", "pred", "correct", "bpd_input", "pvalue_input",
                "bpd_defended"]:
        assert df[col].notna().all(), col
    assert sorted(p.parent.name for p in (full_run / "results").glob("*/_SUCCESS")) == \
        ["shard=00000", "shard=00001", "shard=00002"]
    run = json.loads((full_run / "run.json").read_text())
    assert run["config"]["eps_attack"] == [4, 8] and "torch" in run["versions"]
    assert set(run["models"]) == {"fmnist-resnet-normal", "fmnist-pixelcnn"}
    history = results.read_history(full_run)
    assert history[0]["shards"] == [0, 1, 2] and history[0]["wall_time_s"] > 0
    assert sorted(history[0]["completed"]) == [0, 1, 2] and not history[0]["interrupted"]
    assert "/" not in history[0]["command"][0]
    assert history[0]["peak_pss_mb"] > 100  # the driver and its Ray processes
    # PixelDefend stays inside its ball and lowers bits/dim on attacked images.
    pd_rows = df[(df.defense == "pixeldefend") & (df.attack == "fgsm")]
    assert (pd_rows.bpd_defended < pd_rows.bpd_input).mean() > 0.9
    # Clean inputs are identical across defenses, and "none" really is undefended.
    none = df[df.defense == "none"]
    assert (none.bpd_defended == none.bpd_input).all() and (none.eps_defend == 0).all()


def test_rerunning_one_shard_changes_nothing(full_run):
    local_ray()
    before = rows(full_run)
    pipeline.run(EvalConfig(**CFG), RunOptions(out=str(full_run), shard=1))
    pd.testing.assert_frame_equal(before, rows(full_run))


def test_interrupted_then_resumed_equals_uninterrupted(full_run, tmp_path):
    """Also resumed with two attackers and a purifier that reserves no CPU (the CPU-only
    layout): the actors' number and placement must not change a single row."""
    local_ray()
    out = tmp_path / "resumed"
    pipeline.run(EvalConfig(**CFG), RunOptions(out=str(out), shard="0,2"))
    assert results.completed_shards(out) == {0, 2}
    pipeline.run(EvalConfig(**CFG),
                 RunOptions(out=str(out), resume=True, num_attackers=2, purifier_cpus=0))
    pd.testing.assert_frame_equal(rows(full_run), rows(out))


def test_an_interrupted_run_records_only_if_it_wrote_shards(tmp_path, monkeypatch):
    """A run stopped after writing shards keeps them, so its wall time goes into the
    history; one that wrote nothing leaves the history as it was."""
    def stopped_after_one(cfg, opts, shards, todo, out, log, wrote):
        wrote(todo[0])
        raise KeyboardInterrupt

    def failed(cfg, opts, shards, todo, out, log, wrote):
        raise PdrayError("the cluster has no GPU")

    for fake, error in ((stopped_after_one, KeyboardInterrupt), (failed, PdrayError)):
        monkeypatch.setattr(pipeline, "_evaluate", fake)
        with pytest.raises(error):
            pipeline.run(EvalConfig(**CFG), RunOptions(out=str(tmp_path)))
    (entry,) = results.read_history(tmp_path)
    assert entry["shards"] == [0, 1, 2] and entry["completed"] == [0] and entry["interrupted"]
    assert entry["wall_time_s"] >= 0


def test_a_killed_driver_leaves_the_shards_it_wrote_in_the_history(tmp_path, monkeypatch):
    """The history is written as each shard is, so a driver that dies without running its
    handlers (SIGKILL, a lost node) still accounts for them; each invocation keeps one line."""
    seen = []

    def killed_after_two(cfg, opts, shards, todo, out, log, wrote):
        for k in todo[:2]:
            wrote(k)
            seen.append(results.read_history(out))
        monkeypatch.setattr(results, "record_history", lambda *args: None)  # dead: no more
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_evaluate", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(EvalConfig(**CFG), RunOptions(out=str(tmp_path)))
    assert [[e["completed"] for e in h] for h in seen] == [[[0]], [[0, 1]]]
    (entry,) = results.read_history(tmp_path)
    assert entry["shards"] == [0, 1, 2] and entry["interrupted"] and entry["wall_time_s"] >= 0
    monkeypatch.undo()
    monkeypatch.setattr(pipeline, "_evaluate", lambda *args: {})
    pipeline.run(EvalConfig(**CFG), RunOptions(out=str(tmp_path), resume=True))
    first, second = results.read_history(tmp_path)
    assert first == entry and second["invocation"] != entry["invocation"]


def test_a_resume_on_other_cpu_kernels_says_so(tmp_path, monkeypatch):
    """Other float kernels change CW's and DeepFool's images (README, Reproducibility): a
    run continued on them says so, and the history records each invocation's CPU."""
    monkeypatch.setattr(pipeline, "_evaluate", lambda *args: {})
    pipeline.run(EvalConfig(**CFG), RunOptions(out=str(tmp_path)))
    run = results.read_run(tmp_path)
    run["versions"]["cpu"] = "Some CPU (x86_64, torch kernels ZVECTOR)"
    (tmp_path / "run.json").write_text(json.dumps(run))
    lines = []
    pipeline.run(EvalConfig(**CFG), RunOptions(out=str(tmp_path), resume=True), log=lines.append)
    assert any("begun with torch's ZVECTOR CPU kernels" in line for line in lines)
    assert [e["cpu"] for e in results.read_history(tmp_path)] == [cluster.versions()["cpu"]] * 2


@pytest.mark.parametrize("spec,ids", [
    (None, [0, 1, 2, 3, 4]), (3, [3]), ("3", [3]), ("1-3", [1, 2, 3]), ("4, 0-1,1", [0, 1, 4]),
])
def test_shard_takes_a_number_a_range_or_a_list(spec, ids):
    assert RunOptions(shard=spec).resolved().shard_ids(5) == ids


@pytest.mark.parametrize("spec,words", [
    ("3-1", "--shard takes"), ("x", "--shard takes"), ("-2", "--shard takes"), ("", "--shard takes"),
    ("2-7", "--shard must be in 0..4"),
])
def test_shard_refuses_what_is_not_shards(spec, words):
    with pytest.raises(PdrayError, match=words):
        RunOptions(shard=spec).resolved().shard_ids(5)


def test_report(full_run, capsys):
    table = report.report(full_run)
    folder = full_run / "report"
    for name in ("table1.md", "table1.csv", "pvalues.png", "roc.png", "samples.png", "report.md"):
        assert (folder / name).stat().st_size > 0, name
    csv = pd.read_csv(folder / "table1.csv")
    assert {"strongest", "worst_case", "clean", "fgsm", "rand"} <= set(csv.attack)
    assert list(csv.columns) == ["network", "recipe", "defense", "attack", "eps_attack",
                                 "accuracy", "n_images"]
    strongest = csv[csv.attack == "strongest"].set_index(["defense", "eps_attack"]).accuracy
    attacks_only = csv[csv.attack.isin(["rand", "fgsm"])]
    assert (strongest == attacks_only.groupby(["defense", "eps_attack"]).accuracy.min()).all()
    assert "| ResNet | Normal + PixelDefend |" in table
    md = (folder / "report.md").read_text()
    assert "Total wall time" in md and "63% without and 84% with PixelDefend" in md
    assert not (folder / "table1_vs_paper.md").exists()  # the paper has no FMNIST Table 1


def test_table1_puts_the_papers_rows_beside_ours():
    rows = [("cifar10-resnet-normal", "resnet", "normal", d, a, e, acc, 10)
            for d in ("none", "squeeze") for a in ("clean", "fgsm", "strongest")
            for e, acc in ((2, 0.5), (8, 0.25))]
    long = pd.DataFrame(rows, columns=["classifier", "network", "recipe", "defense", "attack",
                                       "eps_attack", "accuracy", "n_images"])
    lines = report.table1_markdown(long, paper_dataset="cifar10").splitlines()
    assert lines[2] == "| ResNet | Normal | 50/25 | 50/25 | 50/25 | --/-- |"
    assert lines[3] == "| | *paper* | 92/92 | 33/15 | 07/00 |  |"  # no per-image worst case there
    squeezed = lines.index("| ResNet | Normal + Feature Squeezing | 50/25 | 50/25 | 50/25 | --/-- |")
    assert lines[squeezed + 1] == "| | *paper* | 84/84 | 31/20 | 13/00 |  |"
    # Every row the paper prints is there, in its order, those we have no classifier for empty.
    assert lines[4:6] == ["| VGG | Normal (not in this run) |  |  |  |  |",
                          "| | *paper* | 89/89 | 60/46 | 37/00 |  |"]
    assert sum(line.startswith("| | *paper*") for line in lines) == len(paper.TABLE1_CIFAR10)
    assert lines[-2:] == ["| ResNet | Adversarial FGSM + Adaptive PixelDefend (not in this run) "
                          "|  |  |  |  |", "| | *paper* | 90/90 | 81/70 | 81/70 |  |"]
    assert report.table1_markdown(long, paper_dataset="fmnist").count("*paper*") == 0
    assert "not in this run" not in report.table1_markdown(long)
    bpda_only = long[long.attack == "clean"].assign(attack="bpda")
    assert report.table1_markdown(pd.concat([long[long.attack == "clean"], bpda_only])) \
        .startswith("| NETWORK | TRAINING / DEFENSE | CLEAN | BPDA |")


def test_table1_rows_follow_the_papers_order():
    rows = [(f"fmnist-{n}-{r}", n, r, d, "clean", 8, 0.9, 10) for d in ("pixeldefend", "none")
            for n, r in (("resnet", "adv-fgsm"), ("vgg", "normal"), ("resnet", "normal"))]
    long = pd.DataFrame(rows, columns=["classifier", "network", "recipe", "defense", "attack",
                                       "eps_attack", "accuracy", "n_images"])
    labels = [line.split(" | ")[:2] for line in report.table1_markdown(long).splitlines()[2:]]
    assert labels == [["| ResNet", "Normal"], ["| VGG", "Normal"], ["| ResNet", "Adversarial FGSM"],
                      ["| ResNet", "Normal + PixelDefend"], ["| VGG", "Normal + PixelDefend"],
                      ["| ResNet", "Adversarial FGSM + PixelDefend"]]


@pytest.mark.parametrize("change,message", [
    (dict(attacks=["jsma"]), "Unknown attack"),
    (dict(eps_attack=[300]), "0..255"),
    (dict(eps_defend=-1), "eps_defend"),
    (dict(classifiers=["fmnist-vgg-normal"]), "No shipped model"),
    (dict(defenses=["distillation"]), "Unknown defense"),
    (dict(bpda_steps=0), "bpda_steps"),
    (dict(bpda_restarts=0), "bpda_restarts"),
    (dict(bpda_schedule="cosine"), "Unknown BPDA schedule"),
    (dict(bpda_tau=0.0), "bpda_tau"),
    (dict(images="train"), "Unknown image set"),
])
def test_bad_config_is_refused_before_anything_runs(change, message, tmp_path):
    with pytest.raises(PdrayError, match=message):
        pipeline.run(EvalConfig(**{**CFG, **change}),
                     RunOptions(out=str(tmp_path / "x")))
    assert not (tmp_path / "x").exists()


def test_a_run_from_before_an_option_existed_still_resumes(full_run, tmp_path):
    """run.json written before EvalConfig had bpda_steps: resuming with the default matches."""
    old = json.loads((full_run / "run.json").read_text())
    del old["config"]["bpda_steps"]
    (tmp_path / "run.json").write_text(json.dumps(old))
    results.prepare_out(tmp_path, pipeline.resolve(EvalConfig(**CFG)), old["shards"],
                        old["models"])
    with pytest.raises(PdrayError, match="another configuration"):
        results.prepare_out(tmp_path, pipeline.resolve(EvalConfig(**CFG, bpda_steps=50)),
                            old["shards"], old["models"])


def test_existing_results_are_never_touched_by_a_bad_run(full_run):
    before = rows(full_run)
    with pytest.raises(PdrayError, match="another configuration"):
        pipeline.run(EvalConfig(**{**CFG, "eps_defend": 8}),
                     RunOptions(out=str(full_run)))
    with pytest.raises(PdrayError, match="--shard must be in 0..2"):
        pipeline.run(EvalConfig(**CFG), RunOptions(out=str(full_run), shard=3))
    with pytest.raises(PdrayError, match="--purifier-cpus at least 0"):
        pipeline.run(EvalConfig(**CFG),
                     RunOptions(out=str(full_run), purifier_cpus=-1))
    pd.testing.assert_frame_equal(before, rows(full_run))


def test_unwritable_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(PdrayError, match="Cannot write results"):
        pipeline.run(EvalConfig(**CFG), RunOptions(out=str(blocker / "out")))


def test_bench_pipeline_measures_both_paths():
    from pdray import bench

    local_ray()
    r = bench.bench_pipeline("fmnist", n_images=4, shards=2)
    assert r["rows"] == 4 * 2 * 2  # (clean, fgsm 8) x (none, pixeldefend) per image
    assert r["pipeline_s"] > 0 and r["bare_s"] > 0
    assert r["extra_s"] == pytest.approx(r["pipeline_s"] - r["bare_s"], abs=0.02)
    assert r["pipeline_peak_pss_mb"] > 100  # the driver and its Ray processes


def test_adaptive_alone_purifies_only_what_it_needs_and_agrees():
    """The stages are plain classes: this runs them without Ray."""
    from dataclasses import asdict

    import numpy as np

    shards = [[0, 1, 2]]
    plain = pipeline.resolve(EvalConfig(**{**CFG, "defenses": ["none"]}))
    batch = pipeline.AttackStage(asdict(plain), shards, None)({"shard": np.array([0])})
    scored = pd.DataFrame(pipeline.PurifierStage(asdict(plain))(batch))
    threshold = float(scored.bpd_input.median())  # half the images below, half above
    rows = {}
    for defenses in (["pixeldefend", "adaptive"], ["adaptive"]):
        cfg = pipeline.resolve(EvalConfig(**{**CFG, "defenses": defenses,
                                             "adaptive_threshold": threshold}))
        out = pd.DataFrame(pipeline.PurifierStage(asdict(cfg))(batch))
        rows[len(defenses)] = out[out.defense == "adaptive"].drop(
            columns=["seconds", "purifier"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(rows[1], rows[2])
    assert (rows[1].eps_defend == 0).any() and (rows[1].eps_defend > 0).any()


def test_rethreshold_gives_the_rows_a_run_at_that_threshold_gives(tmp_path):
    """Adaptive PixelDefend's rows follow from the undefended and PixelDefend rows: moving a
    run to another threshold gives exactly what running it at that threshold gives."""
    from dataclasses import asdict

    import numpy as np

    shards = [[0, 1, 2]]
    plain = pipeline.resolve(EvalConfig(**{**CFG, "defenses": ["none"]}))
    batch = pipeline.AttackStage(asdict(plain), shards, None)({"shard": np.array([0])})
    bpd = pd.DataFrame(pipeline.PurifierStage(asdict(plain))(batch)).bpd_input
    made = {}
    for t in (float(bpd.max()) + 1, float(bpd.median())):  # nothing purified; half purified
        cfg = pipeline.resolve(EvalConfig(**{**CFG, "adaptive_threshold": t}))
        made[t] = pd.DataFrame(pipeline.PurifierStage(asdict(cfg))(batch))
    before, after = made
    out = results.prepare_out(tmp_path / "run", pipeline.resolve(
        EvalConfig(**{**CFG, "adaptive_threshold": before})), shards, {})
    results.write_shard(out, 0, made[before])
    summary = results.rethreshold(out, after)
    assert summary["adaptive_rows_switched"] == (made[after].eps_defend
                                                 != made[before].eps_defend).sum() > 0
    assert results.read_run(out)["config"]["adaptive_threshold"] == after
    assert "rethreshold" in results.read_history(out)[-1]
    direct = results.prepare_out(tmp_path / "direct", pipeline.resolve(
        EvalConfig(**{**CFG, "adaptive_threshold": after})), shards, {})
    results.write_shard(direct, 0, made[after])
    pd.testing.assert_frame_equal(rows(out), rows(direct))
    results.rethreshold(out, after)  # again: nothing moves
    pd.testing.assert_frame_equal(rows(out), rows(direct))


@pytest.mark.parametrize("change,message", [
    ({"defenses": ["none", "adaptive"]}, "defenses none, pixeldefend and adaptive"),
    ({"attacks": ["fgsm", "bpda"]}, "bpda images aimed at adaptive PixelDefend"),
])
def test_rethreshold_refuses_runs_it_cannot_move(change, message, tmp_path):
    from dataclasses import asdict

    cfg = pipeline.resolve(EvalConfig(**{**CFG, **change}))
    out = results.prepare_out(tmp_path / "run", cfg, [[0]], {})
    with pytest.raises(PdrayError, match=message):
        results.rethreshold(out, 3.0)
    assert results.read_run(out)["config"] == json.loads(json.dumps(asdict(cfg)))


def test_validation_images_are_the_held_out_tail_not_the_test_set():
    """``images="validation"`` attacks the validation images (for choosing settings), with
    their own labels; the default stays the test set."""
    from dataclasses import asdict

    import numpy as np

    from pdray import data

    d = data.load("fmnist")
    for which, split in (("test", d.test), ("validation", d.validation)):
        cfg = pipeline.resolve(EvalConfig(**{**CFG, "images": which, "attacks": ["fgsm"]}))
        batch = pipeline.AttackStage(asdict(cfg), [[0, 1, 2]], None)({"shard": np.array([0])})
        clean = batch["attack"] == "clean"
        assert (batch["image"][clean] == split.images[:3]).all()
        assert (batch["label"][clean] == split.labels[:3]).all()
    assert not (d.validation.images[:3] == d.test.images[:3]).all()
    with pytest.raises(ValueError):  # not silently the validation images
        d.split("tset")


def test_adaptive_attacks_are_made_by_the_purifier_and_reported_apart():
    """The attack stage leaves BPDA and BPDA-soft to the purifier stage, which makes them
    from the clean images, one set per defense. The reducer shows them after STRONGEST,
    which leaves them out, then the worst case over every attack."""
    from dataclasses import asdict

    import numpy as np

    cfg = pipeline.resolve(EvalConfig(**{**CFG, "attacks": ["fgsm", "bpda", "bpda-soft"],
                                         "eps_attack": [8], "bpda_steps": 1}))
    batch = pipeline.AttackStage(asdict(cfg), [[0, 1, 2]], None)({"shard": np.array([0])})
    assert set(batch["attack"]) == {"clean", "fgsm"}
    df = pd.DataFrame(pipeline.PurifierStage(asdict(cfg))(batch))
    assert len(df) == 3 * cfg.rows_per_image()
    assert not df.duplicated(results.KEY).any()
    clean = df[(df.attack == "clean") & (df.defense == "none")].sort_values("image_id")
    for attack in ("bpda", "bpda-soft"):
        rows = df[df.attack == attack].sort_values(["defense", "image_id"])
        assert set(rows.defense) == set(cfg.defenses) and (rows.eps_attack == 8).all()
        for _, g in rows.groupby("defense"):
            for a, x in zip(g.image_input, clean.image_input):
                delta = np.frombuffer(a, np.uint8).astype(int) - np.frombuffer(x, np.uint8)
                assert np.abs(delta).max() <= 8
    long = report.accuracy_long(df)
    strongest = long[(long.attack == "strongest") & (long.defense == "pixeldefend")]
    fgsm = long[(long.attack == "fgsm") & (long.defense == "pixeldefend")]
    assert strongest.accuracy.tolist() == fgsm.accuracy.tolist()
    header = report.table1_markdown(long).splitlines()[0]
    assert header.endswith("| STRONGEST | WORST CASE | BPDA | BPDA-SOFT | WORST CASE ALL |")


def test_each_defense_row_holds_the_images_made_against_it(monkeypatch):
    """A stand-in attack that returns the defense it was aimed at, applied to the clean
    images, shows where each set goes: the images made against a defense are that
    defense's rows, and no other's. The threshold purifies one image of two, so adaptive
    PixelDefend differs from PixelDefend."""
    from dataclasses import asdict, replace

    import numpy as np
    import torch

    from pdray import attacks, purify
    from pdray.pixelcnn import bits_per_dim

    def aimed(name, models, images, labels, eps_list, defend=None, surrogate=None, **options):
        if surrogate is None:
            return [[defend(images)] for _ in models]
        x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).float()
        return [[surrogate(x).numpy().transpose(0, 2, 3, 1).astype(np.uint8)] for _ in models]

    monkeypatch.setattr(attacks, "through_defense", aimed)
    cfg = pipeline.resolve(EvalConfig(**{**CFG, "attacks": ["bpda", "bpda-soft"],
                                         "eps_attack": [8]}))
    batch = pipeline.AttackStage(asdict(cfg), [[0, 1]], None)({"shard": np.array([0])})
    clean = batch["image"][batch["attack"] == "clean"]
    stage = pipeline.PurifierStage(asdict(cfg))
    stage.cfg = replace(cfg, adaptive_threshold=float(bits_per_dim(stage.pixelcnn, clean).mean()))
    df = pd.DataFrame(stage(batch))
    made = {d: purify.defender(stage.pixelcnn, d, cfg.eps_defend,
                               threshold=stage.cfg.adaptive_threshold)(clean) for d in cfg.defenses}
    assert not np.array_equal(made["adaptive"], made["pixeldefend"])
    for d in cfg.defenses:
        for attack in ("bpda", "bpda-soft"):
            rows = df[(df.attack == attack) & (df.defense == d)].sort_values("image_id")
            got = np.stack([np.frombuffer(b, np.uint8) for b in rows.image_input])
            assert np.array_equal(got, made[d].reshape(len(clean), -1)), (attack, d)


def test_a_purifier_call_slower_than_ray_datas_no_progress_guard_still_completes(tmp_path,
                                                                              monkeypatch):
    """BPDA is made inside the purifier stage, so one call can outlast Ray Data's guard
    against executions that make no progress (30 min by default) and would fail the run.
    Here the guard is 0.1 s and the call, BPDA on two images, takes longer."""
    from ray.data import DataContext

    local_ray()
    monkeypatch.delenv("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", raising=False)
    monkeypatch.setattr(DataContext.get_current(), "execution_no_progress_timeout_s", 0.1)
    cfg = EvalConfig(**{**CFG, "n_images": 2, "shards": 1, "attacks": ["bpda"],
                        "eps_attack": [8], "defenses": ["pixeldefend"], "bpda_steps": 5})
    pipeline.run(cfg, RunOptions(out=str(tmp_path)))
    assert results.completed_shards(tmp_path) == {0}
    assert not (tmp_path / results.PARTIAL).exists()  # kept only until the run is complete


def test_a_stopped_run_redoes_only_the_adaptive_attacks_it_had_not_finished(tmp_path,
                                                                            monkeypatch):
    """Each adaptive attack's images are kept in the run's folder as they are made: a purifier
    that meets them again (a resumed shard) makes only the missing or damaged ones, and its
    rows are the same."""
    from dataclasses import asdict

    import numpy as np

    from pdray import attacks

    cfg = pipeline.resolve(EvalConfig(**{**CFG, "n_images": 2, "shards": 1, "attacks": ["bpda"],
                                         "eps_attack": [8], "defenses": ["none", "pixeldefend"],
                                         "bpda_steps": 2}))
    results.prepare_out(tmp_path, cfg, [[0, 1]], {"fmnist-resnet-normal": "sha"})
    batch = pipeline.AttackStage(asdict(cfg), [[0, 1]], None)({"shard": np.array([0])})
    made = []
    real = attacks.through_defense
    monkeypatch.setattr(attacks, "through_defense",
                        lambda *a, **k: made.append(k["defend"]) or real(*a, **k))
    stage = pipeline.PurifierStage(asdict(cfg), str(tmp_path))
    first = pd.DataFrame(stage(batch)).drop(columns="seconds")
    files = sorted((tmp_path / results.PARTIAL).glob("*.npz"))
    assert len(made) == 2 and [f.name.split("-")[1] for f in files] == ["none", "pixeldefend"]
    files[1].unlink()  # stopped while attacking through PixelDefend
    files[0].write_bytes(b"half a file")  # and a file cut short
    again = pd.DataFrame(stage(batch)).drop(columns="seconds")
    assert len(made) == 4
    pd.testing.assert_frame_equal(first, again)
    stage(batch)  # both kept now
    assert len(made) == 4 and sorted((tmp_path / results.PARTIAL).glob("*.npz")) == files
    pipeline.PurifierStage(asdict(cfg))(batch)  # no run folder: nothing kept, all made
    assert len(made) == 6


def test_cpu_purifiers_grow_into_the_free_cpus_unless_fixed():
    """On CPUs the purifier pool starts at one and may grow to what the CPUs hold (the
    attacks' CPUs, once they are done); --num-purifiers or GPUs fix its size."""
    local_ray()  # two CPUs
    pool = pipeline._purifier_pool
    assert (pool(RunOptions(), 0).min_size, pool(RunOptions(), 0).max_size) == (1, 2)
    assert pool(RunOptions(purifier_cpus=0.5), 0).max_size == 4
    assert pool(RunOptions(purifier_cpus=0), 0).max_size == 2
    asked, on_gpus = pool(RunOptions(num_purifiers=3), 0), pool(RunOptions(), 2)
    assert (asked.min_size, asked.max_size) == (3, 3)
    assert (on_gpus.min_size, on_gpus.max_size) == (2, 2)
    assert pipeline._size(pool(RunOptions(), 0)) == "1 to 2"
