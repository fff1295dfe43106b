"""Studies across seeds: `python report.py table` and `plot --mean_over_seeds` group the runs whose names
differ only in their _seed{N} tail."""
import json

import numpy as np
import pandas as pd
import pytest

import report
import utils
from test_plots import assert_png_and_pdf

NAN = float('nan')
PREFIX = 'synthetic_resnet18_positive_proxy_512_2_a1b2c3'  # a run name before its seed tail


def statistics(r1, map_r, epochs=2):
    """A statistics table whose metrics end at r1 and map_r (fractions) at its final epoch."""
    return pd.DataFrame({'epoch': list(range(epochs + 1)), 'loss': [NAN] + [1.0] * epochs,
                         'accuracy': [NAN] + [0.5] * epochs, 'recall@1': [0.3] * epochs + [r1],
                         'map@r': [0.1] * epochs + [map_r]})


SEEDS = {f'{PREFIX}_seed{seed}': statistics(r1, map_r) for seed, (r1, map_r) in
         enumerate([(0.50, 0.20), (0.55, 0.25), (0.60, 0.30)])}


def write_runs(tmp_path, runs):
    paths = []
    for label, table in runs.items():
        paths.append(str(tmp_path / f'{label}_statistics.csv'))
        table.to_csv(paths[-1], index=False)
    return paths


def table_lines(runs):
    return report.results_table(runs).splitlines()


def test_seed_group_is_the_run_name_without_its_seed_tail():
    assert utils.seed_group(f'{PREFIX}_seed12') == PREFIX
    assert utils.seed_group('car_resnet50_positive_proxy_512_20') == 'car_resnet50_positive_proxy_512_20'
    assert utils.seed_group('my_seed7_photos_resnet18_positive_proxy_512_1_seed0') == \
        'my_seed7_photos_resnet18_positive_proxy_512_1'


def test_table_gives_mean_and_std_at_the_final_epoch_under_the_runs_of_a_group():
    lines = table_lines(SEEDS)
    assert [line.split(' | ')[0] for line in lines[2:6]] == [f'| {label}' for label in SEEDS] + \
        [f'| {PREFIX} (mean ± std, n=3 seeds)']
    # R@1 0.50, 0.55, 0.60: mean 55.0 %, sample std 5.0 %; MAP@R 20, 25, 30 %: 25.0 ± 5.0
    assert lines[5] == f'| {PREFIX} (mean ± std, n=3 seeds) | final 2 | 55.0 ± 5.0 | 25.0 ± 5.0 |'
    assert 'sample standard deviation (n − 1)' in lines[-1]


def test_runs_with_other_arguments_or_without_partners_are_not_averaged():
    other = {f'synthetic_resnet18_positive_proxy_512_2_d4e5f6_seed{seed}': statistics(0.9, 0.9) for seed in (0, 1)}
    alone = {'cub_resnet50_positive_proxy_512_20_seed0': statistics(0.7, 0.4)}
    lines = table_lines({**SEEDS, **alone, **other})
    summaries = [line for line in lines if 'mean ± std' in line and line.startswith('|')]
    assert summaries == [f'| {PREFIX} (mean ± std, n=3 seeds) | final 2 | 55.0 ± 5.0 | 25.0 ± 5.0 |',
                         '| synthetic_resnet18_positive_proxy_512_2_d4e5f6 (mean ± std, n=2 seeds) | final 2 | '
                         '90.0 ± 0.0 | 90.0 ± 0.0 |']
    # each group's rows stay together, its summary right under them
    assert lines.index(summaries[1]) == lines.index(next(line for line in lines if '_d4e5f6_seed1' in line)) + 1


def test_single_runs_keep_the_table_they_had():
    single = {'car_resnet50_positive_proxy_512_20': statistics(0.5, 0.2)}
    lines = table_lines(single)
    assert lines[2] == '| car_resnet50_positive_proxy_512_20 | 2 / 2 | 50.0 / 50.0 | 20.0 / 20.0 |'
    assert len([line for line in lines if line.startswith('| car')]) == 1
    assert not any('mean ± std' in line for line in lines)


def test_unequal_final_epochs_and_missing_metrics_are_shown():
    runs = dict(SEEDS)
    runs[f'{PREFIX}_seed1'] = statistics(0.55, 0.25, epochs=1)  # still running: one epoch so far
    runs[f'{PREFIX}_seed2'] = statistics(0.60, 0.30).drop(columns='map@r')  # run with --metrics recall
    summary = table_lines(runs)[5]
    assert summary == f'| {PREFIX} (mean ± std, n=3 seeds) | final 1–2 | 55.0 ± 5.0 | 22.5 ± 3.5 (n=2) |'


