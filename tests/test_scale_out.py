"""Scale-out as a user runs it: torchrun with two CPU processes, resuming a killed run, torch.compile,
mixed precision."""
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

import data_utils
import train
from model import Model, embed_images, preferred_memory_format
from utils import AMP_DTYPES, evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_args(data_path, output_dir, *extra):
    # on the CPU even where there is a GPU: gloo processes, and exact (deterministic) float results
    return ['--data_path', data_path, '--data_name', 'synthetic', '--backbone_type', 'resnet18', '--pretrained', 'none',
            '--image_size', '32', '--batch_size', '10', '--lr', '1e-3', '--num_epochs', '3', '--num_workers', '1',
            '--device', 'cpu', '--output_dir', str(output_dir), *extra]


def prefix_of(argv):
    """Where the files of the run train.py makes from these arguments go: {output_dir}/{run name}."""
    args = train.parse_args(argv)
    return os.path.join(args.output_dir, args.run_name)


def reembed_test_set(prefix, database):
    """The saved model, loaded into a plain (uncompiled, single-process) Model, embedding the test
    images of the database in the run's precision; checked to give the embeddings the run stored,
    to the rounding of that precision."""
    model = Model.from_file(f'{prefix}_model.pth')
    amp = model.run_args['amp']
    embeddings = embed_images(model, database['test_images'], image_size=32, batch_size=7, amp_dtype=AMP_DTYPES[amp])
    torch.testing.assert_close(embeddings, database['test_embeddings'], atol=1e-5 if amp == 'none' else 2e-2, rtol=1e-4)
    return embeddings


def statistics(data_path, output_dir, *extra):
    return pd.read_csv(f'{prefix_of(train_args(data_path, output_dir, *extra))}_statistics.csv')


TWO_PROCESS_RUN = ('--num_epochs', '2', '--num_workers', '0', '--amp', 'none')


def torchrun(data_path, output_dir, *extra):
    """train.py under `torchrun --nproc_per_node=2`, 2 epochs, as a started process; in fp32, whose
    sums the tests compare with a single process's to the last bit."""
    return subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                             'train.py', *train_args(data_path, output_dir, *TWO_PROCESS_RUN, *extra)],
                            cwd=ROOT, env={**os.environ, 'OMP_NUM_THREADS': '1'}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope='module')
def two_process_run(small_synthetic, tmp_path_factory):
    out = tmp_path_factory.mktemp('ddp')
    stdout, stderr = torchrun(small_synthetic, out).communicate(timeout=600)
    return out, stdout, stderr


def small_training(device, amp):
    """resnet18 (16-d) and positive_proxy over 3 classes, as train.py sets them up on `device`, and
    one batch of 4 images."""
    torch.manual_seed(0)
    args = train.parse_args(['--backbone_type', 'resnet18', '--pretrained', 'none', '--feature_dim', '16',
                             '--device', device.type, '--num_epochs', '1'])
    args.amp = amp  # fp16 on the CPU too, which the command line refuses there (it is slow), to test the scaler
    training = train.build_training(args, 3, device)
    images = torch.randn(4, 3, 32, 32).to(device, memory_format=preferred_memory_format(device))
    return training, [(images, torch.tensor([0, 1, 2, 0], device=device))]


def first_batches(loader, n):
    return [batch for batch, _ in zip(loader, range(n))]


