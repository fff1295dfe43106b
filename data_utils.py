"""Build the retrieval splits of CUB-200-2011, Cars196, Stanford Online Products, In-shop
Clothes, the synthetic default, and your own data set (any other name).

    python data_utils.py --data_path data --data_name all [--crop] [--max_size N]
    python data_utils.py --data_path data --data_name cub --download   # fetches and extracts it first
    python data_utils.py --data_path data --data_name my_photos [--test_fraction F]

writes DIR/<name>/uncropped_data_dicts.pth (or cropped_data_dicts.pth; with --max_size N,
uncropped_maxN_data_dicts.pth and so on) holding
{'train': {class_name: [image path, ...]}, 'test': {...}}, or for In-shop
{'train': ..., 'query': ..., 'gallery': ...}. The paths are relative to DIR/<name>/ so the
data folder can move; load_splits() joins them back on.
Retrieval benchmarks split by class, not by image: the network trains on some classes and
is evaluated by searching among unseen ones. CUB and Cars take the first half of their
class ids for training; SOP and In-shop ship their split in their metadata, and In-shop
searches its test items' query images among their gallery images rather than among
each other. Your own data set brings its split (images.csv's split column, or train/ and test/
class folders) or has its classes split at random (--seed) by --test_fraction. Only CUB, Cars and the
synthetic set can be cropped (--crop).
"""
import argparse
import csv
import difflib
import functools
import itertools
import math
import os
import random
import re
import shlex
import shutil
import tarfile
import warnings
import zlib

import numpy as np
import scipy.io
import torch
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

from utils import (IMAGE_EXTENSIONS, DownloadError, HelpFormatter, Range, atomic_path, check_digest, download,
                   load_torch_file, read_rgb, run_script, url_file_name)

# -----------------------------------------------------------------------------
# reading prepared splits


def split_path(data_path, data_name, crop=False, max_size=None):
    # checked here, where every reader and writer of a split file passes
    if max_size is not None and not (isinstance(max_size, int) and max_size >= 1):
        raise ValueError(f'--max_size must be a positive number of pixels, got {max_size!r}')
    variant = ('cropped' if crop else 'uncropped') + (f'_max{max_size}' if max_size else '')
    return os.path.join(data_path, data_name, f'{variant}_data_dicts.pth')


def known_data_names(data_path, data_name):
    """What a --data_name could have been: the built-in names, the folders of --data_path, and the
    closest of them (a typo such as 'synthtic' is the likely mistake)."""
    folders = sub_folders(data_path) if os.path.isdir(data_path) else []
    close = difflib.get_close_matches(data_name, dict.fromkeys([*PREPARERS, *folders]), n=1)
    return (f'built-in data sets: {", ".join(PREPARERS)}; folders in {data_path}/: {", ".join(folders) or "none"}'
            + (f'; did you mean {close[0]}?' if close else ''))


def load_splits(data_path, data_name, crop=False, max_size=None):
    """Return {split: {class_name: [image path]}} with paths usable from the cwd.

    The splits are whatever the preparer saved: 'train' and 'test', or for In-shop
    'train', 'query' and 'gallery'.
    """
    check_data_name(data_name)
    path = split_path(data_path, data_name, crop, max_size)
    if data_name == 'synthetic' and not os.path.exists(path):
        prepare_synthetic(data_path, crop, max_size=max_size)  # the embedded default needs no download
    if data_name not in PREPARERS and not os.path.isdir(os.path.join(data_path, data_name)):
        raise FileNotFoundError(f'--data_name {data_name}: no such data set, neither built in nor a folder '
                                f'{os.path.join(data_path, data_name)}; {known_data_names(data_path, data_name)}')
    if not os.path.exists(path):
        command = (f'python data_utils.py --data_path {shlex.quote(str(data_path))} --data_name {shlex.quote(data_name)}'
                   + (' --crop' if crop else '') + (f' --max_size {max_size}' if max_size else ''))
        raise FileNotFoundError(f'{path} not found; create it with: {command}')
    root = os.path.join(data_path, data_name)
    splits = load_torch_file(path, 'splits file', ('train',), writer='data_utils.py')
    return {split: {name: [os.path.join(root, p) for p in paths] for name, paths in classes.items()}
            for split, classes in splits.items()}


# -----------------------------------------------------------------------------
# checking images and writing splits

# A record is (path relative to DIR/<name>/, class id, class name, bounding box, split), where
# the box is (left, top, right, bottom) in PIL's convention: 0-based, right/bottom exclusive,
# or None for datasets without boxes. Class ids need only sort, to order the saved classes.


def clamp_box(box, size):
    """Round a box to whole pixels inside an image of `size`; None if nothing is left."""
    width, height = size
    left, top = max(0, round(box[0])), max(0, round(box[1]))
    right, bottom = min(width, round(box[2])), min(height, round(box[3]))
    return (left, top, right, bottom) if left < right and top < bottom else None


def looks_cropped(box, size, tolerance=2):
    """Whether an image already has the size of its bounding box, i.e. was saved cropped (the copy of
    Cars196's cars_train/ in fmejbah/car_dataset1 is). A box at the image's origin is left out: it
    is what a whole-image box looks like too."""
    left, top, right, bottom = box
    offset = left > tolerance or top > tolerance
    return offset and abs(size[0] - (right - left)) <= tolerance and abs(size[1] - (bottom - top)) <= tolerance


def split_by_class(records, n_train_classes):
    """Complete (path, class id, name, box) records: ids 1..n_train_classes train, the rest test."""
    return [(*record, 'train' if record[1] <= n_train_classes else 'test') for record in records]