def test_mean_curve_per_group_with_a_band_of_one_standard_deviation(tmp_path):
    runs = {**SEEDS, 'cub_resnet50_positive_proxy_512_2_seed0': statistics(0.7, 0.4)}
    fig = utils.plot_runs(runs, str(tmp_path / 'seeds.png'), mean_over_seeds=True)
    assert_png_and_pdf(str(tmp_path / 'seeds.png'))
    r1_panel = next(ax for ax in fig.axes if ax.get_ylabel() == 'R@1 (%)')
    assert [line.get_label() for line in r1_panel.get_lines()] == \
        [f'{PREFIX} (mean ± std, n=3 seeds)', 'cub_resnet50_positive_proxy_512_2_seed0']
    np.testing.assert_allclose(r1_panel.get_lines()[0].get_ydata(), [30, 30, 55])
    [band] = r1_panel.collections  # only the group has a spread
    vertices = band.get_paths()[0].vertices
    final = vertices[vertices[:, 0] == 2, 1]
    np.testing.assert_allclose([final.min(), final.max()], [50, 60])  # 55 ± 5 at the final epoch
    np.testing.assert_allclose(vertices[vertices[:, 0] == 0, 1], 30)  # no spread where the seeds agree


def test_plot_command_draws_seed_means(tmp_path, capsys):
    paths = write_runs(tmp_path, SEEDS)
    report.main(['plot', *paths, '--mean_over_seeds', '--out', str(tmp_path / 'seeds')])
    assert_png_and_pdf(str(tmp_path / 'seeds.png'))
    report.main(['table', *paths])
    assert f'| {PREFIX} (mean ± std, n=3 seeds) | final 2 |' in capsys.readouterr().out


@pytest.mark.parametrize('mean_over_seeds', [False, True])
def test_without_seed_partners_the_curves_are_the_runs(tmp_path, mean_over_seeds):
    runs = {'a_seed0': statistics(0.5, 0.2), 'b_seed0': statistics(0.6, 0.3)}
    fig = utils.plot_runs(runs, str(tmp_path / 'runs.png'), mean_over_seeds=mean_over_seeds)
    panel = next(ax for ax in fig.axes if ax.get_ylabel() == 'R@1 (%)')
    assert [line.get_label() for line in panel.get_lines()] == ['a_seed0', 'b_seed0']
    assert not panel.collections


def write_arguments(paths, **values):
    """Each run's {run}_args.json as train.py writes it, with `values` ({name: [one per run]})."""
    for i, path in enumerate(paths):
        run = path.removesuffix('_statistics.csv')
        with open(f'{run}_args.json', 'w') as f:
            json.dump({'seed': i, 'loss_name': 'positive_proxy', **{k: v[i] for k, v in values.items()}}, f)


def test_table_shows_the_arguments_asked_for_and_what_a_seed_group_shares(tmp_path, capsys):
    paths = write_runs(tmp_path, SEEDS)
    write_arguments(paths, lr=[1e-4] * 3)
    report.main(['table', *paths, '--args', 'lr,--seed'])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == '| run | lr | seed | epoch | R@1 | MAP@R |'
    assert lines[2] == f'| {PREFIX}_seed0 | 0.0001 | 0 | 2 / 2 | 50.0 / 50.0 | 20.0 / 20.0 |'
    # the group's row: the lr its runs share, no single seed
    assert lines[5] == f'| {PREFIX} (mean ± std, n=3 seeds) | 0.0001 | – | final 2 | 55.0 ± 5.0 | 25.0 ± 5.0 |'


def test_table_args_name_the_run_file_that_lacks_them(tmp_path):
    paths = write_runs(tmp_path, SEEDS)
    with pytest.raises(ValueError, match=r'seed0_args\.json: needed for --args'):
        report.main(['table', *paths, '--args', 'lr'])
    write_arguments(paths, lr=[1e-4] * 3)
    with pytest.raises(ValueError, match=r'seed0_args\.json: no argument scale \(it has seed, loss_name, lr\)'):
        report.main(['table', *paths, '--args', 'lr,scale'])


def test_table_at_epoch_zero_gives_the_untrained_network_per_run_and_per_group():
    runs = dict(SEEDS)
    runs[f'{PREFIX}_seed1'] = statistics(0.55, 0.25).assign(**{'recall@1': [0.36, 0.3, 0.55]})
    lines = report.results_table(runs, epoch=0).splitlines()
    assert lines[3] == f'| {PREFIX}_seed1 | 0 | 36.0 | 10.0 |'
    # R@1 at epoch 0: 30, 36, 30 %: mean 32.0, sample std 3.5
    assert lines[5] == f'| {PREFIX} (mean ± std, n=3 seeds) | 0 | 32.0 ± 3.5 | 10.0 ± 0.0 |'
    assert 'before any training step' in lines[7] and 'each at its epoch 0' in lines[-1]


def test_table_at_an_epoch_a_run_has_not_reached_names_the_run(tmp_path):
    paths = write_runs(tmp_path, SEEDS)
    with pytest.raises(ValueError, match=rf'run {PREFIX}_seed0 has no epoch 5: its statistics end at epoch 2'):
        report.main(['table', *paths, '--epoch', '5'])
