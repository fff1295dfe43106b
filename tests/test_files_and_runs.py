"""Files and runs as a user meets them: run names that never collide, the one loader of torch
files, the feature database, and scripts that start without the plotting stack."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

import data_utils
import train
from conftest import copy_of_repository
from utils import (RetrievalData, build_database, database_split, load_database, load_torch_file, resolve_amp,
                   run_name, save_torch_file)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK_START = ['--data_name', 'synthetic', '--backbone_type', 'resnet18', '--pretrained', 'none', '--image_size', '64',
               '--lr', '1e-3', '--num_epochs', '10']

# -----------------------------------------------------------------------------
# run names


def name(*flags):
    return train.parse_args([*QUICK_START, *flags]).run_name


def test_the_default_run_is_named_by_its_readable_head_and_seed():
    assert train.parse_args([]).run_name == 'car_resnet50_positive_proxy_512_20_seed0'


@pytest.mark.parametrize('flags', [['--seed', '1'], ['--lr', '1e-2'], ['--pretrained', 'imagenet'], ['--scale', '16'],
                                   ['--pooling', 'avgmax'], ['--no_freeze_bn'], ['--recalls', '1,5']])
def test_any_argument_that_defines_the_run_changes_its_name(flags):
    assert name(*flags) != name()


def test_the_default_precision_keeps_the_name_and_the_other_one_changes_it():
    chosen = resolve_amp('auto', 'cpu')  # what the default, --amp auto, runs on this CPU (bf16 where it computes it)
    other = {'bf16': 'none', 'none': 'bf16'}[chosen]
    assert train.parse_args([*QUICK_START, '--device', 'cpu']).amp == chosen  # as stored
    assert name('--device', 'cpu', '--amp', chosen) == name('--device', 'cpu') == name()
    assert name('--device', 'cpu', '--amp', other) != name()
    # the default run keeps the name it had when fp32 was the default, the one the README gives
    assert train.parse_args([*QUICK_START, '--device', 'cpu'], amp_default='none').run_name == name() == \
        'synthetic_resnet18_positive_proxy_512_10_43a97a_seed0'


def leave_a_quick_start_run(results, amp):
    """The files by which train.py recognises a run of the quick start's name begun in `amp`."""
    results.mkdir(parents=True, exist_ok=True)
    prefix = results / name()
    (prefix.parent / f'{prefix.name}_args.json').write_text(json.dumps({'amp': amp}))
    torch.save({'epoch': 10}, prefix.parent / f'{prefix.name}_checkpoint.pth')


def pytest_in(folder, *arguments):
    return subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', *arguments], cwd=folder,
                          capture_output=True, text=True)


@pytest.mark.slow  # a fresh pytest session in a copy of the repository
def test_a_run_the_quick_start_left_in_results_changes_no_test(tmp_path, monkeypatch):
    repository = copy_of_repository(tmp_path / 'repository')
    leave_a_quick_start_run(repository / 'results', 'bf16')
    # from the repository's folder, as a user types them, train.py's arguments do meet that run
    monkeypatch.chdir(repository)
    with pytest.raises(ValueError, match='hold a run trained in bf16'):
        train.parse_args([*QUICK_START, '--device', 'cpu'], amp_default='none')  # fp32, under the same name
    # the tests do not: each works in its own folder
    done = pytest_in(repository, '-m', 'not slow', 'tests/test_files_and_runs.py')
    assert done.returncode == 0, done.stdout[-3000:]
    assert 'test_the_default_precision_keeps_the_name' not in done.stdout  # not among failures


@pytest.mark.slow  # a fresh pytest session in a copy of the repository
def test_a_test_that_writes_to_the_repository_results_fails_the_session(tmp_path):
    repository = copy_of_repository(tmp_path / 'repository')
    (repository / 'tests' / 'test_careless.py').write_text(
        'import os\n\n\ndef test_writes_beside_the_code():\n'
        '    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "results", "stray.txt"), "w") as f:\n'
        '        f.write("x")\n')
    (repository / 'results').mkdir()
    done = pytest_in(repository, 'tests/test_careless.py')
    assert done.returncode != 0
    assert "the tests changed the repository's own folders" in done.stdout
    assert 'results/: added stray.txt' in done.stdout


