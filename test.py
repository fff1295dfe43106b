"""Query the feature database that train.py saved: retrieve the K gallery (test) images most
similar to each query image and draw them.

A query that is an image of the database uses its stored embedding and has a ground truth:
it is left out of its own results, which are framed green (its class) or red (another).
Any other image is embedded by the run's saved model, exactly as train.py embedded the test
set; it has no class, so its results are framed grey.

    python test.py --data_base results/car_resnet50_positive_proxy_512_20_seed0_data_base.pth \
                   --query_img_name data/car/car_ims/008055.jpg my_car.jpg my_photos/ --retrieval_num 8

Each query gets {output_dir}/{folder}_{image}/ with query_img.jpg, retrieval_img_{rank}_{similarity}.jpg
and grid.png; several queries also get {output_dir}/retrieval_summary.png, one row per query.
"""
import argparse
import glob
import os
import re
from typing import NamedTuple

import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

from model import Model, embed_images
from utils import (add_device_argument, atomic_path, database_split, load_database, read_rgb, resolve_device,
                   run_script, stored_run_name)

GREEN, RED, GREY = (0, 160, 0), (210, 0, 0), (150, 150, 150)
GRID_TILE, SUMMARY_TILE = 240, 120  # pixels of a framed image: the grid is for reading, the summary for scanning
IMAGE_EXTENSIONS = {ext for ext, kind in Image.registered_extensions().items() if kind in Image.OPEN}
# how an image becomes an embedding: a model that differs in one of these cannot query the database
EMBEDDING_ARGS = ('backbone_type', 'pooling', 'feature_dim', 'image_size')
# 1 - cosine grows with the square of an embedding's error: 0.9999 allows about 1.4 % of it, far above
# float noise across devices and batch sizes; the weights of another run or epoch move it further
MIN_REPRODUCED_COSINE = 0.9999


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Retrieve the gallery images most similar to query images.')
    parser.add_argument('--query_img_name', nargs='+', default=['data/car/car_ims/008055.jpg'],
                        help='query images, or folders of them: images of the database or any others')
    parser.add_argument('--data_base', default='results/car_resnet50_positive_proxy_512_20_seed0_data_base.pth',
                        help='feature database written by train.py')
    parser.add_argument('--model', default=None,
                        help='the model file of the run that wrote the database, to embed queries from outside it '
                             "(default: {output_dir}/{run name}_model.pth from the database's arguments)")
    parser.add_argument('--retrieval_num', type=int, default=8, help='how many images to retrieve per query')
    add_device_argument(parser)
    parser.add_argument('--output_dir', default='results')
    args = parser.parse_args(argv)
    args.device = resolve_device(args.device)
    return args


class Query(NamedTuple):
    embedding: torch.Tensor
    label: int | None  # index into the database's test_classes; None: outside the database, no ground truth
    gallery_index: int | None  # its place in the gallery, to leave it out of its own results


def stored_queries(database):
    """Absolute path -> Query of each image the database embeds: the gallery (test_*) and
    In-shop's separate queries (query_*), which are not in the gallery."""
    stored = {}
    for split in ('query', 'test'):
        images, labels, embeddings = database_split(database, split)
        for i, path in enumerate(images):
            stored[os.path.abspath(path)] = Query(embeddings[i], labels[i], i if split == 'test' else None)
    return stored


def query_paths(names):
    """Each name, or every image of a folder (sorted); an image named twice counts once."""
    paths = []
    for name in names:
        if os.path.isdir(name):
            images = sorted(p for p in glob.glob(os.path.join(name, '*'))
                            if os.path.splitext(p)[1].lower() in IMAGE_EXTENSIONS)
            if not images:
                raise ValueError(f'--query_img_name {name}: the folder holds no images')
            paths += images
        else:
            paths.append(name)
    return list({os.path.abspath(p): p for p in paths}.values())


def check_outside_image(path, database_path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f'--query_img_name {path}: no such image or folder, '
                                f'and not an image of --data_base {database_path}')
    try:
        read_rgb(path)
    except OSError as e:  # PIL's UnidentifiedImageError too
        raise ValueError(f'--query_img_name {path} is not a readable image ({e})') from None


