"""Precision and layout as a user meets them: --amp auto runs bf16 where the hardware computes it,
bf16 embeddings rank the synthetic test classes as fp32 ones do, channels-last changes nothing but the speed,
and a run begun before --amp auto was the default is continued by its own command as it began, never
written over by a fresh one."""
import json
import os

import pandas as pd
import pytest
import torch

import data_utils
import train
from model import Model, backbone_spec, embed, embed_images, preferred_memory_format
from test_scale_out import first_batches, train_args
from utils import AMP_DTYPES, RetrievalData, computes_bf16, evaluate, precision_label, resolve_amp

CPU = torch.device('cpu')


def cpu_flags():
    try:
        with open('/proc/cpuinfo') as f:
            return set(next(line for line in f if line.startswith('flags')).split(':', 1)[1].split())
    except (OSError, StopIteration):
        pytest.skip('the CPU flags are read from /proc/cpuinfo, which only Linux has')


def test_amp_auto_is_bf16_on_exactly_the_cpus_with_bf16_instructions():
    has_bf16 = bool({'avx512_bf16', 'amx_bf16'} & cpu_flags())
    assert computes_bf16('cpu') == has_bf16
    assert resolve_amp('auto', 'cpu') == ('bf16' if has_bf16 else 'none')
    assert [resolve_amp(amp, 'cpu') for amp in ('none', 'bf16')] == ['none', 'bf16']  # asked for: as asked
    with pytest.raises(ValueError, match='--amp fp16 is for CUDA'):
        resolve_amp('fp16', 'cpu')


def test_amp_auto_trains_lite0_in_bf16_from_its_native_size_on_and_in_fp32_below_it():
    bf16 = 'bf16' if computes_bf16('cpu') else 'none'

    def chosen(backbone, image_size, amp_default='auto'):
        return train.parse_args(['--backbone_type', backbone, '--image_size', str(image_size), '--device', 'cpu'],
                                amp_default=amp_default)
    assert [chosen('resnet50', size).amp for size in (96, 224)] == [bf16, bf16]
    assert [chosen('efficientnet_lite0', size).amp for size in (96, 160, 224)] == ['none', 'none', bf16]
    # a default run keeps the name it had when fp32 was the default, at every size
    assert chosen('efficientnet_lite0', 224).run_name == 'car_efficientnet_lite0_positive_proxy_512_20_seed0'
    assert chosen('efficientnet_lite0', 96).run_name == chosen('efficientnet_lite0', 96, amp_default='none').run_name


def test_cnns_run_channels_last_on_the_cpu_with_the_embeddings_of_the_contiguous_layout():
    assert preferred_memory_format(CPU, backbone_spec('resnet18')) == torch.channels_last
    assert preferred_memory_format(CPU, backbone_spec('timm:vit_small_patch16_224')) == torch.contiguous_format
    torch.manual_seed(0)
    model = Model('resnet18', 16, 'none').eval()
    images = torch.randn(6, 3, 64, 64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.zeros(6)), batch_size=3)
    contiguous = embed(model, loader, progress=False, memory_format=torch.contiguous_format)
    channels_last = embed(model, loader, progress=False, memory_format=torch.channels_last)
    torch.testing.assert_close(channels_last, contiguous, atol=1e-5, rtol=1e-4)


def test_bf16_embeddings_give_the_recall_of_fp32_ones_on_the_synthetic_test_classes(trained_run, tmp_path):
    # 80 images of each of the 50 test classes (the default set's 20 among them, the same images):
    # bf16 reorders a few near-tied neighbours either way: on 1,000 queries that chance alone moves
    # Recall@K by up to 0.6 points, on 4,000 by half as much, so there half a point measures bf16
    data_utils.prepare_synthetic(str(tmp_path), images_per_class=80)
    paths, labels = RetrievalData.from_splits(data_utils.load_splits(str(tmp_path), 'synthetic')).split('test')
    model = Model.from_file(f'{trained_run["prefix"]}_model.pth')
    recalls = {}
    for amp in ('none', 'bf16'):
        embeddings = embed_images(model, paths, trained_run['args'].image_size, 256, progress=False,
                                  amp_dtype=AMP_DTYPES[amp])
        recalls[amp] = evaluate(embeddings, labels, metrics=['recall'])
    assert len(paths) == 4000 and recalls['none']['recall@1'] > 0.3  # a trained network, whose ranking can move
    for k, fp32 in recalls['none'].items():
        assert abs(recalls['bf16'][k] - fp32) <= 0.005, k  # half a point


def killed_in_epoch_2(monkeypatch):
    """train.py dies in its second epoch, after the files of the first are written."""
    train_epoch = train.train_epoch

    def dying(training, loader, epoch, progress=True):
        if epoch == 2:
            train_epoch(training, first_batches(loader, 1), epoch, progress)
            raise KeyboardInterrupt
        return train_epoch(training, loader, epoch, progress)
    monkeypatch.setattr(train, 'train_epoch', dying)


@pytest.mark.parametrize('flags', [[], ['--amp', 'none'], ['--amp', 'bf16']], ids=['default', 'none', 'bf16'])
def test_a_run_from_before_amp_auto_is_continued_by_its_command_in_its_precision(small_synthetic, tmp_path, flags,
                                                                                   monkeypatch, capsys):
    argv = train_args(small_synthetic, tmp_path, '--num_epochs', '2', *flags)
    # the run as the code before --amp auto wrote it (the default was none), killed in epoch 2
    killed_in_epoch_2(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train.main(argv, amp_default='none')
    monkeypatch.undo()
    before = train.parse_args(argv, amp_default='none')
    capsys.readouterr()

    train.main([*argv, '--resume', 'auto'])  # the same command today
    began_in = {'none': 'fp32', 'bf16': 'bf16'}[before.amp]
    assert f' in {began_in} (--amp)' in capsys.readouterr().out  # printed at the start
    assert {name.split('_statistics')[0] for name in os.listdir(tmp_path) if name.endswith('.csv')} == {before.run_name}
    assert pd.read_csv(tmp_path / f'{before.run_name}_statistics.csv')['epoch'].tolist() == [0, 1, 2]
    with open(tmp_path / f'{before.run_name}_args.json') as f:
        assert json.load(f)['amp'] == before.amp  # and stored in the run's arguments


def test_a_fresh_run_does_not_write_over_a_run_of_its_name_trained_in_another_precision(small_synthetic, tmp_path,
                                                                                        capsys):
    argv = train_args(small_synthetic, tmp_path, '--num_epochs', '1')
    today, name = train.parse_args(argv).amp, train.parse_args(argv).run_name
    # the run as the other default wrote it: on a CPU with bf16, fp32, as before --amp auto was the default
    other = {'bf16': 'none', 'none': 'bf16'}[today]
    train.main(argv, amp_default=other)
    assert train.parse_args(argv, amp_default=other).run_name == name  # the same name, the other precision
    files = {file: (tmp_path / file).read_bytes() for file in os.listdir(tmp_path)}

    with pytest.raises(ValueError, match=f'hold a run trained in {precision_label(other)}, and this one trains in '
                                         f'{precision_label(today)}: continue that run with --resume auto'):
        train.main(argv)
    assert {file: (tmp_path / file).read_bytes() for file in os.listdir(tmp_path)} == files  # nothing written
    capsys.readouterr()
    train.main([*argv, '--resume', 'auto'])  # as the message says: it continues in its own precision
    assert f'began in {precision_label(other)} and continues so' in capsys.readouterr().out