@pytest.mark.parametrize('flags', [['--num_workers', '0'], ['--output_dir', 'elsewhere'], ['--data_path', 'd2'],
                                   ['--device', 'cpu'], ['--resume', 'auto'], ['--compile']])
def test_where_and_how_fast_a_run_goes_keep_its_name(flags):
    assert name(*flags) == name()


def test_runs_that_differ_only_in_seed_differ_only_in_the_tail():
    head = name().removesuffix('_seed0')
    assert head.startswith('synthetic_resnet18_positive_proxy_512_10_')
    assert [name('--seed', str(seed)) for seed in (1, 2)] == [f'{head}_seed1', f'{head}_seed2']


def test_a_backbone_name_with_a_colon_or_slash_stays_one_file_name():
    args = argparse.Namespace(data_name='mine', backbone_type='timm:org/vit_small_patch16_224.dino',
                              loss_name='positive_proxy', feature_dim=512, num_epochs=1, seed=0)
    named = run_name(args, vars(args))
    assert named == 'mine_timm-org-vit_small_patch16_224.dino_positive_proxy_512_1_seed0'


@pytest.mark.slow
def test_a_second_seed_in_the_same_output_dir_keeps_the_first_runs_files(tmp_path):
    data = tmp_path / 'data'
    data_utils.prepare_synthetic(str(data), num_classes=6, images_per_class=6, image_size=32)
    argv = ['--data_path', str(data), '--data_name', 'synthetic', '--backbone_type', 'resnet18', '--pretrained', 'none',
            '--image_size', '32', '--batch_size', '6', '--num_epochs', '1', '--num_workers', '0',
            '--output_dir', str(tmp_path / 'results')]
    train.main(argv)
    first = {f: (tmp_path / 'results' / f).read_bytes() for f in os.listdir(tmp_path / 'results')}
    train.main([*argv, '--seed', '1'])
    files = os.listdir(tmp_path / 'results')
    assert len(files) == 2 * len(first)
    assert all((tmp_path / 'results' / f).read_bytes() == content for f, content in first.items())

# -----------------------------------------------------------------------------
# the one loader of torch files


