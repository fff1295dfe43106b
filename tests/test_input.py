"""The input path: workers decode (utils.read_image) and crop (utils.build_transforms) to uint8, and
the network normalises on its device (model.InputConvention) to the numbers the float32
transforms of before gave."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T

import data_utils
import train
import utils
from model import BACKBONES, InputConvention, Model, embed_images
from conftest import write_tiny_run
from test_data_utils import ODD_MODES, write_image, write_truncated_jpeg

# a classic CNN (ImageNet's 0-1 RGB mean and std), BN-Inception (Caffe's BGR 0-255) and Lite0 (bicubic, 0.875)
CONVENTIONS = ['resnet50', 'inception', 'efficientnet_lite0']


def old_to_input(spec):
    """ToTensor and Normalize as the workers ran them before (with BN-Inception's ToBGR255): PIL -> float32."""
    bgr_255 = [T.Lambda(lambda x: x[[2, 1, 0]] * 255)] if spec.bgr_255 else []
    return T.Compose([T.ToTensor(), *bgr_255, T.Normalize(spec.mean, spec.std)])


def old_test_crop(spec, image_size):
    """The old test transform's resize and centre crop, on PIL images."""
    interpolation = T.InterpolationMode(spec.interpolation)
    return T.Compose([T.Resize(round(image_size / spec.crop_pct), interpolation=interpolation),
                      T.CenterCrop(image_size)])


def as_uint8_tensor(image):
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


@pytest.fixture(scope='module')
def synthetic_images(small_synthetic):
    """The small synthetic set's JPEGs (32 x 32), train and test."""
    splits = data_utils.load_splits(small_synthetic, 'synthetic')
    return [path for split in splits.values() for paths in split.values() for path in paths]


@pytest.mark.parametrize('backbone', CONVENTIONS)
def test_the_network_input_is_the_old_float_transform_on_the_same_crop(backbone, synthetic_images):
    spec = BACKBONES[backbone]
    convention, old = InputConvention(spec), old_to_input(spec)
    crop = old_test_crop(spec, 24)
    for path in synthetic_images[:20]:
        cropped = crop(utils.read_rgb(path))
        new = convention(as_uint8_tensor(cropped)[None])[0]
        assert new.dtype == torch.float32
        assert (new - old(cropped)).abs().max() < 1e-5


@pytest.mark.parametrize('backbone', CONVENTIONS)
def test_the_new_test_transform_crops_as_the_old_one_did(backbone, synthetic_images):
    """decode_jpeg gives PIL's pixels; the antialiased tensor resize differs from PIL's by a level
    in a few pixels (two in bicubic), never in where it crops."""
    spec = BACKBONES[backbone]
    new, old = utils.build_transforms(spec, 24)[1], old_test_crop(spec, 24)
    differences = []
    for path in synthetic_images[:20]:
        image = utils.read_image(path)
        assert torch.equal(image, as_uint8_tensor(utils.read_rgb(path)))
        cropped = new(image)
        assert cropped.dtype == torch.uint8 and cropped.shape == (3, 24, 24)
        differences.append((cropped.int() - as_uint8_tensor(old(utils.read_rgb(path))).int()).abs())
    differences = torch.stack(differences)
    assert differences.max() <= 2 and differences.float().mean() < 0.05


def test_a_seed_draws_the_old_train_crops_and_flips():
    """v2's RandomResizedCrop and flip draw from torch's generator as the old transforms did, so a
    seeded (resumed) run augments the same images the same way."""
    spec = BACKBONES['resnet50']
    pixels = np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    pixels[:, :45] //= 4  # a dark left half: a flip or a shifted crop shows
    old = T.Compose([T.RandomResizedCrop(32), T.RandomHorizontalFlip()])
    new = utils.build_transforms(spec, 32)[0]
    for seed in range(8):
        torch.manual_seed(seed)
        expected = as_uint8_tensor(old(T.functional.to_pil_image(pixels)))
        torch.manual_seed(seed)
        got = new(torch.from_numpy(pixels).permute(2, 0, 1))
        assert got.dtype == torch.uint8
        assert (got.int() - expected.int()).abs().float().mean() < 1  # the same box and flip, resized alike


def test_embedding_normalises_once_as_the_old_transforms_did(small_synthetic, synthetic_images):
    """embed_images (train.py's embedding, test.py's queries, gallery.py's index) on 32 px images at
    28 px: the test resize is then no resize, so old and new input are the same crop."""
    torch.manual_seed(0)
    model = Model('resnet18', feature_dim=8, pretrained='none').eval()
    paths = synthetic_images[:6]
    old = T.Compose([old_test_crop(model.backbone_spec, 28), old_to_input(model.backbone_spec)])
    images = torch.stack([old(utils.read_rgb(path)) for path in paths])
    with torch.no_grad():
        expected = F.normalize(model.refactor(model.pool(model.trunk(images))), dim=1)
    torch.testing.assert_close(embed_images(model, paths, 28, batch_size=4, progress=False), expected,
                               atol=1e-5, rtol=0)


def test_the_workers_send_uint8_batches(small_synthetic, synthetic_images):
    args = train.parse_args(['--data_path', small_synthetic, '--data_name', 'synthetic', '--backbone_type', 'resnet18',
                             '--pretrained', 'none', '--image_size', '24', '--batch_size', '8', '--num_workers', '1'])
    train_transform, test_transform = utils.build_transforms(BACKBONES['resnet18'], 24)
    for transform, is_train in ((train_transform, True), (test_transform, False)):
        loader = train.build_loader(synthetic_images, [0] * len(synthetic_images), transform, is_train, args,
                                    torch.device('cpu'))
        images, _ = next(iter(loader))
        assert images.dtype == torch.uint8 and images.shape == (8, 3, 24, 24)


def test_a_model_file_from_before_the_input_convention_loads(tmp_path):
    """The convention's mean and std are not in the state dict: files saved without them (all files
    from before it) load strictly, and take the convention from their backbone type."""
    run = write_tiny_run(str(tmp_path), 'inception')
    saved = utils.load_torch_file(run['model_file'], 'model file')
    assert not [key for key in saved['model'] if key.startswith('input_convention')]
    model = Model.from_file(run['model_file'])
    convention = model.input_convention
    assert convention.bgr_255 and convention.mean.flatten().tolist() == [104, 117, 128]
    assert convention.std.flatten().tolist() == [1, 1, 1]


@pytest.mark.parametrize('filename', ODD_MODES)
def test_pngs_and_odd_jpegs_decode_to_three_channels_as_pil_converts_them(tmp_path, filename):
    path = str(tmp_path / filename)
    ODD_MODES[filename](path)  # grayscale and CMYK JPEGs, palette and RGBA PNGs
    image = utils.read_image(path)
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 48)
    assert torch.equal(image, as_uint8_tensor(utils.read_rgb(path)))


def test_a_colour_jpeg_decodes_to_the_pixels_pil_gives(tmp_path):
    write_image(str(tmp_path / 'colour.jpg'))
    image = utils.read_image(str(tmp_path / 'colour.jpg'))
    assert image.shape == (3, 32, 48) and torch.equal(image, as_uint8_tensor(utils.read_rgb(tmp_path / 'colour.jpg')))


@pytest.mark.parametrize('name,write', [
    ('truncated.jpg', write_truncated_jpeg),
    ('garbage.jpg', lambda path: open(path, 'wb').write(b'\xff\xd8\xff not really a jpeg')),
    ('empty.png', lambda path: open(path, 'wb').close()),
])
def test_an_unreadable_image_is_an_error_naming_the_file(tmp_path, name, write):
    path = str(tmp_path / name)
    write(path)
    with pytest.raises(utils.UnreadableImage, match=f'^{path}: not a readable image \\(') as error:
        utils.read_image(path)
    assert str(error.value).endswith(f'({error.value.reason})')  # what messages naming the file themselves say
