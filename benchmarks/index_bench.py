"""
Speed and memory of searching a gallery index (test.py --gallery/--index) at 100k and 1M images,
on synthetic 512-d embeddings (the embedding itself is not timed: it is the network's cost):

  exact   gallery.search: the project's exact blocked top-k (utils.nearest_neighbours), the default
  ivf     gallery.search over faiss's IVF-Flat index (test.py --search ivf): build (--threads), then
          --nprobe lists per query (one thread, as test.py searches); its recall@K against exact
          search is in the table

Each method runs in a fresh child process, so its peak memory is its own: the child loads the
embeddings, warms up, records its RSS, builds and searches, and reports ru_maxrss minus that RSS.
The exact child also times writing and reading the index file test.py keeps (paths, embeddings,
file stamps), which is what a query-only run (--index, no --gallery) starts with.

    pip install -r requirements-bench.txt
    python benchmarks/index_bench.py --sizes 10000             # a quick check, under a minute
    python benchmarks/index_bench.py --out results/index_bench.md   # 100k and 1M; about 3 minutes on 2 idle cores
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from measure import peak_rss_mb, pin_threads, rss_mb  # beside this script; puts the repo root on sys.path

parser = argparse.ArgumentParser(description='\n\n'.join(__doc__.split('\n\n')[:3]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--sizes', default='100000,1000000', help='comma-separated gallery sizes N')
parser.add_argument('--nprobes', default='8,32,128', help='--search ivf: the --nprobe values to measure')
parser.add_argument('--k', type=int, default=10, help='results per query (and the K of recall@K)')
parser.add_argument('--batch', type=int, default=64, help='queries in the batch that is timed as one')
parser.add_argument('--singles', type=int, default=32, help='single queries timed one by one; the median is reported')
parser.add_argument('--threads', type=int, default=os.cpu_count(), help='torch and faiss (OpenMP) threads')
parser.add_argument('--dim', type=int, default=512)
parser.add_argument('--seed', type=int, default=0)
parser.add_argument('--scene_size', type=int, default=5, help='photos per scene, on average')
parser.add_argument('--spread', type=float, default=1.5,
                    help="a photo's distance from its scene's centre, relative to the centre's (larger: harder)")
parser.add_argument('--topic_spread', type=float, default=1.5,
                    help="a scene centre's distance from its topic, relative to the topic's "
                         '(larger: topics matter less)')
parser.add_argument('--out', help='also write the Markdown table to this file (atomically)')
parser.add_argument('--child', help=argparse.SUPPRESS)  # internal: one method on --data, JSON on stdout
parser.add_argument('--data', help=argparse.SUPPRESS)
args = parser.parse_args()

pin_threads(args.threads)  # before numpy and torch are imported

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(args.threads)


def timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start

# -----------------------------------------------------------------------------
# child: one method, one N, its own process


def latencies(search, singles, batch):
    """Median seconds of a single query (over `singles` different ones) and of one batch (best of 5),
    after one untimed batch: thread pools left spinning by what ran before have settled."""
    search(batch)
    single = statistics.median(timed(lambda q=q: search([q]))[1] for q in singles)
    return single, min(timed(lambda: search(batch))[1] for _ in range(5))


def run_child():
    from gallery import Gallery, Query, build_ivf, prepare_ivf_search, search
    gallery_embeddings = torch.from_numpy(np.load(args.data + '-gallery.npy'))
    query_embeddings = torch.from_numpy(np.load(args.data + '-queries.npy'))
    n = len(gallery_embeddings)
    gallery = Gallery([f'photos/{i:07d}.jpg' for i in range(n)], gallery_embeddings, None, None, 'bench')
    queries = [Query(e, None, None) for e in query_embeddings]
    singles, batch = queries[args.batch:args.batch + args.singles], queries[:args.batch]
    if args.child == 'exact':
        search(gallery, batch[:2], args.k)  # warm-up: lazily loaded code, thread pools
        base_rss, base_peak = rss_mb(), peak_rss_mb()
        build = None  # nothing to build: the embeddings are searched as they are
        single, together = latencies(lambda q: search(gallery, q, args.k), singles, batch)
        peak = peak_rss_mb()
        neighbours = np.array([indices for indices, _ in search(gallery, batch, args.k)])
        np.save(args.data + '-exact.npy', neighbours)
        extra = {'file': index_file_times(gallery)}
    else:
        import faiss
        faiss.omp_set_num_threads(args.threads)
        build_ivf(gallery_embeddings[:4096])  # warm-up
        base_rss, base_peak = rss_mb(), peak_rss_mb()
        ivf, build = timed(lambda: build_ivf(gallery_embeddings))
        results = {}
        for nprobe in map(int, args.nprobes.split(',')):
            prepare_ivf_search(ivf, nprobe)  # as test.py searches: one faiss thread
            single, together = latencies(lambda q: search(gallery, q, args.k, ivf=ivf), singles, batch)
            found = np.array([indices for indices, _ in search(gallery, batch, args.k, ivf=ivf)])
            results[nprobe] = {'single': single, 'batch': together, 'found': found.tolist()}
        peak = peak_rss_mb()
        extra = {'nlist': ivf.nlist, 'nprobes': results}
        single = together = None
    print(json.dumps({'build': build, 'single': single, 'batch': together, 'extra_mb': peak - base_rss,
                      'upper_bound': peak <= base_peak, 'base_mb': base_rss, **extra}))


def index_file_times(gallery):
    """Seconds to write and to read back the index test.py keeps of this gallery."""
    from gallery import load_index
    from utils import save_torch_file
    n = len(gallery.images)
    stamps = torch.zeros(n, dtype=torch.int64)
    index = {'paths': gallery.images, 'embeddings': gallery.embeddings, 'sizes': stamps, 'mtimes': stamps,
             'model': {'file': 'bench', 'run': 'bench', 'fingerprint': '0'}}
    path = args.data + '-index.pth'
    _, write = timed(lambda: save_torch_file(index, path))
    _, read = timed(lambda: load_index(path))
    size = os.path.getsize(path)
    os.remove(path)
    return {'write': write, 'read': read, 'mb': size / 2 ** 20}


if args.child:
    run_child()
    sys.exit(0)

# -----------------------------------------------------------------------------
# synthetic photo-collection embeddings


def write_embeddings(path, n, dim, generator, centres, spread):
    """n unit vectors, each a noisy copy of a random centre, written in blocks (the whole set is
    never twice in memory)."""
    out = np.lib.format.open_memmap(path, mode='w+', dtype=np.float32, shape=(n, dim))
    for start in range(0, n, 65536):
        rows = min(65536, n - start)
        picked = centres[torch.randint(len(centres), (rows,), generator=generator)]
        out[start:start + rows] = torch.nn.functional.normalize(
            picked + spread * torch.randn(rows, dim, generator=generator) / dim ** 0.5, dim=1).numpy()
    out.flush()


def make_data(path, n, dim, seed, queries):
    """A gallery like a photo collection: scenes of --scene_size photos on average (noisy copies of
    the scene's centre), scenes grouped into 100 topics so that neighbouring scenes are alike; the
    queries are new photos of random scenes."""
    g = torch.Generator().manual_seed(seed)
    unit = torch.nn.functional.normalize
    topics = unit(torch.randn(100, dim, generator=g), dim=1)
    scenes = max(1, n // args.scene_size)
    centres = unit(topics[torch.randint(100, (scenes,), generator=g)]
                   + args.topic_spread * torch.randn(scenes, dim, generator=g) / dim ** 0.5, dim=1)
    write_embeddings(path + '-gallery.npy', n, dim, g, centres, args.spread)
    write_embeddings(path + '-queries.npy', queries, dim, g, centres, args.spread)


def run(method, data):
    command = [sys.executable, os.path.abspath(__file__), '--child', method, '--data', data, '--k', str(args.k),
               '--batch', str(args.batch), '--singles', str(args.singles), '--threads', str(args.threads),
               '--nprobes', args.nprobes]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f'{method} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])


def recall(found, exact):
    """Mean fraction of the exact k nearest that a method returns (recall@k against exact search)."""
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact)]))


def ms(seconds):
    return f'{1000 * seconds:.1f}'


def main():
    import faiss
    print(f'torch {torch.__version__}, faiss {faiss.__version__}, {args.threads} threads, dim {args.dim}, '
          f'k {args.k}, seed {args.seed}; load average {os.getloadavg()[0]:.1f}', flush=True)
    rows, files = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for n in map(int, args.sizes.split(',')):
            data = os.path.join(tmp, f'n{n}')
            make_data(data, n, args.dim, args.seed, args.batch + args.singles)
            print(f'N={n}: embeddings {n * args.dim * 4 / 2 ** 20:.0f} MB', flush=True)
            exact = run('exact', data)
            print(f'  exact: {exact}', flush=True)
            memory = ('≤' if exact['upper_bound'] else '') + f'{exact["extra_mb"]:.0f}'
            rows.append(f'| {n:,} | exact (default) | – | {memory} | {ms(exact["single"])} | {ms(exact["batch"])} '
                        f'| 1 |')
            files.append(f'| {n:,} | {exact["file"]["mb"]:.0f} | {exact["file"]["write"]:.1f} | '
                         f'{exact["file"]["read"]:.1f} |')
            ivf = run('ivf', data)
            truth = np.load(data + '-exact.npy').tolist()
            memory = ('≤' if ivf['upper_bound'] else '') + f'{ivf["extra_mb"]:.0f}'
            for nprobe, r in ivf['nprobes'].items():
                rows.append(f'| {n:,} | ivf, {ivf["nlist"]} lists, --nprobe {nprobe} | {ivf["build"]:.1f} | {memory} | '
                            f'{ms(r["single"])} | {ms(r["batch"])} | {recall(r["found"], truth):.3f} |')
                print(f'  {rows[-1]}', flush=True)
    table = '\n'.join([
        f'Synthetic photo-collection embeddings ({args.dim}-d, unit norm, scenes of {args.scene_size} photos on '
        f'average, spread {args.spread}, topic spread {args.topic_spread}, seed {args.seed}), {args.threads} threads, '
        f'k = {args.k}; latency: median of {args.singles} single queries, best of 5 batches of {args.batch}.',
        'Memory: peak RSS of the method\'s own process beyond the embeddings, libraries and warm-up'
        + ('; ≤: no new peak above one reached while loading, so an upper bound.' if any('≤' in r for r in rows)
           else '.'),
        '',
        f'| N | search | build (s) | peak extra memory (MB) | 1 query (ms) | {args.batch} queries (ms) | '
        f'recall@{args.k} vs exact |',
        '|---:|---|---:|---:|---:|---:|---:|', *rows, '',
        '| N | index file (MB) | write (s) | read (s) |', '|---:|---:|---:|---:|', *files, ''])
    print('\n' + table)
    if args.out:
        from utils import atomic_path  # a crash mid-write leaves any previous table intact
        with atomic_path(args.out) as tmp_path, open(tmp_path, 'w') as f:
            f.write(table)


main()
