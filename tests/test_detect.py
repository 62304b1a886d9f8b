import numpy as np

from pdray import pvalues


def test_pvalue_is_equation_1():
    train = np.array([1.0, 2.0, 3.0, 4.0])
    # (#{train <= x} + 1) / (N + 1)
    assert pvalues.pvalues(np.array([0.5, 2.0, 10.0]), train).tolist() == [0.2, 0.6, 1.0]


def test_clean_pvalues_are_uniform_and_shifted_ones_are_not():
    rng = np.random.default_rng(0)
    train = rng.normal(size=20000)
    clean = pvalues.pvalues(rng.normal(size=500), train)
    shifted = pvalues.pvalues(rng.normal(size=500) - 1.0, train)
    assert pvalues.ks_uniform(clean) > 0.01 and pvalues.ks_uniform(shifted) < 1e-6
    assert shifted.mean() < clean.mean()


def test_roc_auc():
    fpr, tpr, auc = pvalues.roc(np.array([0.0, 1.0, 2.0]), np.array([1.5, 3.0]))
    assert abs(auc - 5 / 6) < 1e-12  # 5 of the 6 (negative, positive) pairs are ordered
    assert fpr[0] == 0 and tpr[-1] == 1 and fpr[-1] == 1
    _, _, perfect = pvalues.roc(np.zeros(5), np.ones(5))
    _, _, tie = pvalues.roc(np.zeros(5), np.zeros(5))
    assert perfect == 1.0 and tie == 0.5
