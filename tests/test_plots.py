"""Figures and tables of finished runs: utils.plot_runs, report.results_table, the embedding map and
`python report.py plot|table|map|structure`, on statistics CSVs and a database written here."""
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import report
import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAN = float('nan')
# positive_proxy peaks at epoch 2 in R@1 and ends lower; its R@2 peaks later, at the final epoch
RUNS = {
    'synthetic_resnet18_positive_proxy_512_3': {
        'epoch': [0, 1, 2, 3], 'loss': [NAN, 2.0, 1.5, 1.2], 'accuracy': [NAN, 0.2, 0.4, 0.5],
        'recall@1': [0.30, 0.50, 0.70, 0.60], 'recall@2': [0.40, 0.60, 0.80, 0.85],
        'map@r': [0.10, 0.20, 0.30, 0.25]},
    'synthetic_resnet18_normalized_softmax_512_3': {
        'epoch': [0, 1, 2, 3], 'loss': [NAN, 2.5, 1.8, 1.4], 'accuracy': [NAN, 0.1, 0.3, 0.45],
        'recall@1': [0.30, 0.40, 0.45, 0.55], 'recall@2': [0.40, 0.50, 0.60, 0.65],
        'map@r': [0.10, 0.15, 0.20, 0.22]},
}
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


@pytest.fixture
def csvs(tmp_path):
    paths = []
    for run, columns in RUNS.items():
        paths.append(str(tmp_path / f'{run}_statistics.csv'))
        pd.DataFrame(columns).to_csv(paths[-1], index=False)
    return paths


def assert_png_and_pdf(png):
    with open(png, 'rb') as f:
        assert f.read(8) == PNG_SIGNATURE
    assert os.path.getsize(png) > 10_000
    with open(os.path.splitext(png)[0] + '.pdf', 'rb') as f:
        assert f.read(4) == b'%PDF'
    assert not [f for f in os.listdir(os.path.dirname(png)) if f.startswith('.tmp')]


def test_several_runs_share_one_figure_one_line_per_run_in_every_panel(csvs, tmp_path):
    fig = utils.plot_runs(report.read_statistics(csvs), str(tmp_path / 'comparison.png'))
    assert_png_and_pdf(str(tmp_path / 'comparison.png'))
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_ylabel() for ax in panels] == \
        ['training loss', 'proxy accuracy (%)', 'R@1 (%)', 'R@2 (%)', 'MAP@R (%)']
    for ax in panels:
        assert [line.get_label() for line in ax.get_lines()] == list(RUNS)
    assert [text.get_text() for text in fig.legends[0].get_texts()] == list(RUNS)
    r1 = panels[2].get_lines()[0].get_ydata()
    np.testing.assert_allclose(r1, [30, 50, 70, 60])  # in %


def test_train_py_single_run_figure_is_named_after_the_run(tmp_path):
    run = 'synthetic_resnet18_positive_proxy_512_3'
    fig = utils.plot_statistics(pd.DataFrame(RUNS[run]), str(tmp_path / f'{run}_results.png'))
    assert_png_and_pdf(str(tmp_path / f'{run}_results.png'))
    assert [text.get_text() for text in fig.legends[0].get_texts()] == [run]


def test_table_reads_best_epoch_by_r1_and_final_epoch_and_warns_of_test_set_selection(csvs):
    table = report.results_table(report.read_statistics(csvs))
    lines = table.splitlines()
    assert lines[0] == '| run | epoch | R@1 | R@2 | MAP@R |'
    # every metric of the best row is read at the R@1-best epoch (R@2 80.0, not its own best 85.0)
    assert lines[2:4] == [
        '| synthetic_resnet18_positive_proxy_512_3 | 2 / 3 | 70.0 / 60.0 | 80.0 / 85.0 | 30.0 / 25.0 |',
        '| synthetic_resnet18_normalized_softmax_512_3 | 3 / 3 | 55.0 / 55.0 | 65.0 / 65.0 | 22.0 / 22.0 |']
    footnote = lines[-1]
    assert 'best epoch / final epoch' in footnote
    assert 'selected on the test set' in footnote and 'optimistic' in footnote
    assert 'no selection on the test set' in footnote


