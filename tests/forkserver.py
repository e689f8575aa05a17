"""Commands of the test suite started as forks of one process that has imported torch and the training package
once, instead of a fresh interpreter each: most of a tiny training run's time in a fresh interpreter is importing
torch, torch._dynamo (the optimizer's constructor does) and TensorBoard, and the suite starts hundreds of
commands. `python -X importtime -m training.pretrain --help 2>&1 | sort -t'|' -k2 -n | tail` shows where it goes.

A forked command is a process of its own, as `python -m training.X` is: its own pid, environment, working
directory, sys.path, stdin/stdout/stderr, signal handlers, random seeds and exit status (a command ended by a
signal too); it runs the module as __main__ (runpy), so the code path from the entry point on is the command's
own. What differs: the imports happened before the fork (DeepSpeed's too, on a CPU build of torch: its
accelerator is the CPU's), and str hashing shares the server's seed. Several ranks
(RANK, WORLD_SIZE, ... in their environments) are several forks, as srun starts them. Real processes are still
started where the launcher or the interpreter is what a test is about: torchrun (test_lr_find.py and
test_launch.py), Slurm, MPI, DeepSpeed's launcher, the no-network test, the commands' entry points in a fresh
interpreter (test_architecture.py), kill -9 and SIGTERM of a real run.

The server itself runs no torch operation and keeps one thread per process: GNU OpenMP's thread pool does not
survive a fork (a fork of a process that ran a parallel operation hangs in its first one).

    python tests/forkserver.py SOCKET          the server (conftest.py starts one per pytest process)
    FORKSERVER_SOCKET=SOCKET python tests/forkserver.py --client ARGS...
                                               `python ARGS...`, forked by the server when ARGS run our code
                                               (-m training.X, a script); else the real interpreter (-c, -m
                                               preprocess, which never imports torch). The README's tour and
                                               `make demo` run their commands through it (PY=).
"""

import contextlib
import ctypes
import importlib.util
import io
import json
import logging
import os
import random
import runpy
import select
import shutil
import signal
import socket
import sys
import traceback

PR_SET_PDEATHSIG = 1


def serve(path: str) -> None:
    parent = os.getppid()
    sys.path.pop(0)  # this script's directory: a command's sys.path starts as its own would
    base_path = list(sys.path)
    sys.path.insert(0, os.getcwd())  # the repository, as `python -m` run from it finds the packages
    # what the commands import, imported once: the rooms, not the command modules (each runs as __main__ in its
    # fork, as `python -m` runs it); torch's lazily imported parts that every run pays for; matplotlib's pyplot
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import torch
    import torch._dynamo  # noqa: F401  (torch.optim's constructors import it)
    import torch.utils.tensorboard  # noqa: F401

    import training.checkpoint.weights  # noqa: F401
    import training.cli  # noqa: F401  (the loop, the stages, the backends)
    import training.models.decoding  # noqa: F401
    import training.models.tokenizer_export  # noqa: F401

    torch.set_num_threads(1)  # no OpenMP pool here, whatever runs (see above); each fork sets its own count
    import_deepspeed_for_cpu()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    waiting: dict[int, socket.socket] = {}  # pid → the --client connection that waits for its exit status
    print("ready", flush=True)
    while os.getppid() == parent:  # pytest (or whoever started this) is gone: so is the server
        ready, _, _ = select.select([listener, *(c for c in waiting.values() if c)], [], [], 0.02)
        reap(waiting)
        for conn in ready:
            if conn is listener:
                accept(listener, waiting, base_path)
                continue
            pid = next((p for p, c in waiting.items() if c is conn), None)
            if pid is not None and not peek(conn):  # its client is gone: so is the command
                conn.close()
                waiting[pid] = None
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    shutil.rmtree(os.environ["FORKSERVER_DIR"], ignore_errors=True)  # its owner was killed before it could


