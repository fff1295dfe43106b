"""Retrieval metric, transforms and atomic writes."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import BACKBONES
from utils import atomic_path, build_transforms, recall


def brute_force_recall(embeddings, labels, ks):
    """Full N x N distances in numpy, one query at a time, no shared code with utils.recall."""
    x = embeddings.numpy().astype(np.float64)
    labels = np.asarray(labels)
    result = []
    for k in ks:
        hits = 0
        for i in range(len(x)):
            distances = ((x - x[i]) ** 2).sum(axis=1)
            distances[i] = np.inf
            hits += labels[i] in labels[np.argsort(distances, kind='stable')[:k]]
        result.append(hits / len(x))
    return result


def clustered(n=300, classes=20, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(classes, (n,), generator=generator)
    centres = torch.randn(classes, dim, generator=generator)
    return F.normalize(centres[labels] + 1.5 * torch.randn(n, dim, generator=generator), dim=1), labels


@pytest.mark.parametrize('block_size', [7, 64, 1024])
def test_recall_matches_brute_force_for_any_block_size(block_size):
    embeddings, labels = clustered()
    ks = [1, 2, 4, 8]
    expected = brute_force_recall(embeddings, labels, ks)
    assert 0 < expected[0] < expected[-1] < 1  # a discriminating case, not all hits or none
    assert recall(embeddings, labels, ks, block_size=block_size) == pytest.approx(expected, abs=1e-9)


def test_recall_accepts_label_lists_and_excludes_the_query_itself():
    embeddings = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.01, 1.0]]), dim=1)
    # nearest other image is always of the same class, even though each image is nearest to itself
    assert recall(embeddings, [0, 0, 1, 1], [1]) == [1.0]
    assert recall(embeddings, [0, 1, 0, 1], [1]) == [0.0]


def test_recall_rejects_k_not_smaller_than_the_set():
    embeddings, labels = clustered(n=8)
    with pytest.raises(ValueError, match='Recall@8'):
        recall(embeddings, labels, [1, 8])


def test_transforms_follow_the_backbone_input_convention():
    from PIL import Image
    image = Image.new('RGB', (40, 40), (255, 0, 0))  # pure red
    _, resnet = build_transforms(BACKBONES['resnet18'], 32)
    _, inception = build_transforms(BACKBONES['inception'], 32)
    x = resnet(image)
    assert x.shape == (3, 32, 32)
    assert x[:, 0, 0].tolist() == pytest.approx([(1 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225], abs=1e-5)
    # BN-Inception: BGR, 0-255, mean [104, 117, 128]: red lands in the last channel
    assert inception(image)[:, 0, 0].tolist() == pytest.approx([-104, -117, 255 - 128], abs=1e-3)


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
