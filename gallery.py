"""What test.py's queries search, and how: the Gallery (a train.py database's test set, or an
index of photo folders) and its Query; embedding images as train.py embedded its test set; the
gallery index of photo folders (--gallery, --index), kept up to date and saved as it grows; and
the search, exact or through faiss's inverted-file index (--search ivf).

test.py is the command line over these; benchmarks/index_bench.py times the search.
"""
import functools
import hashlib
import math
import os
import time
from typing import NamedTuple

import torch
from tqdm import tqdm

from model import embed_images
from utils import (IMAGE_EXTENSIONS, UnreadableImage, load_torch_file, nearest_neighbours, read_image,
                   save_torch_file, stored_run_name)


class Query(NamedTuple):
    embedding: torch.Tensor
    label: int | None  # index into the database's test_classes; None: outside the database, no ground truth
    gallery_index: int | None  # its place in the gallery, to leave it out of its own results


class Gallery(NamedTuple):
    """What queries search: a train.py database's test set, or an index of photo folders."""
    images: list  # paths
    embeddings: torch.Tensor
    labels: list | None  # index into classes; None for an index: photos have no classes
    classes: list | None
    name: str  # the flag and file it comes from, for messages
    model: str | None = None  # the run whose network embedded it, for the sheet's title

# -----------------------------------------------------------------------------
# images to embeddings: the queries from outside the gallery, and the photos of an index

# how an image becomes an embedding: a model that differs in one of these cannot query the database
EMBEDDING_ARGS = ('backbone_type', 'pooling', 'feature_dim', 'image_size')


def embed_queries(model, paths, desc='embed queries', progress=True, amp_dtype=None):
    """Embeddings of image files as train.py embedded its test set: same size, same batches;
    autocast to amp_dtype (None: fp32)."""
    return embed_images(model, paths, model.run_args['image_size'], model.run_args['batch_size'], desc, progress,
                        amp_dtype)


def why_unreadable(path):
    """None for an image that decodes as the network's input is decoded, else the reason it does not."""
    try:
        read_image(path)
    except UnreadableImage as e:
        return e.reason
    except OSError as e:  # not opened: gone, or not a file
        return f'{type(e).__name__}: {e}'
    return None

# -----------------------------------------------------------------------------
# a gallery index of photo folders (--gallery, --index)

# What an index file holds: one row per image (its absolute path, embedding, size in bytes and
# modification time in ns, which tell a changed file from an unchanged one) and the model it was
# made with; 'ivf' (optional) is the faiss search structure of exactly these rows.
INDEX_KEYS = ('paths', 'embeddings', 'sizes', 'mtimes', 'model')


def default_index_path(model_path):
    stem = model_path[:-len('_model.pth')] if model_path.endswith('_model.pth') else os.path.splitext(model_path)[0]
    return f'{stem}_index.pth'


def model_identity(model, path):
    """What an index records of the network that made it. The fingerprint covers the weights and
    the input size, all that decides the embeddings: equal fingerprints embed alike."""
    digest = hashlib.sha256(repr([model.run_args[key] for key in EMBEDDING_ARGS]).encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy())
    return {'file': os.path.abspath(path), 'run': stored_run_name(model.run_args),
            'fingerprint': digest.hexdigest()[:16]}


def describe_model(identity):
    return f'{identity["file"]} (run {identity["run"]}, weights {identity["fingerprint"]})'


def load_index(path):
    return load_torch_file(path, 'gallery index', INDEX_KEYS, writer='test.py --gallery',
                           not_found=f'--index {path}: no such index; make one with --gallery FOLDER --model PATH')


def empty_index(identity, dim):
    return {'paths': [], 'embeddings': torch.empty(0, dim), 'sizes': torch.empty(0, dtype=torch.int64),
            'mtimes': torch.empty(0, dtype=torch.int64), 'model': identity}


def gallery_files(folders):
    """Absolute paths of the images under the folders, recursively, sorted; hidden files and
    folders (.thumbnails, half-written .tmp files) are left out."""
    files = set()
    for folder in folders:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f'--gallery {folder}: no such folder')
        for root, folders_here, names in os.walk(folder):
            folders_here[:] = [f for f in folders_here if not f.startswith('.')]
            files.update(os.path.abspath(os.path.join(root, name)) for name in names
                         if not name.startswith('.') and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS)
    return sorted(files)


def file_stamps(paths):
    """path -> (size, modification time in ns); a file gone since it was listed is left out."""
    stamps = {}
    for path in paths:
        try:
            status = os.stat(path)
        except FileNotFoundError:
            continue
        stamps[path] = (status.st_size, status.st_mtime_ns)
    return stamps


