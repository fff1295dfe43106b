"""Under torchrun every loss trains on the global batch: two gloo processes running train.py's
DDP-wrapped ProxyTraining, each on half of a batch, give the network and the proxies the gradient
that one process computes on the whole batch, for every loss."""
import pytest
import torch

import train
from conftest import on_two_ranks
from loss import LOSSES

NUM_CLASSES, FEATURE_DIM, IMAGE_SIZE = 6, 16, 16
# the two halves hold different classes, in different numbers (class 0: 3 and 1; class 2: 2 and 0;
# class 3: 0 and 3; class 5 in neither): per-rank class counts, or a per-rank Proxy-Anchor, differ
# from the global batch's
LABELS = [0, 0, 0, 1, 2, 2, 0, 3, 3, 3, 1, 4]
# a per-rank loss gives gradients this far (relative) from the global batch's, at least, on this batch
PER_RANK_APART = 0.1
# fp32, summed over the batch in another order: rounding only
EXACT = 1e-5


def training_for(loss_name, world_size, *flags):
    """train.py's training (resnet18, 16-d, fp32, on the CPU) for loss_name, the same on every rank
    (seed 0); under world_size 2, its ProxyTraining wrapped in DDP. BatchNorm uses its running
    statistics: under DDP the trunk's training BatchNorm normalises each rank's share, which is not
    the loss's doing (the embedding's centring is the global batch's: the test below)."""
    torch.manual_seed(0)
    args = train.parse_args(['--backbone_type', 'resnet18', '--pretrained', 'none', '--feature_dim', str(FEATURE_DIM),
                             '--image_size', str(IMAGE_SIZE), '--loss_name', loss_name, '--amp', 'none',
                             '--device', 'cpu', *flags])
    training = train.build_training(args, NUM_CLASSES, torch.device('cpu'), world_size)
    training.model.eval()
    return training


def batch():
    generator = torch.Generator().manual_seed(1)
    return torch.randn(len(LABELS), 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator), torch.tensor(LABELS)


def gradients(training, images, labels):
    """{'network': every network parameter's gradient, flattened into one vector, 'proxies': the proxies'}."""
    loss, _ = training.trainer(images, labels)
    loss.backward()
    return {'network': torch.cat([p.grad.flatten() for p in training.model.parameters()]),
            'proxies': training.loss_fn.proxies.grad.clone()}


def relative_difference(got, want):
    return float((got - want).norm() / want.norm())


def gradients_on_one_rank(rank):
    """One of two gloo processes, as under torchrun: every loss, on this rank's half of the batch."""
    images, labels = batch()
    half = slice(rank * len(labels) // 2, (rank + 1) * len(labels) // 2)
    return {loss_name: {side: grad.numpy() for side, grad in  # by value: this process ends before it is read
                        gradients(training_for(loss_name, 2), images[half], labels[half]).items()}
            for loss_name in LOSSES}


@pytest.fixture(scope='module')
def two_rank_gradients(tmp_path_factory):
    return on_two_ranks(gradients_on_one_rank, tmp_path_factory.mktemp('gloo'), timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize('loss_name', LOSSES)
def test_two_processes_give_the_network_and_the_proxies_the_gradient_of_the_whole_batch(loss_name,
                                                                                       two_rank_gradients):
    whole = gradients(training_for(loss_name, 1), *batch())
    for rank, results in two_rank_gradients.items():
        for side, want in whole.items():
            difference = relative_difference(torch.from_numpy(results[loss_name][side]), want)
            assert difference < EXACT, f'{loss_name}, rank {rank}, the {side}\'s gradient: {difference:.2e} apart'


@pytest.mark.parametrize('loss_name', ['proxy_anchor', 'positive_proxy_anchor'])
def test_a_per_rank_loss_would_be_told_apart_on_this_batch(loss_name):
    """The batch is one that catches a per-rank loss: the mean of the two halves' Proxy-Anchor
    losses (what DDP's averaging of per-rank losses trains) has gradients far from the whole batch's."""
    images, labels = batch()
    whole = gradients(training_for(loss_name, 1), images, labels)
    training = training_for(loss_name, 1)
    halves = [slice(0, len(labels) // 2), slice(len(labels) // 2, None)]
    (sum(training.trainer(images[half], labels[half])[0] for half in halves) / 2).backward()
    per_rank = {'network': torch.cat([p.grad.flatten() for p in training.model.parameters()]),
                'proxies': training.loss_fn.proxies.grad}
    for side, want in whole.items():
        assert relative_difference(per_rank[side], want) > PER_RANK_APART, side


def centring_training(embedding_norm, world_size):
    """positive_proxy's training with its embedding centred by a BatchNorm (its recipe) or a running
    mean that trains, as in every training step; the trunk's BatchNorm on its running statistics."""
    training = training_for('positive_proxy', world_size, '--embedding_norm', embedding_norm)
    training.model.embedding_norm.train()
    return training


def centred_gradients_on_one_rank(rank):
    images, labels = batch()
    half = slice(rank * len(labels) // 2, (rank + 1) * len(labels) // 2)
    results = {}
    for embedding_norm in CENTRINGS:
        training = centring_training(embedding_norm, 2)
        results[embedding_norm] = {**{side: grad.numpy() for side, grad in
                                      gradients(training, images[half], labels[half]).items()},
                                   'running_mean': training.model.embedding_norm.running_mean.numpy()}
    return results


CENTRINGS = ('batchnorm', 'centre')
# BatchNorm divides by the batch's standard deviation, which magnifies fp32 rounding: 3e-5 measured
# on an Intel Xeon; a per-rank centring (each process's share alone) is 0.59 apart on this batch
CENTRED_EXACT = 1e-4


@pytest.mark.slow
def test_two_processes_centre_the_embeddings_with_the_whole_batch(tmp_path):
    """positive_proxy's default centres its embeddings over the batch: under torchrun over the global
    batch, so the gradients and the running statistics are one process's on the whole batch."""
    two_ranks = on_two_ranks(centred_gradients_on_one_rank, tmp_path)
    for embedding_norm in CENTRINGS:
        training = centring_training(embedding_norm, 1)
        whole = {**gradients(training, *batch()), 'running_mean': training.model.embedding_norm.running_mean}
        for rank, results in two_ranks.items():
            for side, want in whole.items():
                difference = relative_difference(torch.from_numpy(results[embedding_norm][side]), want)
                assert difference < CENTRED_EXACT, f'{embedding_norm}, rank {rank}, {side}: {difference:.2e} apart'
