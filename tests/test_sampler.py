"""--samples_per_class M: class-balanced batches, as a user relies on them: M images of each of
batch_size / M classes in every batch, whole classes on each torchrun process, the same batches
after a resume, and classes with fewer than M images handled and said."""
from collections import Counter

import pytest
import torch

import data_utils
import train


def labels_of(counts):
    """Labels of a training set whose class c has counts[c] images, in class order."""
    return [label for label, n in enumerate(counts) for _ in range(n)]


def batches(sampler, batch_size):
    indices = list(sampler)
    return [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]


def test_every_batch_holds_exactly_m_images_of_each_of_its_classes():
    labels = labels_of([7, 5, 9, 4, 6, 8, 5, 4, 10, 6])
    sampler = train.ClassBalancedSampler(labels, batch_size=12, samples_per_class=4, seed=3)
    drawn = batches(sampler, 12)
    assert len(drawn) == len(labels) // 12  # as many batches as random batching gives
    for batch in drawn:
        assert len(set(batch)) == len(batch)  # no image twice where its class has M or more
        assert sorted(Counter(labels[i] for i in batch).values()) == [4, 4, 4]


def test_an_epoch_visits_the_classes_evenly_and_each_class_s_images_in_turn():
    labels = labels_of([8] * 6)
    sampler = train.ClassBalancedSampler(labels, batch_size=8, samples_per_class=4, seed=0)
    seen = Counter(labels[i] for batch in batches(sampler, 8) for i in batch)
    assert set(seen.values()) == {8}  # 6 batches of 2 classes: every class twice, all 8 of its images


def test_two_processes_each_get_whole_classes_and_together_the_one_process_batch():
    labels = labels_of([6, 5, 7, 4, 6, 8, 5, 6])
    alone = train.ClassBalancedSampler(labels, batch_size=16, samples_per_class=4, seed=1)
    ranks = [train.ClassBalancedSampler(labels, 16, 4, world_size=2, rank=r, seed=1) for r in (0, 1)]
    for sampler in (alone, *ranks):
        sampler.set_epoch(2)
    per_rank = [batches(sampler, 8) for sampler in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == len(labels) // 16
    for global_batch, share_0, share_1 in zip(batches(alone, 16), *per_rank):
        assert share_0 + share_1 == global_batch
        for share in (share_0, share_1):  # two whole classes each, none shared with the other process
            assert sorted(Counter(labels[i] for i in share).values()) == [4, 4]
        assert not {labels[i] for i in share_0} & {labels[i] for i in share_1}


def test_the_batches_follow_seed_and_epoch_so_a_resumed_run_draws_the_same():
    labels = labels_of([5] * 10)

    def epoch_batches(epoch, seed=0):
        sampler = train.ClassBalancedSampler(labels, batch_size=10, samples_per_class=5, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)
    assert epoch_batches(4) == epoch_batches(4)  # a new process at epoch 4 draws what the first did
    assert epoch_batches(4) != epoch_batches(5)
    assert epoch_batches(4) != epoch_batches(4, seed=1)


def test_a_class_with_fewer_than_m_images_repeats_its_own_images():
    labels = labels_of([2, 6, 6, 6])
    sampler = train.ClassBalancedSampler(labels, batch_size=8, samples_per_class=4, seed=0)
    assert sampler.short_classes() == [0]
    for batch in batches(sampler, 8):
        per_class = Counter(labels[i] for i in batch)
        assert sorted(per_class.values()) == [4, 4]
        if 0 in per_class:
            assert {i for i in batch if labels[i] == 0} == {0, 1}  # both its images, each twice


def test_too_many_classes_a_batch_is_refused_naming_the_flags():
    with pytest.raises(ValueError, match='--batch_size 64 / --samples_per_class 4 = 16 classes a batch, '
                                         'but the training set has 10'):
        train.ClassBalancedSampler(labels_of([10] * 10), batch_size=64, samples_per_class=4)


def test_a_samples_per_class_that_does_not_divide_the_batch_is_refused(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(['--batch_size', '64', '--samples_per_class', '5'])
    assert '--samples_per_class 5 must divide --batch_size 64' in capsys.readouterr().err


@pytest.mark.slow
def test_train_py_trains_on_balanced_batches_and_names_the_short_classes(tmp_path, capsys):
    data = tmp_path / 'data'
    data_utils.prepare_synthetic(str(data), num_classes=10, images_per_class=3, image_size=32)
    argv = ['--data_path', str(data), '--data_name', 'synthetic', '--backbone_type', 'resnet18', '--pretrained', 'none',
            '--image_size', '32', '--batch_size', '8', '--samples_per_class', '4', '--num_epochs', '1',
            '--num_workers', '0', '--output_dir', str(tmp_path / 'results')]
    train.main(argv)
    assert '--samples_per_class 4: 5 training classes have fewer images' in capsys.readouterr().out
    args = train.parse_args(argv)
    splits = data_utils.load_splits(args.data_path, args.data_name)
    loader = train.build_loader(*train.RetrievalData.from_splits(splits).split('train'), transform=None, train=True,
                                args=args, device=torch.device('cpu'))
    assert isinstance(loader.sampler, train.ClassBalancedSampler) and loader.batch_size == 8
