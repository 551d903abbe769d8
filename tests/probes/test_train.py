"""Probe fitting and evaluation on synthetic data with a known answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score

from lmlab.errors import LmlabError
from lmlab.probes.train import (TrainConfig, bootstrap_metrics, build_layer_data, fit_joint,
                                ranking_metrics, split_chains, split_groups, standardizer,
                                threshold_metrics, train_layer)
from lmlab.stats import cluster_bootstrap

PLANTED_LAG = 3


def planted(n_chains: int = 100, width: int = 16, seed: int = 0, lag: int = PLANTED_LAG,
            prompt: int = 6):
    """Chains whose activation at t carries the label at t + lag along feature 0."""
    rng = np.random.default_rng(seed)
    acts, labels, ids, starts = [], [], [], []
    for _ in range(n_chains):
        length = int(rng.integers(40, 90))
        label = (rng.random(length) < 0.12).astype(np.int8)
        label[:prompt] = 0
        x = rng.normal(size=(length, width)).astype(np.float32)
        future = np.zeros(length)
        future[:length - lag] = label[lag:]
        x[:, 0] += 2.5 * future
        x[:prompt] += 10.0  # prompt tokens are very different: they must not be used
        acts.append(x)
        labels.append(label)
        ids.append(rng.integers(0, 40, length))
        starts.append(prompt)
    return acts, labels, ids, starts


def _data(lags, **kwargs):
    acts, labels, ids, starts = planted(**kwargs)
    split = split_chains(len(acts), (0.6, 0.2, 0.2), 0)
    return build_layer_data(acts, labels, ids, starts, lags, split)


def test_a_planted_signal_is_found_at_its_lag_and_nowhere_else():
    lags = (-4, 0, PLANTED_LAG, 8)
    result = train_layer(_data(lags), layer=5, label="x", config=TrainConfig(lags, bootstrap=100))
    for lag in lags:
        metrics = result.metrics[lag]
        if lag == PLANTED_LAG:
            assert metrics["test_auroc"] > 0.9
            assert metrics["test_auroc_ci_lo"] > 0.85
            assert metrics["test_pr_auc"] > 3 * metrics["base_rate"]
            assert metrics["shuffled_test_auroc"] < metrics["test_auroc"] - 0.2
        else:
            assert abs(metrics["test_auroc"] - 0.5) < 0.08
            assert abs(metrics["shuffled_test_auroc"] - 0.5) < 0.1
        assert abs(metrics["token_test_auroc"] - 0.5) < 0.1  # tokens are random here
        assert metrics["test_auroc_ci_lo"] <= metrics["test_auroc"] <= metrics["test_auroc_ci_hi"]


def test_only_chain_tokens_are_rows_and_the_lag_never_reaches_into_the_prompt():
    data = _data((-2, 0, 2), n_chains=5)
    acts, labels, ids, starts = planted(n_chains=5)
    assert data.features.shape[0] == sum(a.shape[0] - s for a, s in zip(acts, starts))
    assert data.features.max() < 8  # no prompt row (shifted by +10) made it in
    first = data.chain == 0
    positions = np.arange(starts[0], acts[0].shape[0])
    np.testing.assert_array_equal(data.valid[first, 0], positions - 2 >= starts[0])
    np.testing.assert_array_equal(data.valid[first, 2], positions + 2 < acts[0].shape[0])
    np.testing.assert_array_equal(data.targets[first, 1], labels[0][starts[0]:])


def test_chains_never_straddle_splits():
    split = split_chains(50, (0.6, 0.2, 0.2), seed=3)
    assert np.bincount(split).tolist() == [30, 10, 10]
    data = build_layer_data(*planted(n_chains=50), (0,), split)
    for chain in np.unique(data.chain):
        assert np.unique(split[data.chain[data.chain == chain]]).size == 1


def test_joint_training_matches_sklearn_one_fit_at_a_time():
    lags = (0, PLANTED_LAG)
    data = _data(lags, n_chains=40)
    mean, scale = standardizer(data.features)
    x = (data.features - mean) / scale
    strengths = (0.01, 1.0)
    n_out = len(lags) * len(strengths)
    targets = np.repeat(data.targets.astype(np.float32), len(strengths), axis=1)
    weights = np.repeat(data.valid.astype(np.float32), len(strengths), axis=1)
    fit = fit_joint(torch.from_numpy(x), torch.from_numpy(targets), torch.from_numpy(weights),
                    torch.tensor(list(strengths) * len(lags)))
    assert fit.converged.all()
    coef, bias = fit.coef, fit.bias
    for column in range(n_out):
        k, c = divmod(column, len(strengths))
        rows = data.valid[:, k]
        reference = LogisticRegression(C=strengths[c], max_iter=2000, tol=1e-8)
        reference.fit(x[rows], data.targets[rows, k])
        ours = x[rows] @ coef[:, column].numpy() + bias[column].item()
        theirs = reference.decision_function(x[rows])
        np.testing.assert_allclose(ours, theirs, atol=2e-2)
        assert roc_auc_score(data.targets[rows, k], ours) == pytest.approx(
            roc_auc_score(data.targets[rows, k], theirs), abs=1e-3)


def test_the_vectorised_chain_bootstrap_equals_the_core_cluster_bootstrap():
    rng = np.random.default_rng(0)
    chain = np.repeat(np.arange(20), 50)
    y = (rng.random(chain.size) < 0.2).astype(int)
    score = np.round(rng.random(chain.size) + 0.3 * y, 2)
    ours = bootstrap_metrics(y, score, 0.8, chain, n_resamples=200, seed=4)
    clusters = [np.nonzero(chain == c)[0] for c in range(20)]
    reference = {
        "auroc": lambda i: ranking_metrics(y[i], score[i])[0],
        "pr_auc": lambda i: ranking_metrics(y[i], score[i])[1],
        "accuracy": lambda i: threshold_metrics(y[i], score[i], 0.8)[0],
        "f1": lambda i: threshold_metrics(y[i], score[i], 0.8)[1],
    }
    for name, statistic in reference.items():
        expected = cluster_bootstrap(statistic, clusters, n_resamples=200, seed=4)
        assert ours[name].value == pytest.approx(expected.value, abs=1e-12)
        assert ours[name].lower == pytest.approx(expected.lower, abs=1e-9)
        assert ours[name].upper == pytest.approx(expected.upper, abs=1e-9)


def test_fast_ranking_metrics_equal_sklearn_with_ties():
    rng = np.random.default_rng(1)
    for _ in range(20):
        y = rng.integers(0, 2, 300)
        score = np.round(rng.random(300), 1)  # many ties
        auroc, ap = ranking_metrics(y, score)
        assert auroc == pytest.approx(roc_auc_score(y, score), abs=1e-12)
        assert ap == pytest.approx(average_precision_score(y, score), abs=1e-12)


def test_the_probe_object_reproduces_the_scores_it_was_evaluated_with():
    lags = (PLANTED_LAG,)
    data = _data(lags)
    result = train_layer(data, layer=1, label="x", config=TrainConfig(lags, bootstrap=0))
    probe = result.probes[PLANTED_LAG]
    test_rows = (data.split[data.chain] == 2) & data.valid[:, 0]
    scores = probe.predict_proba(data.features[test_rows])
    assert roc_auc_score(data.targets[test_rows, 0], scores) == pytest.approx(
        result.metrics[PLANTED_LAG]["test_auroc"], abs=1e-6)
    assert probe.threshold == result.metrics[PLANTED_LAG]["threshold"]


def test_fitting_with_one_thread_gives_the_same_probe_and_restores_the_setting():
    lags = (PLANTED_LAG,)
    data = _data(lags, n_chains=40)
    before = torch.get_num_threads()
    one = train_layer(data, 1, "x", TrainConfig(lags, bootstrap=0, fit_threads=1))
    assert torch.get_num_threads() == before
    default = train_layer(data, 1, "x", TrainConfig(lags, bootstrap=0))
    assert one.metrics[PLANTED_LAG]["test_auroc"] == pytest.approx(
        default.metrics[PLANTED_LAG]["test_auroc"], abs=1e-3)


def test_a_lag_longer_than_every_chain_is_refused():
    with pytest.raises(LmlabError, match="lag 500 is longer than every"):
        train_layer(_data((0, 500)), 1, "x", TrainConfig((0, 500), bootstrap=0))


def test_a_label_that_never_occurs_is_refused():
    acts, labels, ids, starts = planted(n_chains=10)
    data = build_layer_data(acts, [np.zeros_like(l) for l in labels], ids, starts, (0,),
                            split_chains(10, (0.6, 0.2, 0.2), 0))
    with pytest.raises(LmlabError, match="never occurs"):
        train_layer(data, 1, "backtracking", TrainConfig((0,), bootstrap=0))


def test_mismatched_lengths_are_an_error_not_a_truncation():
    acts, labels, ids, starts = planted(n_chains=3)
    labels[1] = labels[1][:-1]
    with pytest.raises(LmlabError, match="lengths must match exactly"):
        build_layer_data(acts, labels, ids, starts, (0,), split_chains(3, (0.6, 0.2, 0.2), 0))


@pytest.mark.parametrize("kwargs, message", [
    ({"lags": ()}, "lags"), ({"lags": (0, 0)}, "repeat"), ({"lags": (0,), "strengths": (0.0,)}, "strengths"),
    ({"lags": (0,), "split": (0.5, 0.5, 0.5)}, "split"), ({"lags": (0,), "bootstrap": -1}, "bootstrap"),
    ({"lags": (0,), "fit_threads": 0}, "fit_threads"), ({"lags": (0,), "tolerance": 0}, "tolerance"),
])
def test_bad_training_settings_are_refused(kwargs, message):
    with pytest.raises(LmlabError, match=message):
        TrainConfig(**kwargs)


# ------------------------------------------------------------- splits by problem

def test_chains_of_one_problem_never_straddle_splits_and_shares_are_kept():
    rng = np.random.default_rng(5)
    problems = [f"problem {i}" for i in rng.integers(0, 70, 200)]  # ~2.9 chains per problem
    split = split_groups(problems, (0.6, 0.2, 0.2), seed=1)
    for problem in set(problems):
        assert np.unique(split[[p == problem for p in problems]]).size == 1
    shares = np.bincount(split, minlength=3) / len(problems)
    np.testing.assert_allclose(shares, [0.6, 0.2, 0.2], atol=0.05)


def test_with_one_chain_per_problem_the_group_split_is_the_chain_split():
    np.testing.assert_array_equal(split_groups(np.arange(50), (0.6, 0.2, 0.2), 3),
                                  split_chains(50, (0.6, 0.2, 0.2), 3))


def test_too_few_problems_to_split_is_refused():
    with pytest.raises(LmlabError, match="at least 3 different problems"):
        split_groups(["a", "a", "b", "b"], (0.6, 0.2, 0.2), 0)


def test_test_intervals_resample_problems_not_chains():
    acts, labels, ids, starts = planted(n_chains=60)
    groups = np.arange(60) // 3  # three chains per problem
    split = split_groups(groups, (0.6, 0.2, 0.2), 0)
    data = build_layer_data(acts, labels, ids, starts, (PLANTED_LAG,), split, groups)
    metrics = train_layer(data, 1, "x", TrainConfig((PLANTED_LAG,), bootstrap=50)).metrics[PLANTED_LAG]
    assert metrics["problems_test"] == metrics["chains_test"] / 3
    test_rows = data.split[data.chain] == 2
    assert np.unique(data.group[test_rows]).size == metrics["problems_test"]


# ------------------------------------------------------------- label persistence

def spans_without_signal(n_chains: int = 120, width: int = 16, seed: int = 0, prompt: int = 4):
    """Labels in contiguous spans of 8-20 tokens; activations and tokens carry nothing."""
    rng = np.random.default_rng(seed)
    acts, labels, ids, starts = [], [], [], []
    for _ in range(n_chains):
        length = int(rng.integers(80, 140))
        label = np.zeros(length, dtype=np.int8)
        at = prompt + int(rng.integers(0, 20))
        while at < length:
            span = int(rng.integers(8, 21))
            label[at:at + span] = 1
            at += span + int(rng.integers(30, 70))
        acts.append(rng.normal(size=(length, width)).astype(np.float32))
        labels.append(label)
        ids.append(rng.integers(0, 40, length))
        starts.append(prompt)
    return acts, labels, ids, starts


def test_on_contiguous_spans_without_signal_persistence_is_strong_and_the_probe_does_not_beat_it():
    lags = (0, 2, 4, 40)
    acts, labels, ids, starts = spans_without_signal()
    data = build_layer_data(acts, labels, ids, starts, lags,
                            split_chains(len(acts), (0.6, 0.2, 0.2), 0))
    result = train_layer(data, 1, "x", TrainConfig(lags, bootstrap=200))
    for lag, floor in ((2, 0.85), (4, 0.75)):
        metrics = result.metrics[lag]
        assert metrics["persistence_test_auroc"] > floor
        assert metrics["persistence_test_pr_auc"] > 2 * metrics["base_rate"]
        assert abs(metrics["test_auroc"] - 0.5) < 0.08
        assert metrics["probe_minus_persistence_test_pr_auc_ci_hi"] < 0
        assert metrics["beats_baselines"] == 0.0
    # Far beyond a span's length the label at t says little.
    assert result.metrics[40]["persistence_test_auroc"] < 0.65
    assert "persistence_test_auroc" not in result.metrics[0]  # at lag 0 it is the target


def test_a_probe_with_real_signal_beats_both_baselines():
    lags = (PLANTED_LAG,)
    result = train_layer(_data(lags), 1, "x", TrainConfig(lags, bootstrap=200))
    metrics = result.metrics[PLANTED_LAG]
    assert abs(metrics["persistence_test_auroc"] - 0.5) < 0.1  # labels are i.i.d. here
    assert metrics["probe_minus_persistence_test_pr_auc_ci_lo"] > 0
    assert metrics["probe_minus_token_test_pr_auc_ci_lo"] > 0
    assert metrics["beats_baselines"] == 1.0
    lo, hi = (metrics["probe_minus_persistence_test_auroc_ci_lo"],
              metrics["probe_minus_persistence_test_auroc_ci_hi"])
    assert lo <= metrics["probe_minus_persistence_test_auroc"] <= hi


# ------------------------------------------------------------- convergence, lag independence

def test_a_lags_probe_is_the_same_whichever_other_lags_are_fitted_with_it():
    alone = train_layer(_data((0,)), 1, "x", TrainConfig((0,), bootstrap=50))
    joint = train_layer(_data((0, 4)), 1, "x", TrainConfig((0, 4), bootstrap=50))
    a, b = alone.probes[0], joint.probes[0]
    assert a.strength == b.strength
    np.testing.assert_allclose(a.weight, b.weight, rtol=0, atol=1e-6)
    assert a.bias == pytest.approx(b.bias, abs=1e-6)
    for name in ("test_auroc", "test_pr_auc", "shuffled_test_auroc", "test_auroc_ci_lo",
                 "threshold"):
        assert alone.metrics[0][name] == pytest.approx(joint.metrics[0][name], abs=1e-6), name


def test_every_fit_reports_convergence():
    lags = (0, PLANTED_LAG)
    result = train_layer(_data(lags), 1, "x", TrainConfig(lags, bootstrap=0))
    for lag in lags:
        metrics = result.metrics[lag]
        assert metrics["converged"] == 1.0 and metrics["fits_unconverged"] == 0
        assert metrics["fits"] == 2 * len(TrainConfig(lags).strengths)
        assert metrics["fit_grad_max"] <= 1e-4 and 0 < metrics["fit_iterations"] < 100
    assert result.convergence_warnings() == []


def test_a_fit_out_of_iterations_is_flagged_and_warned_about():
    lags = (0, PLANTED_LAG)
    result = train_layer(_data(lags), 1, "x", TrainConfig(lags, bootstrap=0, max_iter=2))
    metrics = result.metrics[PLANTED_LAG]
    assert metrics["fits_unconverged"] > 0
    assert metrics["fit_iterations"] <= 2
    warnings = result.convergence_warnings()
    assert any(f"lag {PLANTED_LAG}:" in w and "did not converge" in w for w in warnings)


def test_one_slow_output_does_not_hold_back_or_change_the_others():
    data = _data((PLANTED_LAG,), n_chains=40)
    mean, scale = standardizer(data.features)
    x = torch.from_numpy((data.features - mean) / scale)
    y = torch.from_numpy(data.targets.astype(np.float32))
    w = torch.from_numpy(data.valid.astype(np.float32))
    easy = fit_joint(x, y, w, torch.tensor([0.001]))
    both = fit_joint(x, y.repeat(1, 2), w.repeat(1, 2), torch.tensor([0.001, 1e4]))
    assert both.iterations[0] == easy.iterations[0] < both.iterations[1]
    np.testing.assert_allclose(both.coef[:, 0].numpy(), easy.coef[:, 0].numpy(), atol=1e-6)
