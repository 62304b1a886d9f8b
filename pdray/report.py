"""The reducer: completed shards' Parquet -> Table 1, p-value histograms, ROC curves,
sample images and report.md. Pandas and matplotlib only; no Ray.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pdray import paper
from pdray.config import PAPER_ATTACKS, THROUGH_DEFENSE, Dataset, Defense, EvalConfig, Recipe
from pdray.data import SHAPE
from pdray.files import atomic_write
from pdray.pvalues import roc_vs_training
from pdray.results import load_results, read_history

COLUMNS = ["clean", *PAPER_ATTACKS]
# Not the paper's: shown after STRONGEST and WORST CASE, and left out of both; WORST CASE
# ALL, the per-image worst case over every attack, comes after them.
BEYOND = list(THROUGH_DEFENSE)
# Table 1's names, in its row order.
DEFENSE_NAMES = {Defense.NONE.value: "", Defense.SQUEEZE.value: "Feature Squeezing",
                 Defense.PIXELDEFEND.value: "PixelDefend",
                 Defense.ADAPTIVE.value: "Adaptive PixelDefend"}
RECIPE_NAMES = {Recipe.NORMAL.value: "Normal", Recipe.ADV_FGSM.value: "Adversarial FGSM",
                Recipe.ADV_BIM.value: "Adversarial BIM",
                Recipe.LABEL_SMOOTHING.value: "Label Smoothing"}


def accuracy_long(df: pd.DataFrame) -> pd.DataFrame:
    """Accuracy per (network, recipe, defense, attack, eps_attack), plus the paper's
    STRONGEST (minimum over the paper's attacks per cell) and a per-image worst case over
    them, and where the run has adaptive attacks the per-image worst case over all attacks."""
    keys = ["classifier", "network", "recipe", "defense"]
    eps_list = sorted(df.loc[df.attack != "clean", "eps_attack"].unique())
    clean = df[df.attack == "clean"]
    attacked = df[df.attack != "clean"]
    rows = []
    for k, g in attacked.groupby(keys + ["attack", "eps_attack"]):
        rows.append((*k, g.correct.mean(), g.image_id.nunique()))
    for k, g in clean.groupby(keys):
        for eps in eps_list or [0]:
            rows.append((*k, "clean", eps, g.correct.mean(), g.image_id.nunique()))
    table = pd.DataFrame(rows, columns=keys + ["attack", "eps_attack", "accuracy", "n_images"])
    extra = []
    for k, g in attacked[~attacked.attack.isin(BEYOND)].groupby(keys + ["eps_attack"]):
        per_attack = g.groupby("attack").correct.mean()
        survives = g.groupby("image_id").correct.all()
        extra.append((*k[:4], "strongest", k[4], per_attack.min(), g.image_id.nunique()))
        extra.append((*k[:4], "worst_case", k[4], survives.mean(), len(survives)))
    if attacked.attack.isin(BEYOND).any():
        for k, g in attacked.groupby(keys + ["eps_attack"]):
            survives = g.groupby("image_id").correct.all()
            extra.append((*k[:4], "worst_case_all", k[4], survives.mean(), len(survives)))
    table = pd.concat([table, pd.DataFrame(extra, columns=table.columns)], ignore_index=True)
    return table.sort_values(keys + ["attack", "eps_attack"]).reset_index(drop=True)


def table1_markdown(long: pd.DataFrame, paper_dataset: str | None = None) -> str:
    """Table 1 as the paper lays it out. With ``paper_dataset``, each row is followed by
    the paper's row for the same network, training and defense, where its Table 1 has one,
    and the paper's rows this run has no classifier for come in their place, ours empty."""
    present = set(long.attack)
    cols = [c for c in COLUMNS if c in present]
    cols += ["strongest", "worst_case"] if set(cols) - {"clean"} else []  # over the paper's attacks
    cols += [c for c in BEYOND + ["worst_case_all"] if c in present]
    eps_list = sorted(long.eps_attack.unique())
    head = ["NETWORK", "TRAINING / DEFENSE"] + [c.upper().replace("_", " ") for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    # The paper's row order: by defense, then Normal (ResNet, VGG) before the robust trainings.
    defenses = {d: i for i, d in enumerate(DEFENSE_NAMES)}
    recipes = {r: i for i, r in enumerate(RECIPE_NAMES)}
    groups = list(long.groupby(["classifier", "network", "recipe", "defense"]))
    ours = {k[1:] for k, _ in groups}
    groups += [(("", *k), long.iloc[:0]) for k in paper.TABLE1.get(paper_dataset, {})
               if k not in ours]
    groups.sort(key=lambda kv: (defenses.get(kv[0][3], 9), recipes.get(kv[0][2], 9),
                                kv[0][1] != "resnet", kv[0][0]))
    for (classifier, network, recipe, defense), g in groups:
        label = RECIPE_NAMES.get(recipe, recipe) + (f" + {DEFENSE_NAMES[defense]}"
                                                    if DEFENSE_NAMES.get(defense) else "")
        label += "" if classifier else " (not in this run)"
        cells = []
        for c in cols:
            acc = g[g.attack == c].set_index("eps_attack").accuracy
            cells.append("/".join(f"{100 * acc[e]:02.0f}" if e in acc else "--" for e in eps_list)
                         if classifier else "")
        lines.append(f"| {'ResNet' if network == 'resnet' else 'VGG'} | {label} | "
                     + " | ".join(cells) + " |")
        theirs = [paper.table1_cell(paper_dataset, network, recipe, defense, c)
                  for c in cols] if paper_dataset else []
        if any(theirs):
            lines.append("| | *paper* | " + " | ".join(
                "/".join(f"{t[e]:02d}" if e in t else "--" for e in eps_list) if t else ""
                for t in theirs) + " |")
    return "\n".join(lines) + "\n"


def _images(blob: bytes, shape) -> np.ndarray:
    return np.frombuffer(blob, dtype=np.uint8).reshape(shape)


def figures(df: pd.DataFrame, run: dict, folder: Path) -> dict:
    import matplotlib  # a second's start-up that only the figures need

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shape = SHAPE[Dataset(run["config"]["dataset"])]
    first = run["config"]["classifiers"][0]
    # One row per distinct input image: the undefended rows of the first classifier.
    inputs = df[(df.defense == df.defense.iloc[0]) & (df.classifier == first)]
    groups = [("clean", 0)] + sorted({(a, e) for a, e in zip(inputs.attack, inputs.eps_attack)
                                     if a != "clean"})
    n_train = run["train_logp_n"]
    saved = {}

    fig, axes = plt.subplots(1, len(groups), figsize=(2.2 * len(groups), 2.4), sharey=True,
                             squeeze=False)
    for ax, (attack, eps) in zip(axes[0], groups):
        p = inputs[(inputs.attack == attack) & (inputs.eps_attack == eps)].pvalue_input
        ax.hist(p, bins=20, range=(0, 1), color="tab:blue" if attack == "clean" else "tab:red")
        ax.set_title(attack if attack == "clean" else f"{attack} {eps}", fontsize=9)
        ax.set_xlabel("p-value", fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "pvalues.png", dpi=110)
    plt.close(fig)
    saved["pvalues"] = "pvalues.png"

    # Negatives are training images, whose Eq. 1 p-values are uniform by construction.
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    aucs = {}
    for attack, eps in groups:
        p = inputs[(inputs.attack == attack) & (inputs.eps_attack == eps)].pvalue_input
        fpr, tpr, auc = roc_vs_training(p.to_numpy(), n_train)
        label = attack if attack == "clean" else f"{attack} {eps}"
        aucs[label] = auc
        ax.plot(fpr, tpr, label=f"{label} (AUC {auc:.2f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate (clean training images)")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "roc.png", dpi=110)
    plt.close(fig)
    saved["roc"] = "roc.png"

    kept = df[df.image_input.notna() & (df.classifier == first)]
    attacked = kept[(kept.attack != "clean") & (kept.attack != "rand")]
    if len(attacked) and "pixeldefend" in set(kept.defense):
        attack, eps = sorted({(a, e) for a, e in zip(attacked.attack, attacked.eps_attack)})[0]
        rows = kept[(kept.attack == attack) & (kept.eps_attack == eps)
                    & (kept.defense == "pixeldefend")].sort_values("image_id").head(8)
        fig, axes = plt.subplots(2, len(rows), figsize=(1.3 * len(rows), 2.9), squeeze=False)
        for i, (_, r) in enumerate(rows.iterrows()):
            for j, (blob, title) in enumerate(((r.image_input, f"{attack} {eps}"),
                                               (r.image_defended, "purified"))):
                im = _images(blob, shape)
                axes[j][i].imshow(im[..., 0] if shape[2] == 1 else im,
                                  cmap="gray" if shape[2] == 1 else None, vmin=0, vmax=255)
                axes[j][i].set_xticks([]), axes[j][i].set_yticks([])
                axes[j][i].set_title(title, fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / "samples.png", dpi=110)
        plt.close(fig)
        saved["samples"] = "samples.png"
    return {"files": saved, "aucs": aucs}


def report(out: str | Path) -> str:
    """Write OUT/report/{table1.md, table1.csv, pvalues.png, roc.png, samples.png,
    report.md}, and table1_vs_paper.md where the paper has a Table 1 for the dataset;
    returns the Table 1 markdown."""
    out = Path(out)
    df, run = load_results(out)
    history = read_history(out)
    folder = out / "report"
    folder.mkdir(exist_ok=True)
    long = accuracy_long(df)
    table = table1_markdown(long)
    csv = long[["network", "recipe", "defense", "attack", "eps_attack", "accuracy", "n_images"]]
    atomic_write(folder / "table1.csv", lambda tmp: csv.to_csv(tmp, index=False))
    atomic_write(folder / "table1.md", lambda tmp: tmp.write_text(table))
    figs = figures(df, run, folder)
    cfg = run["config"]
    eps = "/".join(str(e) for e in cfg["eps_attack"])
    beside = []
    if cfg["dataset"] in paper.TABLE1:
        both = table1_markdown(long, paper_dataset=cfg["dataset"])
        atomic_write(folder / "table1_vs_paper.md", lambda tmp: tmp.write_text(both))
        beside = ["## Beside the paper's Table 1", "",
                  f"Each of our rows is followed by the paper's (*paper*, eps_attack "
                  f"{'/'.join(map(str, paper.TABLE1_EPS_ATTACK[cfg['dataset']]))}) where it has "
                  f"one.", "", both]
    before, after = paper.HEADLINE_STRONGEST[cfg["dataset"]]
    beside += [f"The paper's abstract: strongest-attack accuracy {before}% without and {after}% "
               f"with PixelDefend on this dataset.", ""]
    data_name = run.get("data", {}).get("name") or f"{cfg['dataset']} (data not recorded)"
    md = [f"# pdray report: {data_name}", "",
          f"{df.image_id.nunique()} {cfg.get('images', EvalConfig.images)} images of {data_name}; eps_attack {eps}; "
          f"eps_defend {cfg['eps_defend']}; "
          + (f"adaptive PixelDefend's threshold {cfg['adaptive_threshold']:.3f} bits/dim; "
             if cfg.get("adaptive_threshold") is not None else "") +
          f"PixelCNN {cfg['pixelcnn']}; classifiers {', '.join(cfg['classifiers'])}.", "",
          f"## Table 1 (accuracy %, cells are eps_attack {eps})", "", table,
          "STRONGEST is the minimum over attacks per cell, as in the paper; WORST CASE counts an "
          "image only if it survives every attack at that eps_attack. Both cover the paper's "
          "attacks only. The adaptive attacks (BPDA, Athalye et al. 2018, and BPDA-soft, "
          "through a soft Algorithm 1), where the run has them, come after: each row's are made "
          "against that row's defense, and WORST CASE ALL counts an image only if it survives "
          "every attack of the run.", "",
          *beside,
          "## How it was made", "",
          "| command | shards written | wall time (s) | peak memory (MB, PSS of the driver's "
          "process tree) |", "|---|---|---|---|",
          *[f"| `{' '.join(h['command'])}` | {len(h.get('completed', h['shards']))}"
            f"{' (interrupted)' if h.get('interrupted') else ''} | {h['wall_time_s']:.0f} | "
            f"{h.get('peak_pss_mb', '-')} |" for h in history],
          "", f"Total wall time: {sum(h['wall_time_s'] for h in history):.0f} s.", "",
          "## Detection (Claim 1)", "",
          "| input | AUC vs clean training images |", "|---|---|",
          *[f"| {k} | {v:.3f} |" for k, v in figs["aucs"].items()], "",
          *[f"![{k}]({v})" for k, v in figs["files"].items()], ""]
    atomic_write(folder / "report.md", lambda tmp: tmp.write_text("\n".join(md)))
    return table
