"""Shared fixtures: the synthetic data set and one short training run on it, made once per session;
a tiny untrained model file; the devices to run device-dependent tests on (CUDA too, where there is one).
Every test runs in an empty folder of its own, and the suite fails if any test changed the
repository's results/ or data/, where the user's own runs and data sets live."""
import datetime
import glob
import importlib
import os
import pickle
import queue
import shutil
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import data_utils
import train
import utils
from model import Model


def absent(message):
    """A test whose optional extra is missing: skipped, saying so; in CI (CI=true) failed instead,
    since .ci/run installs every extra and a skip there would hide one that is missing."""
    if os.environ.get('CI') == 'true':
        pytest.fail(f'{message} (.ci/run installs it)')
    pytest.skip(message)


def require(module, install):
    """The optional package `module` (faiss, onnx, ...), or absent() naming it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        absent(f'needs {module}, an optional extra: {install}')


EXPORT_EXTRA = 'pip install -r requirements-export.txt'
BENCH_EXTRA = 'pip install -r requirements-bench.txt'
REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USER_FOLDERS = ('results', 'data')  # the user's runs and data sets: no test reads or writes them


def folder_state(folder):
    """{path under folder: (size, mtime in ns)} of every file, and None of every sub-folder; {} when
    the folder does not exist."""
    state = {}
    for root, folders, files in os.walk(folder):
        state.update({os.path.relpath(os.path.join(root, name), folder): None for name in folders})
        for name in files:
            try:
                status = os.stat(os.path.join(root, name))
            except FileNotFoundError:  # removed while walking
                continue
            state[os.path.relpath(os.path.join(root, name), folder)] = (status.st_size, status.st_mtime_ns)
    return state


def state_changes(before, after):
    """What became of the entries of a folder between two folder_state()s, a few named per kind."""
    kinds = {'added': sorted(after.keys() - before.keys()), 'removed': sorted(before.keys() - after.keys()),
             'changed': sorted(p for p in before.keys() & after.keys() if before[p] != after[p])}
    return [f'{kind} {", ".join(paths[:5])}{" ..." * (len(paths) > 5)}' for kind, paths in kinds.items() if paths]


@pytest.fixture(scope='session', autouse=True)
def user_folders_untouched():
    """Fails the session if a test added, removed or changed anything in the repository's results/ or data/."""
    before = {name: folder_state(os.path.join(REPOSITORY, name)) for name in USER_FOLDERS}
    yield
    changed = [f'{name}/: {"; ".join(changes)}' for name in USER_FOLDERS
               if (changes := state_changes(before[name], folder_state(os.path.join(REPOSITORY, name))))]
    if changed:
        pytest.fail('the tests changed the repository\'s own folders, which hold the user\'s runs and data: '
                    + ' | '.join(changed) + ' (a test must write to its tmp_path, never to the defaults)',
                    pytrace=False)


@pytest.fixture(autouse=True)
def own_working_folder(tmp_path_factory, monkeypatch):
    """Each test starts in an empty folder of its own: train.py's default --output_dir results and
    --data_path data resolve there, so a run the user left in the repository's results/ changes
    nothing a test sees, and nothing a test writes by default lands there."""
    monkeypatch.chdir(tmp_path_factory.mktemp('cwd'))


def copy_of_repository(folder):
    """The code of the repository copied to `folder` (the scripts, benchmarks/, tests/, pytest.ini),
    without results/ or data/: a place to run the README's commands, or the tests, as a user would."""
    for pattern in ('*.py', 'benchmarks/*.py', 'tests/*.py', 'pytest.ini', 'requirements*.txt'):
        for path in glob.glob(os.path.join(REPOSITORY, pattern)):
            target = os.path.join(folder, os.path.relpath(path, REPOSITORY))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy2(path, target)
    return folder


@pytest.fixture(params=['cpu', 'cuda'] if torch.cuda.is_available() else ['cpu'])
def device(request):
    return torch.device(request.param)


