"""Writing files so that readers only ever see a complete one: write a temporary file
beside the target, then rename it over the target in one step."""

import contextlib
import os
import tempfile


def publish(tmp: str, path: str) -> None:
    """Give ``tmp`` the permissions a plain new file would have (mkstemp makes it
    private) and rename it to ``path`` atomically."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary file name beside ``path``; when the block ends normally the
    file is published as ``path``, when it raises the temporary file is removed."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".",
                               suffix=os.path.splitext(path)[1], dir=folder)
    os.close(fd)
    try:
        yield tmp
        publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