def test_table_of_runs_with_different_metrics_marks_the_gaps(tmp_path, csvs):
    other = str(tmp_path / 'nmi_only_statistics.csv')
    pd.DataFrame({'epoch': [0, 1, 2], 'loss': [NAN, 1.0, 0.9], 'accuracy': [NAN, 0.5, 0.6],
                  'nmi': [0.5, 0.8, 0.7]}).to_csv(other, index=False)
    lines = report.results_table(report.read_statistics([csvs[0], other])).splitlines()
    assert lines[0] == '| run | epoch | R@1 | R@2 | MAP@R | NMI |'
    assert lines[3] == '| nmi_only | 1 / 2 (by NMI) | – | – | – | 80.0 / 70.0 |'


def test_table_command_prints_the_table_or_writes_it_atomically(csvs, tmp_path, capsys):
    report.main(['table', *csvs])
    printed = capsys.readouterr().out
    assert printed == report.results_table(report.read_statistics(csvs))
    out = tmp_path / 'tables' / 'results.md'
    report.main(['table', *csvs, '--out', str(out)])
    assert out.read_text() == printed
    assert os.listdir(out.parent) == ['results.md']


def test_plot_command_writes_png_and_pdf_beside_the_csvs_by_default(csvs, tmp_path):
    report.main(['plot', *csvs])
    assert_png_and_pdf(str(tmp_path / 'comparison.png'))
    report.main(['plot', *csvs, '--out', str(tmp_path / 'figures' / 'losses')])
    assert_png_and_pdf(str(tmp_path / 'figures' / 'losses.png'))


@pytest.mark.parametrize('content,message', [
    ('epoch,loss,accuracy\n0,,\n', 'no metric column'),
    ('epoch,recall@1\n0,0.5\n', "no 'loss' column, no 'accuracy' column"),
    ('epoch,loss,accuracy,recall@1\n', 'no rows'),
    ('epoch,loss,accuracy,recall@1\n0,,,high\n', "non-numeric column 'recall@1'"),
    ('', 'not a readable CSV'),
])
def test_a_csv_that_is_not_train_py_statistics_is_refused_naming_the_file(tmp_path, csvs, content, message):
    bad = tmp_path / 'bad_statistics.csv'
    bad.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        report.read_statistics([csvs[0], str(bad)])
    assert str(bad) in str(error.value)


def test_no_csv_is_an_error():
    with pytest.raises(ValueError, match='no statistics CSV'):
        report.read_statistics([])


