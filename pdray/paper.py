"""The paper's published accuracies, to put beside ours (pdray.report).

Table 1 of Song et al. (ICLR 2018) is CIFAR-10 at eps_attack 2/8/16 and eps_defend 16;
each cell is accuracy in percent per eps_attack. Its Fashion-MNIST table is not in the
text we have, only the abstract's strongest-attack headline.
"""

from __future__ import annotations

ATTACKS = ("clean", "rand", "fgsm", "bim", "deepfool", "cw", "strongest")

# (network, recipe, defense) -> one (eps 2, 8, 16) triple per attack in ATTACKS.
TABLE1_CIFAR10 = {
    ("resnet", "normal", "none"): [(92, 92, 92), (92, 87, 76), (33, 15, 11), (10, 0, 0),
                                   (12, 6, 6), (7, 0, 0), (7, 0, 0)],
    ("vgg", "normal", "none"): [(89, 89, 89), (89, 88, 80), (60, 46, 30), (44, 2, 0),
                                (57, 25, 11), (37, 0, 0), (37, 0, 0)],
    ("resnet", "adv-fgsm", "none"): [(91, 91, 91), (90, 88, 84), (88, 91, 91), (24, 7, 0),
                                     (45, 0, 0), (20, 0, 7), (20, 0, 0)],
    ("resnet", "adv-bim", "none"): [(87, 87, 87), (87, 87, 86), (80, 52, 34), (74, 32, 6),
                                    (79, 48, 25), (76, 42, 8), (74, 32, 6)],
    ("resnet", "label-smoothing", "none"): [(92, 92, 92), (91, 88, 77), (73, 54, 28), (59, 8, 1),
                                            (56, 20, 10), (30, 2, 2), (30, 2, 1)],
    ("resnet", "normal", "squeeze"): [(84, 84, 84), (83, 82, 76), (31, 20, 18), (13, 0, 0),
                                      (75, 75, 75), (78, 78, 78), (13, 0, 0)],
    ("resnet", "adv-fgsm", "squeeze"): [(86, 86, 86), (85, 84, 81), (73, 67, 55), (55, 2, 0),
                                        (85, 85, 85), (83, 83, 83), (55, 2, 0)],
    ("resnet", "normal", "pixeldefend"): [(85, 85, 88), (82, 83, 84), (73, 46, 24), (71, 46, 25),
                                          (80, 80, 80), (78, 78, 78), (71, 46, 24)],
    ("vgg", "normal", "pixeldefend"): [(82, 82, 82), (82, 82, 84), (80, 62, 52), (80, 61, 48),
                                       (81, 76, 76), (81, 79, 79), (80, 61, 48)],
    ("resnet", "adv-fgsm", "pixeldefend"): [(88, 88, 86), (86, 86, 87), (81, 68, 67),
                                            (81, 69, 56), (85, 85, 85), (84, 84, 84),
                                            (81, 69, 56)],
    ("resnet", "adv-fgsm", "adaptive"): [(90, 90, 90), (86, 87, 87), (81, 70, 67), (81, 70, 56),
                                         (82, 81, 82), (81, 80, 81), (81, 70, 56)],
}
TABLE1_EPS_ATTACK = {"cifar10": (2, 8, 16)}
TABLE1 = {"cifar10": TABLE1_CIFAR10}

# The abstract: strongest-attack accuracy without -> with PixelDefend.
HEADLINE_STRONGEST = {"fmnist": (63, 84), "cifar10": (32, 70)}


def table1_cell(dataset: str, network: str, recipe: str, defense: str,
                attack: str) -> dict[int, int] | None:
    """The paper's accuracies (%) of one Table 1 cell by eps_attack, or None."""
    row = TABLE1.get(dataset, {}).get((network, recipe, defense))
    if row is None or attack not in ATTACKS:
        return None
    return dict(zip(TABLE1_EPS_ATTACK[dataset], row[ATTACKS.index(attack)]))
