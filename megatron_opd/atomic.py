"""Files written whole or not at all: under a temporary name beside the target, renamed over it once
complete (a rename within a directory is atomic on POSIX). A crash leaves the old file, or none — never
half of one — and a failed write removes what it left."""
import os
import shutil
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def replaced_when_done(path: str, suffix: str = ".tmp") -> Iterator[str]:
    """Yields a temporary path beside `path` (a file, or a directory `path` does not exist as yet); it becomes
    `path` when the block completes and is removed when the block raises."""
    tmp = f"{path}{suffix}"
    try:
        yield tmp
    except BaseException:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def write_text(path: str, text: str, suffix: str = ".tmp") -> None:
    with replaced_when_done(path, suffix) as tmp:
        with open(tmp, "w") as f:
            f.write(text)
