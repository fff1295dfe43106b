"""Figures and tables of train.py's runs, and the method figure:

    python report.py plot results/*_statistics.csv [--out PREFIX] [--mean_over_seeds]
    python report.py table results/*_statistics.csv [--out FILE] [--args lr,scale] [--epoch N]
    python report.py map results/{run}_data_base.pth [--out FILE]
    python report.py structure [--out docs/images/structure.png]

The figures that train.py also draws after a run (utils.plot_runs, utils.plot_embedding_map) are
utils.py's; here are what only reports need: the statistics CSVs read back, the tables, and the
method figure, whose arrows loss.py computes.
"""
import argparse
import json
import math
import os

import numpy as np
import pandas as pd
import torch
from matplotlib.lines import Line2D
from matplotlib.patches import FancyBboxPatch

from data_utils import render  # the synthetic set's drawing: the pipeline's example image
from loss import GRADIENT_MASKS, GRADIENT_RULES, build_loss
from utils import (RUN_COLUMNS, HelpFormatter, Range, atomic_path, group_runs, load_database, metric_columns,
                   metric_label, plot_embedding_map, plot_runs, pyplot, run_label, run_prefix, run_script, save_figure)

# -----------------------------------------------------------------------------
# statistics files: the {run}_statistics.csv that train.py writes, read back


def statistics_problems(table):
    """Why a table is not a statistics table of train.py; empty when it is one."""
    if table.empty:
        return ['no rows']
    problems = [f'no {column!r} column' for column in RUN_COLUMNS if column not in table.columns]
    if not metric_columns([table]):
        problems.append('no metric column')
    return problems + [f'non-numeric column {column!r}' for column in table.columns
                       if not pd.api.types.is_numeric_dtype(table[column])]


def read_statistics(paths):
    """{run label: table} of train.py's statistics CSVs, each run labelled by its file name."""
    if not paths:
        raise ValueError('no statistics CSV given')
    runs = {}
    for path in paths:
        try:
            table = pd.read_csv(path)
        except ValueError as e:  # pandas' parser and empty-file errors, undecodable bytes
            raise ValueError(f'{path}: not a readable CSV ({e})') from e
        problems = statistics_problems(table)
        if problems:
            raise ValueError(f'{path}: not a statistics CSV of train.py: {", ".join(problems)}')
        if run_label(path) in runs:
            raise ValueError(f'{path}: a second run named {run_label(path)}')
        runs[run_label(path)] = table
    return runs


# -----------------------------------------------------------------------------
# tables of runs: python report.py table


def run_arguments(paths, names):
    """{run label: {name: value}}: the named arguments of each run, read from the {run}_args.json that
    train.py writes beside its statistics CSV."""
    arguments = {}
    for path in paths:
        args_path = f'{run_prefix(path)}_args.json'
        try:
            with open(args_path, encoding='utf-8') as f:
                run_args = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f'{args_path}: needed for --args, not a readable {{run}}_args.json of train.py '
                             f'({e.__class__.__name__}: {e})') from e
        missing = [name for name in names if name not in run_args]
        if missing:
            raise ValueError(f'{args_path}: no argument {", ".join(missing)} (it has {", ".join(run_args)})')
        arguments[run_label(path)] = {name: run_args[name] for name in names}
    return arguments


def evaluated_rows(table):
    """The rows of the epochs that were evaluated: those train.py --eval_every skipped have no metric."""
    return table.dropna(subset=metric_columns([table]), how='all')


def run_row(label, table, columns, epoch=None):
    """A run's row: every metric at its best epoch / at its final epoch, or at `epoch` alone."""
    if epoch is not None:
        at = epoch_row(label, table, epoch)
        return [label, str(epoch)] + [f'{100 * at[c]:.1f}' if c in table else '–' for c in columns]
    # a run without the table's first metric (other --metrics) is selected by its own first one
    select = columns[0] if columns[0] in table else metric_columns([table])[0]
    best, final = table.loc[table[select].idxmax()], evaluated_rows(table).iloc[-1]
    epochs = f'{int(best["epoch"])} / {int(final["epoch"])}'
    if select != columns[0]:
        epochs += f' (by {metric_label(select)})'
    return [label, epochs] + [f'{100 * best[c]:.1f} / {100 * final[c]:.1f}' if c in table else '–' for c in columns]


