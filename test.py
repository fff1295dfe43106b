"""Query the feature database that train.py saved: retrieve the K gallery (test) images most
similar to each query image and draw them.

A query that is an image of the database uses its stored embedding and has a ground truth:
it is left out of its own results, which are framed green (its class) or red (another).
Any other image is embedded by the run's saved model, exactly as train.py embedded the test
set; it has no class, so its results are framed grey.

    python test.py --data_base results/car_resnet50_positive_proxy_512_20_seed0_data_base.pth \
                   --query_img_name data/car/car_ims/008055.jpg my_car.jpg my_photos/ --retrieval_num 8

The queries of a database go to a folder of its own, --output_dir, by default
results/{run}_queries/ for results/{run}_data_base.pth. Each query gets {output_dir}/{folder}_{image}/
with query_img.jpg, retrieval_img_{rank}_{similarity}.jpg, grid.png and its page, index.html; several
queries also get {output_dir}/retrieval_summary.png, one row per query under a title and a legend, and
{output_dir}/index.html links every query page in the folder, earlier runs' too.
--random_queries N draws N gallery images as queries, with --seed, to show typical results.

Any folders of photos become the gallery through an index file, built with a run's saved model and
brought up to date on every run (only new or changed files are embedded):

    python test.py --model results/{run}_model.pth --gallery ~/Pictures --query_img_name my_car.jpg

This file is the command line, the queries, the grids and the page; what they search (the gallery,
its index of photo folders, exact and faiss search) is gallery.py.
"""
import argparse
import functools
import glob
import html
import json
import os
import random
import re
import signal
import sys
import time
import urllib.request
from typing import NamedTuple

from PIL import Image, ImageDraw, ImageFont, ImageOps

from gallery import (EMBEDDING_ARGS, SEARCHES, Gallery, Query, default_index_path, describe_model, embed_queries,
                     index_gallery, index_ivf, load_index, model_identity, search, update_index, why_unreadable)
from model import Model
from utils import (AMP_DTYPES, IMAGE_EXTENSIONS, HelpFormatter, Range, add_amp_argument, add_device_argument,
                   atomic_path, database_split, load_database, queries_folder, read_rgb, resolve_amp, resolve_device,
                   run_script, stored_run_name)

GREEN, RED, GREY = (0, 160, 0), (210, 0, 0), (150, 150, 150)
COLOUR_NAMES = {GREEN: 'green', RED: 'red', GREY: 'grey'}  # the page's names of the frames
GRID_TILE, SUMMARY_TILE = 240, 120  # pixels of a framed image: the grid is for reading, the summary for scanning
# 1 - cosine grows with the square of an embedding's error: 0.9999 allows about 1.4 % of it, far above
# float noise across devices and batch sizes; the weights of another run or epoch move it further
MIN_REPRODUCED_COSINE = 0.9999


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Retrieve the gallery images most similar to query images: '
                                                 'those of a --data_base, or of photo folders (--gallery, --index).',
                                     formatter_class=HelpFormatter)
    parser.add_argument('--query_img_name', nargs='+', default=None,
                        help='query images, or folders of them: images of the gallery or any others '
                             '(with --data_base, this or --random_queries is needed; with --gallery: none, only index)')
    parser.add_argument('--data_base', default=None,
                        help='the _data_base.pth that train.py wrote (its last lines name it); required unless '
                             '--gallery or --index is given')
    parser.add_argument('--model', default=None,
                        help='the model file of the run that wrote the database, to embed queries from outside it '
                             "(default: {output_dir}/{run name}_model.pth from the database's arguments); "
                             'with --gallery, the model that embeds the photos (required)')
    parser.add_argument('--gallery', nargs='+', metavar='FOLDER',
                        help='search the images under these folders (recursively) instead of --data_base: '
                             'they are indexed into --index, and only new or changed files are embedded again')
    parser.add_argument('--index', default=None,
                        help='the gallery index file (default: {run}_index.pth beside --model); '
                             'without --gallery it is searched as it is')
    parser.add_argument('--search', default='exact', choices=SEARCHES,
                        help="exact: every gallery embedding; ivf: faiss's inverted-file index of --index "
                             '(built once and kept in it; approximate, needs faiss-cpu)')
    parser.add_argument('--nprobe', type=Range(int, 1), default=32, help='--search ivf: inverted lists searched per query')
    parser.add_argument('--random_queries', type=Range(int, 1), default=None, metavar='N',
                        help='also query N images of the gallery drawn at random with --seed: typical results, '
                             'not picked by hand')
    parser.add_argument('--seed', type=Range(int, 0), default=0, help='the draw of --random_queries')
    parser.add_argument('--retrieval_num', type=Range(int, 1), default=8, help='how many images to retrieve per query')
    add_device_argument(parser)
    add_amp_argument(parser, auto='queries against a --data_base in the precision train.py embedded its gallery in, '
                                  'the photos of --gallery in bf16 where the device computes bf16 in hardware')
    parser.add_argument('--output_dir', default=None,
                        help='where the query folders, the sheet of all queries and the contents page go '
                             '(default: results/{database or index name}_queries/, a folder for each)')
    args = parser.parse_args(argv)
    args.device = resolve_device(args.device)
    try:
        resolve_amp(args.amp, args.device)  # --amp fp16 on a CPU is refused now, before any work
    except ValueError as e:
        parser.error(str(e))
    indexing = args.gallery is not None or args.index is not None
    if indexing == (args.data_base is not None):
        parser.error('--data_base and --gallery/--index are two galleries: search one at a time' if indexing else
                     '--data_base is required: the _data_base.pth that train.py wrote (its last lines name it); '
                     'or search photo folders with --gallery FOLDER --model PATH, or an index with --index PATH')
    if not indexing and args.query_img_name is None and args.random_queries is None:
        parser.error(f'--data_base {args.data_base}: name the queries, --query_img_name IMAGE_OR_FOLDER or '
                     '--random_queries N')
    if args.gallery is not None and args.model is None:
        parser.error('--gallery needs --model, the _model.pth of the run whose network embeds the photos')
    if args.search != 'exact' and not indexing:
        parser.error(f'--search {args.search} searches a gallery index: use it with --gallery or --index')
    if args.index is None and args.gallery is not None:
        args.index = default_index_path(args.model)
    args.query_img_name = args.query_img_name or []
    args.output_dir = args.output_dir or queries_folder(args.index if indexing else args.data_base)
    return args


