"""
Cost and correctness of the retrieval evaluation at SOP scale, on synthetic embeddings:

  utils   this project's utils.evaluate (blockwise exact kNN, running top-k)
  pml     pytorch-metric-learning 2.9's AccuracyCalculator with its faiss-cpu kNN
  naive   the full N x N similarity matrix in torch, then topk (only where it fits)

Each method runs in a fresh child process, so its peak memory is its own: the child loads the
embeddings and libraries, warms up, records its RSS, runs the method once (or --repeats times),
and reports ru_maxrss minus that RSS.

    pip install -r requirements-bench.txt
    python benchmarks/eval_bench.py --sizes 2000,5000          # a quick check, under a minute
    python benchmarks/eval_bench.py --out results/eval_bench.md # N = 10k, 60k, 120k

The default sizes take about 6 minutes on 2 idle cores (utils.evaluate ~70 s at 120k). The naive method is skipped from 60k on (13 GiB > --naive_max_gb);
PML needs about 10 bytes per (class, image) pair, ~28 GiB at 120k, and is skipped when that
is more than 90% of the memory available.
"""
import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

from measure import peak_rss_mb, pin_threads, rss_mb  # beside this script; puts the repo root on sys.path

parser = argparse.ArgumentParser(description='\n\n'.join(__doc__.split('\n\n')[:2]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--sizes', default='10000,60000,120000', help='comma-separated numbers of embeddings N')
parser.add_argument('--methods', default='utils,pml,naive', help='any of utils,pml,naive')
parser.add_argument('--threads', type=int, default=os.cpu_count(), help='torch and faiss (OpenMP) threads')
parser.add_argument('--naive_max_gb', type=float, default=8,
                    help='skip the naive method when its estimated memory (GiB) is above this')
parser.add_argument('--pml_max_gb', type=float, default=None,
                    help='skip PML when its estimated memory (GiB) is above this; default: 90%% of available memory')
parser.add_argument('--repeats', type=int, default=1, help='runs per method in its child; the fastest is reported')
parser.add_argument('--pml_index', choices=['ip', 'l2'], default='ip',
                    help="faiss flat index for PML: 'ip' (inner product = cosine on unit vectors) or "
                         "'l2' (PML's default IndexFlatL2; same ranking in exact arithmetic only)")
parser.add_argument('--dim', type=int, default=512)
parser.add_argument('--seed', type=int, default=0)
parser.add_argument('--sigma', type=float, default=1.5, help='within-class spread (larger: harder)')
parser.add_argument('--tau', type=float, default=1.0, help='spread of classes around their superclass (smaller: harder)')
parser.add_argument('--lone_frac', type=float, default=0.01, help='fraction of classes with a single image')
parser.add_argument('--out', help='also write the Markdown table to this file (atomically)')
parser.add_argument('--child', help=argparse.SUPPRESS)  # internal: run one method on --data and print JSON
parser.add_argument('--data', help=argparse.SUPPRESS)
args = parser.parse_args()

pin_threads(args.threads)  # before numpy and torch are imported

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(args.threads)

# -----------------------------------------------------------------------------
# the three methods: (embeddings, labels) -> {'r@1', 'map@r', 'r_precision'}

# Each method also copies its neighbour lists here (first columns), so that if the metrics
# disagree the parent can tell near-ties from a real bug. The buffer is allocated before the
# memory baseline and a copy of N x ~11 indices takes milliseconds: the measurement is unchanged.
NEIGHBOURS = None


def record(indices):
    if NEIGHBOURS is not None:
        NEIGHBOURS[:len(indices)] = indices[:, :NEIGHBOURS.shape[1]]


def run_utils(x, y):
    import utils
    # the project's call as train.py makes it (default ks), less NMI, which the others don't compute
    r = utils.evaluate(x, y, metrics=('recall', 'map@r', 'r_precision'), on_neighbours=record)
    return {'r@1': r['recall@1'], 'map@r': r['map@r'], 'r_precision': r['r_precision']}


def run_pml(x, y):
    import faiss
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import FaissKNN
    index = faiss.IndexFlatIP if args.pml_index == 'ip' else faiss.IndexFlatL2  # both exact (flat)

    class RecordingKNN(FaissKNN):
        def __call__(self, *a, **kw):
            distances, indices = super().__call__(*a, **kw)  # self already removed
            record(indices)
            return distances, indices
    # k='max_bin_count': the default k=None asks faiss for all N neighbours of every query
    # (N x N distances and int64 indices), which is what MAP@R needs only in the worst case.
    # device=cpu: its default is cuda when torch sees a GPU.
    calc = AccuracyCalculator(include=('precision_at_1', 'mean_average_precision_at_r', 'r_precision'),
                              k='max_bin_count', device=torch.device('cpu'), knn_func=RecordingKNN(index_init_fn=index))
    r = calc.get_accuracy(x, y, x, y, ref_includes_query=True)
    return {'r@1': r['precision_at_1'], 'map@r': r['mean_average_precision_at_r'], 'r_precision': r['r_precision']}


def naive_gib(n):
    # the N x N float32 similarities; topk's output and the label checks are O(N k), negligible
    return 4 * n * n / 2 ** 30


def pml_gib(n, num_classes, dim):
    # get_label_match_counts compares every class with every label: a C x N bool matrix, a second
    # one from torch.all over a size-1 dim, and torch.sum casts it to int64 (8 bytes) -> 10 C N
    # bytes (measured: within 2% from N=5k to 40k). Plus allclose's temporaries, ~4 embedding copies.
    return (10 * num_classes * n + 16 * n * dim) / 2 ** 30


def available_gib():
    with open('/proc/meminfo') as f:
        return next(int(line.split()[1]) for line in f if line.startswith('MemAvailable:')) / 2 ** 20


def run_naive(x, y):
    sims = x @ x.t()
    sims.fill_diagonal_(float('-inf'))  # a query never retrieves itself
    _, y = torch.unique(y, return_inverse=True)
    r = torch.bincount(y)[y] - 1  # relevant items of each query
    k = max(1, r.max().item())
    top = sims.topk(k, dim=1).indices
    del sims
    record(top)
    ok = r > 0  # lone queries have nothing to find: left out, as in utils and PML
    hits = (y[top] == y[:, None])[ok]
    r = r[ok, None].double()
    hits &= torch.arange(1, k + 1) <= r  # only the first R neighbours count for MAP@R / R-Precision
    precision = hits.cumsum(dim=1).double() / torch.arange(1, k + 1)
    return {'r@1': hits[:, 0].double().mean().item(),
            'map@r': ((precision * hits).sum(dim=1, keepdim=True) / r).mean().item(),
            'r_precision': (hits.sum(dim=1, keepdim=True) / r).mean().item()}


METHODS = {'utils': run_utils, 'pml': run_pml, 'naive': run_naive}

# -----------------------------------------------------------------------------
# child: one method, one N, its own process

if args.child:
    run = METHODS[args.child]
    if args.child == 'pml':
        import faiss
        faiss.omp_set_num_threads(args.threads)
    x = torch.from_numpy(np.load(args.data + '-x.npy'))  # read straight into place: no peak above the result
    y = torch.from_numpy(np.load(args.data + '-y.npy'))
    # Warm-up on a slice (labels made up in pairs so every query has a match): imports, thread
    # pools and lazily loaded code happen here, so they count neither in time nor in memory.
    run(x[:256].clone(), torch.arange(256) // 2)
    NEIGHBOURS = torch.full((len(x), max(1, torch.unique(y, return_counts=True)[1].max().item() - 1)), -1)
    gc.collect()
    base_rss, base_peak = rss_mb(), peak_rss_mb()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        result = run(x, y)
        times.append(time.perf_counter() - start)
    peak = peak_rss_mb()
    np.save(f'{args.data}-{args.child}-nn.npy', NEIGHBOURS.numpy())
    # If the run never rose above a peak reached before the baseline (loading), the high-water
    # mark did not move and the true extra is only known to be at most this.
    print(json.dumps({**result, 'time': min(times), 'extra_mb': peak - base_rss,
                      'upper_bound': peak <= base_peak, 'base_mb': base_rss}))
    sys.exit(0)

# -----------------------------------------------------------------------------
# synthetic SOP-like embeddings


def make_embeddings(n, dim, seed):
    """Unit vectors in classes of mostly 2-12 (mean ~5, like SOP), classes grouped into 12
    superclasses (SOP's categories) so that neighbouring classes are confusable."""
    g = torch.Generator().manual_seed(seed)
    sizes = 2 + torch.multinomial(0.8 ** torch.arange(11.0), n, replacement=True, generator=g)
    sizes[torch.rand(n, generator=g) < args.lone_frac] = 1  # a few lone queries, which all methods must skip
    num_classes = int((sizes.cumsum(0) < n).sum()) + 1
    sizes = sizes[:num_classes]
    sizes[-1] -= sizes.sum() - n  # the last class takes what is left
    labels = torch.repeat_interleave(torch.arange(num_classes), sizes)
    unit = torch.nn.functional.normalize
    supers = unit(torch.randn(12, dim, generator=g), dim=1)
    # randn / sqrt(dim) has norm ~1: tau and sigma are noise-to-signal ratios
    centres = unit(supers[torch.randint(12, (num_classes,), generator=g)]
                   + args.tau * torch.randn(num_classes, dim, generator=g) / dim ** 0.5, dim=1)
    spread = args.sigma * torch.exp(0.25 * torch.randn(num_classes, generator=g))  # some classes are harder
    x = unit(centres[labels] + spread[labels, None] * torch.randn(n, dim, generator=g) / dim ** 0.5, dim=1)
    order = torch.randperm(n, generator=g)  # classes not contiguous, so index tie-breaks favour no class
    return x[order].contiguous(), labels[order].contiguous(), sizes


def compare_neighbours(a, b, x, y):
    """Where two methods' neighbour lists differ within the first R of a query (all that R@1 and
    MAP@R read): how many queries, in how many the same/other-class pattern differs (only those
    move a metric), and the largest float64 difference between the similarities the two lists
    have at the same rank. Two exact searches agree on the similarity at every rank, whatever
    order they put ties in, so that difference is float32 rounding unless one of them is wrong."""
    r = torch.unique(y, return_counts=True, return_inverse=True)
    r = r[2][r[1]] - 1
    counted = torch.arange(a.shape[1]) < r[:, None]
    rows = ((a != b) & counted).any(dim=1).nonzero()[:, 0]
    if len(rows) == 0:
        return 0, 0, 0.0
    q = x[rows].double()
    sims_a = (q[:, None] * x[a[rows]].double()).sum(-1)
    sims_b = (q[:, None] * x[b[rows]].double()).sum(-1)
    gap = ((sims_a - sims_b).abs() * counted[rows]).max().item()
    pattern = ((y[a[rows]] == y[rows, None]) != (y[b[rows]] == y[rows, None])) & counted[rows]
    return len(rows), int(pattern.any(dim=1).sum()), gap


def fmt(value, digits=6):
    return '–' if value is None else f'{value:.{digits}f}'


sizes = [int(s) for s in args.sizes.split(',')]
methods = args.methods.split(',')
if set(methods) - set(METHODS):
    parser.error(f'unknown methods {sorted(set(methods) - set(METHODS))}')
import faiss  # noqa: E402  (versions for the header only)
import pytorch_metric_learning  # noqa: E402
print(f'torch {torch.__version__}, faiss {faiss.__version__}, pytorch-metric-learning '
      f'{pytorch_metric_learning.__version__}, {args.threads} threads, dim {args.dim}, seed {args.seed}', flush=True)

rows, notes = [], []
with tempfile.TemporaryDirectory() as tmp:
    for n in sizes:
        x, y, class_sizes = make_embeddings(n, args.dim, args.seed)
        data = os.path.join(tmp, f'n{n}')
        np.save(data + '-x.npy', x.numpy())
        np.save(data + '-y.npy', y.numpy())
        lone = int((class_sizes == 1).sum())
        print(f'N={n}: {len(class_sizes)} classes (sizes {class_sizes.min()}-{class_sizes.max()}, mean '
              f'{n / len(class_sizes):.2f}), {lone} lone queries left out, embeddings {x.numel() * 4 / 2 ** 20:.0f} MB',
              flush=True)
        results = {}
        for method in methods:
            if method == 'naive' and naive_gib(n) > args.naive_max_gb:
                results[method] = {'skip': f'does not fit ({naive_gib(n):.3g} GiB > {args.naive_max_gb:g})'}
                print(f'  {method}: skipped, {results[method]["skip"]}', flush=True)
                continue
            # PML's memory is quadratic too (see pml_gib); on a shared machine an OOM kill is worse than a skip
            pml_limit = args.pml_max_gb if args.pml_max_gb is not None else 0.9 * available_gib()
            if method == 'pml' and pml_gib(n, len(class_sizes), args.dim) > pml_limit:
                results[method] = {'skip': f'does not fit (est. {pml_gib(n, len(class_sizes), args.dim):.3g} GiB '
                                           f'> {pml_limit:.3g})'}
                print(f'  {method}: skipped, {results[method]["skip"]}', flush=True)
                continue
            command = [sys.executable, os.path.abspath(__file__), '--child', method, '--data', data,
                       '--threads', str(args.threads), '--repeats', str(args.repeats), '--pml_index', args.pml_index]
            proc = subprocess.run(command, capture_output=True, text=True)
            if proc.returncode != 0:  # e.g. killed for memory: report it, keep going
                last = (f'killed by signal {-proc.returncode} (out of memory?)' if proc.returncode < 0
                        else (proc.stderr.strip().splitlines() or [f'exit code {proc.returncode}'])[-1])
                results[method] = {'skip': f'failed: {last[:80]}'}
                print(f'  {method}: FAILED (exit {proc.returncode})\n{proc.stderr[-2000:]}', flush=True)
                continue
            results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
            r = results[method]
            print(f'  {method}: {r["time"]:.2f} s, +{r["extra_mb"]:.0f} MB over {r["base_mb"]:.0f} MB, '
                  f'R@1 {r["r@1"]:.6f}, MAP@R {r["map@r"]:.6f}, R-Prec {r["r_precision"]:.6f}', flush=True)

        ref = results.get('pml', {})
        for method in methods:
            r = results[method]
            if 'skip' in r:
                rows.append(f'| {n} | {method} | {r["skip"]} | – | – | – | – | – |')
                continue
            time_ratio = r['time'] / ref['time'] if 'time' in ref else None
            mem_ratio = r['extra_mb'] / ref['extra_mb'] if ref.get('extra_mb', 0) > 0 else None
            memory = ('≤' if r['upper_bound'] else '') + f'{r["extra_mb"]:.0f}'
            rows.append(f'| {n} | {method} | {r["time"]:.2f} | {memory} | {r["r@1"]:.6f} | {r["map@r"]:.6f} | '
                        f'{fmt(time_ratio, 2)} | {fmt(mem_ratio, 2)} |')

        ran = [m for m in methods if 'skip' not in results[m]]
        if len(ran) < 2:
            notes.append(f'- N={n}: fewer than two methods ran; nothing to compare.')
            continue
        spread = {key: max(results[m][key] for m in ran) - min(results[m][key] for m in ran)
                  for key in ('r@1', 'map@r', 'r_precision')}
        agree = spread['r@1'] <= 1e-6 and spread['map@r'] <= 1e-6
        notes.append(f'- N={n}: {", ".join(ran)} {"agree" if agree else "DO NOT agree"} on R@1 and MAP@R to 1e-6: '
                     f'max |ΔR@1| = {spread["r@1"]:.1e}, max |ΔMAP@R| = {spread["map@r"]:.1e} '
                     f'(R-Precision: {spread["r_precision"]:.1e})')
        nn = {m: torch.from_numpy(np.load(f'{data}-{m}-nn.npy')) for m in ran}
        for other in ran[1:]:
            differ, flips, gap = compare_neighbours(nn[ran[0]], nn[other], x, y)
            if differ == 0:
                notes.append(f'  - {ran[0]} vs {other}: identical neighbour lists (first R of every query)')
            else:
                verdict = ('near-ties: same similarity at each rank up to float32 rounding' if gap < 1e-5 else
                           'NOT near-ties: one of them returns a wrong neighbour')
                notes.append(f'  - {ran[0]} vs {other}: neighbour order differs in {differ} queries ({flips} with a '
                             f'different same/other-class pattern, the only ones that move a metric); max similarity '
                             f'difference at equal rank {gap:.1e} -> {verdict}')

table = '\n'.join([
    f'Synthetic SOP-like embeddings ({args.dim}-d, unit norm, seed {args.seed}), {args.threads} threads; '
    f'PML = pytorch-metric-learning AccuracyCalculator, faiss IndexFlat{args.pml_index.upper()}, k=max_bin_count.',
    'Memory: peak RSS of the method\'s own process beyond its embeddings, libraries and warm-up'
    + ('; ≤: the run stayed below a peak reached before its baseline (loading), so this is an upper bound.'
       if any('≤' in row for row in rows) else '.'),
    '',
    '| N | method | time (s) | peak extra memory (MB) | R@1 | MAP@R | time vs PML | memory vs PML |',
    '|---:|---|---:|---:|---:|---:|---:|---:|',
    *rows, '', *notes, ''])
print('\n' + table)
if args.out:
    from utils import atomic_path  # a crash mid-write leaves any previous table intact
    with atomic_path(args.out) as tmp_path, open(tmp_path, 'w') as f:
        f.write(table)