def write_splits(data_path, data_name, records, crop, split_names=('train', 'test'), max_size=None, check=None):
    """Keep the records whose image decodes (cropping it, then shrinking it to max_size, if asked),
    group them by split and class, save; check(splits), if given, may refuse them first."""
    out = split_path(data_path, data_name, crop, max_size)  # a bad max_size fails before the decoding pass
    root = os.path.join(data_path, data_name)
    splits = {split: {} for split in split_names}
    skipped, precropped = [], []
    # sorting by class id orders the classes in the saved dicts; sorted() is stable, so
    # images keep their metadata order within a class
    for rel_path, class_id, class_name, box, split in tqdm(sorted(records, key=lambda r: r[1]),
                                                           desc=f'{data_name}: decoding images', unit='img'):
        path = os.path.join(root, rel_path)
        try:
            img = read_rgb(path)
        except Exception as e:  # Pillow reports corrupt files with OSError, SyntaxError, EOFError, ...
            warnings.warn(f'skipping unreadable image {path}: {e}')
            skipped.append(path)
            continue
        listed = rel_path  # the original, unless a copy (crop, smaller copy or both) replaces it below
        if box is not None and looks_cropped(box, img.size):
            precropped.append(path)  # cropping it again would cut a corner out of the object
        elif crop:
            pixels = clamp_box(box, img.size)
            if pixels is None:
                warnings.warn(f'skipping {path}: bounding box {box} lies outside the {img.width}x{img.height} image')
                skipped.append(path)
                continue
            img = img.crop(pixels)
            listed = os.path.join('cropped', os.path.splitext(rel_path)[0] + '.jpg')
        # training decodes every image every epoch, so a small copy makes that cheap; an image
        # already within max_size is listed as it is, sparing it a lossy re-encoding
        if max_size and max(img.size) > max_size:
            img.thumbnail((max_size, max_size), Image.LANCZOS)  # in place, aspect ratio kept
            listed = os.path.join(f'resized_{max_size}', os.path.splitext(listed)[0] + '.jpg')
        if listed != rel_path:  # one write, after cropping and resizing: never a full-size crop only to shrink it
            os.makedirs(os.path.dirname(os.path.join(root, listed)), exist_ok=True)
            img.save(os.path.join(root, listed), 'JPEG', quality=95)
        splits[split].setdefault(class_name, []).append(listed)

    if skipped:
        warnings.warn(f'{data_name}: skipped {len(skipped)} of {len(records)} images (named above)')
    if precropped:
        warnings.warn(f'{data_name}: {len(precropped)} of {len(records)} images (e.g. {precropped[0]}) already have '
                      f'the size of their bounding box, so they were saved cropped: they are listed as they are, '
                      + ('not cropped again' if crop else 'so this uncropped split holds crops, not whole photos'))
    for split, classes in splits.items():
        if not classes:
            raise ValueError(f'{root}: no usable {split} images ({len(skipped)} of {len(records)} skipped)')
    if check:
        check(splits)
    with atomic_path(out) as tmp:
        torch.save(splits, tmp)
    counts = ', '.join(f'{split} {len(classes)} classes / {sum(map(len, classes.values()))} images'
                       for split, classes in splits.items())
    print(f'{data_name}: {counts}, skipped {len(skipped)} -> {out}')
    return out


def require(path, layout):
    if not os.path.exists(path):
        raise FileNotFoundError(f'{path} not found; expected {layout}')


def release_base(root, folder, marker):
    """Where an archive's files are: root/folder/ as it extracts, or root/ if they were moved up
    (told apart by the file `marker`)."""
    nested = os.path.join(root, folder)
    return nested if os.path.isdir(nested) and not os.path.exists(os.path.join(root, marker)) else root


def read_rows(path, layout, *types, header=()):
    """Parse a metadata file of whitespace-separated '<value> ...' lines into tuples of `types`.

    `header` holds the text of the lines before the rows (None: any text); checking it, rather
    than skipping lines blindly, keeps a file that lost its header from losing a row instead.
    """
    rows = []
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            line = line.strip()
            if line_number <= len(header):
                expected = header[line_number - 1]
                if expected is not None and line.split() != expected.split():
                    raise ValueError(f"{path}, line {line_number}: expected the header '{expected}', got {line!r}")
            elif line:
                # maxsplit keeps the last column whole, so too many fields fail its type conversion
                fields = line.split(maxsplit=len(types) - 1)
                try:
                    rows.append(tuple(convert(field) for convert, field in zip(types, fields, strict=True)))
                except ValueError:
                    raise ValueError(f"{path}, line {line_number}: expected '{layout}', got {line!r}") from None
    return rows


def read_table(path, layout, *types):
    """Parse a CUB metadata file of '<id> <value> ...' lines into {id: value} or {id: (values)}."""
    return {key: values[0] if len(values) == 1 else tuple(values) for key, *values in read_rows(path, layout, *types)}


# Datasets whose splits --crop cannot make, and why; --data_name all passes over them.
WITHOUT_BOXES = {'sop': 'the release has no bounding boxes',
                 'inshop': 'its boxes (Anno/list_bbox_inshop.txt) are not read'}


def refuse_crop(data_name, crop, reason=None):
    # listing uncropped images as the cropped split would pass off whole photos as crops
    if crop:
        raise ValueError(f'--crop is not supported for {data_name}: {reason or WITHOUT_BOXES[data_name]}; '
                         'prepare it without --crop')

# -----------------------------------------------------------------------------
# CUB-200-2011


CUB_LAYOUT = ('the extracted CUB_200_2011.tgz, i.e. images.txt, image_class_labels.txt, bounding_boxes.txt, '
              'classes.txt and images/ in DIR/cub/ or DIR/cub/CUB_200_2011/')