def epoch_row(label, table, epoch):
    """The statistics of a run's `epoch` (0: before training)."""
    rows = table.loc[table['epoch'] == epoch]
    if rows.empty:
        raise ValueError(f'run {label} has no epoch {epoch}: its statistics end at epoch {int(table["epoch"].max())}')
    if evaluated_rows(rows).empty:
        raise ValueError(f'run {label} did not evaluate epoch {epoch} (train.py --eval_every); it evaluated '
                         f'{", ".join(str(int(e)) for e in evaluated_rows(table)["epoch"])}')
    return rows.iloc[-1]


def mean_std_cell(values, n):
    """'mean ± std' in % of a metric's final values; n added where fewer runs than the group's have it."""
    if len(values) == 0:
        return '–'
    cell = f'{100 * np.mean(values):.1f}' + (f' ± {100 * np.std(values, ddof=1):.1f}' if len(values) > 1 else '')
    return cell + (f' (n={len(values)})' if len(values) < n else '')


def seed_row(group, members, columns, epoch=None):
    """A seed group's row: each metric's mean ± sample standard deviation over its runs' final epochs,
    or over their `epoch`."""
    if epoch is None:
        rows = [evaluated_rows(table).iloc[-1] for table in members.values()]
        epochs = sorted({int(row['epoch']) for row in rows})
        shown = f'final {epochs[0]}' + (f'–{epochs[-1]}' if len(epochs) > 1 else '')
    else:
        rows, shown = [epoch_row(label, table, epoch) for label, table in members.items()], str(epoch)
    return [f'{group} (mean ± std, n={len(rows)} seeds)', shown] + [
        mean_std_cell([row[c] for row in rows if c in row.index], len(rows)) for c in columns]


def results_table(runs, arguments=None, epoch=None):
    """Markdown table of each run's test metrics in %, at its best epoch and at its final epoch, and
    under the runs that differ only in --seed (names ending in _seed{N}), their mean ± std.
    `arguments` ({label: {argument: value}}, as run_arguments reads them) adds a column per argument
    after the run's name; a seed group's row shows the values its runs share. `epoch` shows every
    metric at that epoch instead (0: the network before training), with no selection.

    The best epoch is the one with the highest value of the first metric (R@1 by default) on the
    test set itself: that selection is optimistic, which the footnote says.
    """
    columns = metric_columns(runs.values())
    names = list(next(iter(arguments.values()))) if arguments else []
    header = ['run'] + names + ['epoch'] + [metric_label(column) for column in columns]

    def with_arguments(row, labels):
        shared = [{str(arguments[label][name]) for label in labels} for name in names]
        return row[:1] + [values.pop() if len(values) == 1 else '–' for values in shared] + row[1:]

    rows = []
    for group, members in group_runs(runs).items():
        rows += [with_arguments(run_row(label, table, columns, epoch), [label]) for label, table in members.items()]
        if len(members) > 1:
            rows.append(with_arguments(seed_row(group, members, columns, epoch), list(members)))
    lines = ['| ' + ' | '.join(header) + ' |', '|---|' + '---|' * len(names) + '---:|' * (len(header) - 1 - len(names))]
    lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
    if epoch is None:
        lines += ['', f'Each cell: **best epoch / final epoch**, metrics in %. Best: the epoch with the highest '
                      f'{metric_label(columns[0])}, every metric read there; it is selected on the test set itself '
                      f'(on the validation classes for a --val_fraction run), so optimistic. Final: the last epoch '
                      f'in the CSV, no selection on the test set.']
    else:
        lines += ['', f'Each cell: the metric at epoch {epoch}, in %'
                      + (' (epoch 0: the network before any training step).' if epoch == 0 else '.')]
    if len(rows) > len(runs):
        lines += ['', 'mean ± std: over the runs whose names differ only in their _seed{N} tail, each at its '
                      + ('final epoch' if epoch is None else f'epoch {epoch}') + '; sample standard deviation (n − 1).']
    return '\n'.join(lines) + '\n'


# -----------------------------------------------------------------------------
# the method at a glance: python report.py structure

# a 2-D example on the unit circle: the embedding f_i (class 0) and three proxies, angles in degrees
FIGURE_EMBEDDING_ANGLE, FIGURE_PROXY_ANGLES = 100.0, (35.0, 165.0, 250.0)
FIGURE_SCALE = 3.0  # a soft softmax (training uses 32), so that the pushes of the other proxies are visible
PULL, PUSH, STEP, PROXY_STEP = '#1a9850', '#d73027', '#222222', '#7b3294'
# the panels: the baseline, the method, the ablation
FIGURE_LOSSES = {
    'normalized_softmax': 'normalized_softmax:\nevery proxy pulls or pushes $f_i$,\nand every proxy learns from it',
    'positive_proxy': 'positive_proxy (the method):\n$f_i$ as under normalized softmax;\nonly $p_{y_i}$ learns from $f_i$',
    'positive_pull': 'positive_pull (ablation):\nonly $p_{y_i}$ pulls $f_i$,\nand every proxy learns from it',
}