@pytest.fixture(scope='session')
def synthetic_path(tmp_path_factory):
    data_path = str(tmp_path_factory.mktemp('data'))
    data_utils.prepare_synthetic(data_path)  # the default set of the quick start
    return data_path


@pytest.fixture(scope='session')
def small_synthetic(tmp_path_factory):
    """5 train and 5 test classes of 10 images at 32 px: seconds per epoch."""
    data_path = str(tmp_path_factory.mktemp('small'))
    data_utils.prepare_synthetic(data_path, num_classes=10, images_per_class=10, image_size=32)
    return data_path


@pytest.fixture(scope='session')
def trained_run(synthetic_path, tmp_path_factory):
    """A real run: resnet18 from scratch on the synthetic set for 5 epochs (about a minute on 2 cores)."""
    output_dir = str(tmp_path_factory.mktemp('results'))
    argv = ['--data_path', synthetic_path, '--data_name', 'synthetic', '--backbone_type', 'resnet18',
            '--pretrained', 'none', '--image_size', '64', '--lr', '1e-3', '--num_epochs', '5',
            '--num_workers', '0', '--output_dir', output_dir]
    train.main(argv)
    args = train.parse_args(argv)
    return {'args': args, 'prefix': f'{output_dir}/{args.run_name}'}


def write_tiny_run(output_dir, backbone_type):
    """A run's _model.pth without training, written as train.py writes it: random weights (seed 0),
    32 px; for the tools that only use a model file (index, export, page)."""
    args = train.parse_args(['--data_name', 'synthetic', '--backbone_type', backbone_type, '--pretrained', 'none',
                             '--image_size', '32', '--batch_size', '8', '--num_epochs', '1', '--num_workers', '0',
                             '--output_dir', output_dir])
    torch.manual_seed(0)
    model = Model(args.backbone_type, args.feature_dim, args.pretrained, args.pooling, args.freeze_bn,
                  image_size=args.image_size, embedding_norm=args.embedding_norm)
    path = f'{output_dir}/{args.run_name}_model.pth'
    utils.save_torch_file({'model': model.state_dict(), 'proxies': {}, 'epoch': 1, 'args': vars(args)}, path)
    return {'args': args, 'model_file': path}


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory):
    """resnet18, untrained (write_tiny_run)."""
    return write_tiny_run(str(tmp_path_factory.mktemp('tiny_run')), 'resnet18')


COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)  # a collective the other rank never joins raises after it


def rank_process(target, rank, init_file, results, args):
    """One of on_two_ranks' processes: in the gloo group, target(rank, *args); its result or its
    traceback, pickled by value (the process may end before the test reads it)."""
    torch.set_num_threads(1)  # two processes share the cores, as under torchrun's OMP_NUM_THREADS=1
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        results.put((rank, pickle.dumps(target(rank, *args)), None))
    except BaseException:
        results.put((rank, None, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def on_two_ranks(target, folder, *args, timeout=300):
    """{rank: target(rank, *args)} from two fresh processes joined in a gloo group, as torchrun's two
    ranks on the CPU. target: a module-level function (the processes are spawned); folder: an empty
    folder for the group's rendezvous file. A rank's exception fails the test with its traceback (a
    collective that the other rank never joins raises one), and a rank that does not answer within
    `timeout` seconds fails it too."""
    context = mp.get_context('spawn')
    results = context.Queue()
    processes = [context.Process(target=rank_process, args=(target, rank, folder / 'rendezvous', results, args))
                 for rank in range(2)]
    for process in processes:
        process.start()
    try:
        returned = {}
        for _ in processes:
            rank, value, error = results.get(timeout=timeout)
            if error:
                pytest.fail(f'rank {rank} failed:\n{error}')
            returned[rank] = pickle.loads(value)
        return returned
    except queue.Empty:
        pytest.fail(f'no answer from rank(s) {sorted({0, 1} - returned.keys())} within {timeout} s: hung')
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
