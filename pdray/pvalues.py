"""Equation 1 and detection by it, in numpy alone (the report reads it without models).

The p-value of an image X' ranks its likelihood among the N training images:
p = (#{i: p_CNN(X_i) <= p_CNN(X')} + 1) / (N + 1). Training images' own p-values are then
uniform by construction, which gives the ROC of detection against them in closed form.
"""

from __future__ import annotations

import numpy as np
from scipy import stats


def pvalues(logp: np.ndarray, train_logp: np.ndarray) -> np.ndarray:
    """Equation 1: the share of training images no more likely than each image."""
    ranked = np.sort(train_logp)
    at_most = np.searchsorted(ranked, logp, side="right")
    return (at_most + 1) / (len(ranked) + 1)


def roc(negative_scores: np.ndarray, positive_scores: np.ndarray):
    """ROC curve (fpr, tpr) and AUC for 'positive has the higher score'; ties count half."""
    scores = np.concatenate([negative_scores, positive_scores])
    labels = np.concatenate([np.zeros(len(negative_scores)), np.ones(len(positive_scores))])
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last_of_tie = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tpr = np.r_[0, np.cumsum(y)[last_of_tie] / max(1, y.sum())]
    fpr = np.r_[0, np.cumsum(1 - y)[last_of_tie] / max(1, (1 - y).sum())]
    ranks = stats.rankdata(scores)
    n_pos, n_neg = len(positive_scores), len(negative_scores)
    auc = (ranks[len(negative_scores):].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return fpr, tpr, float(auc)


def ks_uniform(p: np.ndarray) -> float:
    """Kolmogorov-Smirnov p-value of the hypothesis that ``p`` is Uniform(0, 1)."""
    return float(stats.kstest(p, "uniform").pvalue)


def roc_vs_training(p: np.ndarray, n_train: int):
    """ROC curve (fpr, tpr) and AUC of detecting images by their p-values ``p`` (low:
    detected) against the N = ``n_train`` training images, whose p-values are uniform: the
    false-positive rate at threshold t is the share of training images at or below it,
    ((N + 1) t - 1) / N."""
    p = np.sort(p)
    fpr = np.clip(((n_train + 1) * np.r_[0, p] - 1) / n_train, 0, 1)
    tpr = np.arange(len(p) + 1) / len(p)
    auc = float(1 - np.mean(np.clip(((n_train + 1) * p - 1) / n_train, 0, 1)))
    return np.r_[fpr, 1], np.r_[tpr, 1], auc