def query_folder(output_dir, path):
    # parent folder + file name: unique for CUB/Cars/synthetic layouts (class folder or car_ims)
    parent, file_name = os.path.split(os.path.normpath(path))
    return os.path.join(output_dir, f'{os.path.basename(parent)}_{os.path.splitext(file_name)[0]}')


def check_distinct_folders(paths, output_dir):
    written_by = {}
    for path in paths:
        folder = query_folder(output_dir, path)
        if folder in written_by:
            raise ValueError(f'--query_img_name {written_by[folder]} and {path} would both be written to {folder}/; '
                             f'query them in separate runs')
        written_by[folder] = path

# -----------------------------------------------------------------------------
# embedding queries from outside the database


def default_model_path(database):
    run = database['args']
    return os.path.join(run['output_dir'], f'{stored_run_name(run)}_model.pth')


def embed_queries(model, paths):
    """Embeddings of query images as train.py embedded its test set: same size, same batches."""
    return embed_images(model, paths, model.run_args['image_size'], model.run_args['batch_size'], 'embed queries')


def load_model(path, database, database_path, device):
    """The network that wrote the database's embeddings, checked against them, on device."""
    model = Model.from_file(path, not_found=(
        f'model file {path} not found: it embeds the queries that are not images of --data_base {database_path}; '
        f'pass --model PATH, the _model.pth of that run'))
    run, stored = model.run_args, database['test_embeddings']
    differences = [f'{key} {run[key]} vs {database["args"][key]}' for key in EMBEDDING_ARGS
                   if run[key] != database['args'][key]]
    if stored.shape[1] != run['feature_dim']:
        differences.append(f'{run["feature_dim"]}-d embeddings vs {stored.shape[1]}-d')
    if differences:
        raise ValueError(f'model {path} does not fit --data_base {database_path}: '
                         f'{"; ".join(differences)} (model vs database)')
    model.to(device)
    # same architecture is not enough: weights of another run or epoch embed into another space
    cosine = (embed_queries(model, database['test_images'][:1])[0] @ stored[0].float()).item()
    if cosine < MIN_REPRODUCED_COSINE:
        raise ValueError(f'model {path} does not reproduce the embeddings of --data_base {database_path} '
                         f'(cosine {cosine:.3f} on {database["test_images"][0]}): they come from different runs '
                         f'or epochs; pass --model with the _model.pth of the run that wrote the database')
    return model

# -----------------------------------------------------------------------------
# retrieval


def retrieve(gallery, query, own_index, k):
    """The k gallery images most similar to the query, itself left out when it is one: (indices, similarities)."""
    available = len(gallery) - (own_index is not None)
    if not 1 <= k <= available:
        raise ValueError(f'--retrieval_num {k}: the gallery holds {available} '
                         f'{"other " if own_index is not None else ""}images')
    similarities = gallery @ query
    if own_index is not None:
        similarities[own_index] = float('-inf')
    top = similarities.topk(k)
    return top.indices.tolist(), top.values.tolist()


def result_tiles(path, label, indices, similarities, database):
    """The query then its results, as (image path, frame colour, header, class) tiles."""
    images, labels, classes = database['test_images'], database['test_labels'], database['test_classes']
    query_class = 'not in the database' if label is None else classes[label]
    tiles = [(path, GREY, f'query: {os.path.basename(path)}', query_class)]
    for rank, (index, similarity) in enumerate(zip(indices, similarities), 1):
        colour = GREY if label is None else GREEN if labels[index] == label else RED
        tiles.append((images[index], colour, f'#{rank}  {similarity:.3f}', classes[labels[index]]))
    return tiles

# -----------------------------------------------------------------------------
# drawing