def on_circle(degrees):
    return torch.tensor([math.cos(math.radians(degrees)), math.sin(math.radians(degrees))])


def method_gradients(loss_name, embedding_angle=FIGURE_EMBEDDING_ANGLE, proxy_angles=FIGURE_PROXY_ANGLES,
                     scale=FIGURE_SCALE):
    """The figure's arrows, on one embedding of class 0 and unit proxies in 2-D: loss.py's descent
    directions (minus autograd's gradients) of the embedding and of each proxy, and the embedding's
    direction as per-proxy pieces -(dL/dS_c) p_c (pulls towards its class proxy, pushes away from the
    others), masked by the loss's rule for the embeddings (positive_pull keeps the pull only); the
    normalisation turns their sum into the embedding's step, along the circle."""
    loss_fn = build_loss(loss_name, len(proxy_angles), 2, scale)
    with torch.no_grad():
        loss_fn.proxies.copy_(torch.stack([on_circle(angle) for angle in proxy_angles]))
    embedding, labels = on_circle(embedding_angle)[None].requires_grad_(), torch.tensor([0])
    loss_fn(embedding, labels).backward()
    f, proxies = embedding.detach()[0], loss_fn.proxies.detach()
    cosines = (f @ proxies.t())[None].requires_grad_()
    d_loss_d_similarity = torch.autograd.grad(loss_fn.loss(cosines, labels), cosines)[0]
    embedding_mask = GRADIENT_MASKS[GRADIENT_RULES[loss_name][1][0]]
    if embedding_mask is not None:
        d_loss_d_similarity = d_loss_d_similarity * embedding_mask(labels, len(proxies), cosines.dtype)
    pieces = -d_loss_d_similarity[0, :, None] * proxies
    return {'embedding': f, 'proxies': proxies, 'embedding_step': -embedding.grad[0],
            'proxy_steps': -loss_fn.proxies.grad, 'pieces': pieces}


def draw_box(ax, x, y, text, colour='#f2f2f2', width=2.5, height=1.15):
    ax.add_patch(FancyBboxPatch((x - width / 2, y - height / 2), width, height,
                                boxstyle='round,pad=0.02,rounding_size=0.15', facecolor=colour,
                                edgecolor='#555555', linewidth=0.8))
    ax.text(x, y, text, ha='center', va='center', fontsize=9.5, linespacing=1.3)


def draw_arrow(ax, start, end, colour='#333333', style='-', rad=0.0, width=1.1):
    ax.annotate('', xy=end, xytext=start, arrowprops=dict(arrowstyle='-|>', color=colour, linestyle=style,
                                                          linewidth=width, shrinkA=0, shrinkB=0,
                                                          connectionstyle=f'arc3,rad={rad}', mutation_scale=10))


