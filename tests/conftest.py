"""Shared fixtures: the synthetic data set and one short training run on it, made once per session;
the devices to run device-dependent tests on (CUDA too, where there is one)."""
import pytest
import torch

import data_utils
import train


@pytest.fixture(params=['cpu', 'cuda'] if torch.cuda.is_available() else ['cpu'])
def device(request):
    return torch.device(request.param)


@pytest.fixture(scope='session')
def synthetic_path(tmp_path_factory):
    data_path = str(tmp_path_factory.mktemp('data'))
    data_utils.prepare_synthetic(data_path)  # the default set of the quick start
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
