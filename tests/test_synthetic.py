"""The embedded synthetic default: reproducible, and a real transfer problem."""
import hashlib
import os

import pytest
import torch

from data_utils import COLOURS, DETAILS, PATTERNS, SHAPES, load_splits, prepare_synthetic, split_path


def digest(root):
    h = hashlib.sha256()
    for directory, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            if name.endswith('.jpg'):
                with open(os.path.join(directory, name), 'rb') as f:
                    h.update(f.read())
    return h.hexdigest()


def test_synthetic_set_is_deterministic_from_its_seed(tmp_path):
    options = dict(num_classes=8, images_per_class=3, image_size=32)
    prepare_synthetic(str(tmp_path / 'a'), seed=1, **options)
    prepare_synthetic(str(tmp_path / 'b'), seed=1, **options)
    prepare_synthetic(str(tmp_path / 'c'), seed=2, **options)
    assert digest(tmp_path / 'a') == digest(tmp_path / 'b') != digest(tmp_path / 'c')


@pytest.mark.slow  # seconds: a fresh interpreter, or the whole synthetic set generated
def test_test_classes_are_unseen_combinations_of_seen_attribute_values(synthetic_path):
    splits = torch.load(split_path(synthetic_path, 'synthetic'), weights_only=True)
    train, test = set(splits['train']), set(splits['test'])
    assert len(train) == len(test) == 50 and train.isdisjoint(test)
    assert all(len(images) == 20 for images in [*splits['train'].values(), *splits['test'].values()])
    attributes = lambda classes, k: {name.split('-', 3)[k] for name in classes}  # noqa: E731
    for k, values in enumerate((SHAPES, COLOURS, PATTERNS, DETAILS)):
        assert attributes(test, k) <= attributes(train, k) <= set(values)


@pytest.mark.slow  # seconds: a fresh interpreter, or the whole synthetic set generated
def test_load_splits_generates_the_synthetic_set_when_missing(tmp_path):
    splits = load_splits(str(tmp_path), 'synthetic')
    some_image = splits['test'][sorted(splits['test'])[0]][0]
    assert some_image.startswith(os.path.join(str(tmp_path), 'synthetic', 'images'))
    assert os.path.isfile(some_image)
