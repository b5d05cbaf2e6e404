"""Publishing a finished temporary file under its final name in one step."""

import os


def publish(tmp: str, path: str) -> None:
    """Give ``tmp`` the permissions a plain new file would have (mkstemp makes it
    private) and rename it to ``path`` atomically."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
