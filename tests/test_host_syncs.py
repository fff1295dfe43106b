"""The training step never waits for the device: forward, loss, backward, clipping, the optimizer
step and the epoch's running sums read nothing back to the host (on a GPU each read drains the
queue of work); the sums are read every log_every steps and at the epoch's end, where a non-finite
loss stops the run, and they add up to what per-step reads gave."""
import collections
import contextlib
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import train
from loss import LOSSES

NUM_CLASSES = 5
# the operators that bring a value back to the host: .item() and bool(tensor) (which reach a dispatch
# mode as _local_scalar_dense), nonzero, torch.equal; and those that do on CUDA but inside their
# kernel on the CPU, where a dispatch mode cannot see it: bincount (its largest label), masked_select
# and an index by a boolean mask (their count)
HOST_READS = {'_local_scalar_dense', 'nonzero', 'item', 'is_nonzero', 'equal', 'bincount', 'masked_select'}


def boolean_index(name, args):
    return name == 'index' and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])


class HostReads(TorchDispatchMode):
    """Counts the operators that read the device back (HOST_READS, boolean_index) while it is active."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split('::')[-1]
        if name in HOST_READS or boolean_index(name, args):
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def small_training(loss_name, *flags):
    """resnet18 (16-d) over 5 classes in fp32, on the CPU unless flags say otherwise, with a warm-up
    epoch and gradient clipping, so that a step in epoch 1 and one in epoch 2 take every branch of train.step."""
    torch.manual_seed(0)
    args = train.parse_args(['--backbone_type', 'resnet18', '--pretrained', 'none', '--feature_dim', '16',
                             '--loss_name', loss_name, '--num_epochs', '3', '--device', 'cpu', '--amp', 'none',
                             '--warmup_epochs', '1', '--clip_grad', '1', *flags])
    return train.build_training(args, NUM_CLASSES, torch.device(args.device))


def batches(sizes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 32, 32, generator=generator),
             torch.randint(NUM_CLASSES, (size,), generator=generator)) for size in sizes]


@contextlib.contextmanager
def cuda_syncs_are_errors(device):
    """On CUDA, any call that waits for the GPU raises (torch.cuda.set_sync_debug_mode), whatever operator
    it hides in; on the CPU, nothing."""
    if device.type != 'cuda':
        yield
        return
    torch.cuda.set_sync_debug_mode('error')
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode('default')


@pytest.mark.parametrize('loss_name', LOSSES)
def test_a_training_step_reads_nothing_back_from_the_device(loss_name, device):
    training = small_training(loss_name, '--device', device.type)
    training.trainer.train()
    sums = train.EpochSums(NUM_CLASSES, device, world_size=1, epoch=1)
    loader = [(images.to(device, memory_format=training.memory_format), labels.to(device))
              for images, labels in batches([6, 6, 6])]
    with HostReads() as reads, cuda_syncs_are_errors(device):
        for epoch, (images, labels) in zip((1, 2, 2), loader):  # warm-up, first and later AdamW steps
            sums.add(*train.train_step(training, training.trainer_for(epoch), images, labels), len(labels))
    assert not reads.counts, f'{loss_name}: {dict(reads.counts)}'
    assert training.optimizer.state[training.loss_fn.proxies]['step'] == 3  # it did step


@pytest.mark.parametrize('loss_name', ['positive_proxy', 'proxy_anchor'])
def test_an_epochs_reads_do_not_grow_with_its_steps(loss_name):
    """With log_every beyond the epoch, train_epoch reads the device as often over 2 steps as over 6:
    only at the epoch's end."""
    counts = []
    for steps in (2, 6):
        training = small_training(loss_name)
        with HostReads() as reads:
            train.train_epoch(training, batches([6] * steps), epoch=2, progress=False, log_every=100)
        counts.append(sum(reads.counts.values()))
    assert counts[0] == counts[1], counts


def per_step_reads(training, loader, epoch):
    """The epoch's mean loss and accuracy as the loop computed them before: each step's loss and
    correct count read back at once and summed on the host."""
    total_loss, correct, seen = 0.0, 0, 0
    for images, labels in loader:
        loss, right, _ = train.train_step(training, training.trainer_for(epoch), images, labels)
        total_loss += loss.item() * len(labels)
        correct += right.item()
        seen += len(labels)
    return total_loss / seen, correct / seen


@pytest.mark.parametrize('log_every', [1, 3, 100])
def test_the_epochs_loss_and_accuracy_are_those_of_per_step_reads(log_every):
    loader = batches([6, 4, 6, 5, 6], seed=1)  # uneven batches: the loss is weighted by their sizes
    loss, accuracy, _ = train.train_epoch(small_training('positive_proxy'), loader, epoch=2, progress=False,
                                          log_every=log_every)
    assert (loss, accuracy) == per_step_reads(small_training('positive_proxy'), loader, epoch=2)
    assert 0 < accuracy < 1  # a figure that could be wrong both ways


@pytest.mark.parametrize('log_every,steps', [(2, '3 to 4'), (100, '1 to 5')])
def test_a_non_finite_loss_stops_the_epoch_naming_it_and_its_steps(log_every, steps):
    """A batch of NaN images in step 3: the next read raises FloatingPointError, naming the epoch
    and the steps since the read before (the steps before it were finite, and read so)."""
    loader = batches([6] * 5)
    images, labels = loader[2]
    loader[2] = (torch.full_like(images, float('nan')), labels)
    with pytest.raises(FloatingPointError, match=rf'non-finite in epoch 2, in one of its steps {re.escape(steps)}$'):
        train.train_epoch(small_training('proxy_anchor'), loader, epoch=2, progress=False, log_every=log_every)