def import_deepspeed_for_cpu() -> None:
    """DeepSpeed as a DeepSpeed run on a CPU imports it (training.parallel.deepspeed.deepspeed_on), with the Muon
    module that ZeRO's optimizer check imports (torch._inductor with it); what that costs each rank:
        python -X importtime -c "import torch, training.parallel.deepspeed as d; d.prepare_environment(
            torch.device('cpu')); import deepspeed, deepspeed.runtime.zero.muon.muon_optimizer" 2>&1 | sort -t'|' -k2 -n | tail
    Its accelerator is fixed at import,
    so not where torch is built for CUDA (a GPU host's runs must choose theirs); nor where it fails to import (its
    tests say why, the rest go on)."""
    import torch

    if torch.version.cuda is not None or importlib.util.find_spec("deepspeed") is None:
        return
    from training.parallel.deepspeed import prepare_environment

    prepare_environment(torch.device("cpu"))
    try:
        import deepspeed  # noqa: F401
        import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401
    except Exception as e:  # whatever a broken install raises
        print(f"forkserver: deepspeed not imported beforehand: {e}", file=sys.stderr)


def peek(conn: socket.socket) -> bool:
    """Whether a waiting client's connection is still open."""
    try:
        return bool(conn.recv(1, socket.MSG_PEEK))
    except OSError:
        return False


def accept(listener: socket.socket, waiting: dict, base_path: list[str]) -> None:
    """One request: {argv, env, cwd, and stdout/stderr paths, or the client's fds; wait: the client waits}."""
    conn, _ = listener.accept()
    fds = []
    try:
        conn.settimeout(10)
        message, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
        while message and not message.endswith(b"\n"):
            chunk = conn.recv(1 << 16)
            if not chunk:
                break
            message += chunk
        if not message.endswith(b"\n"):  # a client that went away before it asked anything
            conn.close()
            return
        request = json.loads(message)
        pid = os.fork()
        if pid == 0:
            for held in (listener, conn, *(c for c in waiting.values() if c)):  # the server's, not the command's
                held.close()
            run(request, fds, base_path)  # never returns
        with contextlib.suppress(FileNotFoundError):
            os.unlink(status_file(pid))  # a finished earlier process of the same pid: not this one's
        try:
            conn.sendall(f"{pid}\n".encode())
        except OSError:  # nobody will wait for it
            os.kill(pid, signal.SIGKILL)
            raise
        if request.get("wait"):
            conn.settimeout(None)
            waiting[pid] = conn
        else:
            conn.close()
    except Exception:  # a request the server cannot serve ends its connection, not the server
        traceback.print_exc()
        conn.close()
    finally:
        for fd in fds:  # the child has its own copies
            os.close(fd)


