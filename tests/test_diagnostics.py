"""The collapse diagnostics that train.py logs every epoch (statistics CSV, results figure, end-of-run
summary): the proxies' mean and largest pairwise cosine, the length of their mean direction, the
test embeddings' mean pairwise cosine, and the share of proxies that a gradient reached."""
import itertools
import math

import pandas as pd
import pytest
import torch

import train
from utils import DIAGNOSTICS, collapse_diagnostics, max_pairwise_cosine, mean_pairwise_cosine


def hand_cosines(vectors):
    """Every pair's cosine, one pair at a time, in fp64."""
    v = vectors.double()
    return [float(v[i] @ v[j] / (v[i].norm() * v[j].norm())) for i, j in itertools.combinations(range(len(v)), 2)]


def test_pairwise_cosines_match_a_pair_by_pair_computation():
    torch.manual_seed(0)
    vectors = torch.randn(37, 16) * torch.rand(37, 1) * 5 + 0.3  # unnormalised rows sharing a common part
    pairs = hand_cosines(vectors)
    assert mean_pairwise_cosine(vectors) == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)
    assert max_pairwise_cosine(vectors, block=5) == pytest.approx(max(pairs), abs=1e-6)  # blocks of rows


def test_diagnostics_tell_collapsed_proxies_from_spread_ones():
    spread = torch.eye(8)  # orthogonal: mean cosine 0, mean direction 1/sqrt(8) long
    same = torch.ones(8, 4) * torch.arange(1, 9.)[:, None]  # one direction, lengths 1..8
    spread_figures = collapse_diagnostics(spread, spread)
    assert spread_figures['proxy_cosine_mean'] == pytest.approx(0)
    assert spread_figures['proxy_cosine_max'] == pytest.approx(0)
    assert spread_figures['proxy_mean_length'] == pytest.approx(1 / math.sqrt(8))
    same_figures = collapse_diagnostics(same, -same)
    assert same_figures['proxy_cosine_mean'] == pytest.approx(1)
    assert same_figures['proxy_cosine_max'] == pytest.approx(1)
    assert same_figures['proxy_mean_length'] == pytest.approx(1)
    assert same_figures['embedding_cosine_mean'] == pytest.approx(1)
    assert set(spread_figures) | {'proxies_updated'} == set(DIAGNOSTICS)


def small_training(loss_name, num_classes=5):
    torch.manual_seed(0)
    args = train.parse_args(['--backbone_type', 'resnet18', '--pretrained', 'none', '--feature_dim', '16',
                             '--loss_name', loss_name, '--num_epochs', '1', '--device', 'cpu'])
    return train.build_training(args, num_classes, torch.device('cpu'))


@pytest.mark.parametrize('loss_name,reached', [
    ('positive_proxy', 2 / 5),  # a proxy learns only in batches that hold its class
    ('positive_proxy_anchor', 2 / 5),
    ('normalized_softmax', 1.0),  # every proxy is pushed by the negatives too
    ('proxy_anchor', 1.0),
])
def test_the_share_of_proxies_reached_counts_the_rows_a_gradient_reached(loss_name, reached):
    training = small_training(loss_name)
    images = torch.randn(4, 3, 32, 32)
    batches = [(images, torch.tensor([0, 3, 0, 3])), (images, torch.tensor([3, 0, 0, 3]))]
    assert train.train_epoch(training, batches, epoch=1, progress=False)[2] == pytest.approx(reached)


@pytest.mark.slow
def test_a_run_logs_the_diagnostics_every_epoch_and_summarises_them(trained_run, capsys):
    statistics = pd.read_csv(f"{trained_run['prefix']}_statistics.csv")
    assert set(DIAGNOSTICS) <= set(statistics.columns)
    assert math.isnan(statistics['proxies_updated'].iloc[0])  # epoch 0 trains nothing
    assert (statistics['proxies_updated'].iloc[1:] == 1.0).all()  # 50 classes, 15 batches of 64: all reached
    database = torch.load(f"{trained_run['prefix']}_data_base.pth", weights_only=True)
    final = collapse_diagnostics(database['proxies'], database['test_embeddings'])
    for column, value in final.items():  # the CSV's last row is the saved proxies' and embeddings'
        assert statistics[column].iloc[-1] == pytest.approx(value, abs=1e-6)


def test_the_summary_flags_a_drop_that_chance_does_not_explain_and_a_collapse():
    row = {'loss': 1.0, 'accuracy': 0.5, 'proxy_cosine_max': 0.99, 'proxy_mean_length': 0.8,
           'embedding_cosine_mean': 0.5, 'proxies_updated': 1.0}
    untrained = {'epoch': 0, 'recall@1': 0.833, 'map@r': 0.625, **row, 'proxy_cosine_mean': 0.1}
    worse = {'epoch': 20, 'recall@1': 0.792, 'map@r': 0.585, **row, 'proxy_cosine_mean': 0.66}
    # 24 queries: R@1 moves in steps of 4.2 points, so a 4-point drop is within chance
    text = train.summary([untrained, worse], num_queries=24)
    assert 'on 24 test queries' in text and 'R@1 83.3% -> 79.2% (-4.1)' in text
    assert 'training hurt retrieval' not in text
    assert 'the proxies share one cone' in text
    # the same drop on 10,000 queries is far beyond chance
    text = train.summary([untrained, worse], num_queries=10_000)
    assert text.count('training hurt retrieval') == 2
    better = {**worse, 'recall@1': 0.9, 'map@r': 0.7, 'proxy_cosine_mean': 0.05}
    text = train.summary([untrained, better], num_queries=10_000)
    assert 'training hurt retrieval' not in text and 'one cone' not in text