def prepare_cub(data_path, crop=False, max_size=None):
    root = os.path.join(data_path, 'cub')
    base = release_base(root, 'CUB_200_2011', 'images.txt')
    images_txt = os.path.join(base, 'images.txt')
    labels_txt = os.path.join(base, 'image_class_labels.txt')
    boxes_txt = os.path.join(base, 'bounding_boxes.txt')
    classes_txt = os.path.join(base, 'classes.txt')
    images_dir = os.path.join(base, 'images')
    for path in [images_txt, labels_txt, images_dir] + ([boxes_txt] if crop else []):
        require(path, CUB_LAYOUT)

    image_paths = read_table(images_txt, '<image_id> <image_path>', int, str)
    labels = read_table(labels_txt, '<image_id> <class_id>', int, int)
    boxes = {}
    if crop:
        boxes = {image_id: (x, y, x + width, y + height) for image_id, (x, y, width, height)
                 in read_table(boxes_txt, '<image_id> <x> <y> <width> <height>', int, *[float] * 4).items()}
    for table, path in [(labels, labels_txt)] + ([(boxes, boxes_txt)] if crop else []):
        missing = sorted(image_paths.keys() - table.keys())
        if missing:
            raise ValueError(f'{path} has no line for image ids {missing[:5]} listed in {images_txt}')
    # without classes.txt the image folders ('001.Black_footed_Albatross/') name the classes
    class_names = read_table(classes_txt, '<class_id> <class_name>', int, str) if os.path.exists(classes_txt) else {}

    images_rel = os.path.relpath(images_dir, root)
    records = [(os.path.join(images_rel, image_path), labels[image_id],
                class_names.get(labels[image_id], os.path.dirname(image_path)), boxes.get(image_id))
               for image_id, image_path in image_paths.items()]
    return write_splits(data_path, 'cub', split_by_class(records, n_train_classes=100), crop=crop,
                        max_size=max_size)

# -----------------------------------------------------------------------------
# Cars196


CARS_LAYOUT = ('in DIR/car/ either car_ims/ + cars_annos.mat, or cars_train/ + devkit/cars_train_annos.mat '
               'and/or cars_test/ + cars_test_annos_withlabels.mat (also looked for in devkit/), '
               'with class names in devkit/cars_meta.mat')
CARS_FIELDS = ('bbox_x1', 'bbox_y1', 'bbox_x2', 'bbox_y2', 'class')


def load_mat(path, key, fields=()):
    """Load variable `key` of a .mat file as a 1-D array (of structs when `fields` are given).

    squeeze_me strips MATLAB's 1xN and 1x1 wrappers so values come out as plain scalars and
    strings, but it also collapses a one-element array to 0-d; atleast_1d undoes that.
    """
    mat = scipy.io.loadmat(path, squeeze_me=True, variable_names=[key])
    if key not in mat:
        raise ValueError(f'{path} has no variable {key!r}')
    array = np.atleast_1d(mat[key])
    missing = [field for field in fields if field not in (array.dtype.names or ())]
    if missing:
        raise ValueError(f'{path}: {key!r} lacks the fields {", ".join(missing)}')
    return array


def load_class_names(path):
    return {class_id: str(name) for class_id, name in enumerate(load_mat(path, 'class_names'), 1)}


def cars_records(rel_paths, annos, class_names):
    records = []
    for rel_path, x1, y1, x2, y2, class_id in zip(rel_paths, *(annos[field] for field in CARS_FIELDS)):
        class_id = int(class_id)
        name = class_names.get(class_id, f'class_{class_id:03d}')
        # MATLAB boxes are 1-based with inclusive corners
        records.append((rel_path, class_id, name, (float(x1) - 1, float(y1) - 1, float(x2), float(y2))))
    return records


def read_cars_annos(root):
    """The cars_annos.mat release: one struct array for all images, paths under car_ims/."""
    annos_path = os.path.join(root, 'cars_annos.mat')
    require(os.path.join(root, 'car_ims'), CARS_LAYOUT)
    annos = load_mat(annos_path, 'annotations', CARS_FIELDS + ('relative_im_path',))
    return cars_records(annos['relative_im_path'], annos, load_class_names(annos_path))


def read_cars_devkit(root):
    """The devkit release: cars_train/ and cars_test/ each with its own annotation file."""
    meta = os.path.join(root, 'devkit', 'cars_meta.mat')
    class_names = load_class_names(meta) if os.path.exists(meta) else {}
    halves = [('cars_train', [os.path.join(root, 'devkit', 'cars_train_annos.mat')]),
              ('cars_test', [os.path.join(root, name, 'cars_test_annos_withlabels.mat') for name in ('', 'devkit')])]
    records, found = [], False
    for folder, candidates in halves:
        annos_path = next((path for path in candidates if os.path.exists(path)), None)
        if annos_path is None:
            if os.path.isdir(os.path.join(root, folder)):
                warnings.warn(f'ignoring {os.path.join(root, folder)}: its labels {" or ".join(candidates)} are missing')
            continue
        require(os.path.join(root, folder), CARS_LAYOUT)
        annos = load_mat(annos_path, 'annotations', CARS_FIELDS + ('fname',))
        records += cars_records([os.path.join(folder, fname) for fname in annos['fname']], annos, class_names)
        found = True
    if not found:
        raise FileNotFoundError(f'no Cars196 annotations in {root}; expected {CARS_LAYOUT}')
    return records


def prepare_cars(data_path, crop=False, max_size=None):
    root = os.path.join(data_path, 'car')
    if os.path.exists(os.path.join(root, 'cars_annos.mat')):
        records = read_cars_annos(root)
    else:
        records = read_cars_devkit(root)
    return write_splits(data_path, 'car', split_by_class(records, n_train_classes=98), crop=crop,
                        max_size=max_size)

# -----------------------------------------------------------------------------
# Stanford Online Products: Ebay_train.txt and Ebay_test.txt list the two halves


SOP_LAYOUT = ('the extracted Stanford_Online_Products.zip, i.e. Ebay_train.txt, Ebay_test.txt and the '
              '<category>_final/ image folders, in DIR/sop/ or DIR/sop/Stanford_Online_Products/')


