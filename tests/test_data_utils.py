"""data_utils against tiny fixtures laid out like the official CUB-200-2011, Cars196, Stanford Online
Products and In-shop Clothes releases."""
import os
import shutil

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

import data_utils
from data_utils import load_splits, prepare_cars, prepare_cub, prepare_inshop, prepare_sop, split_path
from utils import read_rgb, run_script

# -----------------------------------------------------------------------------
# image writers: each creates (or, for the broken ones, botches) the file at `path`


def main(argv):
    """data_utils.py as run from the command line: an error ends in one 'error: ...' line."""
    run_script(data_utils.main, argv)


def write_image(path, size=(48, 32), mode='RGB'):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # noise, so the JPEG is big enough that cutting it in half loses real image data
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)  # format from the extension


def write_truncated_jpeg(path):
    write_image(path, size=(64, 64))
    with open(path, 'rb') as f:
        data = f.read()
    with open(path, 'wb') as f:
        f.write(data[:len(data) // 2])


def write_empty(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, 'wb').close()


def write_text(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.write('not an image\n')


def write_nothing(path):
    pass  # listed in the metadata but never written


def write_mode(mode):
    return lambda path: write_image(path, mode=mode)


BROKEN = {'truncated.jpg': write_truncated_jpeg, 'empty.jpg': write_empty,
          'text.jpg': write_text, 'missing.jpg': write_nothing}
ODD_MODES = {'gray.jpg': write_mode('L'), 'cmyk.jpg': write_mode('CMYK'),
             'palette.png': write_mode('P'), 'alpha.png': write_mode('RGBA')}

# -----------------------------------------------------------------------------
# CUB-200-2011 fixtures: an entry is (class_id, file name, writer, (x, y, width, height))

# 1, 2, 100 train and 101, 200 test: splitting by count instead of id would move class 100
CUB_NAMES = {1: '001.Black_footed_Albatross', 2: '002.Laysan_Albatross', 100: '100.Brown_Pelican',
             101: '101.White_Pelican', 200: '200.Common_Yellowthroat'}
CUB_TRAIN = [CUB_NAMES[c] for c in (1, 2, 100)]
CUB_TEST = [CUB_NAMES[c] for c in (101, 200)]


def cub_entries():
    return [(c, f'img_{c}_{i}.jpg', write_image, (4.0, 6.0, 20.0, 10.0)) for c in CUB_NAMES for i in range(2)]


def make_cub(data_path, entries, nested=False, with_classes=True):
    base = os.path.join(data_path, 'cub', 'CUB_200_2011' if nested else '')
    os.makedirs(os.path.join(base, 'images'), exist_ok=True)
    images, labels, boxes = [], [], []
    for image_id, (class_id, filename, write, (x, y, width, height)) in enumerate(entries, 1):
        rel_path = f'{CUB_NAMES[class_id]}/{filename}'
        write(os.path.join(base, 'images', rel_path))
        images.append(f'{image_id} {rel_path}\n')
        labels.append(f'{image_id} {class_id}\n')
        boxes.append(f'{image_id} {x} {y} {width} {height}\n')
    files = {'images.txt': images, 'image_class_labels.txt': labels, 'bounding_boxes.txt': boxes}
    if with_classes:
        files['classes.txt'] = [f'{class_id} {name}\n' for class_id, name in CUB_NAMES.items()]
    for name, lines in files.items():
        with open(os.path.join(base, name), 'w') as f:
            f.writelines(lines)
    return base

# -----------------------------------------------------------------------------
# Cars196 fixtures: an entry is (class_id, file name, writer, (x1, y1, x2, y2)), MATLAB's
# 1-based inclusive box


CAR_NAMES = [f'Make Model {class_id} 2012' for class_id in range(1, 197)]
CAR_CLASSES = (1, 2, 98, 99, 196)


def car_entries(classes=CAR_CLASSES):
    return [(c, f'{c:03d}{i:03d}.jpg', write_image, (5, 3, 30, 20)) for c in classes for i in range(2)]


def struct_array(rows):
    """A 1xN MATLAB struct array, the shape the official .mat files have."""
    array = np.zeros((1, len(rows)), dtype=[(field, 'O') for field in rows[0]])
    for i, row in enumerate(rows):
        array[0, i] = tuple(row.values())
    return array


def annotation(class_id, box, **path_field):
    # the official files store small unsigned ints; uint8 arithmetic would wrap at x1 - 1
    x1, y1, x2, y2 = box
    return {**path_field, 'bbox_x1': np.uint8(x1), 'bbox_y1': np.uint8(y1),
            'bbox_x2': np.uint8(x2), 'bbox_y2': np.uint8(y2), 'class': np.uint8(class_id), 'test': np.uint8(0)}


def class_names_cell():
    return np.array(CAR_NAMES, dtype=object)[None, :]


def make_cars_annos(data_path, entries):
    root = os.path.join(data_path, 'car')
    os.makedirs(os.path.join(root, 'car_ims'), exist_ok=True)
    rows = []
    for class_id, filename, write, box in entries:
        write(os.path.join(root, 'car_ims', filename))
        rows.append(annotation(class_id, box, relative_im_path=f'car_ims/{filename}'))
    scipy.io.savemat(os.path.join(root, 'cars_annos.mat'),
                     {'annotations': struct_array(rows), 'class_names': class_names_cell()})
    return root


def make_cars_devkit(data_path, train=None, test=None, test_annos_dir='devkit', meta=True):
    root = os.path.join(data_path, 'car')
    halves = [('cars_train', train, os.path.join(root, 'devkit', 'cars_train_annos.mat')),
              ('cars_test', test, os.path.join(root, test_annos_dir, 'cars_test_annos_withlabels.mat'))]
    for folder, entries, annos_path in halves:
        if entries is None:
            continue
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        os.makedirs(os.path.dirname(annos_path), exist_ok=True)
        for class_id, filename, write, box in entries:
            write(os.path.join(root, folder, filename))
        rows = [annotation(class_id, box, fname=filename) for class_id, filename, _, box in entries]
        scipy.io.savemat(annos_path, {'annotations': struct_array(rows)})
    if meta:
        os.makedirs(os.path.join(root, 'devkit'), exist_ok=True)
        scipy.io.savemat(os.path.join(root, 'devkit', 'cars_meta.mat'), {'class_names': class_names_cell()})
    return root


# -----------------------------------------------------------------------------
# Stanford Online Products fixtures: (class_id, super_class_id, product) per list file, each
# product two images <product>_<k>.JPG; test class ids continue after the train ones, as released

SOP_CLASSES = {'train': [(1, 1, 'bicycle_final/111085122871'), (2, 3, 'chair_final/111265328556')],
               'test': [(11319, 1, 'bicycle_final/121128711434'), (22634, 12, 'toaster_final/380894339738')]}


def make_sop(data_path, nested=False, broken=()):
    """Write the release, the images named in `broken` truncated; return the folder of the lists."""
    base = os.path.join(data_path, 'sop', 'Stanford_Online_Products' if nested else '')
    for split, classes in SOP_CLASSES.items():
        lines = ['image_id class_id super_class_id path\n']
        for class_id, super_class_id, product in classes:
            for k in range(2):
                image_path = f'{product}_{k}.JPG'
                (write_truncated_jpeg if image_path in broken else write_image)(os.path.join(base, image_path))
                lines.append(f'{len(lines)} {class_id} {super_class_id} {image_path}\n')
        with open(os.path.join(base, f'Ebay_{split}.txt'), 'w') as f:
            f.writelines(lines)
    return base

# -----------------------------------------------------------------------------
# In-shop Clothes fixtures: (image under img/, item id, evaluation status); the test items' images
# are split between query and gallery, the train items are others


INSHOP_ROWS = [
    ('WOMEN/Dresses/id_00000002/02_1_front.jpg', 'id_00000002', 'train'),
    ('WOMEN/Dresses/id_00000002/02_2_side.jpg', 'id_00000002', 'train'),
    ('MEN/Denim/id_00000080/01_1_front.jpg', 'id_00000080', 'train'),
    ('WOMEN/Dresses/id_00000001/02_1_front.jpg', 'id_00000001', 'query'),
    ('WOMEN/Dresses/id_00000001/02_2_side.jpg', 'id_00000001', 'gallery'),
    ('WOMEN/Dresses/id_00000001/02_3_back.jpg', 'id_00000001', 'gallery'),
    ('MEN/Shirts_Polos/id_00000007/01_1_front.jpg', 'id_00000007', 'query'),
    ('MEN/Shirts_Polos/id_00000007/01_4_full.jpg', 'id_00000007', 'query'),
    ('MEN/Shirts_Polos/id_00000007/01_2_side.jpg', 'id_00000007', 'gallery'),
]


def make_inshop(data_path, in_eval=False, broken=()):
    """Write img/ and the partition list (in Eval/ if asked); return the folder of the list."""
    root = os.path.join(data_path, 'inshop')
    lines = [f'{len(INSHOP_ROWS)}\n', 'image_name item_id evaluation_status\n']
    for name, item_id, status in INSHOP_ROWS:
        (write_truncated_jpeg if name in broken else write_image)(os.path.join(root, 'img', name))
        lines.append(f'img/{name:<50}{item_id}  {status}\n')  # aligned columns: runs of spaces must parse too
    folder = os.path.join(root, 'Eval' if in_eval else '')
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'list_eval_partition.txt'), 'w') as f:
        f.writelines(lines)
    return folder


def saved_splits(data_path, data_name, crop=False):
    return torch.load(split_path(data_path, data_name, crop), weights_only=True)

# -----------------------------------------------------------------------------
# CUB


@pytest.mark.parametrize('nested', [False, True], ids=['flat', 'CUB_200_2011'])
def test_cub_splits_by_class_id_with_relative_paths(tmp_path, nested):
    make_cub(tmp_path, cub_entries(), nested=nested)
    out = prepare_cub(str(tmp_path))

    assert out == str(tmp_path / 'cub' / 'uncropped_data_dicts.pth')
    splits = saved_splits(str(tmp_path), 'cub')
    assert list(splits['train']) == CUB_TRAIN
    assert list(splits['test']) == CUB_TEST
    images_dir = 'CUB_200_2011/images' if nested else 'images'
    for classes in splits.values():
        for name, paths in classes.items():
            assert len(paths) == 2
            for path in paths:
                assert path.startswith(f'{images_dir}/{name}/')
                assert os.path.isfile(tmp_path / 'cub' / path)
    assert not (tmp_path / 'cub' / 'cropped').exists()  # uncropped lists the originals, copies nothing


def test_load_splits_resolves_paths_and_survives_moving_the_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_cub('data', cub_entries())
    main(['--data_name', 'cub'])  # --data_path defaults to 'data'

    splits = load_splits('data', 'cub')
    assert splits['train'][CUB_NAMES[1]][0] == f'data/cub/images/{CUB_NAMES[1]}/img_1_0.jpg'
    shutil.move('data', 'moved')
    splits = load_splits('moved', 'cub')
    paths = [path for classes in splits.values() for paths in classes.values() for path in paths]
    assert len(paths) == 10
    assert all(path.startswith('moved/cub/') and os.path.isfile(path) for path in paths)


def test_cub_without_classes_txt_names_classes_by_folder(tmp_path):
    make_cub(tmp_path, cub_entries(), with_classes=False)
    prepare_cub(str(tmp_path))
    splits = saved_splits(str(tmp_path), 'cub')
    assert list(splits['train']) == CUB_TRAIN
    assert list(splits['test']) == CUB_TEST


def test_cub_crop_writes_jpegs_of_the_clamped_box(tmp_path):
    entries = cub_entries() + [
        (1, 'overhang.jpg', write_image, (40.0, 20.0, 30.0, 30.0)),  # 48x32 image: clamps to 8x12
        (2, 'alpha.png', write_mode('RGBA'), (0.0, 0.0, 48.0, 32.0)),
        (101, 'outside.jpg', write_image, (60.0, 40.0, 10.0, 10.0)),
    ]
    make_cub(tmp_path, entries)
    with pytest.warns(UserWarning) as warned:
        out = prepare_cub(str(tmp_path), crop=True)

    messages = [str(w.message) for w in warned]
    assert any('outside.jpg: bounding box' in message for message in messages)
    assert any('skipped 1 of 13 images' in message for message in messages)

    assert out == split_path(str(tmp_path), 'cub', crop=True)
    splits = saved_splits(str(tmp_path), 'cub', crop=True)
    sizes = {}
    for classes in splits.values():
        for name, paths in classes.items():
            for path in paths:
                assert path.startswith(f'cropped/images/{name}/')
                with Image.open(tmp_path / 'cub' / path) as img:
                    assert img.format == 'JPEG'
                    sizes[os.path.basename(path)] = img.size
    assert sizes.pop('overhang.jpg') == (8, 12)
    assert sizes.pop('alpha.jpg') == (48, 32)
    assert 'outside.jpg' not in sizes
    assert set(sizes.values()) == {(20, 10)}
    assert len(sizes) == 10


@pytest.mark.parametrize('filename,write', ODD_MODES.items(), ids=ODD_MODES)
def test_read_rgb_converts_odd_modes(tmp_path, filename, write):
    write(str(tmp_path / filename))
    img = read_rgb(tmp_path / filename)
    assert img.mode == 'RGB'
    assert img.size == (48, 32)


def test_broken_images_skipped_and_named_odd_modes_kept(tmp_path, capsys):
    odd = [(2, name, write, (0.0, 0.0, 8.0, 8.0)) for name, write in ODD_MODES.items()]
    broken = [(101, name, write, (0.0, 0.0, 8.0, 8.0)) for name, write in BROKEN.items()]
    make_cub(tmp_path, cub_entries() + odd + broken)
    with pytest.warns(UserWarning) as warned:
        prepare_cub(str(tmp_path))

    messages = [str(w.message) for w in warned]
    for name in BROKEN:
        assert sum(name in message for message in messages) == 1, name
    assert not any(name in message for name in ODD_MODES for message in messages)
    assert any('skipped 4 of 18 images' in message for message in messages)
    splits = saved_splits(str(tmp_path), 'cub')
    kept = {os.path.basename(path) for classes in splits.values() for paths in classes.values() for path in paths}
    assert set(ODD_MODES) <= kept
    assert not set(BROKEN) & kept
    assert len(kept) == 14
    assert 'skipped 4' in capsys.readouterr().out

# -----------------------------------------------------------------------------
# Cars196


def test_cars_annos_layout_splits_by_class_and_crops_inclusive_boxes(tmp_path):
    make_cars_annos(tmp_path, car_entries())
    prepare_cars(str(tmp_path))
    prepare_cars(str(tmp_path), crop=True)

    splits = saved_splits(str(tmp_path), 'car')
    assert list(splits['train']) == [CAR_NAMES[c - 1] for c in (1, 2, 98)]
    assert list(splits['test']) == [CAR_NAMES[c - 1] for c in (99, 196)]
    assert splits['test'][CAR_NAMES[195]] == ['car_ims/196000.jpg', 'car_ims/196001.jpg']
    cropped = saved_splits(str(tmp_path), 'car', crop=True)
    assert cropped['test'][CAR_NAMES[195]] == ['cropped/car_ims/196000.jpg', 'cropped/car_ims/196001.jpg']
    for classes in cropped.values():
        for paths in classes.values():
            for path in paths:
                with Image.open(tmp_path / 'car' / path) as img:
                    assert img.size == (30 - 5 + 1, 20 - 3 + 1)  # corners included


@pytest.mark.parametrize('test_annos_dir', ['', 'devkit'], ids=['car', 'car/devkit'])
def test_cars_devkit_layout_pools_both_halves(tmp_path, test_annos_dir):
    # a single-entry half: squeeze_me turns its struct array into a 0-d one
    make_cars_devkit(tmp_path, train=car_entries([99])[:1], test=car_entries([1, 2, 196]),
                     test_annos_dir=test_annos_dir)
    prepare_cars(str(tmp_path))

    splits = saved_splits(str(tmp_path), 'car')
    assert list(splits['train']) == [CAR_NAMES[0], CAR_NAMES[1]]
    assert list(splits['test']) == [CAR_NAMES[98], CAR_NAMES[195]]
    assert splits['test'][CAR_NAMES[98]] == ['cars_train/099000.jpg']
    assert splits['train'][CAR_NAMES[0]] == ['cars_test/001000.jpg', 'cars_test/001001.jpg']


@pytest.mark.parametrize('present,absent_labels', [('train', 'cars_test_annos_withlabels.mat'),
                                                   ('test', 'cars_train_annos.mat')])
def test_cars_devkit_layout_with_one_half(tmp_path, present, absent_labels):
    make_cars_devkit(tmp_path, **{present: car_entries()}, meta=False)
    absent_folder = tmp_path / 'car' / ('cars_test' if present == 'train' else 'cars_train')
    absent_folder.mkdir()  # images without labels: ignored, with a warning
    with pytest.warns(UserWarning, match=absent_labels):
        prepare_cars(str(tmp_path))

    splits = saved_splits(str(tmp_path), 'car')
    assert list(splits['train']) == ['class_001', 'class_002', 'class_098']
    assert list(splits['test']) == ['class_099', 'class_196']
    assert all(path.startswith(f'cars_{present}/') for paths in splits['test'].values() for path in paths)

def test_cars_images_saved_cropped_are_said_and_not_cropped_again(tmp_path):
    # the copy of cars_train/ in fmejbah/car_dataset1: each photo is its box, one pixel smaller each way
    box = (21, 11, 69, 43)  # MATLAB's 1-based inclusive corners: 49 x 33 pixels, the images 48 x 32
    entries = [(c, f'{c:03d}{i:03d}.jpg', write_image, box) for c in CAR_CLASSES for i in range(2)]
    make_cars_devkit(tmp_path, train=entries)
    for crop in (False, True):
        with pytest.warns(UserWarning, match='10 of 10 images .* already have the size of their bounding box') as warned:
            prepare_cars(str(tmp_path), crop=crop)
        assert ('not cropped again' if crop else 'this uncropped split holds crops') in str(warned[0].message)
        splits = saved_splits(str(tmp_path), 'car', crop=crop)
        assert splits['test'][CAR_NAMES[195]] == ['cars_train/196000.jpg', 'cars_train/196001.jpg']
    assert not (tmp_path / 'car' / 'cropped').exists()

# -----------------------------------------------------------------------------
# Stanford Online Products


@pytest.mark.parametrize('nested', [False, True], ids=['flat', 'Stanford_Online_Products'])
def test_sop_splits_by_list_file_with_product_names(tmp_path, nested):
    broken = 'toaster_final/380894339738_1.JPG'
    make_sop(tmp_path, nested=nested, broken=[broken])
    with pytest.warns(UserWarning) as warned:
        prepare_sop(str(tmp_path))
    assert [broken in str(w.message) or 'skipped 1 of 8 images' in str(w.message) for w in warned] == [True] * 2

    prefix = 'Stanford_Online_Products/' if nested else ''
    splits = saved_splits(str(tmp_path), 'sop')
    assert list(splits) == ['train', 'test']
    for split, classes in SOP_CLASSES.items():  # the header line is no image; the broken one is dropped
        assert splits[split] == {product: [f'{prefix}{product}_{k}.JPG' for k in range(2)
                                           if f'{product}_{k}.JPG' != broken] for _, _, product in classes}
    assert all(os.path.isfile(tmp_path / 'sop' / path)
               for classes in splits.values() for paths in classes.values() for path in paths)


def test_sop_refuses_to_merge_two_classes_under_one_name(tmp_path):
    base = make_sop(tmp_path)
    with open(os.path.join(base, 'Ebay_train.txt'), 'a') as f:
        f.write('5 3 1 bicycle_final/111085122871_0.JPG\n')
    with pytest.raises(ValueError, match="classes 1 and 3 would both be named 'bicycle_final/111085122871'"):
        prepare_sop(str(tmp_path))


def test_sop_refuses_to_crop(tmp_path):
    make_sop(tmp_path)
    with pytest.raises(ValueError, match='--crop is not supported for sop: the release has no bounding boxes'):
        prepare_sop(str(tmp_path), crop=True)
    with pytest.raises(SystemExit, match='error: --crop is not supported for sop'):
        main(['--data_path', str(tmp_path), '--data_name', 'sop', '--crop'])
    assert not os.path.exists(split_path(str(tmp_path), 'sop', crop=True))

# -----------------------------------------------------------------------------
# In-shop Clothes


@pytest.mark.parametrize('in_eval', [False, True], ids=['inshop', 'inshop/Eval'])
def test_inshop_splits_train_query_gallery(tmp_path, in_eval):
    broken = 'MEN/Shirts_Polos/id_00000007/01_4_full.jpg'
    make_inshop(tmp_path, in_eval=in_eval, broken=[broken])
    with pytest.warns(UserWarning) as warned:
        main(['--data_path', str(tmp_path), '--data_name', 'inshop'])
    assert [broken in str(w.message) or 'skipped 1 of 9 images' in str(w.message) for w in warned] == [True] * 2

    splits = load_splits(str(tmp_path), 'inshop')
    assert list(splits) == ['train', 'query', 'gallery']
    root = os.path.join(tmp_path, 'inshop', 'img')
    for split in splits:
        expected = {}
        for name, item_id, status in INSHOP_ROWS:
            if status == split and name != broken:
                expected.setdefault(item_id, []).append(os.path.join(root, name))
        assert splits[split] == expected
    assert set(splits['query']) == set(splits['gallery']) == {'id_00000001', 'id_00000007'}
    assert not set(splits['train']) & set(splits['query'])
    with pytest.raises(ValueError, match='--crop is not supported for inshop'):
        prepare_inshop(str(tmp_path), crop=True)

# -----------------------------------------------------------------------------
# command line and errors


def cub(data_path):
    return make_cub(data_path, cub_entries())


def without(name, make=cub):
    """A builder of the release that `make` writes, less its file or folder `name`."""
    def build(data_path):
        path = os.path.join(make(data_path), name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
        return path
    return build


def nothing(data_name):
    return lambda data_path: os.path.join(data_path, data_name)


def cars_annos_without_images(data_path):
    root = make_cars_annos(data_path, car_entries())
    shutil.rmtree(os.path.join(root, 'car_ims'))
    return os.path.join(root, 'car_ims')


@pytest.mark.parametrize('data_name,flags,build', [
    ('cub', [], nothing('cub')),
    ('cub', [], without('image_class_labels.txt')),
    ('cub', [], without('images')),
    ('cub', ['--crop'], without('bounding_boxes.txt')),
    ('car', [], nothing('car')),
    ('car', [], cars_annos_without_images),
    ('sop', [], nothing('sop')),
    ('sop', [], without('Ebay_test.txt', make_sop)),
    ('sop', [], without('chair_final', make_sop)),
    ('inshop', [], nothing('inshop')),
    ('inshop', [], without('list_eval_partition.txt', make_inshop)),
    ('inshop', [], without('img', make_inshop)),
], ids=['cub-empty', 'cub-labels', 'cub-images', 'cub-boxes', 'car-empty', 'car-images',
        'sop-empty', 'sop-test-list', 'sop-category', 'inshop-empty', 'inshop-partition', 'inshop-images'])
def test_missing_metadata_exits_naming_the_path(tmp_path, data_name, flags, build):
    missing = build(str(tmp_path))
    with pytest.raises(SystemExit) as exited:
        main(['--data_path', str(tmp_path), '--data_name', data_name, *flags])
    message = exited.value.code
    assert isinstance(message, str) and message.startswith('error: ')  # non-zero status, one line
    assert missing in message and '\n' not in message
    assert not os.path.exists(split_path(str(tmp_path), data_name, crop=bool(flags)))


def corrupt_line(name, line_number, text, make=cub):
    def build(data_path):
        path = os.path.join(make(data_path), name)
        with open(path) as f:
            lines = f.readlines()
        lines[line_number - 1] = text + '\n'
        with open(path, 'w') as f:
            f.writelines(lines)
        return [f'{path}, line {line_number}']
    return build


def cars_annos_without_field(data_path):
    root = make_cars_annos(data_path, car_entries())
    rows = [{'relative_im_path': 'car_ims/001000.jpg', 'class': np.uint8(1)}]
    path = os.path.join(root, 'cars_annos.mat')
    scipy.io.savemat(path, {'annotations': struct_array(rows), 'class_names': class_names_cell()})
    return [path, 'bbox_x1']


@pytest.mark.parametrize('data_name,flags,build', [
    ('cub', [], corrupt_line('images.txt', 3, '3')),
    ('cub', [], corrupt_line('image_class_labels.txt', 2, '2 two')),
    ('cub', ['--crop'], corrupt_line('bounding_boxes.txt', 4, '4 1.0 2.0 3.0 4.0 5.0')),
    ('car', [], cars_annos_without_field),
    ('sop', [], corrupt_line('Ebay_train.txt', 1, '1 1 1 bicycle_final/111085122871_0.JPG', make_sop)),
    ('sop', [], corrupt_line('Ebay_test.txt', 3, '2 11319 1', make_sop)),
    ('inshop', [], corrupt_line('list_eval_partition.txt', 2, 'image_name item_id', make_inshop)),
    ('inshop', [], corrupt_line('list_eval_partition.txt', 6, 'img/a.jpg id_00000001 validation', make_inshop)),
], ids=['cub-images', 'cub-labels', 'cub-boxes', 'car-fields', 'sop-header', 'sop-row', 'inshop-header',
        'inshop-status'])
def test_malformed_metadata_exits_naming_file_and_line(tmp_path, data_name, flags, build):
    expected = build(str(tmp_path))
    with pytest.raises(SystemExit) as exited:
        main(['--data_path', str(tmp_path), '--data_name', data_name, *flags])
    assert all(part in exited.value.code for part in expected)


@pytest.mark.slow  # seconds: a fresh interpreter, or the whole synthetic set generated
def test_all_prepares_every_dataset(tmp_path):
    make_cub(tmp_path, cub_entries(), nested=True)
    make_cars_annos(tmp_path, car_entries())
    main(['--data_path', str(tmp_path), '--data_name', 'all'])
    assert os.path.isfile(split_path(str(tmp_path), 'cub'))
    assert os.path.isfile(split_path(str(tmp_path), 'car'))
    assert os.path.isfile(split_path(str(tmp_path), 'synthetic'))


def test_all_passes_over_absent_datasets_and_under_crop_those_without_boxes(tmp_path, capsys):
    make_cub(tmp_path, cub_entries())
    make_sop(tmp_path)
    make_inshop(tmp_path)
    small_synthetic = ['--num_classes', '4', '--images_per_class', '2']
    main(['--data_path', str(tmp_path), '--data_name', 'all', '--crop', *small_synthetic])

    out = capsys.readouterr().out
    assert f"car: skipped, no {tmp_path / 'car'} folder" in out
    assert 'sop: skipped, the release has no bounding boxes' in out
    assert 'inshop: skipped, its boxes (Anno/list_bbox_inshop.txt) are not read' in out
    assert [os.path.exists(split_path(str(tmp_path), name, crop=True))
            for name in ('car', 'cub', 'inshop', 'sop', 'synthetic')] == [False, True, False, False, True]

    main(['--data_path', str(tmp_path), '--data_name', 'all', *small_synthetic])
    assert [os.path.exists(split_path(str(tmp_path), name))
            for name in ('car', 'cub', 'inshop', 'sop', 'synthetic')] == [False, True, True, True, True]


def test_load_splits_missing_file_tells_the_command_to_run(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_splits(f'{tmp_path}/my data', 'car', crop=True)
    assert f"python data_utils.py --data_path '{tmp_path}/my data' --data_name car --crop" in str(error.value)
