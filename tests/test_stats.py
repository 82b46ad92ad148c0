"""Pure statistics: the log-ratio, the cluster bootstrap (wider than the naive interval when facts of a relation
move together; short with few unequal clusters), CR2 (its matrices, its coverage on 5 and 11 unequal clusters), TOST,
Welch's test and Holm's adjustment on a hand-checked example."""

import math

import numpy as np
import pytest

from kscope.stats import LOG_FLOOR, cluster_bootstrap, holm, log_ratio, mean_ci, welch_test


def test_log_ratio_is_symmetric_and_finite_when_the_answer_is_wiped_out():
    p = math.log(0.2)
    assert log_ratio([math.log(0.4), math.log(0.1), p], [p, p, p]).tolist() == pytest.approx([math.log(2), -math.log(2), 0.0])
    wiped = log_ratio([-math.inf], [p])[0]
    assert wiped == pytest.approx(LOG_FLOOR - p) and math.isfinite(wiped)


def _clustered(rng, n_clusters=20, size=5, between=1.0, within=0.5):
    effects = rng.normal(0, between, n_clusters)
    values = np.repeat(effects, size) + rng.normal(0, within, n_clusters * size)
    return values, np.repeat(np.arange(n_clusters), size)


def test_cluster_bootstrap_is_wider_than_the_naive_interval_and_covers_the_mean():
    rng = np.random.default_rng(0)
    covered_cluster = covered_naive = 0
    widths = []
    sims = 150
    for s in range(sims):
        values, clusters = _clustered(rng)
        t = cluster_bootstrap(values, clusters, n_boot=2000, seed=s)
        naive = mean_ci(values)
        covered_cluster += t.interval.lo <= 0 <= t.interval.hi
        covered_naive += naive.lo <= 0 <= naive.hi
        widths.append((t.interval.hi - t.interval.lo) / (naive.hi - naive.lo))
    assert np.median(widths) > 1.5  # five facts per cluster that share most of their value: ~2x wider
    assert covered_cluster / sims > 0.88  # about 95 %
    assert covered_naive / sims < 0.8  # the naive interval treats 100 values as independent


def test_cluster_bootstrap_p_value_seed_and_degenerate_cases():
    values, clusters = [1.0, 1.2, 0.9, 1.1, 1.3, 0.8], ["a", "a", "b", "b", "c", "c"]
    t = cluster_bootstrap(values, clusters, n_boot=999, seed=1)
    assert t.interval.mean == pytest.approx(np.mean(values)) and t.interval.lo > 0 and t.p < 0.01
    assert cluster_bootstrap(values, clusters, n_boot=999, seed=1) == t  # seeded
    # the same six values as three relations that disagree in size: t with 2 degrees of freedom, no verdict
    shaky = cluster_bootstrap([0.1, 0.1, 0.2, 0.2, 2.0, 2.0], clusters, n_boot=999, seed=1)
    assert shaky.interval.lo < 0 < shaky.interval.hi and shaky.p > 0.05
    one = cluster_bootstrap([1.0, 2.0], ["a", "a"])
    assert one.interval.mean == 1.5 and one.interval.lo is None and one.p is None
    assert cluster_bootstrap([np.nan], ["a"]).interval.n == 0


def test_welch_matches_scipy():
    from scipy import stats

    a, b = [1.0, 2.0, 3.0, 4.0], [0.5, 0.7, 0.2]
    t = welch_test(a, b)
    assert t.p == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    assert t.interval.mean == pytest.approx(2.5 - 0.4666666) and t.interval.lo < t.interval.mean < t.interval.hi


def test_holm_on_a_hand_checked_example():
    # sorted: 0.005 x4 = 0.02, 0.01 x3 = 0.03, 0.03 x2 = 0.06, 0.04 x1 = 0.04 -> monotone: 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, None, 0.2]) == [0.5, None, 0.4]
    assert holm([0.6, 0.7]) == [1.0, 1.0]


def test_cluster_robust_interval_is_t_for_one_value_per_cluster_and_over_equal_clusters_means():
    from kscope.stats import cluster_robust

    x = [0.3, -0.1, 0.8, 0.2, 0.5]
    got, t = cluster_robust(x, range(5)).interval, mean_ci(x)
    assert got.mean == pytest.approx(t.mean) and got.lo == pytest.approx(t.lo) and got.hi == pytest.approx(t.hi)
    equal = cluster_robust([1, 2, 3, 5, 6, 7, 2, 2, 3], [0, 0, 0, 1, 1, 1, 2, 2, 2]).interval
    means = mean_ci([2.0, 6.0, 7 / 3])
    assert equal.lo == pytest.approx(means.lo) and equal.hi == pytest.approx(means.hi)  # t over the cluster means


