"""Statistics over evaluation accuracies: mean, std, confidence interval, and the paired comparison of an IWD row
with its base row."""
import math

import numpy as np


def summarize(accs):
    a = np.asarray(accs, dtype=np.float64)
    n = len(a)
    mean = float(a.mean()) if n else float("nan")
    std = float(a.std()) if n > 1 else 0.0  # population std, as the references report (np.std)
    half = 1.96 * float(a.std(ddof=1)) / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "std": std, "n": n, "ci95": (mean - half, mean + half)}


def welch_test(a, b):
    """Two-sided Welch t-test of mean(a) != mean(b) over pooled evaluation accuracies (seeds x networks).
    Returns (difference of means, p-value); p is nan when either side has fewer than 2 values or no spread."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    diff = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return diff, float("nan")
    from scipy import stats
    if a.std() == 0 and b.std() == 0:
        return diff, float("nan")
    return diff, float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def paired_test(differences):
    """Two-sided one-sample t-test of mean(differences) != 0, over per-seed differences of two rows' mean
    accuracies (a paired test). Returns the p-value; nan with fewer than 2 differences or none of spread."""
    d = np.asarray(differences, dtype=np.float64)
    if len(d) < 2 or d.std() == 0:
        return float("nan")
    from scipy import stats
    return float(stats.ttest_1samp(d, 0.0).pvalue)


def roc_auc(scores, positive):
    """ROC AUC of `scores` as a detector of `positive` (probability that a random positive scores higher than a
    random negative, ties counting half), via average ranks (Mann-Whitney U): no scikit-learn needed at run time."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    pos = np.asarray(positive, dtype=bool).ravel()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # average ranks with ties sharing the mean of their positions, in one pass (no loop over distinct values)
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ranks = (counts.cumsum() - (counts - 1) / 2.0)[inverse]
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