def take_rows(index, rows):
    """The index restricted to rows (a list of positions), in that order; the ivf goes, being built for all."""
    positions = torch.tensor(rows, dtype=torch.int64)
    return {**{key: value for key, value in index.items() if key != 'ivf'},
            'paths': [index['paths'][i] for i in rows], 'embeddings': index['embeddings'][positions],
            'sizes': index['sizes'][positions], 'mtimes': index['mtimes'][positions]}


def append_rows(index, paths, embeddings, stamps):
    return {**index, 'paths': index['paths'] + paths, 'embeddings': torch.cat([index['embeddings'], embeddings]),
            'sizes': torch.cat([index['sizes'], torch.tensor([stamps[p][0] for p in paths], dtype=torch.int64)]),
            'mtimes': torch.cat([index['mtimes'], torch.tensor([stamps[p][1] for p in paths], dtype=torch.int64)])}


def embed_readable(model, paths, embed_files, progress):
    """(embeddings, the paths they are of, {unreadable path: reason}). Files are decoded once: only
    a chunk that fails is searched for the files that do not decode, which are then left out."""
    try:
        return embed_files(model, paths, progress=progress), paths, {}
    except Exception:
        unreadable = {path: reason for path in paths if (reason := why_unreadable(path)) is not None}
        if not unreadable:
            raise  # not the images: a real error
    readable = [path for path in paths if path not in unreadable]
    embeddings = (embed_files(model, readable, progress=progress) if readable
                  else torch.empty(0, model.feature_dim))
    return embeddings, readable, unreadable


class IndexReport(NamedTuple):
    images: int
    unchanged: int
    new: int
    changed: int
    deleted: int
    unreadable: dict  # path -> reason

    def __str__(self):
        skipped = f', {len(self.unreadable)} unreadable skipped' if self.unreadable else ''
        return (f'{self.images} images indexed: {self.new} new, {self.changed} changed, {self.deleted} deleted, '
                f'{self.unchanged} unchanged{skipped}')


def update_index(path, folders, model, identity, embed_files=functools.partial(embed_queries, desc='embed photos'),
                 chunk_images=None, save_every_s=60.0, progress=True):
    """Bring the index at `path` up to date with the images under `folders`, embedding only new and
    changed files; returns (index, IndexReport).

    Work in progress is saved (atomically) after the first chunk of chunk_images images that ends
    save_every_s after the last save, and at once if the run is interrupted, so a rerun goes on from
    there: an interrupted run never loses what it had already indexed.
    """
    if os.path.exists(path):
        index = load_index(path)
        if index['model']['fingerprint'] != identity['fingerprint']:
            raise ValueError(f'--index {path} was made with model {describe_model(index["model"])}, not with '
                             f'--model {describe_model(identity)}; pass that --model, or another --index '
                             f'to make a new one')
    else:
        index = empty_index(identity, model.feature_dim)
    stamps = file_stamps(gallery_files(folders))
    unchanged = [i for i, p in enumerate(index['paths'])
                 if stamps.get(p) == (index['sizes'][i].item(), index['mtimes'][i].item())]
    indexed = set(index['paths'])
    new = [p for p in stamps if p not in indexed]
    changed = sorted(indexed.intersection(stamps) - {index['paths'][i] for i in unchanged})
    deleted = len(index['paths']) - len(unchanged) - len(changed)
    todo = sorted(new + changed)
    unreadable = {}
    if todo or deleted or not os.path.exists(path):
        kept = len(unchanged)
        index = take_rows(index, unchanged)  # changed files' old embeddings are wrong now
        index['model'] = identity  # the same fingerprint; the file may have moved
        chunk_images = chunk_images or 8 * model.run_args['batch_size']
        last_save, bar = time.monotonic(), tqdm(total=len(todo), desc='index', unit='image', disable=not progress,
                                                dynamic_ncols=True)
        try:
            for start in range(0, len(todo), chunk_images):
                embeddings, done, skipped = embed_readable(model, todo[start:start + chunk_images], embed_files,
                                                           progress)
                index = append_rows(index, done, embeddings, stamps)
                unreadable.update(skipped)
                bar.update(len(done) + len(skipped))
                if time.monotonic() - last_save >= save_every_s:
                    save_torch_file(index, path)
                    last_save = time.monotonic()
        except BaseException:  # Ctrl-C, SIGTERM (see test.py's __main__), or an error: keep what is embedded
            save_torch_file(index, path)
            raise
        finally:
            bar.close()
        if len(index['paths']) > kept or changed or deleted or not os.path.exists(path):  # else: only unreadable
            # in path order, so that an index updated in steps is the one a single run makes
            index = take_rows(index, sorted(range(len(index['paths'])), key=index['paths'].__getitem__))
            save_torch_file(index, path)
    # what became of each file: an unreadable one is counted as such, not as new or changed
    return index, IndexReport(len(index['paths']), len(unchanged), len(set(new) - unreadable.keys()),
                              len(set(changed) - unreadable.keys()), deleted, unreadable)


