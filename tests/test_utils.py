"""Retrieval metric, transforms and atomic writes."""
import importlib
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import normalized_mutual_info_score

from model import BACKBONES, InputConvention
from utils import atomic_path, build_transforms, evaluate, nmi, recall


def brute_force(queries, query_labels, gallery, gallery_labels, ks, same_set):
    """Full distance matrix in numpy, one query at a time, straight from the definitions."""
    q, g = queries.double().numpy(), gallery.double().numpy()
    query_labels, gallery_labels = np.asarray(query_labels), np.asarray(gallery_labels)
    recalls, r_precisions, average_precisions = [[] for _ in ks], [], []
    for i in range(len(q)):
        similarity = g @ q[i]
        candidates = np.arange(len(g))
        if same_set:
            candidates = candidates[candidates != i]
        # highest similarity first, ties to the lower index
        ranked = candidates[np.lexsort((candidates, -similarity[candidates]))]
        relevant = gallery_labels[ranked] == query_labels[i]
        r = relevant.sum()
        if r == 0:
            continue
        for j, k in enumerate(ks):
            recalls[j].append(relevant[:k].any())
        r_precisions.append(relevant[:r].sum() / r)
        precision_at = np.cumsum(relevant[:r]) / np.arange(1, r + 1)
        average_precisions.append((precision_at * relevant[:r]).sum() / r)
    results = {f'recall@{k}': np.mean(recalls[j]) for j, k in enumerate(ks)}
    return {**results, 'r_precision': np.mean(r_precisions), 'map@r': np.mean(average_precisions)}


def clustered(n=300, classes=20, dim=16, seed=0, noise=1.5):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(classes, (n,), generator=generator)
    centres = torch.randn(classes, dim, generator=generator)
    return F.normalize(centres[labels] + noise * torch.randn(n, dim, generator=generator), dim=1), labels


KS = (1, 2, 4, 8)


@pytest.mark.parametrize('block_bytes', [1 << 12, 1 << 28], ids=['tiny blocks', 'one block'])
def test_metrics_match_brute_force(block_bytes):
    embeddings, labels = clustered()
    expected = brute_force(embeddings, labels, embeddings, labels, KS, same_set=True)
    assert 0 < expected['recall@1'] < expected['recall@8'] < 1 and 0 < expected['map@r'] < 1
    results = evaluate(embeddings, labels, KS, metrics=('recall', 'map@r', 'r_precision'), block_bytes=block_bytes)
    assert results == pytest.approx(expected, abs=1e-12)


def test_query_gallery_protocol_matches_brute_force():
    embeddings, labels = clustered(n=400, classes=30)
    queries, query_labels, gallery, gallery_labels = embeddings[:150], labels[:150], embeddings[150:], labels[150:]
    expected = brute_force(queries, query_labels, gallery, gallery_labels, KS, same_set=False)
    results = evaluate(queries, query_labels, KS, gallery=gallery, gallery_labels=gallery_labels,
                       metrics=('recall', 'map@r', 'r_precision'), block_bytes=1 << 12)
    assert results == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize('block_bytes', [1 << 9, 1 << 28], ids=['many chunks', 'one chunk'])
def test_ties_are_broken_by_gallery_index(block_bytes):
    # 4 distinct points, each repeated 10 times with mixed labels: nearly every neighbour
    # ties, so only the index decides, also across gallery chunks and query blocks. Small
    # integer coordinates keep the dot products exact whatever the matmul's blocking.
    embeddings = torch.randint(4, (4, 8), generator=torch.Generator().manual_seed(0)).float().repeat(10, 1)
    labels = torch.randint(3, (40,), generator=torch.Generator().manual_seed(1))
    expected = brute_force(embeddings, labels, embeddings, labels, KS, same_set=True)
    assert evaluate(embeddings, labels, KS, metrics=('recall', 'map@r', 'r_precision'), block_bytes=block_bytes) == \
        pytest.approx(expected, abs=1e-12)


def test_single_sample_classes_are_left_out_of_retrieval_metrics():
    # image 2 is alone in its class: nothing to find, R-Precision 0/0, so it is not a query;
    # counting it would give 2/3 instead of 1
    embeddings = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0]]), dim=1)
    assert evaluate(embeddings, [0, 0, 1], (1,), metrics=('recall', 'map@r', 'r_precision')) == \
        {'recall@1': 1.0, 'r_precision': 1.0, 'map@r': 1.0}
    # and on a larger set, with a lone image that others may still retrieve, brute force agrees
    embeddings, labels = clustered(n=60, classes=6)
    embeddings[-1], labels[-1] = F.normalize(torch.ones(16), dim=0), 99
    assert evaluate(embeddings, labels, KS, metrics=('recall', 'map@r', 'r_precision')) == \
        pytest.approx(brute_force(embeddings, labels, embeddings, labels, KS, same_set=True), abs=1e-12)
    with pytest.raises(ValueError, match='no query has another image of its class'):
        evaluate(embeddings[:3], [0, 1, 2], (1,))


