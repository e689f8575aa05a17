"""Launchers for real on one machine: a Slurm controller and node daemon on localhost, MPI ranks, signals and
dead peers. Every daemon started here is stopped by PID at the end."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import FAST, REPO, TINY_CONFIG, dir_digest, free_port, losses, run_training

LAUNCH = os.path.join(REPO, "launch")


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node Slurm cluster on localhost (munged, slurmctld, slurmd as root), torn down afterwards."""
    if os.geteuid() != 0:
        pytest.skip("a local Slurm cluster needs root (slurmd runs jobs as their user)")
    if not all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        pytest.skip("Slurm is not installed (.ci/run installs Debian's slurm-wlm and munge)")
    key = "/etc/munge/munge.key"
    if not os.path.isfile(key):
        pytest.skip(f"{key} is missing (installing munge creates it)")
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "log"):
        (d / sub).mkdir()
    host = socket.gethostname().split(".")[0]
    conf = d / "slurm.conf"
    conf.write_text(f"""ClusterName=shardlmtest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
AuthInfo=socket={d}/munge.socket
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName={host} CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons = [subprocess.Popen(["munged", "-F", f"--socket={d}/munge.socket", f"--pid-file={d}/munged.pid",
                                 f"--key-file={key}", f"--log-file={d}/munged.log", f"--seed-file={d}/munge.seed",
                                 "--force"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    wait_for(lambda: os.path.exists(f"{d}/munge.socket"), 20, "munged")
    for daemon in ("slurmctld", "slurmd"):
        daemons.append(subprocess.Popen([daemon, "-D", "-f", str(conf)], env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL))
    try:
        wait_for(lambda: " idle " in subprocess.run(["sinfo", "-h"], env=env, capture_output=True, text=True).stdout,
                 60, "the Slurm node to come up")
        yield env
    finally:
        subprocess.run(["scancel", "--full", "--user=root"], env=env, capture_output=True)
        for p in reversed(daemons):
            p.terminate()
        for p in daemons:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


def sbatch(env, *args) -> str:
    out = subprocess.run(["sbatch", "--parsable", *map(str, args)], env=env, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def job_state(env, job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    return out.split("JobState=")[1].split()[0] if "JobState=" in out else "GONE"


TRAIN_ARGS = [*FAST, "train.grad_accum=1", "train.ckpt_every=1000"]


def training_export() -> str:
    """The environment of a training job: the script's own rendezvous port (20000 + job id) lies in the block that
    conftest.free_port gives this session's tests, whose rendezvous could hold it (seen: a requeued job's ranks
    failing with EADDRINUSE), so the job is given a free one. A requeue keeps it."""
    return f"--export=ALL,PYTHON={sys.executable},MASTER_PORT={free_port()}"


@pytest.mark.slow
@pytest.mark.xdist_group("slurm")  # one local Slurm cluster (the module's fixture) for all
def test_sbatch_runs_one_rank_per_task(slurm, pretrain_shards, tmp_path):
    run_training(f"data.path={pretrain_shards}", "train.max_steps=5", "train.grad_accum=2", f"out_dir={tmp_path / 'one'}")
    job = sbatch(slurm, "--wait", "--ntasks=2", f"--output={tmp_path / 'job.out'}", training_export(),
                 os.path.join(LAUNCH, "slurm", "train.sbatch"), "pretrain",
                 TINY_CONFIG, *TRAIN_ARGS, f"data.path={pretrain_shards}", "train.max_steps=5",
                 f"out_dir={tmp_path / 'slurm'}")
    assert job_state(slurm, job) in ("COMPLETED", "GONE")
    one, two = losses(tmp_path / "one"), losses(tmp_path / "slurm")
    assert sorted(two) == [1, 2, 3, 4, 5]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5)


@pytest.mark.slow
@pytest.mark.xdist_group("slurm")  # one local Slurm cluster (the module's fixture) for all
def test_usr1_before_the_time_limit_checkpoints_requeues_and_resumes(slurm, pretrain_shards, tmp_path):
    steps = 40
    run_training(f"data.path={pretrain_shards}", f"train.max_steps={steps}", "train.grad_accum=2",
                 f"out_dir={tmp_path / 'straight'}")
    out = tmp_path / "slurm"
    job = sbatch(slurm, "--ntasks=2", f"--output={tmp_path / 'job.out'}", training_export(),
                 os.path.join(LAUNCH, "slurm", "train.sbatch"), "pretrain", TINY_CONFIG, *TRAIN_ARGS,
                 f"data.path={pretrain_shards}", f"train.max_steps={steps}", f"out_dir={out}")
    metrics = out / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, 120, "the first steps")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm, check=True)
    show = lambda: subprocess.run(["scontrol", "show", "job", job], env=slurm, capture_output=True, text=True).stdout  # noqa: E731
    wait_for(lambda: "Restarts=1" in show() and job_state(slurm, job) == "PENDING", 120, "the job to be requeued")
    stopped_at = int((out / "checkpoints" / "latest").read_text().strip().removeprefix("step-"))
    assert stopped_at < steps

    # Slurm holds a requeued job back for a while; the test lets it start sooner, but not within the second in
    # which slurmd revoked the first run's credential (whole seconds are compared: it would refuse the new one as
    # "Job credential revoked")
    time.sleep(2)

    def started() -> bool:
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm, capture_output=True)
        return job_state(slurm, job) != "PENDING"

    wait_for(started, 60, "the requeued job to start")
    wait_for(lambda: job_state(slurm, job) not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"), 300,
             "the requeued job to end")
    log = (tmp_path / "job.out").read_text()
    assert job_state(slurm, job) in ("COMPLETED", "GONE"), log[-2000:] + show()
    assert "USR1: the ranks checkpoint at the next step boundary" in log
    assert f"stopped by SIGUSR1 after step {stopped_at}" in log
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, steps + 1))  # no step lost, none repeated
    assert [r["step"] for r in records if "val_loss" in r] == sorted({0, *range(50, steps, 50), steps})
    straight = losses(tmp_path / "straight")
    for step, value in losses(out).items():
        assert value == pytest.approx(straight[step], rel=1e-5)


@pytest.mark.slow
@pytest.mark.xdist_group("slurm")  # one local Slurm cluster (the module's fixture) for all
def test_a_slurm_array_job_writes_the_same_shards_as_one_process(slurm, tokenizer_model, corpus_dir, tmp_path):
    from preprocess.__main__ import main as preprocess_main

    args = ["--input", corpus_dir, "--tokenizer", tokenizer_model, "--unit-mb", "0.05"]
    assert preprocess_main(["shards", *args, "--out", str(tmp_path / "one")]) == 0
    sbatch(slurm, "--wait", "--array=0-2", f"--output={tmp_path}/array-%a.out", f"--export=ALL,PYTHON={sys.executable}",
           os.path.join(LAUNCH, "slurm", "preprocess.sbatch"), *args, "--out", tmp_path / "array")
    logs = "".join((tmp_path / f"array-{i}.out").read_text() for i in range(3))
    assert logs.count("rank ") >= 1 and "shards: " in logs
    assert dir_digest(tmp_path / "array") == dir_digest(tmp_path / "one")


def test_mpirun_ranks_write_the_same_shards_as_one_process(tokenizer_model, corpus_dir, tmp_path):
    from preprocess.__main__ import main as preprocess_main

    if not shutil.which("mpirun", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")):
        pytest.skip("no mpirun (the `mpi` extra installs MPICH)")
    args = ["--input", corpus_dir, "--tokenizer", tokenizer_model, "--unit-mb", "0.05", "--workers", "1"]
    assert preprocess_main(["shards", *args, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "RANKS": "2", "PYTHON": sys.executable,
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.run([os.path.join(LAUNCH, "mpi", "preprocess.sh"), *args, "--out", str(tmp_path / "mpi")],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("shards: ") == 1 and "2 MPI ranks)" in proc.stdout  # one summary, rank 0's
    assert dir_digest(tmp_path / "mpi") == dir_digest(tmp_path / "one")


def mpirun_preprocess(ranks: int, *args, env=None, timeout=300) -> subprocess.CompletedProcess:
    if not shutil.which("mpirun", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")):
        pytest.skip("no mpirun (the `mpi` extra installs MPICH)")
    env = {**os.environ, "RANKS": str(ranks), "PYTHON": sys.executable,
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""), **(env or {})}
    return subprocess.run([os.path.join(LAUNCH, "mpi", "preprocess.sh"), *map(str, args)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_mpi_ranks_deduplicate_as_one_process_and_one_failing_rank_ends_the_job(tokenizer_model, corpus_dir,
                                                                                  tmp_path):
    pytest.importorskip("mpi4py")
    from preprocess.__main__ import main as preprocess_main

    src = tmp_path / "src"
    src.mkdir()
    lines = [json.loads(line) for name in ("a.jsonl", "b.jsonl") for line in open(os.path.join(corpus_dir, name))]
    for i in range(3):  # every document three times, across files and units
        with open(src / f"{i}.jsonl", "w") as f:
            f.writelines(json.dumps({"text": r["text"]}) + "\n" for r in lines)
    # two workers per rank: rank 0's unit server runs next to its own process pool
    args = ["--input", src, "--tokenizer", tokenizer_model, "--unit-mb", "0.1", "--workers", "2", "--dedup", "near"]
    assert preprocess_main(["shards", *map(str, args), "--out", str(tmp_path / "one")]) == 0
    proc = mpirun_preprocess(3, *args, "--out", tmp_path / "mpi")
    assert proc.returncode == 0, proc.stderr
    assert dir_digest(tmp_path / "mpi") == dir_digest(tmp_path / "one")
    assert f"duplicates dropped: exact {2 * len(lines)}" in proc.stdout
    # a bad record under --strict stops one rank: mpirun ends the others instead of leaving them in a barrier
    with open(src / "1.jsonl", "a") as f:
        f.write('{"text": 5}\n')
    proc = mpirun_preprocess(2, *args, "--strict", "--out", tmp_path / "strict", timeout=120)
    assert proc.returncode != 0 and f"{src / '1.jsonl'}:{len(lines) + 1}: not a string" in proc.stderr
    assert not (tmp_path / "strict" / "manifest.json").exists()


@pytest.mark.slow
def test_a_dead_rank_makes_the_others_exit_with_a_clear_message(pretrain_shards, tmp_path):
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "training.pretrain", "--config", TINY_CONFIG, *FAST,
                                       f"data.path={pretrain_shards}", "train.max_steps=100000",
                                       f"out_dir={tmp_path / 'run'}"],
                                      env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    metrics = tmp_path / "run" / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, 120, "training to start")
    procs[1].send_signal(signal.SIGKILL)
    _, stderr = procs[0].communicate(timeout=60)  # no hang: the survivor notices at its next collective
    assert procs[0].returncode == 1
    assert stderr.strip().splitlines()[-1].startswith("error (rank 0): lost contact with another process")
    procs[1].wait()


@pytest.mark.slow
def test_sigterm_stops_at_a_step_boundary_and_the_rerun_resumes_exactly(pretrain_shards, tmp_path):
    common = [f"data.path={pretrain_shards}", "train.max_steps=80", "train.ckpt_every=1000"]
    run_training(*common, f"out_dir={tmp_path / 'straight'}")
    out = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "training.pretrain", "--config", TINY_CONFIG, *FAST, *common,
                             f"out_dir={out}"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, 120, "the first steps")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    stopped_at = int((out / "checkpoints" / "latest").read_text().strip().removeprefix("step-"))
    assert f"stopped by SIGTERM after step {stopped_at}: checkpoint saved" in stderr
    assert max(losses(out)) == stopped_at < 80  # stopped at the boundary after the signal, nothing half-done
    run_training(*common, f"out_dir={out}")
    assert losses(out) == losses(tmp_path / "straight")


@pytest.fixture
def two_nodes():
    """Two network namespaces joined by a veth pair: two hosts, 10.77.0.1 and 10.77.0.2, on one machine."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("network namespaces need root and iproute2")
    tag = str(os.getpid())[-5:]
    names = [f"shardlm{tag}a", f"shardlm{tag}b"]
    links = [f"sl{tag}a", f"sl{tag}b"]
    commands = [["ip", "netns", "add", names[0]], ["ip", "netns", "add", names[1]],
                ["ip", "link", "add", links[0], "type", "veth", "peer", "name", links[1]]]
    for i in (0, 1):
        commands += [["ip", "link", "set", links[i], "netns", names[i]],
                     ["ip", "netns", "exec", names[i], "ip", "addr", "add", f"10.77.0.{i + 1}/24", "dev", links[i]],
                     ["ip", "netns", "exec", names[i], "ip", "link", "set", links[i], "up"],
                     ["ip", "netns", "exec", names[i], "ip", "link", "set", "lo", "up"]]
    try:
        for command in commands:
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                pytest.skip(f"cannot create network namespaces here: {result.stderr.strip()}")
        yield list(zip(names, links, ["10.77.0.1", "10.77.0.2"], strict=True))
    finally:
        for name in names:  # deleting a namespace deletes its end of the veth pair, and with it the pair
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.mark.slow
def test_torchrun_across_two_hosts_gives_the_single_process_losses(two_nodes, pretrain_shards, tmp_path):
    common = [*FAST, f"data.path={pretrain_shards}", "train.max_steps=4", "dist.timeout_s=120"]
    run_training(*common[len(FAST):], "train.grad_accum=2", f"out_dir={tmp_path / 'one'}")
    procs = []
    for i, (namespace, link, address) in enumerate(two_nodes):
        env = {**os.environ, "NNODES": "2", "NPROC_PER_NODE": "1", "RDZV_ENDPOINT": f"10.77.0.1:{free_port()}"
               if i == 0 else procs[0][1]["RDZV_ENDPOINT"], "LOCAL_ADDR": address,
               "RDZV_CONF": f"is_host={'true' if i == 0 else 'false'}", "RDZV_ID": f"test{os.getpid()}",
               "GLOO_SOCKET_IFNAME": link, "PYTHON": sys.executable}
        command = ["ip", "netns", "exec", namespace, "env", *(f"{k}={v}" for k, v in env.items() if k != "PATH"),
                   f"PATH={env.get('PATH', '')}", os.path.join(LAUNCH, "torchrun.sh"), "pretrain", TINY_CONFIG,
                   *common, "train.grad_accum=1", f"out_dir={tmp_path / 'two'}"]
        procs.append((subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
                      env))
    for proc, _ in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(two) == [1, 2, 3, 4]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5)


def test_launch_scripts_are_valid_executable_shell():
    for path in ["torchrun.sh", "slurm/train.sbatch", "slurm/preprocess.sbatch", "mpi/preprocess.sh"]:
        full = os.path.join(LAUNCH, path)
        assert os.access(full, os.X_OK), path
        check = subprocess.run(["bash", "-n", full], capture_output=True, text=True)
        assert check.returncode == 0, (path, check.stderr)
