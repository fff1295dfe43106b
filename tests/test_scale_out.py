"""Scale-out as a user runs it: torchrun with two CPU processes, resuming a killed run, torch.compile,
mixed precision."""
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

import data_utils
import train
from loss import build_loss
from model import Model
from utils import ImageDataset, build_transforms, evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def small_synthetic(tmp_path_factory):
    """5 train and 5 test classes of 10 images at 32 px: seconds per epoch."""
    data_path = str(tmp_path_factory.mktemp('small'))
    data_utils.prepare_synthetic(data_path, num_classes=10, images_per_class=10, image_size=32)
    return data_path


def train_args(data_path, output_dir, *extra):
    # on the CPU even where there is a GPU: gloo processes, and exact (deterministic) float results
    return ['--data_path', data_path, '--data_name', 'synthetic', '--backbone_type', 'resnet18', '--pretrained', 'none',
            '--image_size', '32', '--batch_size', '10', '--lr', '1e-3', '--num_epochs', '3', '--num_workers', '1',
            '--device', 'cpu', '--output_dir', str(output_dir), *extra]


def reembed_test_set(prefix, database):
    """The saved model, loaded into a plain (uncompiled, single-process) Model, embedding the test
    images of the database; checked to give the embeddings the run stored."""
    model = Model('resnet18', 512, pretrained='none')
    model.load_state_dict(torch.load(f'{prefix}_model.pth', weights_only=True)['model'])
    _, test_transform = build_transforms(model.backbone_spec, 32)
    loader = torch.utils.data.DataLoader(
        ImageDataset(database['test_images'], database['test_labels'], test_transform), batch_size=7)
    embeddings = train.embed(model, loader)
    torch.testing.assert_close(embeddings, database['test_embeddings'], atol=1e-5, rtol=1e-4)
    return embeddings


def statistics(output_dir, epochs=3):
    return pd.read_csv(f'{output_dir}/synthetic_resnet18_positive_proxy_512_{epochs}_statistics.csv')


def torchrun(data_path, output_dir, *extra):
    """train.py under `torchrun --nproc_per_node=2`, 2 epochs, as a started process."""
    return subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                             'train.py', *train_args(data_path, output_dir, '--num_epochs', '2', '--num_workers', '0',
                                                     *extra)],
                            cwd=ROOT, env={**os.environ, 'OMP_NUM_THREADS': '1'}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope='module')
def two_process_run(small_synthetic, tmp_path_factory):
    out = tmp_path_factory.mktemp('ddp')
    stdout, stderr = torchrun(small_synthetic, out).communicate(timeout=600)
    return out, stdout, stderr


def small_training(device, amp):
    """resnet18 and positive_proxy as train.py sets them up on `device`, and one batch of 4 images."""
    torch.manual_seed(0)
    network = Model('resnet18', 16, pretrained='none').to(device, memory_format=train.memory_format(device))
    loss_fn = build_loss('positive_proxy', 3, 16).to(device)
    trainer = train.ProxyTraining(network, loss_fn, train.AMP_DTYPES[amp])
    optimizer = train.build_optimizer(network, loss_fn, train.parse_args(['--device', device.type]))
    images = torch.randn(4, 3, 32, 32).to(device, memory_format=train.memory_format(device))
    return trainer, optimizer, [(images, torch.tensor([0, 1, 2, 0], device=device))]