@pytest.mark.slow  # seconds: a fresh interpreter, or the whole synthetic set generated
def test_command_line_errors_name_the_file_and_exit_non_zero(tmp_path):
    bad = tmp_path / 'bad_statistics.csv'
    bad.write_text('a,b\n1,2\n')
    done = subprocess.run([sys.executable, 'report.py', 'table', str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 1
    assert done.stderr == f"error: {bad}: not a statistics CSV of train.py: no 'epoch' column, " \
        "no 'loss' column, no 'accuracy' column\n"
    with pytest.raises(FileNotFoundError, match='missing_statistics.csv'):  # which __main__ reports the same way
        report.main(['plot', str(tmp_path / 'missing_statistics.csv')])
    with pytest.raises(SystemExit) as stop:
        report.main(['table'])  # no file at all: argparse's usage error
    assert stop.value.code == 2



@pytest.mark.slow  # seconds: a fresh interpreter
def test_report_py_prints_the_table_as_a_user_runs_it(csvs):
    done = subprocess.run([sys.executable, 'report.py', 'table', *csvs], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout == report.results_table(report.read_statistics(csvs))


def clustered_embeddings(num_classes, per_class, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=generator)
    embeddings = centres.repeat_interleave(per_class, dim=0) + 0.1 * torch.randn(num_classes * per_class, dim,
                                                                                 generator=generator)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return torch.nn.functional.normalize(embeddings, dim=1), labels.tolist()


def test_embedding_coordinates_are_deterministic_and_subsampled_with_their_labels():
    embeddings, labels = clustered_embeddings(4, 15)
    first, first_labels = utils.embedding_coordinates(embeddings, labels)
    again, again_labels = utils.embedding_coordinates(embeddings, labels)
    assert first.shape == (60, 2)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(first_labels, labels)
    subset, subset_labels = utils.embedding_coordinates(embeddings, labels, max_points=20)
    assert subset.shape == (20, 2) and len(subset_labels) == 20
    np.testing.assert_array_equal(subset, utils.embedding_coordinates(embeddings, labels, max_points=20)[0])
    # the subset keeps the points' order, so its labels stay sorted like the fixture's, classes mixed
    assert (np.diff(subset_labels) >= 0).all() and len(set(subset_labels)) > 1


def test_embeddings_all_alike_map_to_one_spot(tmp_path):
    # a collapsed network: t-SNE's PCA start would divide by their zero spread (and crash the process)
    embeddings = torch.nn.functional.normalize(torch.ones(6, 16), dim=1)
    coordinates, labels = utils.embedding_coordinates(embeddings, [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(coordinates, np.zeros((6, 2)))
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 1])


@pytest.mark.parametrize('num_classes,legend', [(4, True), (25, False)])
def test_embedding_map_names_few_classes_in_a_legend_and_many_by_colour_alone(tmp_path, num_classes, legend):
    embeddings, labels = clustered_embeddings(num_classes, 4)
    names = [f'class {i}' for i in range(num_classes)]
    fig = utils.plot_embedding_map(embeddings, labels, names, str(tmp_path / 'map.png'))
    assert_png_and_pdf(str(tmp_path / 'map.png'))
    assert len(fig.axes[0].collections[0].get_offsets()) == 4 * num_classes
    assert len(np.unique(fig.axes[0].collections[0].get_facecolors(), axis=0)) == num_classes
    assert [text.get_text() for legend_ in fig.legends for text in legend_.get_texts()] == (names if legend else [])


@pytest.mark.parametrize('num_classes', [4, 10, 20, 60])
def test_class_colours_can_be_told_apart(num_classes):
    colours = utils.class_colours(num_classes)[:, :3]
    assert len(np.unique(colours, axis=0)) == num_classes
    if num_classes <= 20:  # every pair, in RGB units of 0-1
        distances = np.linalg.norm(colours[:, None] - colours[None], axis=-1)
        assert distances[~np.eye(num_classes, dtype=bool)].min() > 0.09
    else:  # too many to keep apart: at least classes next to each other in order differ clearly
        assert np.linalg.norm(np.diff(colours, axis=0), axis=1).min() > 0.3


def test_the_legend_shows_each_class_in_its_colour_on_the_map(tmp_path):
    embeddings, labels = clustered_embeddings(12, 3)
    fig = utils.plot_embedding_map(embeddings, labels, [f'class {i}' for i in range(12)], str(tmp_path / 'map.png'))
    points = fig.axes[0].collections[0].get_facecolors()
    legend = {text.get_text(): handle.get_color() for text, handle in zip(fig.legends[0].get_texts(),
                                                                           fig.legends[0].legend_handles)}
    for label in range(12):
        np.testing.assert_allclose(points[labels.index(label)], legend[f'class {label}'])


def test_epochs_are_whole_numbers_from_0_to_the_last_and_shares_stop_at_100(tmp_path):
    perfect = {**RUNS['synthetic_resnet18_positive_proxy_512_3'], 'recall@2': [0.4, 0.9, 1.0, 1.0]}
    fig = utils.plot_runs({'perfect': pd.DataFrame(perfect)}, str(tmp_path / 'perfect.png'))
    panels = [ax for ax in fig.axes if ax.get_visible()]
    for ax in panels:  # the loss starts at epoch 1, the metrics at 0: one axis for both
        low, high = ax.get_xlim()
        assert -0.5 < low < 0 and 3 < high < 3.5
        assert [tick for tick in ax.get_xticks() if low <= tick <= high] == [0, 1, 2, 3]
    assert [ax.get_ylabel() for ax in panels[1:4]] == ['proxy accuracy (%)', 'R@1 (%)', 'R@2 (%)']
    assert all(0 <= ax.get_ylim()[0] and ax.get_ylim()[1] <= 100 for ax in panels[1:])
    assert panels[3].get_ylim()[1] == 100  # R@2 reaches 100 %: its axis ends there, not above


def test_map_command_draws_a_database_beside_it(tmp_path):
    embeddings, labels = clustered_embeddings(3, 10)
    path = tmp_path / 'synthetic_resnet18_positive_proxy_512_3_data_base.pth'
    torch.save({'test_embeddings': embeddings, 'test_labels': labels, 'test_classes': ['a', 'b', 'c'],
                'test_images': [f'{i}.jpg' for i in range(len(labels))]}, path)
    report.main(['map', str(path)])
    assert_png_and_pdf(str(tmp_path / 'synthetic_resnet18_positive_proxy_512_3_embedding_map.png'))


def test_map_of_a_file_that_is_not_a_database_names_it(tmp_path):
    path = tmp_path / 'x_data_base.pth'
    torch.save({'test_embeddings': torch.zeros(3, 2)}, path)
    with pytest.raises(ValueError, match='no test_labels, test_classes, test_images') as error:
        utils.load_database(str(path))
    assert str(path) in str(error.value)
    torch.save(torch.zeros(3, 2), path)
    with pytest.raises(ValueError, match='no test_embeddings'):
        utils.load_database(str(path))
    for text in ('not a database', 'epoch,loss\n0,1\n'):  # torch.load fails differently on each
        path.write_text(text)
        with pytest.raises(ValueError, match='not a database written by train.py'):
            utils.load_database(str(path))


# -----------------------------------------------------------------------------
# the method figure: its arrows are loss.py's gradients


def tangent(vector, at):
    """The part of `vector` along the unit circle at the unit vector `at`."""
    return vector - (vector @ at) * at


def test_figure_arrows_are_the_losses_gradients_under_each_rule():
    softmax, positive, pull = (report.method_gradients(name)
                               for name in ('normalized_softmax', 'positive_proxy', 'positive_pull'))
    f, proxies = softmax['embedding'], softmax['proxies']
    for arrows in (softmax, positive, pull):
        # the drawn pieces add up, along the circle, to the embedding's step autograd gives
        torch.testing.assert_close(tangent(arrows['pieces'].sum(dim=0), f), arrows['embedding_step'])
    # normalized softmax: the own proxy pulls (towards it), the others push (away from them)
    assert softmax['pieces'][0] @ proxies[0] > 0
    assert all(softmax['pieces'][c] @ proxies[c] < 0 for c in (1, 2))
    # positive proxy (the method): the embedding moves as under normalized softmax; only its own
    # proxy moves, as normalized softmax moves it here (f_i is its class's only embedding)
    torch.testing.assert_close(positive['embedding_step'], softmax['embedding_step'])
    torch.testing.assert_close(positive['proxy_steps'][0], softmax['proxy_steps'][0])
    assert not positive['proxy_steps'][1:].any() and (softmax['proxy_steps'].norm(dim=1) > 0).all()
    # positive pull (the ablation): only the pull reaches the embedding; every proxy moves
    torch.testing.assert_close(pull['pieces'][0], softmax['pieces'][0])
    assert not pull['pieces'][1:].any()
    assert not torch.allclose(pull['embedding_step'], softmax['embedding_step'])
    torch.testing.assert_close(pull['proxy_steps'], softmax['proxy_steps'])


def arrow_colours(ax):
    return [text.arrow_patch.get_edgecolor() for text in ax.texts if getattr(text, 'arrow_patch', None)]


def test_structure_command_draws_the_three_rules(tmp_path):
    """Pushes on f_i under normalized softmax and positive_proxy, none under positive_pull; a step
    of the other proxies under normalized softmax and positive_pull, none under positive_proxy."""
    import matplotlib.colors
    report.main(['structure', '--out', str(tmp_path / 'structure.png')])
    assert_png_and_pdf(str(tmp_path / 'structure.png'))
    fig = report.plot_structure(str(tmp_path / 'again.png'))
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title().split(':')[0].split(' ')[0] for ax in panels] == \
        ['normalized_softmax', 'positive_proxy', 'positive_pull']
    push, proxy_step = matplotlib.colors.to_rgba(report.PUSH), matplotlib.colors.to_rgba(report.PROXY_STEP)
    pushes = [arrow_colours(ax).count(push) for ax in panels]
    proxy_steps = [arrow_colours(ax).count(proxy_step) for ax in panels]
    assert pushes[0] > 0 and pushes[1] == pushes[0] and pushes[2] == 0
    assert proxy_steps[1] == 1 and proxy_steps[0] > 1 and proxy_steps[2] == proxy_steps[0]