def prepare_sop(data_path, crop=False, max_size=None):
    refuse_crop('sop', crop)
    root = os.path.join(data_path, 'sop')
    base = release_base(root, 'Stanford_Online_Products', 'Ebay_train.txt')
    lists = {split: os.path.join(base, f'Ebay_{split}.txt') for split in ('train', 'test')}
    for path in lists.values():
        require(path, SOP_LAYOUT)
    records, names = [], {}
    for split, path in lists.items():
        for _, class_id, _, image_path in read_rows(path, '<image_id> <class_id> <super_class_id> <path>',
                                                    int, int, int, str,
                                                    header=['image_id class_id super_class_id path']):
            # a class is one product, its images named <product id>_<k>.JPG in a category folder:
            # 'bicycle_final/111085122871' reads better than the bare class id
            name = names.setdefault(class_id, image_path.rsplit('_', 1)[0])
            records.append((os.path.relpath(os.path.join(base, image_path), root), class_id, name, None, split))
    classes_named = {}
    for class_id, name in names.items():
        if classes_named.setdefault(name, class_id) != class_id:  # one name would merge two classes
            raise ValueError(f'{base}: classes {classes_named[name]} and {class_id} would both be named {name!r}')
    # a missing category folder would otherwise show up as thousands of unreadable images
    for folder in sorted({os.path.dirname(record[0]) for record in records}):
        require(os.path.join(root, folder), SOP_LAYOUT)
    return write_splits(data_path, 'sop', records, crop=False, max_size=max_size)

# -----------------------------------------------------------------------------
# In-shop Clothes: list_eval_partition.txt puts each image in train, query or gallery


INSHOP_LAYOUT = ('the In-shop Clothes release in DIR/inshop/: list_eval_partition.txt '
                 '(or Eval/list_eval_partition.txt) and img/ extracted from Img/img.zip')
INSHOP_SPLITS = ('train', 'query', 'gallery')


def evaluation_status(text):
    """A read_rows column type, so a misspelt status fails naming its line instead of adding a split."""
    if text not in INSHOP_SPLITS:
        raise ValueError(text)
    return text


def prepare_inshop(data_path, crop=False, max_size=None):
    refuse_crop('inshop', crop)
    root = os.path.join(data_path, 'inshop')
    candidates = [os.path.join(root, 'list_eval_partition.txt'), os.path.join(root, 'Eval', 'list_eval_partition.txt')]
    partition = next((path for path in candidates if os.path.exists(path)), candidates[0])
    require(partition, INSHOP_LAYOUT)
    require(os.path.join(root, 'img'), INSHOP_LAYOUT)
    # line 1 is the image count, line 2 names the columns
    rows = read_rows(partition, '<image_name> <item_id> <train|query|gallery>', str, str, evaluation_status,
                     header=[None, 'image_name item_id evaluation_status'])
    # the item is the class; a test item's images are split between query and gallery, which is
    # what the query-to-gallery evaluation needs, so they stay in separate dicts under the same name
    records = [(image_name, item_id, item_id, None, status) for image_name, item_id, status in rows]
    return write_splits(data_path, 'inshop', records, crop=False, split_names=INSHOP_SPLITS,
                        max_size=max_size)

# -----------------------------------------------------------------------------
# your own data set: any other --data_name, read from DIR/<name>/ as a CSV list or as class folders

OWN_LAYOUT = ('DIR/NAME/images.csv (header path,class or path,class,split; paths relative to it), or class folders: '
              'DIR/NAME/train/<class>/ + DIR/NAME/test/<class>/ (or query/ + gallery/ instead of test/), '
              'or DIR/NAME/<class>/ alone')
OWN_SPLITS = ('train', 'test', 'query', 'gallery')
SPLIT_SETS = (('train', 'test'), INSHOP_SPLITS)  # search within the test set, or queries among a gallery
CSV_HEADERS = ({'path', 'class'}, {'path', 'class', 'split'})
DEFAULT_TEST_FRACTION = 0.5


def held_out_count(num_classes, fraction, flag, what):
    """How many of the last sorted classes `fraction` holds out: round(fraction x classes), halves
    rounded up, at least one class left on either side."""
    if not 0 < fraction < 1:
        raise ValueError(f'{flag} must lie strictly between 0 and 1, got {fraction}')
    held_out = math.floor(num_classes * fraction + 0.5)
    if not 1 <= held_out <= num_classes - 1:
        raise ValueError(f'{flag} {fraction} holds out {held_out} of {num_classes} {what}: '
                         'both sides need at least one class')
    return held_out


def validation_splits(splits, val_fraction):
    """{'train': the first training classes, 'test': the last val_fraction of them (sorted)}: an
    evaluation set for choosing hyperparameters that never touches the test classes."""
    classes = sorted(splits['train'])
    first_held_out = len(classes) - held_out_count(len(classes), val_fraction, '--val_fraction', 'training classes')
    return {'train': {name: splits['train'][name] for name in classes[:first_held_out]},
            'test': {name: splits['train'][name] for name in classes[first_held_out:]}}


def generated_folder(name):
    """The folders data_utils.py itself writes into DIR/NAME/ (--max_size copies): no classes."""
    return re.fullmatch(r'resized_\d+|cropped', name) is not None


def sub_folders(folder):
    return sorted(name for name in os.listdir(folder)
                  if not name.startswith('.') and os.path.isdir(os.path.join(folder, name)))


def image_files(folder):
    """The image files in a class folder and its sub-folders, sorted; hidden files and files that
    are no images by their extension (notes, thumbnail caches) are passed over."""
    found = []
    for current, folders, files in os.walk(folder, followlinks=True):
        folders[:] = sorted(name for name in folders if not name.startswith('.'))
        found += [os.path.join(current, name) for name in sorted(files)
                  if not name.startswith('.') and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS]
    return found