def draw_pipeline(ax):
    """image -> backbone -> pooling -> linear head -> L2 normalisation -> embedding, the proxies and
    the loss; forward arrows solid, the gradients dashed."""
    ax.set(xlim=(0, 16.4), ylim=(-0.75, 4.75), aspect='equal')
    ax.axis('off')
    image = np.asarray(render('star', 'red', 'stripes', 'white-eye', 96, np.random.default_rng(3)))
    ax.imshow(image, extent=(0.15, 1.65, 2.55, 4.05), zorder=2)
    ax.text(0.9, 2.35, 'image', ha='center', va='top', fontsize=9.5)
    network = [(3.35, 'backbone\n(ResNet-50,\nBN-Inception, ...)'), (6.15, 'global pooling\n(max or average)'),
               (8.95, 'linear head\n(no bias)'), (11.75, 'L2 normalisation'), (14.55, 'embedding $f_i$\n(unit, 512-d)')]
    for (x, text), colour in zip(network, ['#dbe9f6'] * 4 + ['#fde0c5']):
        draw_box(ax, x, 3.3, text, colour)
    for start, end in zip([1.7] + [x + 1.25 for x, _ in network[:-1]], [x - 1.25 for x, _ in network]):
        draw_arrow(ax, (start, 3.3), (end, 3.3))
    draw_box(ax, 3.35, 0.75, 'proxies $p_c$, one per\ntraining class (unit)', '#e7d4e8')
    draw_box(ax, 8.95, 0.75, 'cosines $S_{ic} = f_i \\cdot p_c$', '#f2f2f2')
    draw_box(ax, 14.55, 0.75, 'loss $L$: cross-entropy\nof scale $\\cdot S_i$ and $y_i$', '#f2f2f2')
    draw_arrow(ax, (4.6, 0.75), (7.7, 0.75))
    draw_arrow(ax, (10.2, 0.75), (13.3, 0.75))
    draw_arrow(ax, (13.75, 2.72), (9.9, 1.33))  # f_i into the cosines
    # the gradients, dashed: to the embedding and on through the network; to every proxy
    draw_arrow(ax, (15.1, 1.33), (15.1, 2.72), STEP, '--', width=1.4)
    ax.text(15.3, 2.03, '$\\partial L/\\partial f_i$', fontsize=10.5, va='center', color=STEP)
    ax.text(4.9, 2.03, '$\\partial L/\\partial f_i$: from every proxy $p_c$\n'
                       '(the positive_pull ablation: from its own class proxy $p_{y_i}$ only)',
            ha='center', va='center', fontsize=9.5, color=STEP)
    draw_arrow(ax, (13.4, 3.88), (1.7, 3.88), STEP, '--', rad=0.06, width=1.0)
    ax.text(7.55, 4.4, 'and on through the head and the backbone', ha='center', fontsize=9.5, color=STEP)
    draw_arrow(ax, (14.55, 0.17), (3.35, 0.17), PROXY_STEP, '--', rad=-0.06, width=1.4)
    ax.text(8.95, -0.6, '$\\partial L/\\partial p_c$: from every embedding; under positive_proxy only from '
                        'those of class $c$, their mean', ha='center', fontsize=9.5, color=PROXY_STEP)


def draw_gradients(ax, loss_name, title):
    """loss.py's gradients on the 2-D example: the pieces that move f_i, its step, each proxy's step."""
    plt = pyplot()
    arrows = method_gradients(loss_name)
    # one length scale for every panel, so that they compare
    longest = max(method_gradients(name)[key].norm(dim=-1).max().item()
                  for name in FIGURE_LOSSES for key in ('pieces', 'proxy_steps', 'embedding_step'))
    stretch = 0.8 / longest
    ax.add_patch(plt.Circle((0, 0), 1, fill=False, color='#bbbbbb', linewidth=0.8))
    f = arrows['embedding']
    visible = 0.05 / stretch  # shorter arrows would be a bare arrowhead: a far proxy's push is about nil
    for c, (proxy, step) in enumerate(zip(arrows['proxies'], arrows['proxy_steps'])):
        ax.plot(*proxy, marker='s', markersize=6, color=PULL if c == 0 else '#777777', zorder=3)
        name = '$p_{y_i}$' if c == 0 else f'$p_{{{c + 1}}}$'
        ax.text(*(1.2 * proxy), name, ha='center', va='center', fontsize=11)
        if step.norm() > visible:
            draw_arrow(ax, tuple(proxy), tuple(proxy + stretch * step), PROXY_STEP, width=1.3)
    for c, piece in enumerate(arrows['pieces']):
        if piece.norm() > visible:
            draw_arrow(ax, tuple(f), tuple(f + stretch * piece), PULL if c == 0 else PUSH, width=1.3)
    draw_arrow(ax, tuple(f), tuple(f + stretch * arrows['embedding_step']), STEP, width=2.2)
    ax.plot(*f, marker='o', markersize=7, color=PULL, zorder=3)
    ax.text(*(f + torch.tensor([-0.2, 0.12])), '$f_i$', ha='center', va='center', fontsize=11)
    ax.set(xlim=(-1.35, 1.35), ylim=(-1.3, 1.45), aspect='equal', xticks=[], yticks=[])
    ax.set_title(title, fontsize=10.5)
    for spine in ax.spines.values():
        spine.set_visible(False)