def test_cr2_and_its_df_match_the_matrix_formulas():
    """The closed form against Bell & McCaffrey's matrices for X = 1: A_g = (I - H_gg)^(-1/2), V = sum (1'A_g e_g)^2 / N^2,
    df = tr(W)^2 / tr(W^2), W = G' Omega G, G's columns (I - H)' A_g' 1_g / N, Omega the random-effects working model with
    the ANOVA estimate of the cluster variance (Imbens & Kolesár)."""
    from kscope.stats import _cr2, _within_ratio

    rng = np.random.default_rng(3)
    sizes = [5, 3, 3, 2, 1]
    labels = np.repeat(np.arange(5), sizes)
    y = rng.normal(0, 1, 5)[labels] + rng.normal(0, 1, labels.size)
    N = labels.size
    H = np.full((N, N), 1 / N)
    e = y - y.mean()
    cols, var = [], 0.0
    for g in range(5):
        idx = labels == g
        w, U = np.linalg.eigh(np.eye(idx.sum()) - H[np.ix_(idx, idx)])
        A = U @ np.diag(w**-0.5) @ U.T
        var += (np.ones(idx.sum()) @ A @ e[idx]) ** 2 / N**2
        a = np.zeros(N)
        a[idx] = A @ np.ones(idx.sum()) / N
        cols.append((np.eye(N) - H) @ a)
    Gm = np.stack(cols, 1)
    rho = _within_ratio(y, labels, np.bincount(labels).astype(float))
    omega = np.eye(N) + rho * (labels[:, None] == labels[None, :])
    W = Gm.T @ omega @ Gm
    m, se, df, n = _cr2(y, labels)
    assert rho > 0 and n == N and m == pytest.approx(y.mean())
    assert se == pytest.approx(np.sqrt(var)) and df == pytest.approx(np.trace(W) ** 2 / np.trace(W @ W))


@pytest.mark.parametrize("sizes", [[14, 6, 6, 5, 2], [14, 9, 7, 6, 6, 5, 4, 3, 2, 2, 2]])
def test_cluster_robust_covers_with_few_unequal_clusters(sizes):
    """5 unequal clusters (the built-in facts' relations: 14/6/6/5/2) and 11 (a ParaRel sample's), a cluster effect as
    large as the noise: the nominal 95 % interval covers at least 93 % (the cluster bootstrap with t on G - 1 df, the
    sweep's verdicts before issue 34, covered about 0.90 on both: see ``test_the_cluster_bootstrap_ran_short``)."""
    from kscope.stats import cluster_robust

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    n_sim = 600
    hits = 0
    for _ in range(n_sim):
        y = rng.normal(0, 1, len(sizes))[labels] + rng.normal(0, 1, labels.size)
        iv = cluster_robust(y, labels).interval
        hits += iv.lo <= 0.0 <= iv.hi
    assert hits / n_sim >= 0.93


def test_the_cluster_bootstrap_ran_short():
    """Why the verdicts moved to CR2: on the same 5 unequal clusters the bootstrap-SD interval with t on G - 1 df
    covers clearly less than 95 %."""
    rng = np.random.default_rng(0)
    sizes = [14, 6, 6, 5, 2]
    labels = np.repeat(np.arange(5), sizes)
    n_sim = 600
    hits = 0
    for _ in range(n_sim):
        y = rng.normal(0, 1, 5)[labels] + rng.normal(0, 1, labels.size)
        iv = cluster_bootstrap(y, labels, n_boot=1000, seed=0).interval
        hits += iv.lo <= 0.0 <= iv.hi
    assert hits / n_sim < 0.93


def test_equivalence_p_is_tost_on_the_cr2_mean():
    from scipy import stats as st

    from kscope.stats import equivalence_p

    x = [0.02, -0.01, 0.03, 0.00, 0.01]
    m, se = np.mean(x), np.std(x, ddof=1) / np.sqrt(len(x))
    want = max(st.t.sf((m + 0.1) / se, 4), st.t.sf((0.1 - m) / se, 4))
    assert equivalence_p(x, range(5), 0.1) == pytest.approx(want)  # one value per cluster: plain TOST on t(G-1)
    assert equivalence_p(x, range(5), 0.1) < 0.05 < equivalence_p(x, range(5), 0.01)
    assert equivalence_p([0.0, 0.0], [0, 1], 0.1) == 0.0 and equivalence_p([1.0], [0], 0.1) is None


def test_welch_equivalence_is_tost_on_welchs_difference():
    from scipy import stats as st

    from kscope.stats import welch_equivalence_p

    a, b = [0.50, 0.52, 0.49, 0.51], [0.50, 0.48, 0.51]
    t = st.ttest_ind(a, b, equal_var=False)
    d = np.mean(a) - np.mean(b)
    se = d / t.statistic
    df = t.df
    want = max(st.t.sf((d + 0.05) / se, df), st.t.sf((0.05 - d) / se, df))
    assert welch_equivalence_p(a, b, 0.05) == pytest.approx(want) and want < 0.05
    assert welch_equivalence_p([1.0], b, 0.05) is None