@pytest.mark.slow
# --eval_every 2: killed after epoch 1, which it did not evaluate; resumed under another --eval_every,
# which keeps the run (its name, and what its epochs compute) and evaluates epochs 2 and 3 all the same
@pytest.mark.parametrize('flags,resume_flags', [((), ()), (('--eval_every', '2'), ('--eval_every', '1'))])
def test_a_run_killed_mid_epoch_and_resumed_ends_like_an_uninterrupted_one(small_synthetic, tmp_path, monkeypatch,
                                                                         flags, resume_flags):
    train.main(train_args(small_synthetic, tmp_path / 'whole', *flags))

    train_epoch = train.train_epoch

    def killed_in_epoch_2(training, loader, epoch, progress=True):
        if epoch == 2:
            train_epoch(training, first_batches(loader, 2), epoch, progress)  # two steps change the weights...
            raise KeyboardInterrupt  # ...then the job dies, mid-epoch
        return train_epoch(training, loader, epoch, progress)
    monkeypatch.setattr(train, 'train_epoch', killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train.main(train_args(small_synthetic, tmp_path / 'killed', *flags))
    monkeypatch.undo()
    checkpoint = f'{prefix_of(train_args(small_synthetic, tmp_path / "killed"))}_checkpoint.pth'
    assert torch.load(checkpoint, weights_only=True)['epoch'] == 1

    train.main(train_args(small_synthetic, tmp_path / 'killed', *resume_flags, '--resume', 'auto'))
    resumed = statistics(small_synthetic, tmp_path / 'killed')
    whole = statistics(small_synthetic, tmp_path / 'whole')
    assert resumed['epoch'].tolist() == [0, 1, 2, 3]
    pd.testing.assert_frame_equal(resumed, whole, check_exact=True)


@pytest.mark.slow
def test_resume_refuses_a_corrupt_or_mismatched_checkpoint(small_synthetic, tmp_path):
    out = tmp_path / 'run'
    train.main(train_args(small_synthetic, out, '--num_epochs', '1', '--keep_checkpoint'))
    checkpoint = f'{prefix_of(train_args(small_synthetic, out, "--num_epochs", "1"))}_checkpoint.pth'
    with pytest.raises(ValueError, match=r'--lr 0\.001 there, 0\.01 now'):
        train.main(train_args(small_synthetic, out, '--num_epochs', '1', '--lr', '1e-2', '--resume', checkpoint))
    corrupt = tmp_path / 'corrupt.pth'
    with open(checkpoint, 'rb') as f:
        corrupt.write_bytes(f.read()[:1000])
    with pytest.raises(ValueError, match='not a checkpoint written by train.py'):
        train.main(train_args(small_synthetic, out, '--num_epochs', '1', '--resume', str(corrupt)))
    with pytest.raises(FileNotFoundError, match='no such checkpoint'):
        train.main(train_args(small_synthetic, out, '--resume', str(tmp_path / 'missing.pth')))
    # and the statistics of the finished run are untouched by the refused attempts
    assert statistics(small_synthetic, out, '--num_epochs', '1')['epoch'].tolist() == [0, 1]


@pytest.mark.slow
def test_two_process_run_evaluates_every_test_image_once_like_a_single_process(small_synthetic, two_process_run):
    out, stdout, stderr = two_process_run
    assert stdout.count('epoch 2/2') == 1, stderr[-3000:]  # finished, and only rank 0 prints
    prefix = prefix_of(train_args(small_synthetic, out, *TWO_PROCESS_RUN))
    database = torch.load(f'{prefix}_data_base.pth', weights_only=True)
    test_split = data_utils.load_splits(small_synthetic, 'synthetic')['test']
    assert database['test_images'] == [path for name in sorted(test_split) for path in test_split[name]]
    assert len(database['test_embeddings']) == len(database['test_images']) == 50

    # a single process re-embeds the test set with the saved model: same embeddings, same metrics
    embeddings = reembed_test_set(prefix, database)
    logged = statistics(small_synthetic, out, *TWO_PROCESS_RUN).iloc[-1]
    for metric, value in evaluate(embeddings, database['test_labels']).items():
        assert logged[metric] == pytest.approx(value, abs=1e-6), metric


@pytest.mark.slow
def test_a_killed_two_process_run_resumed_ends_like_an_uninterrupted_one(small_synthetic, two_process_run, tmp_path):
    checkpoint = f'{prefix_of(train_args(small_synthetic, tmp_path, *TWO_PROCESS_RUN))}_checkpoint.pth'
    job = torchrun(small_synthetic, tmp_path)
    # rank 0 prints an epoch's line once its files, the checkpoint last, are written:
    # after epoch 1's line the job is killed in epoch 2, with a trained network to restore
    for line in job.stdout:
        if line.startswith('epoch 1/2'):
            break
    else:
        pytest.fail(f'the job ended before epoch 1: {job.communicate()[1][-3000:]}')
    # SIGTERM, as a scheduler preempts a job: torchrun passes it on to both ranks, which die at once
    job.terminate()
    job.communicate(timeout=60)
    assert torch.load(checkpoint, weights_only=True)['epoch'] == 1

    stdout, stderr = torchrun(small_synthetic, tmp_path, '--resume', 'auto').communicate(timeout=600)
    assert 'resuming from' in stdout and stdout.count('epoch 2/2') == 1, stderr[-3000:]
    pd.testing.assert_frame_equal(statistics(small_synthetic, tmp_path, *TWO_PROCESS_RUN),
                                  statistics(small_synthetic, two_process_run[0], *TWO_PROCESS_RUN),
                                  check_exact=True)


@pytest.mark.slow
def test_a_compiled_run_saves_a_model_that_reloads_uncompiled(small_synthetic, tmp_path):
    argv = train_args(small_synthetic, tmp_path, '--num_epochs', '1', '--compile')
    train.main(argv)
    prefix = prefix_of(argv)
    reembed_test_set(prefix, torch.load(f'{prefix}_data_base.pth', weights_only=True))


@pytest.mark.parametrize('amp', ['bf16', 'fp16'])
def test_mixed_precision_runs_the_network_in_half_precision_and_the_loss_in_fp32(amp, device):
    training, [(images, labels)] = small_training(device, amp)
    head = []
    training.model.refactor.register_forward_hook(lambda module, inputs, output: head.append(output.dtype))
    loss, embeddings = training.trainer(images, labels)
    assert head == [train.AMP_DTYPES[amp]]  # the network in half precision...
    assert embeddings.dtype == loss.dtype == torch.float32  # ...its normalisation and the loss in fp32
    loss.backward()
    assert training.model.refactor.weight.grad.dtype == torch.float32  # master weights stay fp32
    assert torch.isfinite(training.loss_fn.proxies.grad).all()


# the skipped step leaves the epoch's schedule step first, which torch warns of; here it is the point
@pytest.mark.filterwarnings('ignore:Detected call of `lr_scheduler.step\\(\\)` before')
def test_fp16_skips_a_step_whose_gradients_overflow_and_lowers_the_loss_scale(device):
    """train_epoch steps through the GradScaler: an overflowing step leaves every weight and proxy
    as it was (no inf reaches them) and halves the scale; at a sane scale the step is taken."""
    training, batch = small_training(device, 'fp16')
    before = [parameter.detach().clone() for parameter in training.trainer.parameters()]
    training.scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 40)  # dL/df * 2^40 overflows fp16
    train.train_epoch(training, batch, epoch=1, progress=False)
    assert training.scaler.get_scale() == 2.0 ** 39
    assert all(torch.equal(old, new) for old, new in zip(before, training.trainer.parameters()))

    training.scaler = torch.amp.GradScaler(device.type, init_scale=1.0)
    train.train_epoch(training, batch, epoch=1, progress=False)
    assert training.scaler.get_scale() == 1.0
    for old, new in zip(before, training.trainer.parameters()):
        assert torch.isfinite(new).all() and not torch.equal(old, new)


def test_fp16_on_the_cpu_is_refused_at_the_command_line(capsys):
    with pytest.raises(SystemExit) as stop:
        train.parse_args(['--amp', 'fp16', '--device', 'cpu'])
    assert stop.value.code == 2 and 'bf16' in capsys.readouterr().err