def reap(waiting: dict) -> None:
    """Collect finished children: their exit status goes to the client that waits (or to a file beside the
    socket for conftest.py's Forked, which polls)."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        code = os.waitstatus_to_exitcode(status)
        if pid in waiting:  # a --client's (None once its client went away)
            conn = waiting.pop(pid)
            if conn is None:
                continue
            with conn:
                try:
                    conn.sendall(f"{code}\n".encode())
                except OSError:
                    pass
        else:
            try:
                with open(status_file(pid) + ".tmp", "w") as f:  # whole when the client sees it
                    f.write(str(code))
                os.replace(status_file(pid) + ".tmp", status_file(pid))
            except OSError:  # the test sees the server alive and the command running: its timeout reports it
                traceback.print_exc()


def own_streams(server_streams: tuple) -> None:
    """Log handlers that a module imported in the server made (DeepSpeed's) write to this fork's sys.stdout and
    sys.stderr, not to the server's objects (whose buffers an exit by os._exit would drop)."""
    mine = dict(zip(server_streams, (sys.stdout, sys.stderr), strict=True))
    for logger in [logging.root, *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, logging.StreamHandler) and handler.stream in mine:
                handler.setStream(mine[handler.stream])


def status_file(pid: int) -> str:
    return os.path.join(os.environ["FORKSERVER_DIR"], f"{pid}.exit")


def run(request: dict, fds: list[int], base_path: list[str]) -> None:
    """The child: the command's process, as `python ARGV` would start it, then its end as the interpreter's."""
    code = 1
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # ends with the server (a killed session)
        if fds:  # the client's own stdin, stdout and stderr
            for fd, received in enumerate(fds):
                os.dup2(received, fd)
                os.close(received)
        else:
            for fd, path, mode in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY | os.O_CREAT),
                                   (2, request["stderr"], os.O_WRONLY | os.O_CREAT)):
                opened = os.open(path, mode, 0o644)
                os.dup2(opened, fd)
                os.close(opened)
        env = request["env"]
        os.chdir(request["cwd"])
        if not set(entries(env.get("PYTHONPATH"))) <= set(entries(os.pathsep.join(sys.path))):
            os.execve(sys.executable, [sys.executable, *request["argv"]], env)  # other modules than those imported
        sys.stdin, server_streams = open(0, closefd=False), (sys.stdout, sys.stderr)
        if env.get("PYTHONUNBUFFERED"):  # every write reaches the file at once, as the interpreter does it
            sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
        else:
            sys.stdout = open(1, "w", closefd=False, buffering=1 if os.isatty(1) else -1)
        sys.stderr = open(2, "w", closefd=False, buffering=1, errors="backslashreplace")
        own_streams(server_streams)
        os.environ.clear()
        os.environ.update(env)
        import numpy as np
        import torch

        torch.seed()  # fresh, as a new process's: a run seeds what it uses itself
        np.random.seed()
        random.seed()
        torch.set_num_threads(int(env.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0))))
        argv = request["argv"]
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path[:] = [os.getcwd(), *base_path]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path[:] = [os.path.dirname(os.path.abspath(argv[0])), *base_path]
            runpy.run_path(argv[0], run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except KeyboardInterrupt:  # as the interpreter ends: by SIGINT itself
        finish_interpreter()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        code = 130  # the shell's number for it, should the signal come late
    except BaseException:
        traceback.print_exc()
        code = 1
    finish_interpreter()
    os._exit(code & 0xFF)


def entries(path: str | None) -> list[str]:
    """A PYTHONPATH's directories, absolute."""
    return [os.path.abspath(p) for p in (path or "").split(os.pathsep) if p]


def finish_interpreter() -> None:
    """What the interpreter does at its end (threads joined, atexit handlers, streams flushed), whatever fails."""
    from training.parallel.env import wind_down  # the server's import; the client below never imports torch

    with contextlib.suppress(BaseException):
        wind_down()


def ours(argv: list[str]) -> bool:
    """Whether `python ARGV` runs our code, which the server has imported: a training command or a script."""
    if argv[:1] == ["-m"] and len(argv) > 1:
        return argv[1].startswith("training.")
    return bool(argv) and argv[0].endswith(".py")


def client(argv: list[str]) -> int:
    """`python ARGV`, forked by the server when it runs our code, with this process's stdin, stdout and stderr.
    Signals that stop a command (SIGTERM, SIGINT, SIGUSR1) are passed on to it; if this process is killed, the
    server kills the command; a command ended by a signal ends this process by the same signal."""
    if not ours(argv):
        os.execv(sys.executable, [sys.executable, *argv])
    pid, pending = None, []

    def forward(signum, frame):
        if pid is None:
            pending.append(signum)
        else:
            os.kill(pid, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(signum, forward)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(os.environ["FORKSERVER_SOCKET"])
        request = {"argv": argv, "env": dict(os.environ), "cwd": os.getcwd(), "wait": True}
        socket.send_fds(conn, [(json.dumps(request) + "\n").encode()], [0, 1, 2])
        reader = conn.makefile()
        pid = int(reader.readline())
        for signum in pending:
            os.kill(pid, signum)
        line = reader.readline()
    code = int(line) if line.strip() else 1
    if code < 0:  # ended by a signal: end by it too, as the shell expects
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


if __name__ == "__main__":
    if sys.argv[1] == "--client":
        sys.exit(client(sys.argv[2:]))
    serve(sys.argv[1])