def plot_structure(path):
    """The method figure: the network, the proxies and the loss, and which gradients reach the
    embeddings and the proxies under each loss (computed by loss.py on a 2-D example); writes `path`
    (PNG) and its PDF, returns the figure."""
    plt = pyplot()
    fig = plt.figure(figsize=(10.5, 7.4), layout='constrained')
    top, bottom = fig.subfigures(2, 1, height_ratios=[0.95, 1.0])
    draw_pipeline(top.subplots())
    for ax, (loss_name, title) in zip(bottom.subplots(1, len(FIGURE_LOSSES)), FIGURE_LOSSES.items()):
        draw_gradients(ax, loss_name, title)
    handles = [Line2D([], [], color=PULL, linewidth=1.3, label='pull of $p_{y_i}$ on $f_i$'),
               Line2D([], [], color=PUSH, linewidth=1.3, label='push of another proxy on $f_i$'),
               Line2D([], [], color=STEP, linewidth=2.2, label='step of $f_i$: their sum, along the unit circle'),
               Line2D([], [], color=PROXY_STEP, linewidth=1.3, label='step of each proxy')]
    bottom.legend(handles=handles, loc='outside lower center', ncols=2, fontsize=9.5, frameon=False)
    bottom.suptitle('Descent directions ($-$gradient) computed by loss.py: one embedding $f_i$ of class $y_i$ and '
                    f'three proxies in 2-D\n(scale {FIGURE_SCALE:g}; all arrows to one length scale; the far proxy $p_3$ hardly pushes or moves)', fontsize=10)
    save_figure(fig, path)
    return fig


# -----------------------------------------------------------------------------
# the command line

def plot_command(args):
    out = f'{args.out or os.path.join(os.path.dirname(args.statistics[0]), "comparison")}.png'
    plot_runs(read_statistics(args.statistics), out, args.mean_over_seeds)
    print(f'wrote {out} and its PDF')


def table_command(args):
    names = [name.strip().lstrip('-') for name in args.args.split(',')] if args.args else []
    arguments = run_arguments(args.statistics, names) if names else None
    text = results_table(read_statistics(args.statistics), arguments, args.epoch)
    if args.out is None:
        print(text, end='')
        return
    with atomic_path(args.out) as tmp, open(tmp, 'w') as f:
        f.write(text)
    print(f'wrote {args.out}')


def map_command(args):
    database = load_database(args.data_base)
    out = args.out or f'{run_prefix(args.data_base)}_embedding_map.png'
    plot_embedding_map(database['test_embeddings'], database['test_labels'], database['test_classes'], out)
    print(f'wrote {out} and its PDF')


def structure_command(args):
    plot_structure(args.out)
    print(f'wrote {args.out} and its PDF')


def parse_args(argv=None):
    """The sub-command's arguments; args.command_function runs it."""
    parser = argparse.ArgumentParser(description="Figures and tables of train.py's runs, and the method figure.",
                                     formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest='command', required=True)

    def add_command(name, **kwargs):  # each sub-command's --help with its defaults too
        return commands.add_parser(name, formatter_class=HelpFormatter, **kwargs)
    plot = add_command('plot', help='loss, proxy accuracy and every metric per epoch; several runs, one figure')
    plot.add_argument('statistics', nargs='+', help='{run}_statistics.csv files; runs are named after them')
    plot.add_argument('--out', help='writes PREFIX.png and PREFIX.pdf (default: comparison beside the first CSV)',
                      metavar='PREFIX')
    plot.add_argument('--mean_over_seeds', action='store_true',
                      help='one curve per group of runs that differ only in seed (_seed{N}): the mean per epoch, '
                           'with a band of ± one standard deviation')
    table = add_command('table', help='Markdown table of the best-epoch and final-epoch test metrics, '
                                              'and their mean ± std over runs that differ only in seed')
    table.add_argument('statistics', nargs='+', help='{run}_statistics.csv files; runs are named after them')
    table.add_argument('--out', help='write the table to FILE instead of printing it', metavar='FILE')
    table.add_argument('--args', help="comma-separated train.py arguments to show as columns, read from each "
                                      "run's {run}_args.json, e.g. lr,scale", metavar='NAMES')
    table.add_argument('--epoch', type=Range(int, 0), help='every metric at epoch N instead of best / final '
                                                 '(0: the network before training)', metavar='N')
    embedding_map = add_command('map', help="t-SNE map of a run's test embeddings, coloured by class")
    embedding_map.add_argument('data_base', help='{run}_data_base.pth written by train.py')
    embedding_map.add_argument('--out', help='PNG path (a PDF goes beside it); default: {run}_embedding_map.png '
                                             'beside the database', metavar='FILE')
    structure = add_command('structure', help='the method figure: network, proxies, and which gradients '
                                                       'reach embeddings and proxies under each loss')
    structure.add_argument('--out', default=os.path.join('docs', 'images', 'structure.png'),
                           help='PNG path (a PDF goes beside it); default: %(default)s', metavar='FILE')
    for command, function in zip((plot, table, embedding_map, structure),
                                 (plot_command, table_command, map_command, structure_command)):
        command.set_defaults(command_function=function)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    args.command_function(args)


if __name__ == '__main__':
    run_script(main)