class Trap:
    """An object whose unpickling would run code: weights_only loading must refuse it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, 'w')


def test_loading_names_the_file_and_what_it_should_hold(tmp_path):
    path = tmp_path / 'x.pth'
    with pytest.raises(FileNotFoundError, match=f'{path}: no such checkpoint'):
        load_torch_file(path, 'checkpoint')
    with pytest.raises(FileNotFoundError, match='run train.py first'):
        load_torch_file(path, 'checkpoint', not_found='run train.py first')

    torch.save({'model': {}}, path)
    with pytest.raises(ValueError, match=f'{path}: not a checkpoint written by train.py: no epoch, args'):
        load_torch_file(path, 'checkpoint', ('model', 'epoch', 'args'))
    torch.save([1, 2], path)
    with pytest.raises(ValueError, match='not a dict; it holds a list'):
        load_torch_file(path, 'checkpoint')
    path.write_text('epoch,loss\n0,1\n')
    with pytest.raises(ValueError, match=f'{path}: not a model file written by train.py') as error:
        load_torch_file(path, 'model file')
    assert len(str(error.value)) < 400 + len(str(path))


@pytest.mark.parametrize('damage', ['random bytes', 'cut short', 'text'])
def test_a_file_that_is_no_torch_file_gets_one_short_sentence_naming_it(tmp_path, damage):
    path = tmp_path / 'run_data_base.pth'
    torch.save({'test_embeddings': torch.zeros(3, 4)}, path)
    contents = {'random bytes': os.urandom(3000), 'cut short': path.read_bytes()[:400], 'text': b'epoch,loss\n0,1\n'}
    path.write_bytes(contents[damage])
    with pytest.raises(ValueError) as error:
        load_database(path)
    assert str(error.value) == (f'{path}: not a database written by train.py: it is not a file that torch.save '
                                'writes (another kind of file, or one cut short)')


def test_loading_never_runs_code_hidden_in_a_file(tmp_path):
    path, marker = tmp_path / 'trap.pth', tmp_path / 'ran'
    torch.save({'model': Trap(str(marker))}, path)
    with pytest.raises(ValueError, match='not a model file written by train.py: it holds Python objects besides '
                                         'tensors and plain data, which are not loaded'):
        load_torch_file(path, 'model file')
    assert not marker.exists()


def test_saving_replaces_a_file_whole_and_loading_returns_what_was_saved(tmp_path):
    path = tmp_path / 'run' / 'state.pth'
    save_torch_file({'epoch': 1, 'weights': torch.arange(3)}, path)
    save_torch_file({'epoch': 2, 'weights': torch.arange(4)}, path)
    loaded = load_torch_file(path, 'state', ('epoch', 'weights'))
    assert loaded['epoch'] == 2 and torch.equal(loaded['weights'], torch.arange(4))
    assert os.listdir(path.parent) == ['state.pth']  # no temporary file left behind

# -----------------------------------------------------------------------------
# the feature database


def inshop_like_data():
    splits = {'train': {'a': ['t0.jpg', 't1.jpg']},
              'query': {'x': ['q0.jpg'], 'y': ['q1.jpg']},
              'gallery': {'x': ['g0.jpg', 'g1.jpg'], 'y': ['g2.jpg']}}
    return RetrievalData.from_splits(splits)


def test_the_database_round_trips_every_embedded_split(tmp_path):
    data = inshop_like_data()
    embeddings = {'test': torch.randn(3, 4), 'query': torch.randn(2, 4), 'train': torch.randn(2, 4)}
    database = build_database(data, embeddings, torch.randn(1, 4), epoch=3, args={'seed': 0})
    save_torch_file(database, tmp_path / 'db.pth')
    loaded = load_database(tmp_path / 'db.pth')
    assert loaded['test_classes'] == ['x', 'y'] and loaded['train_classes'] == ['a'] and loaded['epoch'] == 3
    for split, split_embeddings in embeddings.items():
        images, labels, stored = database_split(loaded, split)
        assert (images, labels) == (data.images[split], data.labels[split])
        assert torch.equal(stored, split_embeddings)
    assert database_split(loaded, 'query')[0] == ['q0.jpg', 'q1.jpg']  # labels index the test classes
    assert database_split(loaded, 'query')[1] == [0, 1] and database_split(loaded, 'test')[1] == [0, 0, 1]


def test_a_database_of_an_epoch_before_the_last_has_no_train_split(tmp_path):
    data = inshop_like_data()
    database = build_database(data, {'test': torch.randn(3, 4)}, torch.randn(1, 4), epoch=1, args={})
    assert database_split(database, 'train') == ([], [], [])
    assert 'train_images' not in database

# -----------------------------------------------------------------------------
# what the scripts import


@pytest.mark.slow  # seconds: a fresh interpreter, or the whole synthetic set generated
def test_preparing_data_does_not_load_the_plotting_stack():
    loaded = subprocess.run([sys.executable, '-c', 'import sys, data_utils, test; '
                             'print(sorted({m.split(".")[0] for m in sys.modules} & {"matplotlib", "pandas", "scienceplots"}))'],
                            cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == '[]'

# -----------------------------------------------------------------------------
# the command lines


@pytest.mark.parametrize('script,argv,shown', [
    ('train', ['--help'], ['--num_epochs NUM_EPOCHS (default: 20)', '--output_dir OUTPUT_DIR (default: results)',
                           '--lr LR learning rate of the network (default: 0.0001)']),
    ('test', ['--help'], ['how many images to retrieve per query (default: 8)', '(default: exact)']),
    ('data_utils', ['--help'], ['one sub-folder per dataset (default: data)', '(default: 100)']),
    ('export', ['--help'], ['--format {onnx} (default: onnx)']),
    ('report', ['structure', '--help'], ['default: docs/images/structure.png'])])
def test_help_shows_every_default(script, argv, shown, capsys):
    module = __import__(script)
    with pytest.raises(SystemExit) as exited:
        (module.main if script == 'data_utils' else module.parse_args)(argv)
    said = ' '.join(capsys.readouterr().out.split())  # as one line: argparse wraps to the terminal
    assert exited.value.code == 0 and all(default in said for default in shown)
    assert '(default: None)' not in said and '(default: False)' not in said  # nothing to say: not said
