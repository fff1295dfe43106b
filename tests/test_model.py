import os

import pytest
import torch
import torch.nn.functional as F
import torchvision

from model import BACKBONES, Model

# EfficientNet-Lite0's first forward and backward build ~50 distinct CPU convolution kernels (several
# seconds on 2 cores): its cases run with the slow tests
EVERY_BACKBONE = [pytest.param(name, marks=pytest.mark.slow) if name == 'efficientnet_lite0' else name
                  for name in BACKBONES]

# Smallest inputs each architecture accepts (BN-Inception's unpadded pools need 32); keeps CPU time low.
INPUT_SIZE = {'inception': 32}


def images(size=16, batch=2):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def bn_running_means(model):
    return [m.running_mean.clone() for m in model.trunk.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def train_step(model, size=16):
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(images(size)).sum().backward()
    optimizer.step()


@pytest.fixture(scope='module')
def resnet18_file(tmp_path_factory):
    """A random resnet18 classification state dict, in the official ImageNet file's format."""
    path = tmp_path_factory.mktemp('weights') / 'resnet18.pth'
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def assert_trunk_matches(model, path):
    saved = torch.load(path, weights_only=True)
    trunk = model.trunk.state_dict()
    assert trunk.keys() == saved.keys() - {'fc.weight', 'fc.bias'}
    for k in trunk:
        assert torch.equal(trunk[k], saved[k]), k


@pytest.mark.parametrize('name', EVERY_BACKBONE)
def test_forward_gives_unit_embeddings_for_every_backbone(name):
    model = Model(name, feature_dim=8, pretrained='none').eval()
    x = images(INPUT_SIZE.get(name, 16))
    with torch.no_grad():
        assert model.trunk(x).shape[1] == BACKBONES[name].channels
        out = model(x)
    assert out.shape == (2, 8)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))


@pytest.mark.parametrize('name', EVERY_BACKBONE)
def test_channels_last_gives_the_same_embeddings_and_gradients(name, device):
    """train.py lays network and images out channels-last on CUDA; no backbone may depend on it."""
    torch.manual_seed(0)
    # eval: batch statistics of 2 images at 16 px are too few to compare two computations of them;
    # float64: in float32 the two layouts' convolution kernels round differently, enough to move
    # single gradient elements of a random network past any tolerance that still catches a bug
    model = Model(name, feature_dim=8, pretrained='none').to(device, torch.float64).eval()
    x = images(INPUT_SIZE.get(name, 16)).to(device, torch.float64)
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        model.to(memory_format=layout).zero_grad()
        embeddings = model(x.to(memory_format=layout))
        embeddings[:, 0].sum().backward()
        results.append([embeddings] + [parameter.grad for parameter in model.parameters()])
    for contiguous, channels_last in zip(*results):
        torch.testing.assert_close(channels_last, contiguous, atol=1e-9, rtol=1e-7)


def test_input_conventions():
    inception = BACKBONES['inception']
    assert inception.bgr_255 and inception.mean == (104, 117, 128) and inception.std == (1, 1, 1)
    imagenet = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.transforms()
    for name in ('resnet18', 'resnet50'):
        spec = BACKBONES[name]
        assert not spec.bgr_255 and list(spec.mean) == imagenet.mean and list(spec.std) == imagenet.std


def test_googlenet_convention_equals_torchvision_transform_input():
    raw = torch.rand(2, 3, 4, 4)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    reference = torchvision.models.googlenet(transform_input=True, aux_logits=False, init_weights=False)
    expected = reference._transform_input((raw - mean) / std)
    spec = BACKBONES['googlenet']
    assert not spec.bgr_255
    ours = (raw - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)
    torch.testing.assert_close(ours, expected)


def test_avgmax_pooling_is_avg_plus_max_and_differs_from_max():
    x = images(64)  # a 2x2 final map: at 1x1, avg == max and the two poolings would coincide
    avgmax = Model('resnet18', pretrained='none', pooling='avgmax').eval()
    plain = Model('resnet18', pretrained='none', pooling='max').eval()
    plain.load_state_dict(avgmax.state_dict())
    with torch.no_grad():
        fmap = avgmax.trunk(avgmax.input_convention(x))  # the network normalises its input first
        expected = F.normalize(avgmax.refactor(fmap.mean((2, 3)) + fmap.amax((2, 3))), dim=1)
        torch.testing.assert_close(avgmax(x), expected)
        assert not torch.allclose(avgmax(x), plain(x), atol=1e-3)


def test_unknown_choices_are_listed():
    with pytest.raises(ValueError, match='resnet50'):
        Model('vgg16', pretrained='none')
    with pytest.raises(ValueError, match='avgmax'):
        Model('resnet18', pretrained='none', pooling='gem')


def test_bn_statistics_frozen_only_when_weights_were_loaded(resnet18_file):
    loaded = Model('resnet18', pretrained=str(resnet18_file))
    before = bn_running_means(loaded)
    train_step(loaded)
    assert all(torch.equal(a, b) for a, b in zip(before, bn_running_means(loaded)))
    assert loaded.refactor.training  # only the BN layers are held in eval mode

    scratch = Model('resnet18', pretrained='none')
    before = bn_running_means(scratch)
    train_step(scratch)
    assert not any(torch.equal(a, b) for a, b in zip(before, bn_running_means(scratch)))


def test_loads_local_state_dict(resnet18_file):
    assert_trunk_matches(Model('resnet18', pretrained=str(resnet18_file)), resnet18_file)


def test_loads_imagenet_from_torch_home_cache(resnet18_file, tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    cached = tmp_path / 'hub' / 'checkpoints' / 'resnet18-f37072fd.pth'
    cached.parent.mkdir(parents=True)
    cached.write_bytes(resnet18_file.read_bytes())
    assert_trunk_matches(Model('resnet18', pretrained='imagenet'), cached)


def test_missing_cache_names_expected_file_and_alternatives(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')  # offline, the missing file is said; online it would be downloaded
    with pytest.raises(FileNotFoundError) as error:
        Model('resnet18', pretrained='imagenet')
    message = str(error.value)
    assert os.path.join(str(tmp_path), 'hub', 'checkpoints', 'resnet18-f37072fd.pth') in message
    assert 'https://download.pytorch.org/models/resnet18-f37072fd.pth' in message
    assert '--pretrained none' in message


def test_missing_local_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        Model('resnet18', pretrained=str(tmp_path / 'nope.pth'))


@pytest.mark.parametrize('content', ['not a file torch can read', 'training checkpoint', 'other head'])
def test_wrong_format_file_gives_short_error_naming_it(content, resnet18_file, tmp_path):
    path = tmp_path / 'weights.pth'
    if content == 'training checkpoint':
        torch.save({'model': torch.load(resnet18_file, weights_only=True), 'args': {}}, path)
    elif content == 'other head':
        torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    else:
        path.write_text(content)
    with pytest.raises(ValueError) as error:
        Model('resnet18', pretrained=str(path))
    message = str(error.value)
    assert str(path) in message and len(message) < 400
    if content != 'not a file torch can read':
        assert 'resnet18' in message


def test_saved_model_reloads_with_pretrained_none(resnet18_file, tmp_path):
    args = {'backbone_type': 'resnet18', 'feature_dim': 16, 'pooling': 'avgmax'}
    model = Model(**args, pretrained=str(resnet18_file))
    train_step(model, size=64)
    torch.save({'model': model.state_dict(), 'args': args}, tmp_path / 'ckpt.pth')

    restored = Model.from_file(tmp_path / 'ckpt.pth')
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(images(64)), model(images(64)), rtol=0, atol=0)
