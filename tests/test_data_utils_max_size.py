"""--max_size: the preparers list small JPEG copies under resized_<N>/ so training decodes small images."""
import hashlib
import os
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

import data_utils
from data_utils import load_splits, prepare_cub, prepare_synthetic, split_path
from utils import run_script

MAX_SIZE = 32
# file -> (class id, size, box as x y width height): 1 and 2 train, 101 test. Non-square on both
# sides so a lost aspect ratio shows; small.jpg is already within MAX_SIZE; the PNG has alpha.
CUB_IMAGES = {
    'wide.jpg': (1, (120, 60), (10, 0, 30, 60)),  # the box is tall: cropped first, its copy is tall too
    'tall.jpg': (2, (45, 90), (0, 0, 45, 90)),
    'small.jpg': (2, (20, 12), (0, 0, 20, 12)),
    'alpha.png': (101, (64, 48), (0, 0, 64, 48)),
}
COPY_OF = {os.path.splitext(name)[0] + '.jpg': name for name in CUB_IMAGES}  # copies are JPEGs


def main(argv):
    """data_utils.py as run from the command line: an error ends in one 'error: ...' line."""
    run_script(data_utils.main, argv)


def make_cub(data_path):
    """A CUB-200-2011 layout holding CUB_IMAGES, noise so every copy really is re-encoded."""
    root = os.path.join(data_path, 'cub')
    rng = np.random.default_rng(0)
    lines = {'images.txt': [], 'image_class_labels.txt': [], 'bounding_boxes.txt': []}
    for image_id, (name, (class_id, (width, height), box)) in enumerate(CUB_IMAGES.items(), 1):
        rel_path = f'{class_id:03d}.class/{name}'
        os.makedirs(os.path.join(root, 'images', f'{class_id:03d}.class'), exist_ok=True)
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).convert('RGBA' if name.endswith('.png') else 'RGB').save(
            os.path.join(root, 'images', rel_path))
        lines['images.txt'].append(f'{image_id} {rel_path}\n')
        lines['image_class_labels.txt'].append(f'{image_id} {class_id}\n')
        lines['bounding_boxes.txt'].append(f'{image_id} {" ".join(map(str, box))}\n')
    for file_name, file_lines in lines.items():
        with open(os.path.join(root, file_name), 'w') as f:
            f.writelines(file_lines)


def digests(folder):
    """{path: sha256} of every file under folder: what must stay as it was."""
    return {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in pathlib.Path(folder).rglob('*')
            if path.is_file()}


def listed_sizes(data_path, data_name, crop=False):
    """{file name: (relative path, size)} of every image the saved split lists."""
    splits = torch.load(split_path(data_path, data_name, crop, MAX_SIZE), weights_only=True)
    listed = {}
    for classes in splits.values():
        for paths in classes.values():
            for path in paths:
                with Image.open(os.path.join(data_path, data_name, path)) as img:
                    listed[os.path.basename(path)] = (path, img.size, img.format)
    return listed


def assert_shrunk_with_aspect(size, original):
    (width, height), (original_width, original_height) = size, original
    assert max(width, height) == MAX_SIZE
    # each side is the other scaled by the original ratio, up to rounding to whole pixels
    assert abs(width - height * original_width / original_height) <= 1
    assert abs(height - width * original_height / original_width) <= 1


def test_max_size_lists_shrunk_copies_and_leaves_the_originals(tmp_path):
    data_path = str(tmp_path)
    make_cub(data_path)
    prepare_cub(data_path)  # the full-size split is written first and must survive
    before = digests(tmp_path / 'cub')

    out = prepare_cub(data_path, max_size=MAX_SIZE)

    assert out == str(tmp_path / 'cub' / 'uncropped_max32_data_dicts.pth') == split_path(data_path, 'cub', max_size=32)
    assert digests(tmp_path / 'cub').items() >= before.items()  # originals and the full-size split unchanged
    listed = listed_sizes(data_path, 'cub')
    assert listed.pop('small.jpg')[0] == 'images/002.class/small.jpg'  # within MAX_SIZE: the original itself
    assert set(listed) == {'wide.jpg', 'tall.jpg', 'alpha.jpg'}
    for name, (path, size, image_format) in listed.items():
        class_id, original_size, _ = CUB_IMAGES[COPY_OF[name]]
        assert path == f'resized_32/images/{class_id:03d}.class/{name}'  # relative, mirroring the original's
        assert image_format == 'JPEG'
        assert_shrunk_with_aspect(size, original_size)

    splits = load_splits(data_path, 'cub', max_size=MAX_SIZE)
    paths = [path for classes in splits.values() for paths in classes.values() for path in paths]
    assert len(paths) == len(CUB_IMAGES) and all(os.path.isfile(path) for path in paths)
    assert splits['train']['001.class'] == [os.path.join(data_path, 'cub', 'resized_32/images/001.class/wide.jpg')]


def test_crop_then_max_size_shrinks_the_crop_and_writes_it_once(tmp_path):
    data_path = str(tmp_path)
    make_cub(data_path)
    before = digests(tmp_path / 'cub')

    out = prepare_cub(data_path, crop=True, max_size=MAX_SIZE)

    assert os.path.basename(out) == 'cropped_max32_data_dicts.pth'
    assert digests(tmp_path / 'cub').items() >= before.items()
    # only the crop already within MAX_SIZE is written full size; the others go straight to resized_32/
    assert [os.path.basename(path) for path in digests(tmp_path / 'cub' / 'cropped')] == ['small.jpg']
    path, size, _ = listed_sizes(data_path, 'cub', crop=True)['wide.jpg']
    assert path == 'resized_32/cropped/images/001.class/wide.jpg'
    assert_shrunk_with_aspect(size, (30, 60))  # the tall crop, not the wide image
    # a crop already within MAX_SIZE is the crop itself
    assert listed_sizes(data_path, 'cub', crop=True)['small.jpg'][:2] == ('cropped/images/002.class/small.jpg', (20, 12))


def test_synthetic_max_size_is_found_by_load_splits(tmp_path):
    data_path = str(tmp_path)
    prepare_synthetic(data_path, num_classes=4, images_per_class=2, image_size=64, max_size=MAX_SIZE)
    originals = digests(tmp_path / 'synthetic' / 'images')

    splits = load_splits(data_path, 'synthetic', max_size=MAX_SIZE)  # found, not generated again

    assert digests(tmp_path / 'synthetic' / 'images') == originals
    paths = [path for classes in splits.values() for paths in classes.values() for path in paths]
    assert len(paths) == 8
    for path in paths:
        assert path.startswith(os.path.join(data_path, 'synthetic', 'resized_32', 'images'))
        with Image.open(path) as img:
            assert img.size == (32, 32)
        with Image.open(path.replace(f'{os.sep}resized_32', '')) as img:
            assert img.size == (64, 64)  # the original it was made from


def test_command_line_max_size(tmp_path, capsys):
    data_path = str(tmp_path)
    make_cub(data_path)
    with pytest.raises(FileNotFoundError) as error:
        load_splits(data_path, 'cub', max_size=MAX_SIZE)
    assert f'python data_utils.py --data_path {data_path} --data_name cub --max_size 32' in str(error.value)

    main(['--data_path', data_path, '--data_name', 'cub', '--max_size', '32'])
    assert os.path.isfile(split_path(data_path, 'cub', max_size=MAX_SIZE))
    with pytest.raises(SystemExit) as exited:
        main(['--data_path', data_path, '--data_name', 'cub', '--max_size', '0'])
    assert exited.value.code == 2
    assert "argument --max_size: expected an integer >= 1, got '0'" in capsys.readouterr().err
