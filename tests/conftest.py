"""Shared fixtures: the synthetic data set and one short training run on it, made once per session;
a tiny untrained model file; the devices to run device-dependent tests on (CUDA too, where there is one)."""
import importlib
import os

import pytest
import torch

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
                  image_size=args.image_size)
    path = f'{output_dir}/{args.run_name}_model.pth'
    utils.save_torch_file({'model': model.state_dict(), 'proxies': {}, 'epoch': 1, 'args': vars(args)}, path)
    return {'args': args, 'model_file': path}


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory):
    """resnet18, untrained (write_tiny_run)."""
    return write_tiny_run(str(tmp_path_factory.mktemp('tiny_run')), 'resnet18')