def framed(path, colour, size=GRID_TILE):
    """The image scaled to fit size x size together with its frame (small images grow, to be seen)."""
    border = max(2, size // 30)
    image = ImageOps.contain(read_rgb(path), (size - 2 * border, size - 2 * border))
    return ImageOps.expand(image, border=border, fill=colour)


def wrap(text, font, width, max_lines):
    """text broken after spaces, underscores or hyphens into lines of at most width pixels;
    a line still too long (one long word, or what does not fit in max_lines) ends in an ellipsis."""
    lines = ['']
    for word in re.split(r'(?<=[ _-])', text):
        if lines[-1] and font.getlength(lines[-1] + word) > width:
            lines.append('')
        lines[-1] += word
    if len(lines) > max_lines:
        lines = lines[:max_lines - 1] + [''.join(lines[max_lines - 1:])]
    fitted = []
    for line in lines:
        line = line.strip()
        while font.getlength(line) > width:
            line = line[:-2] + '…'
        fitted.append(line)
    return fitted


def draw_sheet(rows, tile):
    """Rows of tiles on one white image: each framed image in a tile x tile box, its header (one
    line) and class (two lines at most) under it; a wider gap after the first column sets the query apart."""
    font = ImageFont.load_default(size=max(10, tile // 14))
    line, pad = round(1.25 * font.size), max(4, tile // 16)
    cell_width, cell_height = tile + 2 * pad, tile + 2 * pad + 3 * line
    gap, width = 2 * pad, tile + pad  # width: of a caption line
    sheet = Image.new('RGB', (max(map(len, rows)) * cell_width + gap, len(rows) * cell_height), 'white')
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(rows):
        for c, (path, colour, header, class_name) in enumerate(row):
            left, top = c * cell_width + (gap if c else 0), r * cell_height
            image = framed(path, colour, tile)
            sheet.paste(image, (left + (cell_width - image.width) // 2, top + pad + (tile - image.height) // 2))
            lines = wrap(header, font, width, max_lines=1) + wrap(class_name, font, width, max_lines=2)
            for i, text in enumerate(lines):
                draw.text((left + cell_width // 2, top + pad + tile + pad // 2 + i * line), text,
                          fill='black', font=font, anchor='mt')
    return sheet


def save_png(image, path):
    with atomic_path(path) as tmp:
        image.save(tmp)


def write_query_results(tiles, similarities, folder):
    """The framed query and results as jpgs, and their grid."""
    os.makedirs(folder, exist_ok=True)
    for stale in glob.glob(os.path.join(folder, 'retrieval_img_*.jpg')):  # an earlier query's results
        os.remove(stale)
    framed(tiles[0][0], GREY).save(os.path.join(folder, 'query_img.jpg'))
    for rank, ((path, colour, *_), similarity) in enumerate(zip(tiles[1:], similarities), 1):
        framed(path, colour).save(os.path.join(folder, f'retrieval_img_{rank}_{similarity:.4f}.jpg'))
    save_png(draw_sheet([tiles], GRID_TILE), os.path.join(folder, 'grid.png'))


def main(argv=None):
    args = parse_args(argv)
    database = load_database(args.data_base)
    paths = query_paths(args.query_img_name)
    check_distinct_folders(paths, args.output_dir)
    stored = stored_queries(database)
    queries = {p: stored[os.path.abspath(p)] for p in paths if os.path.abspath(p) in stored}
    outside = [p for p in paths if p not in queries]
    for path in outside:
        check_outside_image(path, args.data_base)
    if outside:  # only these need the model
        model = load_model(args.model or default_model_path(database), database, args.data_base, args.device)
        for path, embedding in zip(outside, embed_queries(model, outside)):
            queries[path] = Query(embedding, None, None)

    # every retrieval before any file, so that an error leaves no partial output
    results = {p: retrieve(database['test_embeddings'], queries[p].embedding, queries[p].gallery_index,
                           args.retrieval_num) for p in paths}
    rows = []
    for path in paths:
        label, (indices, similarities) = queries[path].label, results[path]
        rows.append(result_tiles(path, label, indices, similarities, database))
        folder = query_folder(args.output_dir, path)
        write_query_results(rows[-1], similarities, folder)
        if label is None:
            outcome = f'outside the database, no ground truth; {len(indices)} results'
        else:
            correct = sum(database['test_labels'][i] == label for i in indices)
            outcome = (f'{correct}/{len(indices)} retrieved images share the query class '
                       f'{database["test_classes"][label]!r}')
        print(f'{path}: {outcome}; written to {folder}/ (grid.png)')
    if len(rows) > 1:
        summary = os.path.join(args.output_dir, 'retrieval_summary.png')
        save_png(draw_sheet(rows, SUMMARY_TILE), summary)
        print(f'{len(rows)} queries side by side: {summary}')


if __name__ == '__main__':
    run_script(main)