def class_folder_rows(root, split=None):
    """(path relative to root, class, split, where) of each image of root/<split>/<class>/, or of
    root/<class>/ without a split."""
    base = os.path.join(root, split) if split else root
    classes = [name for name in sub_folders(base) if not generated_folder(name)]
    if not classes:
        raise ValueError(f'{base}: no class folders; expected {OWN_LAYOUT}')
    rows = []
    for name in classes:
        folder = os.path.join(base, name)
        images = image_files(folder)
        if not images:
            raise ValueError(f'{folder}: an empty class, no image files in it (such as .jpg or .png)')
        rows += [(os.path.relpath(path, root), name, split, folder) for path in images]
    return rows


def folder_rows(root):
    splits = [split for split in OWN_SPLITS if os.path.isdir(os.path.join(root, split))]
    if not splits:
        return class_folder_rows(root)
    # a val/ or valid/ beside train/ would otherwise be dropped without a word
    others = [name for name in sub_folders(root) if name not in OWN_SPLITS and not generated_folder(name)]
    if others:
        raise ValueError(f'{os.path.join(root, others[0])}: a folder beside the split folders {", ".join(splits)}; '
                         'expected only train/ and test/ (or train/, query/ and gallery/)')
    return [row for split in splits for row in class_folder_rows(root, split)]


def csv_path_field(text, where, root):
    if not text:
        raise ValueError(f'{where}: the path is empty')
    path = os.path.normpath(text)
    if os.path.isabs(path) or path == os.pardir or path.startswith(os.pardir + os.sep):
        raise ValueError(f'{where}: the path {text!r} leads outside {root}; paths are relative to images.csv, '
                         'inside its folder')
    return path


def csv_class_field(text, where):
    if not text:
        raise ValueError(f'{where}: the class is empty')
    return text


def csv_split_field(text, where):
    if text is not None and text.lower() not in OWN_SPLITS:
        raise ValueError(f'{where}: the split {text!r} is not one of {", ".join(OWN_SPLITS)}')
    return text and text.lower()


def csv_rows(root, path):
    """(path relative to root, class, split or None, 'images.csv, line N') of each row of images.csv."""
    rows, listed = [], {}
    # utf-8-sig: the byte-order mark a spreadsheet may write is not part of the first column's name
    with open(path, newline='', encoding='utf-8-sig') as f:
        reader = csv.reader(f)
        try:
            header = [field.strip().lower() for field in next(reader, [])]
            if set(header) not in CSV_HEADERS or len(header) != len(set(header)):
                raise ValueError(f"{path}, line 1: expected the header 'path,class' or 'path,class,split' "
                                 f"(columns in any order), got {','.join(header)!r}")
            for fields in reader:
                where = f'{path}, line {reader.line_num}'
                if not any(field.strip() for field in fields):
                    continue  # a blank line
                if len(fields) != len(header):
                    raise ValueError(f"{where}: expected {len(header)} fields ({','.join(header)}), got {len(fields)}: "
                                     f"{','.join(fields)!r}")
                row = dict(zip(header, (field.strip() for field in fields)))
                image = csv_path_field(row['path'], where, root)
                if image in listed:
                    raise ValueError(f'{where}: {image} is listed a second time (first on line {listed[image]})')
                listed[image] = reader.line_num
                rows.append((image, csv_class_field(row['class'], where), csv_split_field(row.get('split'), where),
                             where))
        except UnicodeDecodeError as e:
            raise ValueError(f'{path}: not UTF-8 text ({e})') from None
        except csv.Error as e:
            raise ValueError(f'{path}, line {reader.line_num}: {e}') from None
    if not rows:
        raise ValueError(f'{path}: lists no images')
    return rows


def random_test_classes(classes, test_fraction, seed, source):
    """round(test_fraction x classes) of the classes, drawn at random from `seed`: class names say
    nothing of how alike classes are ("blue ..." and "red ..." would otherwise split by colour)."""
    if len(classes) < 2:  # whatever the fraction: no class can be both trained on and unseen
        raise ValueError(f'{source}: one class only ({", ".join(map(repr, sorted(classes)))}); the classes are '
                         'split into classes to train on and unseen classes to test with, so at least two are '
                         'needed')
    fraction = DEFAULT_TEST_FRACTION if test_fraction is None else test_fraction
    held_out = held_out_count(len(classes), fraction, '--test_fraction', 'classes')
    return set(random.Random(seed).sample(sorted(classes), held_out))


def assign_splits(rows, source, test_fraction, seed=0):
    """Rows with their split: their own, or, when they have none, a random test_fraction of the
    classes test, the others train (the zero-shot protocol of CUB and Cars, which keep their
    published halves). Returns (rows, split names)."""
    present = {row[2] for row in rows}
    if present == {None}:
        test = random_test_classes({row[1] for row in rows}, test_fraction, seed, source)
        return [(path, name, 'test' if name in test else 'train', where) for path, name, _, where in rows], \
            ('train', 'test')
    if test_fraction is not None:
        warnings.warn(f'{source} has its own splits; --test_fraction is not used')
    split_names = next((names for names in SPLIT_SETS if set(names) == present), None)
    if split_names is None:
        raise ValueError(f'{source}: {", ".join(s for s in OWN_SPLITS if s in present)} images only; expected train '
                         'and test, or train, query and gallery (or no split at all, to split the classes by '
                         '--test_fraction)')
    # retrieval is evaluated on classes unseen in training: one class on both sides would leak
    trained = {}
    for _, name, split, where in rows:
        if split == 'train':
            trained.setdefault(name, where)
    for _, name, split, where in rows:
        if split != 'train' and name in trained:
            raise ValueError(f'class {name!r} is both in train ({trained[name]}) and in {split} ({where}); '
                             'the classes searched must be unseen in training')
    return rows, split_names