def index_gallery(index, path):
    return Gallery(index['paths'], index['embeddings'], None, None, f'--index {path}', index['model']['run'])

# -----------------------------------------------------------------------------
# search

SEARCHES = ('exact', 'ivf')  # --search
# exact search holds a [queries, gallery chunk] similarity tile and its top-k at a time: this bounds it
SEARCH_BLOCK_BYTES = 1 << 26


def require_faiss():
    try:
        import faiss
    except ImportError:
        raise ModuleNotFoundError('--search ivf needs faiss: pip install faiss-cpu==1.15.1 '
                                  '(or pip install -r requirements-bench.txt)') from None
    return faiss


def ivf_lists(n):
    # about sqrt(N) lists: a query scans the list centres and nprobe lists of ~sqrt(N) rows each
    return max(1, round(math.sqrt(n)))


def build_ivf(embeddings):
    """faiss's inverted-file index (exact inner products within the lists it scans) of the rows."""
    faiss = require_faiss()
    ivf = faiss.index_factory(embeddings.shape[1], f'IVF{ivf_lists(len(embeddings))},Flat', faiss.METRIC_INNER_PRODUCT)
    # k-means on at most 64 rows per list: 18 s with the lists filled at 1M rows here; faiss's default 256 is 4x that
    ivf.cp.max_points_per_centroid = 64
    rows = embeddings.float().numpy()
    ivf.train(rows)
    ivf.add(rows)
    return ivf


def index_ivf(index, path, nprobe):
    """The index's ivf, built and saved into it the first time (and after every change of its rows)."""
    faiss = require_faiss()
    if 'ivf' in index:
        ivf = faiss.deserialize_index(index['ivf'].numpy())
    else:
        start = time.perf_counter()
        ivf = build_ivf(index['embeddings'])
        save_torch_file({**index, 'ivf': torch.from_numpy(faiss.serialize_index(ivf))}, path)
        print(f'{path}: built its ivf ({ivf.nlist} lists) in {time.perf_counter() - start:.1f} s')
    return prepare_ivf_search(ivf, nprobe)


def prepare_ivf_search(ivf, nprobe):
    """The ivf set to scan nprobe lists a query, on one thread: torch and faiss each bring their own
    OpenMP runtime, and with threads in both they spin against each other (here, at 100k rows, a
    query took 8 ms with 2 faiss threads, 1.6 ms with 1; 64 queries 600 ms and 89 ms)."""
    require_faiss().omp_set_num_threads(1)
    ivf.nprobe = nprobe
    return ivf


def ivf_neighbours(ivf, queries, gallery, k, block_bytes):
    """Like nearest_neighbours, from the lists the ivf scans; a query whose lists hold under k rows
    is answered by exact search."""
    _, neighbours = ivf.search(queries.numpy(), k)
    neighbours = torch.from_numpy(neighbours)
    short = (neighbours < 0).any(dim=1)
    if short.any():
        neighbours[short] = nearest_neighbours(queries[short], gallery, k, False, block_bytes)
    return neighbours


def search(gallery, queries, k, ivf=None, block_bytes=SEARCH_BLOCK_BYTES):
    """(indices, similarities) of the k most similar gallery images of each Query, best first, ties
    to the lower index (exact search); a query of the gallery is left out of its own results."""
    for query in queries:
        available = len(gallery.images) - (query.gallery_index is not None)
        if not 1 <= k <= available:
            raise ValueError(f'--retrieval_num {k}: the gallery holds {available} '
                             f'{"other " if query.gallery_index is not None else ""}images')
    wanted = min(k + 1, len(gallery.images))  # one more, in case a query finds itself
    embeddings = torch.stack([query.embedding for query in queries]).float()
    if ivf is None:
        neighbours = nearest_neighbours(embeddings, gallery.embeddings.float(), wanted, False, block_bytes)
    else:
        neighbours = ivf_neighbours(ivf, embeddings, gallery.embeddings.float(), wanted, block_bytes)
    results = []
    for query, row in zip(queries, neighbours.tolist()):
        row = [i for i in row if i != query.gallery_index][:k]
        results.append((row, (gallery.embeddings[row].float() @ query.embedding.float()).tolist()))
    return results
