import contextlib
import errno
import sys


class UserError(Exception):
    """A problem with the user's input or options: reported as one line, never as a traceback."""


def environment_error(e: OSError) -> str:
    """An OSError (disk full, permissions, a vanished file) as one line naming the file."""
    where = f"{e.filename}: " if e.filename else ""
    hint = ("; free some space and run the same command again (finished work is kept)"
            if e.errno in (errno.ENOSPC, errno.EDQUOT) else "")
    return f"{where}{e.strerror or e}{hint}"


REPORTED: list[BaseException] = []  # see held()


def held(e: BaseException) -> BaseException:
    """An error already reported, kept until the process ends instead of released: its traceback's frames may hold
    a training run's last reference to a process group (a DDP reducer's), and freeing that group joins gloo's
    worker threads while this thread holds the GIL one of them waits for — a rank that never exits. The training
    commands end with os._exit (training/parallel/env.py's exit_process), which frees nothing."""
    REPORTED.append(e)
    return e


def exit_code(action, who: str = "") -> int:
    """Run a command's action; a user mistake or a problem of the environment becomes one line and exit 1."""
    try:
        action()
    except UserError as e:
        print(f"error{who}: {held(e)}", file=sys.stderr)
        return 1
    except OSError as e:  # disk full, permissions: the environment, not a bug
        print(f"error{who}: {environment_error(held(e))}", file=sys.stderr)
        return 1
    return 0


@contextlib.contextmanager
def naming(path: str):
    """An OSError raised inside that does not say which file (a failed write, flush or close) gets `path`."""
    try:
        yield
    except OSError as e:
        if e.filename:
            raise
        raise OSError(e.errno, e.strerror or str(e), path) from None