def database_gallery(database, path):
    run = database.get('args')
    return Gallery(database['test_images'], database['test_embeddings'], database['test_labels'],
                   database['test_classes'], f'--data_base {path}', stored_run_name(run) if run else None)


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


def random_queries(gallery, n, seed):
    """n images of the gallery, drawn with the seed: the same n for the same seed and gallery."""
    if n > len(gallery.images):
        raise ValueError(f'--random_queries {n}: {gallery.name} holds only {len(gallery.images)} images')
    return [gallery.images[i] for i in random.Random(seed).sample(range(len(gallery.images)), n)]


def check_outside_image(path, gallery_name):
    if not os.path.isfile(path):
        raise FileNotFoundError(f'--query_img_name {path}: no such image or folder, '
                                f'and not an image of {gallery_name}')
    reason = why_unreadable(path)
    if reason is not None:
        raise ValueError(f'--query_img_name {path} is not a readable image ({reason})')


def query_folder(output_dir, path):
    # parent folder + file name: unique for CUB/Cars/synthetic layouts (class folder or car_ims)
    parent, file_name = os.path.split(os.path.abspath(path))
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
# the network: the model that embeds images from outside the database


def default_model_path(database):
    run = database['args']
    return os.path.join(run['output_dir'], f'{stored_run_name(run)}_model.pth')


def read_model(path, device, needed_for):
    """The network of a run's _model.pth, in eval mode, on device; the run's arguments are its .run_args."""
    return Model.from_file(path, not_found=f'model file {path} not found: it embeds {needed_for}; '
                                           f'pass --model PATH, the _model.pth of that run').to(device)


def database_precision(database):
    """The precision train.py embedded a database in: its run's --amp as resolved (fp32 before --amp)."""
    return database['args'].get('amp', 'none')


