"""Table 1's aggregates on hand-made rows, every value checked by hand."""

import pandas as pd
import pytest

from pdray import report

# correct[defense][(attack, eps_attack)]: images 0..3 of classifier "r".
CORRECT = {
    "none": {("clean", 0): [1, 1, 1, 0],
             ("rand", 8): [1, 1, 1, 0], ("fgsm", 8): [1, 1, 0, 1], ("deepfool", 8): [1, 0, 1, 1],
             ("bpda", 8): [0, 0, 0, 0],
             ("rand", 25): [1, 1, 1, 1], ("fgsm", 25): [0, 0, 1, 1], ("deepfool", 25): [0, 1, 1, 1],
             ("bpda", 25): [1, 1, 1, 1]},
    "pixeldefend": {("clean", 0): [1, 1, 1, 1],
                    ("rand", 8): [1, 1, 1, 1], ("fgsm", 8): [1, 1, 1, 1],
                    ("deepfool", 8): [0, 1, 1, 1], ("bpda", 8): [0, 1, 0, 1],
                    ("rand", 25): [0, 1, 1, 1], ("fgsm", 25): [1, 0, 1, 1],
                    ("deepfool", 25): [1, 1, 0, 0], ("bpda", 25): [0, 0, 0, 0]},
}

# (defense, attack, eps_attack) -> accuracy, worked out from CORRECT by hand. STRONGEST is
# the lowest accuracy of the paper's attacks (not BPDA); WORST CASE the share of images
# that survive all of them; WORST CASE ALL the share that survive every attack, BPDA too.
EXPECTED = {
    ("none", "clean", 8): 0.75, ("none", "clean", 25): 0.75,
    ("none", "rand", 8): 0.75, ("none", "fgsm", 8): 0.75, ("none", "deepfool", 8): 0.75,
    ("none", "bpda", 8): 0.0, ("none", "strongest", 8): 0.75, ("none", "worst_case", 8): 0.25,
    ("none", "worst_case_all", 8): 0.0,
    ("none", "rand", 25): 1.0, ("none", "fgsm", 25): 0.5, ("none", "deepfool", 25): 0.75,
    ("none", "bpda", 25): 1.0, ("none", "strongest", 25): 0.5, ("none", "worst_case", 25): 0.5,
    ("none", "worst_case_all", 25): 0.5,
    ("pixeldefend", "clean", 8): 1.0, ("pixeldefend", "clean", 25): 1.0,
    ("pixeldefend", "rand", 8): 1.0, ("pixeldefend", "fgsm", 8): 1.0,
    ("pixeldefend", "deepfool", 8): 0.75, ("pixeldefend", "bpda", 8): 0.5,
    ("pixeldefend", "strongest", 8): 0.75, ("pixeldefend", "worst_case", 8): 0.75,
    ("pixeldefend", "worst_case_all", 8): 0.5,
    ("pixeldefend", "rand", 25): 0.75, ("pixeldefend", "fgsm", 25): 0.75,
    ("pixeldefend", "deepfool", 25): 0.5, ("pixeldefend", "bpda", 25): 0.0,
    ("pixeldefend", "strongest", 25): 0.5, ("pixeldefend", "worst_case", 25): 0.0,
    ("pixeldefend", "worst_case_all", 25): 0.0,
}


def rows() -> pd.DataFrame:
    out = []
    for defense, cells in CORRECT.items():
        for (attack, eps), correct in cells.items():
            for image_id, c in enumerate(correct):
                out.append({"classifier": "r", "network": "resnet", "recipe": "normal",
                            "defense": defense, "attack": attack, "eps_attack": eps,
                            "image_id": image_id, "correct": bool(c)})
    return pd.DataFrame(out)


def test_strongest_and_worst_case_on_hand_made_rows():
    long = report.accuracy_long(rows())
    got = {(r.defense, r.attack, r.eps_attack): r.accuracy for r in long.itertuples()}
    assert got == pytest.approx(EXPECTED) and set(got) == set(EXPECTED)
    assert (long.n_images == 4).all()
    table = report.table1_markdown(long)
    assert "| ResNet | Normal | 75/75 | 75/100 | 75/50 | 75/75 | 75/50 | 25/50 | 00/100 | 00/50 |" \
        in table
    assert "| ResNet | Normal + PixelDefend | 100/100 | 100/75 | 100/75 | 75/50 | 75/50 | 75/00 " \
           "| 50/00 | 50/00 |" in table
    assert table.splitlines()[0].endswith("| STRONGEST | WORST CASE | BPDA | WORST CASE ALL |")