def test_nmi_matches_scikit_learn_and_kmeans_finds_clear_clusters():
    labels = torch.randint(7, (200,), generator=torch.Generator().manual_seed(0))
    clusters = torch.randint(5, (200,), generator=torch.Generator().manual_seed(1))
    assert nmi(labels, clusters) == pytest.approx(normalized_mutual_info_score(labels, clusters),
                                                  abs=1e-12)
    embeddings, labels = clustered(n=200, classes=5, noise=0.05)
    assert evaluate(embeddings, labels, metrics=('nmi',))['nmi'] > 0.95
    assert evaluate(*clustered(n=200, classes=5, noise=3.0), metrics=('nmi',))['nmi'] < 0.5


def test_only_the_metrics_asked_for_are_computed(monkeypatch):
    import utils
    monkeypatch.setattr(utils, 'kmeans', lambda *a, **k: pytest.fail('k-means ran for recall alone'))
    embeddings, labels = clustered()
    assert set(evaluate(embeddings, labels.tolist(), (1, 4), metrics=('recall',))) == {'recall@1', 'recall@4'}
    assert recall(embeddings, labels.tolist(), [1, 4]) == [evaluate(embeddings, labels, (1, 4), metrics=('recall',))[f'recall@{k}']
                                                           for k in (1, 4)]


def test_recall_accepts_label_lists_and_excludes_the_query_itself():
    embeddings = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.01, 1.0]]), dim=1)
    # nearest other image is always of the same class, even though each image is nearest to itself
    assert recall(embeddings, [0, 0, 1, 1], [1]) == [1.0]
    assert recall(embeddings, [0, 1, 0, 1], [1]) == [0.0]


@pytest.mark.parametrize('change,message', [
    (lambda e, l: (e[:0], l[:0]), 'non-empty'),
    (lambda e, l: (e, l[:-1]), 'one label per embedding'),
    (lambda e, l: (torch.where(torch.arange(len(e))[:, None] == 3, float('nan'), e), l), '1 of 8 embeddings hold NaN'),
    (lambda e, l: (e, l), 'K <= 7'),
])
def test_bad_input_is_a_clear_error(change, message):
    embeddings, labels = change(*clustered(n=8))
    with pytest.raises(ValueError, match=message):
        evaluate(embeddings, labels, ks=(1, 8))


def test_transforms_and_the_network_follow_the_backbone_input_convention():
    image = torch.tensor([255, 0, 0], dtype=torch.uint8)[:, None, None].expand(3, 40, 40)  # pure red

    def network_input(backbone):  # the test transform in the loader, then the convention in the network
        cropped = build_transforms(BACKBONES[backbone], 32)[1](image)
        assert cropped.shape == (3, 32, 32) and cropped.dtype == torch.uint8
        return InputConvention(BACKBONES[backbone])(cropped[None])[0]
    x = network_input('resnet18')
    assert x[:, 0, 0].tolist() == pytest.approx([(1 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225], abs=1e-5)
    # BN-Inception: BGR, 0-255, mean [104, 117, 128]: red lands in the last channel
    assert network_input('inception')[:, 0, 0].tolist() == pytest.approx([-104, -117, 255 - 128], abs=1e-3)


def test_atomic_path_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / 'statistics.csv'
    path.write_text('old')
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            with open(tmp, 'w') as f:
                f.write('half')
            raise RuntimeError('crash mid-write')
    assert path.read_text() == 'old'
    assert os.listdir(tmp_path) == ['statistics.csv']
    with atomic_path(path) as tmp:
        with open(tmp, 'w') as f:
            f.write('new')
    assert path.read_text() == 'new'


@pytest.mark.parametrize('script,flags,message', [
    ('data_utils', ['--test_fraction', '0'], "argument --test_fraction: expected a number in (0, 1), got '0'"),
    ('data_utils', ['--num_classes', '1'], "argument --num_classes: expected an integer >= 2, got '1'"),
    ('test', ['--retrieval_num', '0'], "argument --retrieval_num: expected an integer >= 1, got '0'"),
    ('test', ['--nprobe', '0'], "argument --nprobe: expected an integer >= 1, got '0'"),
    ('report', ['table', 'x.csv', '--epoch', '-1'], "argument --epoch: expected an integer >= 0, got '-1'"),
])
def test_every_numeric_flag_states_its_range(script, flags, message, capsys):
    """The integer and fraction flags of every script refuse a value out of range, naming the
    flag and the range, before any work."""
    main = importlib.import_module(script).main
    with pytest.raises(SystemExit) as stop:
        main(flags)
    assert stop.value.code == 2 and message in capsys.readouterr().err
