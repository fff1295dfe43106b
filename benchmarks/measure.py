"""What the benchmarks that run each method in a child process of its own share: one thread
count for every library, and the process's memory."""
import os
import resource
import sys

# the benchmarks live in benchmarks/, the project's modules in the repo root
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PAGE_MB = os.sysconf('SC_PAGE_SIZE') / 2 ** 20


def pin_threads(threads):
    """Call before numpy, torch or faiss is imported: their OpenMP/BLAS pools size themselves from
    these at start-up, and child processes inherit them, so every method gets the same threads."""
    for var in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'OPENBLAS_NUM_THREADS'):
        os.environ[var] = str(threads)


def rss_mb():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * PAGE_MB


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
