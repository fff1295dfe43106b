"""What a run does differently on a GPU, checked on the CPU where it can be: --amp auto's choice on
every kind of device, the gradient scaler's step, the fast CUDA kernels and the full-fp32 metrics
beside them, the metrics measured once (on rank 0), and --eval_every."""
import dataclasses
import types

import numpy as np
import pandas as pd
import pytest
import torch

import report
import train
import utils
from conftest import on_two_ranks
from data_utils import load_splits
from test_scale_out import small_training, statistics, train_args

# -----------------------------------------------------------------------------
# --amp auto


@pytest.mark.parametrize('name,device,in_hardware,pays_on_cpu,amp', [
    ('auto', 'cuda', True, True, 'bf16'),  # A100, H100
    ('auto', 'cuda', False, True, 'fp16'),  # V100, T4: fp16 with the gradient scaler
    ('auto', 'cuda', True, False, 'bf16'),  # what pays on a CPU says nothing of a GPU
    ('auto', 'cpu', True, True, 'bf16'),  # AVX-512 BF16 or AMX
    ('auto', 'cpu', True, False, 'none'),  # a backbone that trains no faster in bf16 at this size
    ('auto', 'cpu', False, True, 'none'),  # no fp16 on a CPU
    ('none', 'cuda', True, True, 'none'),  # asked for: as asked
    ('bf16', 'cuda', False, True, 'bf16'),
    ('fp16', 'cuda', True, True, 'fp16'),
    ('bf16', 'cpu', False, True, 'bf16'),
])
def test_amp_auto_takes_bf16_where_computed_in_hardware_fp16_on_gpus_without_it_else_fp32(
        name, device, in_hardware, pays_on_cpu, amp):
    assert utils.resolve_amp(name, device, pays_on_cpu, bf16_in_hardware=in_hardware) == amp


def test_amp_auto_asks_the_device_itself_unless_told():
    assert utils.resolve_amp('auto', 'cpu') == utils.resolve_amp('auto', 'cpu', bf16_in_hardware=utils.computes_bf16('cpu'))


def parameters_after_a_clipped_step(scaler):
    """resnet18's weights and proxies after one fp32 step clipped to a norm far below the gradient's, the
    step taken through `scaler`."""
    training, [(images, labels)] = small_training(torch.device('cpu'), 'none')
    training = dataclasses.replace(training, scaler=scaler, clip_grad=1e-3)
    train.train_step(training, training.trainer, images, labels)
    return [parameter.detach().clone() for parameter in training.trainer.parameters()]


def test_a_scaled_step_clips_and_updates_as_an_unscaled_one():
    """fp16's path (train.step: unscale, clip, step) with a power-of-two scale is exact in fp32: the same
    weights as without a scaler. Clipping the still-scaled gradient would clip it 2^16 times harder, and
    AdamW's epsilon would then dominate the update."""
    plain = parameters_after_a_clipped_step(torch.amp.GradScaler('cpu', enabled=False))
    scaled = parameters_after_a_clipped_step(torch.amp.GradScaler('cpu', init_scale=2.0 ** 16))
    for want, got in zip(plain, scaled):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)

# -----------------------------------------------------------------------------
# cuDNN autotuning and TF32 for training, full fp32 for the metrics


def precision_flags():
    return {'benchmark': torch.backends.cudnn.benchmark, 'matmul': torch.get_float32_matmul_precision(),
            'cuda matmul': torch.backends.cuda.matmul.fp32_precision}


@pytest.fixture
def restored_precision_flags():
    """The flags as they were before the test: they are global to the process, which runs other tests."""
    matmul, benchmark = torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark
    yield
    torch.set_float32_matmul_precision(matmul)
    torch.backends.cudnn.benchmark = benchmark


def test_fast_cuda_kernels_change_nothing_on_a_cpu(restored_precision_flags):
    before = precision_flags()
    train.use_fast_cuda_kernels(torch.device('cpu'))
    assert precision_flags() == before


def test_fast_cuda_kernels_autotune_cudnn_and_run_fp32_in_tf32(restored_precision_flags):
    """On the CPU too: the flags are settable on every build (they act on CUDA devices only)."""
    train.use_fast_cuda_kernels(torch.device('cuda'))
    assert torch.backends.cudnn.benchmark
    assert torch.backends.cuda.matmul.fp32_precision == 'tf32'
    # torch.compile's Inductor reads the precision back: it must stay readable
    assert torch.get_float32_matmul_precision() == 'high'


def test_the_metrics_are_measured_in_full_fp32_while_training_runs_in_tf32(restored_precision_flags, device):
    """train.measure under the flags use_fast_cuda_kernels sets: the metrics of full fp32, every matrix
    product inside in IEEE fp32 (read where the diagnostics read the proxies), the flags as they were after."""
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(300, 32, generator=generator), dim=1).to(device)
    labels = torch.arange(300) % 10
    args = train.parse_args(['--device', 'cpu', '--metrics', 'recall,map@r,r_precision'])
    data = types.SimpleNamespace(labels={'test': labels.tolist(), 'query': []})
    seen = []

    class Proxies:
        @property
        def proxies(self):
            seen.append((torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.fp32_precision))
            return embeddings[:10]
    training = types.SimpleNamespace(loss_fn=Proxies())
    exact = train.measure(training, data, {'test': embeddings}, args)
    train.use_fast_cuda_kernels(torch.device('cuda'))
    flags = precision_flags()
    assert train.measure(training, data, {'test': embeddings}, args) == exact
    assert seen[-1] == ('highest', 'ieee')
    assert precision_flags() == flags

# -----------------------------------------------------------------------------
# the metrics, measured on rank 0 alone