def check_own_splits(splits, records, root):
    """After decoding: no class lost all its images, and the evaluation has queries that can find
    something. A test class of one image can retrieve nothing: it is kept, as a distractor in the
    gallery (the metrics leave such queries out), and said."""
    for split, name in dict.fromkeys((record[4], record[2]) for record in records):
        if name not in splits[split]:
            raise ValueError(f'{root}: class {name!r} ({split}) is empty: none of its images could be read (named above)')
    if 'test' in splits:
        evaluated, hopeless = 'test', [name for name, paths in splits['test'].items() if len(paths) == 1]
        why, fate = 'a single image', 'they are no queries (nothing to find) but stay in the gallery as distractors'
    else:
        evaluated, hopeless = 'query', [name for name in splits['query'] if name not in splits['gallery']]
        why, fate = 'no gallery image', 'their queries have nothing to find and are left out of the metrics'
    if len(hopeless) == len(splits[evaluated]):
        raise ValueError(f'{root}: every {evaluated} class has {why}, so no query can find anything')
    if hopeless:
        warnings.warn(f'{root}: {len(hopeless)} of {len(splits[evaluated])} {evaluated} classes have {why} '
                      f'({", ".join(map(repr, hopeless[:5]))}{", ..." * (len(hopeless) > 5)}): {fate}')


def check_data_name(data_name):
    # the name is one folder of DIR: a path in it would read (and write) elsewhere
    if data_name in ('', os.curdir, os.pardir, 'all') or any(sep and sep in data_name for sep in (os.sep, os.altsep)):
        raise ValueError(f'--data_name {data_name!r}: expected the name of one folder in --data_path')


def prepare_own(data_path, data_name, crop=False, max_size=None, test_fraction=None, seed=0):
    """Your own data set in DIR/<data_name>/: images.csv if there is one, else the class folders;
    without a split of its own, its classes split at random from `seed`."""
    check_data_name(data_name)
    refuse_crop(data_name, crop, 'your own data set has no bounding boxes')
    root = os.path.join(data_path, data_name)
    if not os.path.isdir(root):
        raise FileNotFoundError(f'{root} not found; expected your own data set there: {OWN_LAYOUT}; '
                                f'{known_data_names(data_path, data_name)}')
    listing = os.path.join(root, 'images.csv')
    rows = csv_rows(root, listing) if os.path.isfile(listing) else folder_rows(root)
    rows, split_names = assign_splits(rows, listing if os.path.isfile(listing) else root, test_fraction, seed)
    # the class name is its id too: classes are saved in sorted order
    records = [(path, name, name, None, split) for path, name, split, _ in rows]
    out = write_splits(data_path, data_name, records, crop=False, split_names=split_names, max_size=max_size,
                       check=functools.partial(check_own_splits, records=records, root=root))
    for split in split_names:  # which classes are learned from, and which searched, said by name
        classes = sorted({name for _, name, split_of, _ in rows if split_of == split})
        print(f'{data_name}: {split} classes: {", ".join(map(repr, classes))}')
    return out

# -----------------------------------------------------------------------------
# synthetic: the embedded default, a small fine-grained set generated on disk

# Each class is one combination of these attribute values. Test classes are combinations
# never seen in training, built from values that all were: an embedding that learned the
# attributes transfers, one that memorised the training classes does not.
SHAPES = ('circle', 'square', 'triangle', 'star', 'cross', 'pentagon')
COLOURS = {'red': (220, 40, 40), 'green': (40, 180, 60), 'blue': (50, 80, 230), 'yellow': (230, 210, 40),
           'magenta': (200, 50, 200), 'cyan': (40, 200, 210)}
PATTERNS = ('solid', 'stripes', 'dots', 'checks')
DETAILS = ('plain', 'black-eye', 'white-eye')


def _outline(shape, radius):
    """Polygon points (or a bounding box for the circle) centred on (radius, radius)."""
    c = radius
    if shape == 'circle':
        return [(0, 0), (2 * c, 2 * c)]
    corners = {'square': 4, 'triangle': 3, 'pentagon': 5}
    if shape in corners:
        n = corners[shape]
        return [(c + c * math.cos(2 * math.pi * k / n - math.pi / 2), c + c * math.sin(2 * math.pi * k / n - math.pi / 2))
                for k in range(n)]
    if shape == 'star':
        return [(c + r * math.cos(math.pi * k / 5 - math.pi / 2), c + r * math.sin(math.pi * k / 5 - math.pi / 2))
                for k, r in zip(range(10), itertools.cycle((c, 0.45 * c)))]
    w = 0.33 * c  # cross: a plus sign of arm half-width w
    return [(c - w, 0), (c + w, 0), (c + w, c - w), (2 * c, c - w), (2 * c, c + w), (c + w, c + w),
            (c + w, 2 * c), (c - w, 2 * c), (c - w, c + w), (0, c + w), (0, c - w), (c - w, c - w)]