def load_model(path, database, database_path, device):
    """The network that wrote the database's embeddings, checked against them, on device."""
    model = read_model(path, device, f'the queries that are not images of --data_base {database_path}')
    run = model.run_args
    stored = database['test_embeddings']
    differences = [f'{key} {run[key]} vs {database["args"][key]}' for key in EMBEDDING_ARGS
                   if run[key] != database['args'][key]]
    if stored.shape[1] != run['feature_dim']:
        differences.append(f'{run["feature_dim"]}-d embeddings vs {stored.shape[1]}-d')
    if differences:
        raise ValueError(f'model {path} does not fit --data_base {database_path}: '
                         f'{"; ".join(differences)} (model vs database)')
    # same architecture is not enough: weights of another run or epoch embed into another space. In
    # the database's own precision: a bf16 embedding is not its fp32 one to this cosine
    embedded = embed_queries(model, database['test_images'][:1], amp_dtype=AMP_DTYPES[database_precision(database)])
    cosine = (embedded[0] @ stored[0].float()).item()
    if cosine < MIN_REPRODUCED_COSINE:
        raise ValueError(f'model {path} does not reproduce the embeddings of --data_base {database_path} '
                         f'(cosine {cosine:.3f} on {database["test_images"][0]}): they come from different runs '
                         f'or epochs; pass --model with the _model.pth of the run that wrote the database')
    return model

# -----------------------------------------------------------------------------
# the results as tiles: what the grids and the page show


class Tile(NamedTuple):
    path: str
    colour: tuple
    header: str
    caption: str  # the class, or what stands in for it
    class_name: str | None = None  # the class when known (the page's labels)


