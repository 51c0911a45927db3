"""Atomic file writes: nothing already written (a checkpoint, a report) is lost when a run
dies mid-write. Each write goes to a unique temporary file in the destination's folder,
is flushed to disk, then renamed over the destination (atomic on POSIX)."""
import os
import tempfile

import torch


def atomic_write(path, write, binary=True):
    """Calls write(file) on a temporary file next to ``path``, then renames it to ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the mode a plain open() would (0666 less the umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_torch_save(obj, path):
    """torch.save(obj) to ``path`` atomically (load it with torch.load(..., weights_only=True))."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path, text):
    """Writes ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(text), binary=False)