def test_a_run_killed_mid_epoch_and_resumed_ends_like_an_uninterrupted_one(small_synthetic, tmp_path, monkeypatch):
    train.main(train_args(small_synthetic, tmp_path / 'whole'))

    steps = []
    all_finite = train.all_finite

    def killed_in_epoch_2(loss, world_size):  # 5 steps per epoch: the 7th is epoch 2's second
        steps.append(1)
        if len(steps) == 7:
            raise KeyboardInterrupt
        return all_finite(loss, world_size)
    monkeypatch.setattr(train, 'all_finite', killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train.main(train_args(small_synthetic, tmp_path / 'killed'))
    monkeypatch.undo()
    checkpoint = tmp_path / 'killed' / 'synthetic_resnet18_positive_proxy_512_3_checkpoint.pth'
    assert torch.load(checkpoint, weights_only=True)['epoch'] == 1

    train.main(train_args(small_synthetic, tmp_path / 'killed', '--resume', 'auto'))
    resumed, whole = statistics(tmp_path / 'killed'), statistics(tmp_path / 'whole')
    assert resumed['epoch'].tolist() == [0, 1, 2, 3]
    pd.testing.assert_frame_equal(resumed, whole, check_exact=True)


def test_resume_refuses_a_corrupt_or_mismatched_checkpoint(small_synthetic, tmp_path):
    out = tmp_path / 'run'
    train.main(train_args(small_synthetic, out, '--num_epochs', '1'))
    checkpoint = out / 'synthetic_resnet18_positive_proxy_512_1_checkpoint.pth'
    with pytest.raises(ValueError, match=r'--lr 0\.001 there, 0\.01 now'):
        train.main(train_args(small_synthetic, out, '--num_epochs', '1', '--lr', '1e-2', '--resume', 'auto'))
    corrupt = tmp_path / 'corrupt.pth'
    corrupt.write_bytes(checkpoint.read_bytes()[:1000])
    with pytest.raises(ValueError, match='not a readable checkpoint'):
        train.main(train_args(small_synthetic, out, '--num_epochs', '1', '--resume', str(corrupt)))
    with pytest.raises(FileNotFoundError, match='no such checkpoint'):
        train.main(train_args(small_synthetic, out, '--resume', str(tmp_path / 'missing.pth')))
    # and the statistics of the finished run are untouched by the refused attempts
    assert statistics(out, epochs=1)['epoch'].tolist() == [0, 1]


@pytest.mark.slow
def test_two_process_run_evaluates_every_test_image_once_like_a_single_process(small_synthetic, two_process_run):
    out, stdout, stderr = two_process_run
    assert stdout.count('epoch 2/2') == 1, stderr[-3000:]  # finished, and only rank 0 prints
    prefix = out / 'synthetic_resnet18_positive_proxy_512_2'
    database = torch.load(f'{prefix}_data_base.pth', weights_only=True)
    test_split = data_utils.load_splits(small_synthetic, 'synthetic')['test']
    assert database['test_images'] == [path for name in sorted(test_split) for path in test_split[name]]
    assert len(database['test_embeddings']) == len(database['test_images']) == 50

    # a single process re-embeds the test set with the saved model: same embeddings, same metrics
    embeddings = reembed_test_set(prefix, database)
    logged = statistics(out, epochs=2).iloc[-1]
    for metric, value in evaluate(embeddings, database['test_labels']).items():
        assert logged[metric] == pytest.approx(value, abs=1e-6), metric


@pytest.mark.slow
def test_a_killed_two_process_run_resumed_ends_like_an_uninterrupted_one(small_synthetic, two_process_run, tmp_path):
    checkpoint = tmp_path / 'synthetic_resnet18_positive_proxy_512_2_checkpoint.pth'
    job = torchrun(small_synthetic, tmp_path)
    written = set()  # the checkpoint is replaced after every epoch: one modification time each
    while len(written) < 2:  # epochs 0 and 1 done: killed in epoch 2, with a trained network to restore
        assert job.poll() is None, job.communicate()[1][-3000:]
        if checkpoint.exists():
            written.add(checkpoint.stat().st_mtime_ns)
        time.sleep(0.02)
    # SIGTERM, as a scheduler preempts a job: torchrun passes it on to both ranks, which die at once
    job.terminate()
    job.communicate(timeout=60)
    assert torch.load(checkpoint, weights_only=True)['epoch'] == 1

    stdout, stderr = torchrun(small_synthetic, tmp_path, '--resume', 'auto').communicate(timeout=600)
    assert 'resuming from' in stdout and stdout.count('epoch 2/2') == 1, stderr[-3000:]
    pd.testing.assert_frame_equal(statistics(tmp_path, epochs=2), statistics(two_process_run[0], epochs=2),
                                  check_exact=True)


@pytest.mark.slow
def test_a_compiled_run_saves_a_model_that_reloads_uncompiled(small_synthetic, tmp_path):
    train.main(train_args(small_synthetic, tmp_path, '--num_epochs', '1', '--compile'))
    prefix = tmp_path / 'synthetic_resnet18_positive_proxy_512_1'
    reembed_test_set(prefix, torch.load(f'{prefix}_data_base.pth', weights_only=True))


@pytest.mark.parametrize('amp', ['bf16', 'fp16'])
def test_mixed_precision_runs_the_network_in_half_precision_and_the_loss_in_fp32(amp, device):
    trainer, _, [(images, labels)] = small_training(device, amp)
    loss, embeddings = trainer(images, labels)
    assert embeddings.dtype == train.AMP_DTYPES[amp] and loss.dtype == torch.float32
    loss.backward()
    assert trainer.network.refactor.weight.grad.dtype == torch.float32  # master weights stay fp32
    assert torch.isfinite(trainer.loss_fn.proxies.grad).all()


def test_fp16_skips_a_step_whose_gradients_overflow_and_lowers_the_loss_scale(device):
    """train_epoch steps through the GradScaler: an overflowing step leaves every weight and proxy
    as it was (no inf reaches them) and halves the scale; at a sane scale the step is taken."""
    trainer, optimizer, batch = small_training(device, 'fp16')
    before = [parameter.detach().clone() for parameter in trainer.parameters()]
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 40)  # dL/df * 2^40 overflows fp16
    train.train_epoch(trainer, batch, optimizer, scaler, 1, SimpleNamespace(num_epochs=1), 1, False)
    assert scaler.get_scale() == 2.0 ** 39
    assert all(torch.equal(old, new) for old, new in zip(before, trainer.parameters()))

    scaler = torch.amp.GradScaler(device.type, init_scale=1.0)
    train.train_epoch(trainer, batch, optimizer, scaler, 1, SimpleNamespace(num_epochs=1), 1, False)
    assert scaler.get_scale() == 1.0
    for old, new in zip(before, trainer.parameters()):
        assert torch.isfinite(new).all() and not torch.equal(old, new)


def test_fp16_on_the_cpu_is_refused_at_the_command_line(capsys):
    with pytest.raises(SystemExit) as stop:
        train.parse_args(['--amp', 'fp16', '--device', 'cpu'])
    assert stop.value.code == 2 and 'bf16' in capsys.readouterr().err
