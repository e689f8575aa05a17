"""Commands of the test suite started as forks of one process that has imported torch and the training package
once, instead of a fresh interpreter each. Measured on the 2-core machine: a tiny training run takes ~5 s as
`python -m training.pretrain`, of which ~2 s is importing torch, ~1.5 s importing torch._dynamo (the optimizer's
constructor does) and ~0.6 s TensorBoard; forked, it takes ~0.7 s. The suite starts hundreds of commands.

A forked command is a process of its own, as `python -m training.X` is: its own pid, environment, working
directory, stdin/stdout/stderr, signal handlers and exit status; it runs the module as __main__ (runpy), so the
code path from the entry point on is the command's own. What differs is only that the imports happened before
the fork. Several ranks (RANK, WORLD_SIZE, ... in their environments) are several forks, as srun starts them.
The tests of launchers (torchrun, Slurm, MPI, DeepSpeed's) start real processes.

    python tests/forkserver.py SOCKET          the server (conftest.py starts one per pytest process)
    FORKSERVER_SOCKET=SOCKET python tests/forkserver.py --client ARGS...
                                               `python ARGS...`, forked by the server when ARGS run our code
                                               (-m training.X, a script); else the real interpreter (-c, -m
                                               preprocess, which never imports torch). The README's tour and
                                               `make demo` run their commands through it (PY=).
"""

import atexit
import json
import os
import runpy
import select
import signal
import socket
import sys
import threading
import traceback


def serve(path: str) -> None:
    sys.path.insert(0, os.getcwd())  # as `python -m` from the repository puts it first (this script's directory is)
    # what the commands import, imported once: the rooms, not the command modules (each runs as __main__ in its
    # fork, as `python -m` runs it); torch's lazily imported parts that every run pays for; matplotlib's pyplot
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401  (torch.optim's constructors import it)
    import torch.utils.tensorboard  # noqa: F401

    import training.checkpoint.weights  # noqa: F401
    import training.cli  # noqa: F401  (the loop, the stages, the backends)
    import training.models.decoding  # noqa: F401
    import training.models.tokenizer_export  # noqa: F401

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    waiting: dict[int, socket.socket] = {}  # pid → the client connection that waits for its exit status
    print("ready", flush=True)
    while True:
        ready, _, _ = select.select([listener], [], [], 0.02)
        reap(waiting)
        if not ready:
            if os.getppid() == 1:  # pytest is gone
                return
            continue
        conn, _ = listener.accept()
        message, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
        while not message.endswith(b"\n"):
            message += conn.recv(1 << 16)
        request = json.loads(message)
        pid = os.fork()
        if pid == 0:
            listener.close()
            conn.close()
            for other in waiting.values():
                other.close()
            run(request, fds)  # never returns
        for fd in fds:
            os.close(fd)
        conn.sendall(f"{pid}\n".encode())
        if request.get("wait"):
            waiting[pid] = conn
        else:
            conn.close()


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
        conn = waiting.pop(pid, None)
        if conn is not None:
            with conn:
                try:
                    conn.sendall(f"{code}\n".encode())
                except OSError:
                    pass
        else:
            with open(status_file(pid) + ".tmp", "w") as f:  # whole when the client sees it
                f.write(str(code))
            os.replace(status_file(pid) + ".tmp", status_file(pid))


def status_file(pid: int) -> str:
    return os.path.join(os.environ["FORKSERVER_DIR"], f"{pid}.exit")


def run(request: dict, fds: list[int]) -> None:
    code = 1
    try:
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
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
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", closefd=False, buffering=1 if os.isatty(1) else -1)
        sys.stderr = open(2, "w", closefd=False, buffering=1)
        argv = request["argv"]
        if "OMP_NUM_THREADS" in request["env"]:  # read by torch when it starts, which this process did before
            import torch

            torch.set_num_threads(int(request["env"]["OMP_NUM_THREADS"]))
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
            runpy.run_path(argv[0], run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except KeyboardInterrupt:
        code = 130
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:  # what the interpreter does at its end (threads joined, atexit handlers, streams flushed)
        try:
            threading._shutdown()
            atexit._run_exitfuncs()
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
        finally:
            os._exit(code)


def ours(argv: list[str]) -> bool:
    """Whether `python ARGV` runs our code, which the server has imported: a training command or a script."""
    if argv[:1] == ["-m"] and len(argv) > 1:
        return argv[1].startswith("training.")
    return bool(argv) and argv[0].endswith(".py")


def client(argv: list[str]) -> int:
    """`python ARGV`, forked by the server when it runs our code, with this process's stdin, stdout and stderr;
    signals that stop a command (SIGTERM, SIGINT, SIGUSR1) are passed on to it."""
    if not ours(argv):
        os.execv(sys.executable, [sys.executable, *argv])
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(os.environ["FORKSERVER_SOCKET"])
        request = {"argv": argv, "env": dict(os.environ), "cwd": os.getcwd(), "wait": True}
        socket.send_fds(conn, [(json.dumps(request) + "\n").encode()], [0, 1, 2])
        reader = conn.makefile()
        pid = int(reader.readline())
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            signal.signal(signum, lambda s, _: os.kill(pid, s))
        line = reader.readline()
        return int(line) if line.strip() else 1


if __name__ == "__main__":
    if sys.argv[1] == "--client":
        sys.exit(client(sys.argv[2:]))
    serve(sys.argv[1])
