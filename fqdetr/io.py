"""Atomic file writes: nothing already written (a checkpoint, a report) is lost when a run
dies mid-write. Each write goes to a unique temporary file in the destination's folder,
is flushed to disk, then renamed over the destination (atomic on POSIX)."""
import hashlib
import json
import os
import tempfile

import torch


def file_sha256(path, chunk=1 << 20):
    """Hex SHA-256 of a file's bytes (what a cache records to know which checkpoint made it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


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


def write_json(obj, path, indent=2, other=None):
    """Writes ``obj`` as JSON to ``path`` atomically (numpy values and tensors as numbers / lists;
    any other object through ``other``, e.g. str for a settings snapshot, else TypeError);
    returns the path. The one JSON writer of fqdetr."""
    def default(x):
        if hasattr(x, "tolist"):
            return x.tolist()
        if other is not None:
            return other(x)
        raise TypeError(f"Object of type {type(x).__name__} is not JSON serializable")

    return atomic_write_text(path, json.dumps(obj, indent=indent, default=default))


def atomic_savefig(fig, path, dpi=100):
    """A matplotlib figure as PNG at ``path``, atomically."""
    return atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