def _pattern(pattern, colour, size, period, rng):
    base = np.array(colour, dtype=np.float32) * rng.uniform(0.8, 1.1)
    dark = base * 0.35
    y, x = np.mgrid[:size, :size]
    if pattern == 'solid':
        mask = np.zeros((size, size), bool)
    elif pattern == 'stripes':
        mask = (x // period) % 2 == 1
    elif pattern == 'checks':
        mask = ((x // period) + (y // period)) % 2 == 1
    else:  # dots on a grid
        mask = ((x % (2 * period) - period) ** 2 + (y % (2 * period) - period) ** 2) < (0.5 * period) ** 2
    fill = np.where(mask[..., None], dark, base)
    return Image.fromarray(np.clip(fill, 0, 255).astype(np.uint8))


def _background(size, rng):
    tone = rng.uniform(60, 160, size=3)
    canvas = np.ones((size, size, 3), np.float32) * tone
    image = Image.fromarray(canvas.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(4, 9)):  # clutter: strokes and blobs in muted colours
        colour = tuple(int(v) for v in rng.uniform(30, 200, size=3))
        x0, y0, x1, y1 = rng.uniform(0, size, size=4)
        if rng.random() < 0.5:
            draw.line([(x0, y0), (x1, y1)], fill=colour, width=int(rng.integers(1, 4)))
        else:
            r = rng.uniform(2, size / 8)
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=colour)
    return image


def render(shape, colour, pattern, detail, size, rng):
    image = _background(size, rng)
    radius = int(size * rng.uniform(0.22, 0.34))
    side = 2 * radius
    mask = Image.new('L', (side + 1, side + 1), 0)
    outline = _outline(shape, radius)
    (ImageDraw.Draw(mask).ellipse if shape == 'circle' else ImageDraw.Draw(mask).polygon)(outline, fill=255)
    obj = _pattern(pattern, COLOURS[colour], side + 1, max(2, side // 7), rng)
    if detail != 'plain':
        eye = radius * 0.28
        ImageDraw.Draw(obj).ellipse([radius - eye, radius - eye, radius + eye, radius + eye],
                                    fill=(15, 15, 15) if detail == 'black-eye' else (245, 245, 245))
    angle = rng.uniform(0, 360)
    obj = obj.rotate(angle, resample=Image.BILINEAR, expand=True)
    mask = mask.rotate(angle, resample=Image.BILINEAR, expand=True)
    x = int(rng.integers(0, max(1, size - obj.width)))
    y = int(rng.integers(0, max(1, size - obj.height)))
    image.paste(obj, (x, y), mask)
    pixels = np.asarray(image, np.float32) + rng.normal(0, 12, size=(size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.7)))


def synthetic_classes(num_classes, seed):
    """Split attribute combinations into train and test classes, every test value seen in training."""
    combos = list(itertools.product(SHAPES, COLOURS, PATTERNS, DETAILS))
    if not 2 <= num_classes <= len(combos):
        raise ValueError(f'--num_classes must be between 2 and {len(combos)}, got {num_classes}')
    rng = np.random.default_rng(seed)
    while True:
        chosen = [combos[i] for i in rng.permutation(len(combos))[:num_classes]]
        train, test = chosen[:num_classes // 2], chosen[num_classes // 2:]
        if all({c[k] for c in test} <= {c[k] for c in train} for k in range(4)):
            return train, test


def prepare_synthetic(data_path, crop=False, num_classes=100, images_per_class=20, image_size=64, seed=0,
                      max_size=None):
    root = os.path.join(data_path, 'synthetic')
    train, test = synthetic_classes(num_classes, seed)
    records = []
    for class_id, attributes in enumerate(train + test, 1):
        name = '-'.join(attributes)
        os.makedirs(os.path.join(root, 'images', name), exist_ok=True)
        for i in range(images_per_class):
            # seeded per (class, image): any image can be regenerated alone, in any order
            rng = np.random.default_rng([seed, class_id, i])
            rel_path = os.path.join('images', name, f'{i:03d}.jpg')
            render(*attributes, image_size, rng).save(os.path.join(root, rel_path), quality=95)
            records.append((rel_path, class_id, name, (0, 0, image_size, image_size)))
    return write_splits(data_path, 'synthetic', split_by_class(records, n_train_classes=len(train)),
                        crop=crop, max_size=max_size)

# -----------------------------------------------------------------------------
# downloading a release (--download)

# The releases with a fixed official address and a published checksum: (archive URL, its MD5, the
# folder it extracts to, a file that folder holds). The others are fetched by hand: docs/data.md.
DOWNLOADS = {
    'cub': ('https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz', '97eceeb196236b17998738112f37df78',
            'CUB_200_2011', 'images.txt'),
}
NOT_DOWNLOADED = {'synthetic': 'is generated, not downloaded: drop --download',
                  'all': 'is several data sets: name the one to download'}


def release_present(data_path, name):
    """Whether DIR/<name>/ holds the extracted release, moved up out of its folder or not."""
    _, _, folder, marker = DOWNLOADS[name]
    root = os.path.join(data_path, name)
    return os.path.exists(os.path.join(release_base(root, folder, marker), marker))


def extract_release(archive, root, folder):
    """Extract the archive's `folder` to root/folder/ all at once: into a temporary sibling of root,
    then renamed, so that a failure leaves no half-extracted folder where the preparer reads."""
    final = os.path.join(root, folder)
    tmp = os.path.join(os.path.dirname(os.path.abspath(root)), f'.tmp-{os.getpid()}-{os.path.basename(root)}')
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter='data')  # no member lands outside tmp, none is a device or a link out
        if not os.path.isdir(os.path.join(tmp, folder)):
            raise ValueError(f'{archive}: holds no {folder}/ folder; is it the release?')
        os.makedirs(root, exist_ok=True)
        os.replace(os.path.join(tmp, folder), final)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:  # a corrupt archive, a full disk
        raise ValueError(f'{archive}: extraction failed ({type(e).__name__}: {e}); nothing was written '
                         f'to {final}') from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download_release(data_path, name, url=None, md5=None):
    """Fetch the official archive of `name` (or `url`, a mirror, with `md5`), check its MD5 and
    extract it into DIR/<name>/, unless the release is there already. A cut download is kept and
    resumed by the next call; the archive is deleted once extracted."""
    if name not in DOWNLOADS:
        raise ValueError(f'--download fetches {", ".join(DOWNLOADS)}; {name} ' + NOT_DOWNLOADED.get(
            name, 'has no fixed official address and checksum: docs/data.md says where to get it and how to '
                  'lay it out in ' + os.path.join(data_path, name)))
    official_url, official_md5, folder, marker = DOWNLOADS[name]
    url, md5 = url or official_url, md5 or official_md5
    root = os.path.join(data_path, name)
    if release_present(data_path, name):
        print(f'{name}: the release is in {root} already; nothing downloaded')
        return
    if os.path.exists(os.path.join(root, folder)):  # os.replace cannot put the new folder there
        raise ValueError(f'{os.path.join(root, folder)} exists without its {marker}: move it away and run again')
    archive = os.path.join(data_path, url_file_name(url) or f'{name}.tgz')
    if os.path.exists(archive):  # fetched by an earlier call, or by hand
        try:
            check_digest(archive, 'md5', md5)
        except ValueError as e:
            raise ValueError(f'{e}: not the {name} release; delete it to download it again') from None
    else:
        print(f'{name}: downloading {url} to {archive}')
        try:
            download(url, archive, md5=md5, resume=True)  # a wrong MD5 deletes it, saying so
        except DownloadError as e:
            raise FileNotFoundError(f'{name} not downloaded ({e}); run the command again to resume, or download '
                                    f'{url} by hand and extract it into {root}/') from None
    extract_release(archive, root, folder)
    os.remove(archive)  # its contents are in root now, as large again
    print(f'{name}: extracted into {os.path.join(root, folder)}')

# -----------------------------------------------------------------------------
# command line

# Each preparer reads DIR/<name>/ and writes split_path(DIR, name, crop, max_size); new datasets go here.
PREPARERS = {
    'car': prepare_cars,
    'cub': prepare_cub,
    'inshop': prepare_inshop,
    'sop': prepare_sop,
    'synthetic': prepare_synthetic,
}


def skip_reason(data_path, name, crop):
    """Why --data_name all passes over `name`, or None: it prepares every dataset there is and can be."""
    folder = os.path.join(data_path, name)
    if name != 'synthetic' and not os.path.isdir(folder):  # the synthetic set is generated, not downloaded
        return f'no {folder} folder'
    if crop and name in WITHOUT_BOXES:
        return WITHOUT_BOXES[name]
    return None


def preparer(name, test_fraction, seed=0):
    """The function that prepares DIR/<name>/: a built-in data set's, or your own data set's."""
    if name in PREPARERS:
        if test_fraction is not None:
            raise ValueError(f'--test_fraction is for your own data sets; {name} has a fixed split')
        return PREPARERS[name]
    return functools.partial(prepare_own, data_name=name, test_fraction=test_fraction, seed=seed)


def main(argv=None):
    parser = argparse.ArgumentParser(description='Write the class splits of a retrieval dataset.',
                                     formatter_class=HelpFormatter)
    parser.add_argument('--data_path', default='data', help='folder holding one sub-folder per dataset')
    parser.add_argument('--data_name', required=True,
                        help='car (Cars196), cub (CUB-200-2011), inshop (In-shop Clothes) or sop (Stanford '
                             'Online Products), read from DATA_PATH/<name>/ (a missing file names the layout '
                             'expected); synthetic, generated there; all: synthetic and each dataset present; '
                             'any other name: your own data set in DATA_PATH/<name>/, as images.csv '
                             '(path,class[,split]) or class folders (train/ + test/, train/ + query/ + gallery/, '
                             'or the class folders alone)')
    parser.add_argument('--crop', action='store_true',
                        help='save bounding-box crops and list those instead (car, cub and synthetic only)')
    parser.add_argument('--max_size', type=Range(int, 1), default=None, metavar='N',
                        help='list JPEG copies (quality 95) shrunk to a longer side of at most N pixels, aspect '
                             'kept, saved under DATA_PATH/<name>/resized_N/ (after --crop if both), so that '
                             'training decodes small images; images already within N are listed as they are')
    parser.add_argument('--test_fraction', type=Range(float, 0, 1, closed=False), default=None, metavar='F',
                        help='your own data set without a split: a random F of its classes (drawn from --seed) '
                             f'are the test classes, the others train (default {DEFAULT_TEST_FRACTION})')
    parser.add_argument('--seed', type=Range(int, 0), default=0,
                        help='draws the synthetic set, and the random class split of your own data set')
    fetch = parser.add_argument_group('downloading (--data_name cub)')
    fetch.add_argument('--download', action='store_true',
                       help=f'first fetch the official archive of the data set ({", ".join(DOWNLOADS)} only), '
                            'check its MD5 and extract it into DATA_PATH/<name>/, unless it is there; a cut '
                            'download is resumed by the next call')
    fetch.add_argument('--download_url', metavar='URL', help='with --download: fetch the archive from a mirror instead')
    fetch.add_argument('--download_md5', metavar='HEX',
                       help="with --download: the archive's MD5, instead of the official one")
    synthetic = parser.add_argument_group('synthetic set (--data_name synthetic)')
    synthetic.add_argument('--num_classes', type=Range(int, 2), default=100, help='half train, half unseen test classes')
    synthetic.add_argument('--images_per_class', type=Range(int, 2), default=20)
    synthetic.add_argument('--image_size', type=Range(int, 1), default=64)
    args = parser.parse_args(argv)
    if (args.download_url or args.download_md5) and not args.download:
        parser.error('--download_url and --download_md5 go with --download')
    if args.download:
        download_release(args.data_path, args.data_name, args.download_url, args.download_md5)
    synthetic_options = dict(num_classes=args.num_classes, images_per_class=args.images_per_class,
                             image_size=args.image_size, seed=args.seed)
    names = list(PREPARERS) if args.data_name == 'all' else [args.data_name]
    for name in names:
        reason = skip_reason(args.data_path, name, args.crop) if args.data_name == 'all' else None
        if reason:
            print(f'{name}: skipped, {reason}')
            continue
        options = synthetic_options if name == 'synthetic' else {}
        preparer(name, args.test_fraction, args.seed)(args.data_path, crop=args.crop, max_size=args.max_size, **options)


if __name__ == '__main__':
    run_script(main)