def result_tiles(path, label, indices, similarities, gallery):
    """The query then its results as tiles. Without classes (an index) a result's caption is its file name."""
    if gallery.classes is None:
        tiles = [Tile(path, GREY, f'query: {os.path.basename(path)}', '')]
        return tiles + [Tile(gallery.images[index], GREY, f'#{rank}  {similarity:.3f}',
                             os.path.basename(gallery.images[index]))
                        for rank, (index, similarity) in enumerate(zip(indices, similarities), 1)]
    images, labels, classes = gallery.images, gallery.labels, gallery.classes
    query_class = None if label is None else classes[label]
    tiles = [Tile(path, GREY, f'query: {os.path.basename(path)}', query_class or 'not in the database', query_class)]
    for rank, (index, similarity) in enumerate(zip(indices, similarities), 1):
        colour = GREY if label is None else GREEN if labels[index] == label else RED
        tiles.append(Tile(images[index], colour, f'#{rank}  {similarity:.3f}', classes[labels[index]],
                          classes[labels[index]]))
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
    """Rows of Tiles on one white image: each framed image in a tile x tile box, its header (one
    line) and caption (two lines at most) under it; a wider gap after the first column sets the query apart."""
    font = ImageFont.load_default(size=max(10, tile // 14))
    line, pad = round(1.25 * font.size), max(4, tile // 16)
    cell_width, cell_height = tile + 2 * pad, tile + 2 * pad + 3 * line
    gap, width = 2 * pad, tile + pad  # width: of a caption line
    sheet = Image.new('RGB', (max(map(len, rows)) * cell_width + gap, len(rows) * cell_height), 'white')
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(rows):
        for c, shown in enumerate(row):
            left, top = c * cell_width + (gap if c else 0), r * cell_height
            image = framed(shown.path, shown.colour, tile)
            sheet.paste(image, (left + (cell_width - image.width) // 2, top + pad + (tile - image.height) // 2))
            lines = wrap(shown.header, font, width, max_lines=1) + wrap(shown.caption, font, width, max_lines=2)
            for i, text in enumerate(lines):
                draw.text((left + cell_width // 2, top + pad + tile + pad // 2 + i * line), text,
                          fill='black', font=font, anchor='mt')
    return sheet


# what a result's frame says, in the order the sheet's legend gives them
FRAME_MEANINGS = {GREEN: "the query's class", RED: 'another class', GREY: 'no class to compare with'}


def summary_sheet(rows, gallery):
    """The sheet of every query, a row each (draw_sheet), under a title (the number of queries, the
    gallery, the run whose network embedded it) and a legend of the frames that appear on it."""
    sheet = draw_sheet(rows, SUMMARY_TILE)
    font = ImageFont.load_default(size=max(10, SUMMARY_TILE // 10))
    line, pad = round(1.3 * font.size), max(4, SUMMARY_TILE // 16)
    title = f'{plural(len(rows), "query", "queries")} in {gallery.name}'
    title += f', model {gallery.model}' if gallery.model else ''
    lines = wrap(title, font, sheet.width - 2 * pad, max_lines=3)
    shown = {tile.colour for row in rows for tile in row[1:]}
    legend = [('the query, then its nearest images, best first:', None)]
    legend += [(f'{COLOUR_NAMES[colour]}: {meaning}', colour) for colour, meaning in FRAME_MEANINGS.items()
               if colour in shown]
    # the legend flows left to right, onto another line where the sheet is too narrow
    swatch, placed, x, y = font.size, [], pad, pad + len(lines) * line
    for text, colour in legend:
        width = (swatch + pad // 2 if colour else 0) + font.getlength(text)
        if x > pad and x + width > sheet.width - pad:
            x, y = pad, y + line
        placed.append((x, y, text, colour))
        x += width + 2 * pad
    header = y + line + pad
    framed_sheet = Image.new('RGB', (sheet.width, header + sheet.height), 'white')
    framed_sheet.paste(sheet, (0, header))
    draw = ImageDraw.Draw(framed_sheet)
    for i, text in enumerate(lines):
        draw.text((pad, pad + i * line), text, fill='black', font=font)
    for x, y, text, colour in placed:
        if colour:
            draw.rectangle((x, y + 1, x + swatch - 1, y + swatch), outline=colour, width=max(2, swatch // 4))
            x += swatch + pad // 2
        draw.text((x, y), text, fill='black', font=font)
    return framed_sheet


def save_png(image, path):
    with atomic_path(path) as tmp:
        image.save(tmp)


def write_query_results(tiles, similarities, folder):
    """The framed query and results as jpgs, and their grid; returns the jpgs' paths, query first."""
    os.makedirs(folder, exist_ok=True)
    for stale in glob.glob(os.path.join(folder, 'retrieval_img_*.jpg')):  # an earlier query's results
        os.remove(stale)
    jpgs = [os.path.join(folder, 'query_img.jpg')] + [os.path.join(folder, f'retrieval_img_{rank}_{similarity:.4f}.jpg')
                                                      for rank, similarity in enumerate(similarities, 1)]
    for shown, jpg in zip(tiles, jpgs):
        framed(shown.path, shown.colour).save(jpg)
    save_png(draw_sheet([tiles], GRID_TILE), os.path.join(folder, 'grid.png'))
    return jpgs



# -----------------------------------------------------------------------------
# the pages: each query's {folder}/index.html, and {output_dir}/index.html of every query page there

PAGE, RECORD = 'index.html', 'page.json'  # a query folder's page, and what it shows (the contents page reads it)
PAGE_STYLE = '''body { font: 14px sans-serif; margin: 1em; }
h1 { font-size: 1.3em; }
h2 { font-size: 1.05em; margin: 1.2em 0 0.3em; }
p { margin: 0.3em 0; }
section { margin-bottom: 1.5em; }
.row { display: flex; flex-wrap: wrap; align-items: flex-start; gap: 6px; }
figure { margin: 0; width: 120px; text-align: center; }
figure.query { margin-right: 1em; }
img { max-width: 120px; max-height: 120px; }
figcaption { font-size: 12px; overflow-wrap: anywhere; }'''


def link(path, page_folder):
    """A relative URL from a page to path: the folder can move, and the page opens from disk."""
    return html.escape(urllib.request.pathname2url(os.path.relpath(os.path.abspath(path), os.path.abspath(page_folder))))


def plural(n, word, words=None):
    return f'{n} {word if n == 1 else words or word + "s"}'


def legend(tiles):
    """What this query's frames mean: the sentence that fits its kind of gallery and query."""
    query, results = tiles[0], tiles[1:]
    if query.class_name is not None:
        return (f'The query comes first, in a grey frame, with its class under it. A result is framed green '
                f'when it is of the same class, red when it is of another.')
    if any(shown.class_name is not None for shown in results):
        return ('The query comes first, in a grey frame. It is not an image of the database, so no class says '
                'which results are right: they are framed grey, with their class under them.')
    return ('The query comes first, in a grey frame. A gallery index of photos has no classes: every result '
            'is framed grey, with its file name under it.')


def query_record(tiles, similarities, jpgs, gallery_name, outcome_text, run_started, position):
    """What a query's page shows, kept beside it as page.json; paths relative to the query's folder.
    run_started (time.time() of the run) and the query's position in the run order the contents page."""
    folder = os.path.dirname(jpgs[0])
    figures = [{'image': os.path.basename(jpg), 'original': os.path.relpath(os.path.abspath(shown.path), os.path.abspath(folder)),
                'frame': COLOUR_NAMES[shown.colour], 'class': shown.class_name, 'header': shown.header,
                'caption': shown.caption, 'rank': rank or None,
                'similarity': None if rank == 0 else f'{similarities[rank - 1]:.4f}'}
               for rank, (shown, jpg) in enumerate(zip(tiles, jpgs))]
    return {'query': os.path.basename(tiles[0].path), 'gallery': gallery_name, 'outcome': outcome_text,
            'legend': legend(tiles), 'run_started': run_started, 'position': position, 'figures': figures}


def written(record):
    return time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(record['run_started']))


def page_figure(figure, folder, page_folder):
    data = {key: figure[key] for key in ('frame', 'class', 'rank', 'similarity') if figure[key] is not None}
    attributes = ''.join(f' data-{key}="{html.escape(str(value))}"' for key, value in data.items())
    lines = [figure['header']] + ([figure['caption']] if figure['caption'] else [])
    return (f'<figure class="{"result" if figure["rank"] else "query"}"{attributes}>'
            f'<a href="{link(os.path.join(folder, figure["original"]), page_folder)}">'
            f'<img src="{link(os.path.join(folder, figure["image"]), page_folder)}" alt="{html.escape(figure["header"])}">'
            f'</a><figcaption>{"<br>".join(map(html.escape, lines))}</figcaption></figure>')


def page_section(record, folder, page_folder, heading):
    figures = ''.join(page_figure(figure, folder, page_folder) for figure in record['figures'])
    return (f'<section>{heading}<p>{html.escape(record["outcome"])}. {html.escape(record["legend"])}</p>'
            f'<div class="row">{figures}</div></section>')


def write_html(path, title, body):
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<style>\n{PAGE_STYLE}\n</style></head><body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n')
    with atomic_path(path) as tmp, open(tmp, 'w', encoding='utf-8') as f:
        f.write(page)
    return path


def write_query_page(record, folder):
    """The query's own page, {folder}/index.html, and its record: what a later run's contents page links."""
    with atomic_path(os.path.join(folder, RECORD)) as tmp, open(tmp, 'w', encoding='utf-8') as f:
        json.dump(record, f, indent=1)
    title = f'{record["query"]}: {plural(len(record["figures"]) - 1, "nearest image")} in {record["gallery"]}'
    note = f'<p>Written {written(record)}; every query page of this folder: <a href="../{PAGE}">{PAGE}</a>.</p>'
    return write_html(os.path.join(folder, PAGE), title, note + page_section(record, folder, folder, ''))


def query_pages(output_dir):
    """(folder, record) of every query page under output_dir: the newest run first, each run's queries in
    their order; a file that is not such a record is left out, saying so."""
    pages = []
    for path in glob.glob(os.path.join(output_dir, '*', RECORD)):
        try:
            with open(path, encoding='utf-8') as f:
                record = json.load(f)
            order = (-float(record['run_started']), int(record['position']))
            if not isinstance(record['figures'], list):
                raise TypeError('figures')
        except (OSError, ValueError, KeyError, TypeError):
            print(f'left out of the contents page: {path} is not a query page record')
            continue
        pages.append((order, os.path.dirname(path), record))
    return [(folder, record) for _, folder, record in sorted(pages, key=lambda page: page[:2])]


def write_contents_page(output_dir):
    """{output_dir}/index.html: every query page in the folder, this run's and earlier ones, newest first."""
    pages = query_pages(output_dir)
    sections = [page_section(record, folder, output_dir,
                             f'<h2><a href="{link(os.path.join(folder, PAGE), output_dir)}">'
                             f'{html.escape(record["query"])}</a> in {html.escape(record["gallery"])} '
                             f'<small>({written(record)})</small></h2>')
                for folder, record in pages]
    # the folder's own name: an absolute path in the page would be wrong once the folder moves
    title = f'{plural(len(pages), "query page")} in {os.path.basename(os.path.abspath(output_dir))}/'
    return write_html(os.path.join(output_dir, PAGE), title, '\n'.join(sections))

# -----------------------------------------------------------------------------
# the command line


def embedding_dtype(args, gallery_amp=None):
    """The precision test.py embeds images in: --amp as asked. Under --amp auto, queries against a
    run's database are embedded as train.py embedded its gallery (gallery_amp, the run's --amp), so
    a copy of a gallery image finds it at similarity 1; photos of --gallery, in bf16 where the device
    computes it."""
    amp = gallery_amp if args.amp == 'auto' and gallery_amp is not None else resolve_amp(args.amp, args.device)
    return AMP_DTYPES[amp]


def open_database(args):
    """(gallery, the stored Query of an absolute path or None, a function embedding outside images)."""
    database = load_database(args.data_base)
    stored = stored_queries(database)

    def embed_outside(paths):
        model = load_model(args.model or default_model_path(database), database, args.data_base, args.device)
        return embed_queries(model, paths, amp_dtype=embedding_dtype(args, database_precision(database)))
    return database_gallery(database, args.data_base), stored.get, embed_outside


def open_index(args):
    """As open_database, for an index of --gallery folders, brought up to date first; and its ivf."""
    model = None
    if args.gallery is not None:
        model = read_model(args.model, args.device, f'the images of --gallery into --index {args.index}')
        embed_photos = functools.partial(embed_queries, desc='embed photos', amp_dtype=embedding_dtype(args))
        index, report = update_index(args.index, args.gallery, model, model_identity(model, args.model), embed_photos)
        for path, reason in report.unreadable.items():
            print(f'skipped {path}: not a readable image ({reason})')
        print(f'{args.index}: {report}')
    else:
        index = load_index(args.index)
    gallery = index_gallery(index, args.index)
    positions = {path: i for i, path in enumerate(index['paths'])} if args.query_img_name else {}

    def stored(path):
        i = positions.get(path)
        return None if i is None else Query(index['embeddings'][i], None, i)

    def embed_outside(paths):
        nonlocal model
        if model is None:  # the index's own model, unless --model names another file of it
            path = args.model or index['model']['file']
            model = read_model(path, args.device, f'the queries that are not images of --index {args.index}')
            if model_identity(model, path)['fingerprint'] != index['model']['fingerprint']:
                raise ValueError(f'--index {args.index} was made with model {describe_model(index["model"])}, '
                                 f'not with --model {describe_model(model_identity(model, path))}')
        return embed_queries(model, paths, amp_dtype=embedding_dtype(args))
    ivf = index_ivf(index, args.index, args.nprobe) if args.search == 'ivf' and args.query_img_name else None
    return gallery, stored, embed_outside, ivf


def outcome(gallery, label, indices):
    if gallery.labels is None:
        return f'{len(indices)} results (an index of photos has no classes)'
    if label is None:
        return f'outside the database, no ground truth; {len(indices)} results'
    correct = sum(gallery.labels[i] == label for i in indices)
    return f'{correct}/{len(indices)} retrieved images share the query class {gallery.classes[label]!r}'


def main(argv=None):
    args = parse_args(argv)
    if args.gallery is not None or args.index is not None:
        gallery, stored, embed_outside, ivf = open_index(args)
    else:
        (gallery, stored, embed_outside), ivf = open_database(args), None
    paths = query_paths(args.query_img_name)
    if args.random_queries:
        paths = list(dict.fromkeys(paths + random_queries(gallery, args.random_queries, args.seed)))
    if not paths:
        return
    check_distinct_folders(paths, args.output_dir)
    queries = {p: query for p in paths if (query := stored(os.path.abspath(p))) is not None}
    outside = [p for p in paths if p not in queries]
    for path in outside:
        check_outside_image(path, gallery.name)
    if outside:  # only these need the model
        for path, embedding in zip(outside, embed_outside(outside)):
            queries[path] = Query(embedding, None, None)

    # every retrieval before any file, so that an error leaves no partial output
    results = search(gallery, [queries[p] for p in paths], args.retrieval_num, ivf)
    rows, started = [], time.time()
    for position, (path, (indices, similarities)) in enumerate(zip(paths, results)):
        rows.append(result_tiles(path, queries[path].label, indices, similarities, gallery))
        folder, said = query_folder(args.output_dir, path), outcome(gallery, queries[path].label, indices)
        jpgs = write_query_results(rows[-1], similarities, folder)
        page = write_query_page(query_record(rows[-1], similarities, jpgs, gallery.name, said, started, position), folder)
        print(f'{path}: {said}; written to {folder}/ (grid.png, {os.path.basename(page)})')
    if len(rows) > 1:
        summary = os.path.join(args.output_dir, 'retrieval_summary.png')
        save_png(summary_sheet(rows, gallery), summary)
        print(f'{len(rows)} queries side by side: {summary}')
    print(f'every query page of {args.output_dir}, on one page: {write_contents_page(args.output_dir)}')


def stop_on_sigterm(signum, frame):
    # SystemExit unwinds like Ctrl-C does: an indexing run saves what it has embedded
    sys.exit(f'stopped by signal {signum}')


if __name__ == '__main__':
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    run_script(main)
