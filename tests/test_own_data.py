"""Your own data set: any --data_name that is not built in, read from DATA_PATH/NAME/ as class folders or
images.csv, into the splits train.py and test.py use; its bad inputs; the validation split of train.py."""
import os
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import test as query_script
import train
from data_utils import load_splits, split_path, validation_splits
from test_data_utils import main, write_truncated_jpeg
from test_query import draw_image

# spaces and non-ASCII characters in class and file names; sorted: 'Käfer' < 'cat' < 'straße' < 'zebra fish' < '猫'
CLASSES = ['Käfer', 'cat', 'straße', 'zebra fish', '猫']


def write_image(path, size=(40, 32)):
    """A noise image of its own: seeded by its path, so that no two images are alike."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(str(path).encode()))
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def write_classes(folder, classes, images=3):
    """folder/<class>/<k> é.jpg for each class; `images` per class, or {class: count}."""
    for name in classes:
        for k in range(images[name] if isinstance(images, dict) else images):
            write_image(os.path.join(folder, name, f'{k} é.jpg'))


def write_csv(root, lines):
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, 'images.csv'), 'w', encoding='utf-8') as f:
        f.write('\n'.join(lines) + '\n')


def prepare(data_path, name, *flags):
    main(['--data_path', str(data_path), '--data_name', name, *flags])
    return torch.load(split_path(str(data_path), name), weights_only=True)


def refused(data_path, name, *flags):
    """The one-line message of a refused preparation, checked to have written no split file."""
    with pytest.raises(SystemExit) as exited:
        main(['--data_path', str(data_path), '--data_name', name, *flags])
    message = exited.value.code
    assert isinstance(message, str) and message.startswith('error: ') and '\n' not in message
    assert not os.path.exists(split_path(str(data_path), name))
    assert not [f for f in os.listdir(os.path.join(data_path, name)) if f.startswith('.tmp')]
    return message

# -----------------------------------------------------------------------------
# layouts


def test_train_and_test_class_folders_become_the_splits(tmp_path):
    write_classes(tmp_path / 'my photos' / 'train', CLASSES[:3])
    write_classes(tmp_path / 'my photos' / 'test', CLASSES[3:])
    splits = prepare(tmp_path, 'my photos')

    assert list(splits) == ['train', 'test']
    assert list(splits['train']) == CLASSES[:3] and list(splits['test']) == CLASSES[3:]
    assert splits['test']['猫'] == [os.path.join('test', '猫', f'{k} é.jpg') for k in range(3)]
    loaded = load_splits(str(tmp_path), 'my photos')  # paths usable from the cwd
    assert all(os.path.isfile(path) for classes in loaded.values() for paths in classes.values() for path in paths)


def test_query_and_gallery_folders_give_in_shop_style_splits(tmp_path):
    write_classes(tmp_path / 'shop' / 'train', CLASSES[:2])
    write_classes(tmp_path / 'shop' / 'query', CLASSES[2:], images=1)
    write_classes(tmp_path / 'shop' / 'gallery', CLASSES[2:], images=2)
    splits = prepare(tmp_path, 'shop')

    assert list(splits) == ['train', 'query', 'gallery']
    assert list(splits['query']) == list(splits['gallery']) == CLASSES[2:]
    assert [len(paths) for paths in splits['gallery'].values()] == [2, 2, 2]


def test_class_folders_without_split_are_split_at_random_from_the_seed_and_named(tmp_path, capsys):
    """Classes whose names sort by colour, "blue ..." before "red ...": a split in name order would
    train on every blue class and test on every red one. The split is drawn from --seed instead,
    the same for the same seed, and data_utils.py names the classes on each side."""
    names = [f'{colour} {shape}' for colour in ('blue', 'red') for shape in ('car', 'van', 'bus')]
    write_classes(tmp_path / 'mine', names)
    splits = prepare(tmp_path, 'mine')
    assert sorted([*splits['train'], *splits['test']]) == sorted(names) and len(splits['test']) == 3
    assert set(splits['test']) != set(names[3:])  # not the sorted second half
    printed = capsys.readouterr().out
    for split in ('train', 'test'):
        assert f"mine: {split} classes: {', '.join(map(repr, sorted(splits[split])))}" in printed
    assert prepare(tmp_path, 'mine')['test'] == splits['test']  # the same seed, the same split
    others = [set(prepare(tmp_path, 'mine', '--seed', str(seed))['test']) for seed in (1, 2, 3)]
    assert any(other != set(splits['test']) for other in others)

    splits = prepare(tmp_path, 'mine', '--test_fraction', '0.2')  # round(0.2 x 6) = 1 test class
    assert len(splits['test']) == 1 and len(splits['train']) == 5


def test_resized_copies_are_not_taken_for_a_class_the_next_time(tmp_path):
    write_classes(tmp_path / 'mine', CLASSES[:4])
    before = prepare(tmp_path, 'mine')
    main(['--data_path', str(tmp_path), '--data_name', 'mine', '--max_size', '16'])  # writes mine/resized_16/<class>/
    assert os.path.isdir(tmp_path / 'mine' / 'resized_16')
    assert prepare(tmp_path, 'mine') == before  # the same four classes, not a fifth 'resized_16'


def test_csv_with_split_column_any_column_order_quotes_and_byte_order_mark(tmp_path):
    root = tmp_path / 'csv set'
    for k in range(2):
        write_image(str(root / 'imgs' / f'a, b {k}.jpg'))
        write_image(str(root / 'imgs' / f'ñ {k}.png'))
    write_csv(root, ['\ufeffclass,split,path', *[f'bird,train,"imgs/a, b {k}.jpg"' for k in range(2)],
                     *[f'猫 cat , test, imgs/ñ {k}.png' for k in range(2)], ''])
    splits = prepare(tmp_path, 'csv set')
    assert splits == {'train': {'bird': ['imgs/a, b 0.jpg', 'imgs/a, b 1.jpg']},
                      'test': {'猫 cat': ['imgs/ñ 0.png', 'imgs/ñ 1.png']}}


def test_csv_without_split_column_splits_its_classes_as_class_folders_do(tmp_path):
    """The same classes, listed in images.csv instead of folders, get the same random split."""
    root = tmp_path / 'listed'
    rows = []
    for name in CLASSES[:4]:
        for k in range(2):
            write_image(str(root / f'{name}_{k}.jpg'))
            rows.append(f'{name}_{k}.jpg,{name}')
    write_csv(root, ['path,class', *rows])
    splits = prepare(tmp_path, 'listed')
    write_classes(tmp_path / 'folders', CLASSES[:4], images=2)
    folders = prepare(tmp_path, 'folders')
    assert list(splits['test']) == list(folders['test']) and len(splits['test']) == 2
    assert splits['test'][next(iter(splits['test']))][0].endswith('_0.jpg')


def test_images_csv_is_read_rather_than_the_folders_beside_it(tmp_path):
    root = tmp_path / 'both'
    write_classes(root, ['x', 'y', 'z'], images=2)
    write_csv(root, ['path,class,split', 'x/0 é.jpg,x,train', 'x/1 é.jpg,x,train', 'y/0 é.jpg,y,test',
                     'y/1 é.jpg,y,test'])
    assert prepare(tmp_path, 'both') == {'train': {'x': ['x/0 é.jpg', 'x/1 é.jpg']},
                                         'test': {'y': ['y/0 é.jpg', 'y/1 é.jpg']}}

# -----------------------------------------------------------------------------
# bad input: one message, no split file


def test_an_empty_class_folder_is_refused_naming_it(tmp_path):
    write_classes(tmp_path / 'mine' / 'train', ['a', 'b'])
    write_classes(tmp_path / 'mine' / 'test', ['c'])
    os.makedirs(tmp_path / 'mine' / 'test' / 'empty one')
    with open(tmp_path / 'mine' / 'test' / 'empty one' / 'notes.txt', 'w') as f:
        f.write('not an image\n')
    message = refused(tmp_path, 'mine')
    assert f"{tmp_path / 'mine' / 'test' / 'empty one'}: an empty class" in message


def test_a_class_whose_images_are_all_unreadable_is_an_empty_class(tmp_path):
    write_classes(tmp_path / 'mine' / 'train', ['a', 'b'])
    write_classes(tmp_path / 'mine' / 'test', ['c', 'd'])
    for k in range(3):
        write_truncated_jpeg(str(tmp_path / 'mine' / 'train' / 'b' / f'{k} é.jpg'))
    with pytest.warns(UserWarning) as warned:
        message = refused(tmp_path, 'mine')
    assert "class 'b' (train) is empty: none of its images could be read" in message
    assert sum('skipping unreadable image' in str(w.message) for w in warned) == 3


def test_unreadable_images_are_skipped_and_named(tmp_path):
    write_classes(tmp_path / 'mine' / 'train', ['a', 'b'])
    write_classes(tmp_path / 'mine' / 'test', ['c', 'd'])
    broken = tmp_path / 'mine' / 'test' / 'c' / 'broken ü.jpg'
    write_truncated_jpeg(str(broken))
    with pytest.warns(UserWarning) as warned:
        splits = prepare(tmp_path, 'mine')
    messages = [str(w.message) for w in warned]
    assert sum(str(broken) in message for message in messages) == 1
    assert any('skipped 1 of 13 images' in message for message in messages)
    assert len(splits['test']['c']) == 3


def test_a_class_in_both_train_and_test_folders_is_refused_naming_both(tmp_path):
    write_classes(tmp_path / 'mine' / 'train', ['a', 'straße'])
    write_classes(tmp_path / 'mine' / 'test', ['straße', 'c'])
    message = refused(tmp_path, 'mine')
    assert "class 'straße' is both in train" in message
    assert str(tmp_path / 'mine' / 'train' / 'straße') in message and str(tmp_path / 'mine' / 'test' / 'straße') in message


def test_a_class_in_both_train_and_query_csv_rows_is_refused_naming_both_lines(tmp_path):
    root = tmp_path / 'listed'
    for k in range(4):
        write_image(str(root / f'{k}.jpg'))
    write_csv(root, ['path,class,split', '0.jpg,a,train', '1.jpg,b,gallery', '2.jpg,a,query', '3.jpg,b,query'])
    message = refused(tmp_path, 'listed')
    assert f"class 'a' is both in train ({root / 'images.csv'}, line 2) and in query ({root / 'images.csv'}, line 4)" \
        in message


def test_test_classes_of_a_single_image_are_kept_as_distractors_and_counted(tmp_path):
    write_classes(tmp_path / 'mine' / 'train', ['a', 'b'])
    write_classes(tmp_path / 'mine' / 'test', ['c', 'd', 'e'], images={'c': 3, 'd': 1, 'e': 1})
    with pytest.warns(UserWarning, match=r"2 of 3 test classes have a single image \('d', 'e'\).*distractors"):
        splits = prepare(tmp_path, 'mine')
    assert {name: len(paths) for name, paths in splits['test'].items()} == {'c': 3, 'd': 1, 'e': 1}


def test_a_test_set_of_single_image_classes_is_refused(tmp_path):
    write_classes(tmp_path / 'mine' / 'train', ['a', 'b'])
    write_classes(tmp_path / 'mine' / 'test', ['c', 'd'], images=1)
    assert 'every test class has a single image, so no query can find anything' in refused(tmp_path, 'mine')


def test_query_classes_without_gallery_images_are_counted(tmp_path):
    write_classes(tmp_path / 'shop' / 'train', ['a', 'b'])
    write_classes(tmp_path / 'shop' / 'query', ['c', 'd'], images=1)
    write_classes(tmp_path / 'shop' / 'gallery', ['c', 'e'], images=2)
    with pytest.warns(UserWarning, match=r"1 of 2 query classes have no gallery image \('d'\)"):
        splits = prepare(tmp_path, 'shop')
    assert list(splits['gallery']) == ['c', 'e']


@pytest.mark.parametrize('lines,expected', [
    (['path,class,split', '0.jpg,a,train', '1.jpg,a', '2.jpg,b,test'],
     'images.csv, line 3: expected 3 fields (path,class,split), got 2'),
    (['path,class', '0.jpg,a', '1.jpg,b,test'], 'images.csv, line 3: expected 2 fields (path,class), got 3'),
    (['path,class', '0.jpg,a', '../outside.jpg,b'],
     "images.csv, line 3: the path '../outside.jpg' leads outside"),
    (['path,class', '0.jpg,a', '/etc/passwd,b'], "images.csv, line 3: the path '/etc/passwd' leads outside"),
    (['path,class', '0.jpg,a', 'x/../../1.jpg,b'], 'images.csv, line 3: the path'),
    (['path,label', '0.jpg,a'], "images.csv, line 1: expected the header 'path,class' or 'path,class,split'"),
    (['path,class,split', '0.jpg,a,train', '1.jpg,b,val'], "images.csv, line 3: the split 'val' is not one of"),
    (['path,class', '0.jpg,a', '', '1.jpg,'], 'images.csv, line 4: the class is empty'),
    (['path,class', '0.jpg,a', './0.jpg,b'], 'images.csv, line 3: 0.jpg is listed a second time (first on line 2)'),
    (['path,class,split', '0.jpg,a,train', '1.jpg,b,train'], 'train images only; expected train and test'),
    (['path,class,split', '0.jpg,a,train', '1.jpg,b,test', '2.jpg,c,query'], 'train, test, query images only'),
    (['path,class'], 'images.csv: lists no images'),
], ids=['missing-field', 'extra-field', 'parent-path', 'absolute-path', 'path-escaping-midway', 'header',
        'split-value', 'empty-class', 'listed-twice', 'train-only', 'test-and-query', 'no-rows'])
def test_a_malformed_csv_is_refused_naming_its_line(tmp_path, lines, expected):
    root = tmp_path / 'listed'
    for k in range(3):
        write_image(str(root / f'{k}.jpg'))
    write_csv(root, lines)
    assert expected in refused(tmp_path, 'listed')


def test_a_csv_that_is_not_utf8_is_refused(tmp_path):
    os.makedirs(tmp_path / 'listed')
    with open(tmp_path / 'listed' / 'images.csv', 'wb') as f:
        f.write('path,class\n0.jpg,stra\xdfe\n'.encode('latin-1'))
    assert 'images.csv: not UTF-8 text' in refused(tmp_path, 'listed')


@pytest.mark.parametrize('folders,expected', [
    ({'train': ['a', 'b'], 'val': ['c', 'd'], 'test': ['e', 'f']}, 'val: a folder beside the split folders'),
    ({'train': ['a', 'b']}, 'train images only'),
    ({'train': ['a', 'b'], 'test': ['c', 'd'], 'gallery': ['e']}, 'train, test, gallery images only'),
    ({'train': []}, 'train: no class folders'),
], ids=['val-folder', 'train-only', 'test-and-gallery', 'no-classes'])
def test_split_folders_that_are_no_protocol_are_refused(tmp_path, folders, expected):
    for split, classes in folders.items():
        os.makedirs(tmp_path / 'mine' / split, exist_ok=True)
        write_classes(tmp_path / 'mine' / split, classes)
    assert expected in refused(tmp_path, 'mine')


def test_too_few_classes_for_the_test_fraction_are_refused(tmp_path, capsys):
    write_classes(tmp_path / 'mine', ['a', 'b', 'c'])
    assert '--test_fraction 0.1 holds out 0 of 3 classes' in refused(tmp_path, 'mine', '--test_fraction', '0.1')
    with pytest.raises(SystemExit) as exited:  # a fraction out of range is refused with the flag's usage
        main(['--data_path', str(tmp_path), '--data_name', 'mine', '--test_fraction', '1'])
    assert exited.value.code == 2
    assert "argument --test_fraction: expected a number in (0, 1), got '1'" in capsys.readouterr().err
    assert not os.path.exists(split_path(str(tmp_path), 'mine'))


def test_a_folder_of_one_class_is_refused_naming_it_and_no_flag_the_user_did_not_pass(tmp_path):
    write_classes(tmp_path / 'mine', ['cat'])
    message = refused(tmp_path, 'mine')
    assert f"{tmp_path / 'mine'}: one class only ('cat')" in message and 'at least two are needed' in message
    assert '--test_fraction' not in message


def test_an_unknown_data_name_lists_the_built_in_names_and_the_folders_found(tmp_path):
    write_classes(tmp_path / 'mine', ['a', 'b'])
    with pytest.raises(FileNotFoundError) as error:
        load_splits(str(tmp_path), 'synthtic')  # what train.py reads
    assert str(error.value).startswith('--data_name synthtic: no such data set')
    assert str(error.value).endswith(f'built-in data sets: car, cub, inshop, sop, synthetic; folders in {tmp_path}/: '
                                     'mine; did you mean synthetic?')
    with pytest.raises(SystemExit, match=f'folders in {tmp_path}/: mine; did you mean mine?'):
        main(['--data_path', str(tmp_path), '--data_name', 'mien'])
    # a folder there that is not prepared yet: the command that prepares it
    with pytest.raises(FileNotFoundError, match=f'create it with: python data_utils.py --data_path {tmp_path} '
                                                '--data_name mine$'):
        load_splits(str(tmp_path), 'mine')


def test_names_that_are_no_folder_a_missing_folder_crop_and_fractions_of_built_ins_are_refused(tmp_path):
    with pytest.raises(SystemExit, match=r"--data_name '\.\./elsewhere': expected the name of one folder"):
        main(['--data_path', str(tmp_path), '--data_name', '../elsewhere'])
    with pytest.raises(SystemExit, match=r'cars not found; expected your own data set there.*built-in data sets: car'):
        main(['--data_path', str(tmp_path), '--data_name', 'cars'])
    write_classes(tmp_path / 'mine', ['a', 'b'])
    assert '--crop is not supported for mine: your own data set has no bounding boxes' in \
        refused(tmp_path, 'mine', '--crop')
    with pytest.raises(SystemExit, match='--test_fraction is for your own data sets; cub has a fixed split'):
        main(['--data_path', str(tmp_path), '--data_name', 'cub', '--test_fraction', '0.3'])


def test_a_refused_preparation_keeps_the_previous_splits(tmp_path):
    write_classes(tmp_path / 'mine', ['a', 'b', 'c', 'd'])
    before = prepare(tmp_path, 'mine')
    os.makedirs(tmp_path / 'mine' / 'e')  # an empty class folder added later
    with pytest.raises(SystemExit, match='an empty class'):
        main(['--data_path', str(tmp_path), '--data_name', 'mine'])
    assert torch.load(split_path(str(tmp_path), 'mine'), weights_only=True) == before

# -----------------------------------------------------------------------------
# the validation split of train.py


def test_validation_split_holds_out_the_last_training_classes_and_never_the_test_classes():
    splits = {'train': {name: [f'{name}.jpg'] for name in ['e', 'a', 'd', 'b', 'c']}, 'test': {'z': ['z.jpg']}}
    held_out = validation_splits(splits, 0.4)
    assert held_out == {'train': {'a': ['a.jpg'], 'b': ['b.jpg'], 'c': ['c.jpg']},
                        'test': {'d': ['d.jpg'], 'e': ['e.jpg']}}
    assert list(validation_splits(splits, 0.2)['test']) == ['e']  # round(0.2 x 5) = 1
    # In-shop-style splits give the same: the held-out training classes search among themselves
    inshop = {'train': splits['train'], 'query': {'z': ['q.jpg']}, 'gallery': {'z': ['g.jpg']}}
    assert validation_splits(inshop, 0.4) == held_out
    with pytest.raises(ValueError, match='--val_fraction 0.05 holds out 0 of 5 training classes'):
        validation_splits(splits, 0.05)
    with pytest.raises(ValueError, match='--val_fraction must lie strictly between 0 and 1'):
        validation_splits(splits, 0)


def test_train_py_takes_any_data_name_and_the_validation_fraction_defines_the_run(tmp_path):
    args = train.parse_args(['--data_name', 'my photos', '--val_fraction', '0.2'])
    assert args.data_name == 'my photos' and args.val_fraction == 0.2
    assert train.parse_args([]).val_fraction is None
    # its own file names: a validation run never writes over the run evaluated on the test classes
    test_run = train.parse_args(['--data_name', 'my photos']).run_name
    assert args.run_name != test_run and args.run_name.endswith('_seed0')
    assert args.run_name != train.parse_args(['--data_name', 'my photos', '--val_fraction', '0.3']).run_name
    # a checkpoint of the run evaluated on the test classes cannot be resumed as a validation run
    path = tmp_path / 'checkpoint.pth'
    saved = vars(train.parse_args(['--data_name', 'my photos']))
    torch.save({key: {} for key in ('model', 'loss', 'optimizer', 'scheduler', 'scaler', 'statistics')}
               | {'epoch': 1, 'args': saved}, path)
    with pytest.raises(ValueError, match=r'belongs to another run: --val_fraction None there, 0\.2 now'):
        train.load_checkpoint(str(path), args)

# -----------------------------------------------------------------------------
# train.py and test.py on your own data (1 epoch, 32 px, resnet18 from scratch)


def train_and_query(data_path, data_name, output_dir, *flags):
    """train.main on the data set, then test.py on a test image of its database: the database."""
    argv = ['--data_path', str(data_path), '--data_name', data_name, '--backbone_type', 'resnet18', '--pretrained',
            'none', '--image_size', '32', '--num_epochs', '1', '--batch_size', '4', '--num_workers', '0',
            '--recalls', '1,2', '--output_dir', str(output_dir), *flags]
    train.main(argv)
    prefix = os.path.join(output_dir, train.parse_args(argv).run_name)
    database = torch.load(f'{prefix}_data_base.pth', weights_only=True)
    query = database['test_images'][0]
    query_script.main(['--data_base', f'{prefix}_data_base.pth', '--query_img_name', query, '--retrieval_num', '2',
                       '--output_dir', str(output_dir / 'queries')])
    folder = query_script.query_folder(str(output_dir / 'queries'), query)
    assert {'grid.png', 'query_img.jpg', 'index.html'} <= set(os.listdir(folder))
    assert len([f for f in os.listdir(folder) if f.startswith('retrieval_img_')]) == 2
    return database


@pytest.mark.slow
def test_train_and_query_on_class_folders_with_non_ascii_names(tmp_path):
    write_classes(tmp_path / 'data' / 'my photos', CLASSES + ['dog'])
    main(['--data_path', str(tmp_path / 'data'), '--data_name', 'my photos'])
    splits = load_splits(str(tmp_path / 'data'), 'my photos')
    database = train_and_query(tmp_path / 'data', 'my photos', tmp_path / 'results')
    assert database['train_classes'] == sorted(splits['train']) and database['test_classes'] == sorted(splits['test'])
    assert sorted(database['train_classes'] + database['test_classes']) == sorted(CLASSES + ['dog'])
    assert database['test_embeddings'].shape == (9, 512)


@pytest.mark.slow
def test_train_and_query_on_a_csv_set_and_validate_on_held_out_training_classes(tmp_path):
    root = tmp_path / 'data' / 'listed'
    rows = ['path,class,split']
    for split, names in (('train', ['a', 'b', 'c', 'd']), ('test', ['y', 'z'])):
        for name in names:
            for k in range(3):
                write_image(str(root / 'images' / f'{name} {k}.jpg'))
                rows.append(f'images/{name} {k}.jpg,{name},{split}')
    write_csv(root, rows)
    main(['--data_path', str(tmp_path / 'data'), '--data_name', 'listed'])
    database = train_and_query(tmp_path / 'data', 'listed', tmp_path / 'results')
    assert database['train_classes'] == ['a', 'b', 'c', 'd'] and database['test_classes'] == ['y', 'z']

    validation = train_and_query(tmp_path / 'data', 'listed', tmp_path / 'validation', '--val_fraction', '0.25')
    assert validation['train_classes'] == ['a', 'b', 'c'] and validation['test_classes'] == ['d']
    assert not any('/y ' in path or '/z ' in path for path in validation['test_images'] + validation['train_images'])
    assert validation['args']['val_fraction'] == 0.25


def write_own_photos(folder, classes=6, photos=8):
    """folder/<colour> things/<i>.jpg: the README's example of your own photos, 6 classes of 8, each
    class a disc of its colour, each photo of a size of its own."""
    for k, colour in enumerate(['red', 'green', 'blue', 'yellow', 'magenta', 'cyan'][:classes]):
        os.makedirs(os.path.join(folder, f'{colour} things'), exist_ok=True)
        for i in range(photos):
            draw_image(os.path.join(folder, f'{colour} things', f'{i}.jpg'), colour, (80 + 7 * i, 64 + 5 * k))
