import contextlib
import os


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; on success it replaces `path` in one rename.

    A crash mid-write leaves the previous file intact. The temporary name keeps the
    extension so writers that infer the format from it (matplotlib) still work.
    """
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f'.tmp-{os.getpid()}-{name}')
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
