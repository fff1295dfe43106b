"""The warm-up epochs (--warmup_epochs): the trunk holds still outside autograd, the head and the
proxies get the gradients a full backward gives them, on one process and on two."""
import io

import pytest
import torch
import torchvision

import train
from conftest import on_two_ranks

C = 3  # classes
LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])


def warmup_training(device, *flags, world_size=1):
    """resnet18 (16-d) as train.py builds it with one warm-up epoch, on `device`, in fp32, for one
    of world_size ranks; the same weights and proxies at every call."""
    torch.manual_seed(0)
    args = train.parse_args(['--backbone_type', 'resnet18', '--pretrained', 'none', '--feature_dim', '16',
                             '--image_size', '32', '--amp', 'none', '--device', device.type, '--warmup_epochs', '1',
                             *flags])
    return train.build_training(args, C, device, world_size)


def batch(device):
    images = torch.randn(len(LABELS), 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return images.to(device, memory_format=train.preferred_memory_format(device)), LABELS.to(device)


def head(training):
    """{name: gradient} of everything but the trunk: the embedding head and the proxies."""
    named = [*training.model.named_parameters(), *training.loss_fn.named_parameters()]
    return {name: parameter.grad for name, parameter in named if not name.startswith('trunk.')}


@pytest.mark.parametrize('loss_name', ['proxy_anchor', 'normalized_softmax'])
def test_a_warm_up_step_gives_the_head_and_proxies_the_full_gradient_and_leaves_the_trunk_alone(loss_name, device):
    """One train_epoch step in the warm-up (epoch 1) and one after it (epoch 2), from the same
    weights on the same batch. --pretrained none: the trunk's BatchNorm layers train, and must
    move their statistics in the warm-up as they do after it."""
    warming, full = warmup_training(device, '--loss_name', loss_name), warmup_training(device, '--loss_name', loss_name)
    trunk_before = [parameter.detach().clone() for parameter in warming.model.trunk.parameters()]
    train.train_epoch(warming, [batch(device)], epoch=1, progress=False)
    train.train_epoch(full, [batch(device)], epoch=2, progress=False)

    for name, gradient in head(warming).items():
        torch.testing.assert_close(gradient, head(full)[name], msg=lambda m: f'{name}: {m}')
    assert all(parameter.grad is None for parameter in warming.model.trunk.parameters())
    assert all(torch.equal(old, new) for old, new in zip(trunk_before, warming.model.trunk.parameters()))
    assert all(parameter.grad is not None for parameter in full.model.trunk.parameters())
    for (name, statistic), moved in zip(warming.model.trunk.named_buffers(), full.model.trunk.buffers()):
        torch.testing.assert_close(statistic, moved, msg=lambda m: f'{name}: {m}')
    # the next epoch trains the trunk again
    train.train_epoch(warming, [batch(device)], epoch=2, progress=False)
    assert not any(torch.equal(old, new) for old, new in zip(trunk_before, warming.model.trunk.parameters()))


@pytest.mark.parametrize('warmup_epochs', ['1', '2'])  # resumed after the warm-up, and inside it
def test_a_run_resumed_after_epoch_1_trains_on_as_an_uninterrupted_one(warmup_epochs):
    """Epochs 1 to 3 in one go, against epoch 1, its state through a checkpoint's bytes into a
    freshly built Training (as --resume builds it), then epochs 2 and 3: the same weights, to the bit."""
    def trained(training, epochs):
        for epoch in epochs:
            train.train_epoch(training, [batch(torch.device('cpu'))], epoch, progress=False)
        return training
    cpu = torch.device('cpu')
    uninterrupted = trained(warmup_training(cpu, '--warmup_epochs', warmup_epochs), (1, 2, 3))
    checkpoint = io.BytesIO()
    torch.save(trained(warmup_training(cpu, '--warmup_epochs', warmup_epochs), (1,)).state_dict(), checkpoint)
    resumed = warmup_training(cpu, '--warmup_epochs', warmup_epochs)
    checkpoint.seek(0)
    resumed.load_state_dict(torch.load(checkpoint, weights_only=True))
    trained(resumed, (2, 3))
    after_resume = resumed.trainer.state_dict()
    for name, weight in uninterrupted.trainer.state_dict().items():
        assert torch.equal(weight, after_resume[name]), name


def test_the_warm_up_records_no_graph_through_the_trunk(device):
    training = warmup_training(device)
    outputs = []
    training.model.trunk.register_forward_hook(lambda module, inputs, output: outputs.append(output))
    for epoch in (1, 2):
        training.trainer_for(epoch)(*batch(device))
    warm_up, after = outputs
    assert warm_up.grad_fn is None and not warm_up.requires_grad
    assert after.grad_fn is not None

# -----------------------------------------------------------------------------
# under DDP


def save_pretrained_weights(path):
    """A resnet18 state dict in the official file's format: with --pretrained PATH the trunk's
    BatchNorm statistics are frozen (the fine-tuning recipe), so an image's embedding does not depend
    on the others in its batch, and a half batch's gradients average to the whole batch's."""
    torch.manual_seed(2)
    torch.save(torchvision.models.resnet18().state_dict(), path)


def warm_up_then_train(training, images, labels):
    """The gradients of the head and proxies after a warm-up step (epoch 1), then every gradient
    after a normal step (epoch 2), each read after its train_epoch; and whether the warm-up left
    every trunk gradient None."""
    train.train_epoch(training, [(images, labels)], epoch=1, progress=False)
    warm_up = {name: gradient.clone() for name, gradient in head(training).items()}
    trunk_untouched = all(parameter.grad is None for parameter in training.model.trunk.parameters())
    train.train_epoch(training, [(images, labels)], epoch=2, progress=False)
    named = [*training.model.named_parameters(), *training.loss_fn.named_parameters()]
    return warm_up, {name: parameter.grad for name, parameter in named}, trunk_untouched


def rank_gradients(rank, weights):
    """One of two torchrun ranks, with its half of the batch."""
    training = warmup_training(torch.device('cpu'), '--loss_name', 'normalized_softmax', '--pretrained', str(weights),
                               world_size=2)
    images, labels = batch(torch.device('cpu'))
    half = slice(rank * len(labels) // 2, (rank + 1) * len(labels) // 2)
    return warm_up_then_train(training, images[half], labels[half])


@pytest.mark.slow
def test_two_processes_warm_up_with_the_gradients_of_one_process_on_the_whole_batch(tmp_path):
    """normalized_softmax, whose DDP gradient is the whole batch's: the warm-up's own DDP wrapper
    reduces the head's and proxies' gradients as the full one does, and training goes on after it
    (the full wrapper's reducer is not left waiting)."""
    weights = tmp_path / 'resnet18.pth'
    save_pretrained_weights(weights)
    ranks = on_two_ranks(rank_gradients, tmp_path, weights)
    whole = warm_up_then_train(warmup_training(torch.device('cpu'), '--loss_name', 'normalized_softmax',
                                               '--pretrained', str(weights)), *batch(torch.device('cpu')))
    for rank, (warm_up, trained, trunk_untouched) in ranks.items():
        assert trunk_untouched, rank
        for name, gradient in warm_up.items():
            torch.testing.assert_close(gradient, whole[0][name], msg=lambda m: f'rank {rank}, warm-up, {name}: {m}')
        for name, gradient in trained.items():
            torch.testing.assert_close(gradient, whole[1][name], msg=lambda m: f'rank {rank}, epoch 2, {name}: {m}')