def embedded_epoch(rank, data_path, world_size):
    """evaluate_epoch of epoch 1 of a small run on one of world_size ranks (the same network on
    every one): (how often it measured, its metrics and diagnostics)."""
    args = train.parse_args(train_args(data_path, 'unused', '--num_workers', '0', '--amp', 'none'))
    data = utils.RetrievalData.from_splits(load_splits(data_path, 'synthetic'))
    torch.manual_seed(args.seed)
    training = train.build_training(args, len(data.train_classes), torch.device('cpu'), world_size)
    args.metrics = list(utils.METRICS)
    _, loaders = train.build_loaders(data, training, args, torch.device('cpu'), rank, world_size)
    measured = []

    def counted(*measure_args):
        measured.append(True)
        return train.measure(*measure_args)
    _, metrics, diagnostics = train.evaluate_epoch(training, loaders, data, args, 1, rank == 0, counted)
    return len(measured), metrics, diagnostics


@pytest.mark.slow
def test_two_ranks_embed_together_and_rank_0_alone_measures_what_one_process_does(small_synthetic, tmp_path):
    ranks = on_two_ranks(embedded_epoch, tmp_path, small_synthetic, 2)
    alone = embedded_epoch(0, small_synthetic, 1)
    assert [ranks[rank][0] for rank in (0, 1)] == [1, 0]
    assert ranks[1][1:] == ({}, {})
    assert alone[0] == 1 and set(alone[1]) == {'recall@1', 'recall@2', 'recall@4', 'recall@8', 'map@r',
                                               'r_precision', 'nmi'}
    for got, want in zip(ranks[0][1:], alone[1:]):
        assert got == pytest.approx(want, abs=1e-6)

# -----------------------------------------------------------------------------
# --eval_every


def test_eval_every_picks_every_nth_epoch_and_always_the_first_and_the_last():
    def picked(num_epochs, eval_every):
        args = train.parse_args(['--device', 'cpu', '--num_epochs', str(num_epochs), '--eval_every', str(eval_every)])
        return [epoch for epoch in range(num_epochs + 1) if train.evaluated(epoch, args)]
    assert picked(3, 1) == [0, 1, 2, 3]
    assert picked(3, 2) == [0, 2, 3]
    assert picked(10, 4) == [0, 4, 8, 10]
    assert picked(2, 5) == [0, 2]


def test_eval_every_keeps_the_run_name_so_a_run_resumes_under_another():
    plain = train.parse_args(['--device', 'cpu'])
    assert train.parse_args(['--device', 'cpu', '--eval_every', '3']).run_name == plain.run_name


@pytest.mark.slow
def test_skipped_epochs_train_as_evaluated_ones_and_leave_their_metrics_empty(small_synthetic, tmp_path, capsys):
    train.main(train_args(small_synthetic, tmp_path / 'every'))
    train.main(train_args(small_synthetic, tmp_path / 'second', '--eval_every', '2'))
    assert 'epoch 1/3' in (printed := capsys.readouterr().out) and 'not evaluated (--eval_every)' in printed
    every, second = statistics(small_synthetic, tmp_path / 'every'), statistics(small_synthetic, tmp_path / 'second')
    assert every.columns.tolist() == second.columns.tolist()
    measured = [column for column in utils.metric_columns([second]) + utils.diagnostic_columns([second])
                if column != 'proxies_updated']
    assert second.loc[second['epoch'] == 1, measured].isna().all(axis=None)
    assert second.loc[second['epoch'] != 1, measured].notna().all(axis=None)
    # the evaluation does not change the training: the same losses, and the same metrics where both evaluated
    pd.testing.assert_frame_equal(second.drop(columns=measured), every.drop(columns=measured), check_exact=True)
    pd.testing.assert_frame_equal(second.drop(index=1), every.drop(index=1), check_exact=True)


def test_the_figure_joins_the_evaluated_epochs_across_the_skipped_ones(tmp_path):
    nan = float('nan')
    table = pd.DataFrame({'epoch': [0, 1, 2, 3], 'loss': [nan, 2.0, 1.5, 1.2], 'accuracy': [nan, 0.2, 0.4, 0.5],
                          'recall@1': [0.3, nan, 0.7, 0.6], 'proxy_cosine_mean': [0.1, nan, 0.2, 0.3],
                          'proxies_updated': [nan, 1.0, 1.0, 1.0]})
    fig = utils.plot_statistics(table, str(tmp_path / 'run_results.png'))
    lines = {ax.get_ylabel(): ax.get_lines()[0] for ax in fig.axes if ax.get_visible()}
    np.testing.assert_array_equal(lines['R@1 (%)'].get_xdata(), [0, 2, 3])  # one line, no gap at epoch 1
    np.testing.assert_allclose(lines['R@1 (%)'].get_ydata(), [30, 70, 60])
    np.testing.assert_array_equal(lines['proxy cos, mean'].get_xdata(), [0, 2, 3])
    np.testing.assert_array_equal(lines['training loss'].get_xdata(), [1, 2, 3])


def test_the_report_reads_the_last_evaluated_epoch_as_final_and_refuses_a_skipped_one(tmp_path):
    nan = float('nan')
    path = tmp_path / 'run_statistics.csv'
    pd.DataFrame({'epoch': [0, 1, 2, 3], 'loss': [nan, 2.0, 1.5, 1.2], 'accuracy': [nan, 0.2, 0.4, 0.5],
                  'recall@1': [0.3, 0.5, 0.7, nan]}).to_csv(path, index=False)  # a run still training epoch 4
    runs = report.read_statistics([str(path)])
    assert '| run | 2 / 2 | 70.0 / 70.0 |' in report.results_table(runs)
    with pytest.raises(ValueError, match=r'did not evaluate epoch 3 \(train.py --eval_every\); it evaluated 0, 1, 2'):
        report.results_table(runs, epoch=3)
