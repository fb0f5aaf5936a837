"""One writer per folder: a run, a latent store, a sample folder and a pipeline folder are each written by
one process at a time (an advisory lock, `runtime/lock.py`); workers stop when their launcher dies; temp
files of killed writes are swept when a folder is taken."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sendvae.cli import main

from .conftest import tiny_train_args

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")

# Another process holding a folder, the way every writer does: flock on FOLDER/.lock, its pid inside.
# Plain fcntl (not our module): the test states the on-disk protocol, not the implementation.
HOLDER = textwrap.dedent(
    """
    import fcntl, os, sys, time
    folder = sys.argv[1]
    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    print("held", flush=True)
    time.sleep(600)
    """
)


@pytest.fixture
def hold():
    """hold(folder) -> the pid of a live process holding folder's lock (killed after the test)."""
    procs: list[subprocess.Popen] = []

    def start(folder: Path) -> int:
        p = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout is not None and p.stdout.readline().strip() == "held"
        return p.pid

    yield start
    for p in procs:
        p.kill()
        p.wait()


def _one_error_line(err: str, pid: int) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "error" in lines[0] and str(pid) in lines[0], lines[0]
    return lines[0]


# -- the lock itself --------------------------------------------------------------------------------------


def test_lock_is_exclusive_between_processes_and_names_the_holder(tmp_path, hold):
    from sendvae.runtime.lock import FolderLockedError, folder_lock

    pid = hold(tmp_path / "a")
    with pytest.raises(FolderLockedError, match=f"process {pid}"):
        with folder_lock(tmp_path / "a"):
            pass
    with folder_lock(tmp_path / "b"):  # another folder is free
        assert (tmp_path / "b" / ".lock").read_text().strip() == str(os.getpid())


def test_lock_is_reentrant_in_a_process_and_nests_across_folders(tmp_path):
    from sendvae.runtime import lock

    root, sub = tmp_path / "demo", tmp_path / "demo" / "vae"
    with lock.folder_lock(root):
        with lock.folder_lock(sub):  # a train run inside the pipeline folder
            with lock.folder_lock(root):  # the study calling the demo's stages: no deadlock
                assert lock.held(root) and lock.held(sub)
            assert lock.held(root)
        assert not lock.held(sub)
    assert not lock.held(root)
    # released: another process takes it at once
    code = f"from sendvae.runtime.lock import folder_lock\nwith folder_lock({str(root)!r}): print('ok')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
    assert r.stdout.strip() == "ok", r.stderr


def test_lock_of_a_killed_process_is_free(tmp_path, hold):
    from sendvae.runtime.lock import folder_lock

    code = f"from sendvae.runtime.lock import folder_lock\nwith folder_lock({str(tmp_path)!r}):\n"
    code += "    print('held', flush=True)\n    import time; time.sleep(600)"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=ENV)
    assert p.stdout is not None and p.stdout.readline().strip() == "held"
    p.kill()
    p.wait()
    with folder_lock(tmp_path):  # no stale lock to clean by hand
        pass


# -- every writer takes it --------------------------------------------------------------------------------


def test_second_train_run_on_a_held_folder_is_refused(tmp_path, hold, capsys):
    pid = hold(tmp_path / "run")
    assert main(["train-vae", *tiny_train_args(tmp_path, steps=1)]) == 2
    _one_error_line(capsys.readouterr().err, pid)
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "config.json").exists()


def test_cache_latents_on_a_held_store_is_refused(tmp_path, hold, capsys):
    store = tmp_path / "store"
    pid = hold(store)
    args = ["cache-latents", "--vae", "tiny-f4d4", "--data", "shapes", "--resolution", "32",
            "--num-images", "4", "--output-dir", str(store), "--workers", "0", "--no-progress"]  # fmt: skip
    assert main(args) == 2
    _one_error_line(capsys.readouterr().err, pid)
    assert not (store / "plan.json").exists()


def test_sample_into_a_held_folder_is_refused(tmp_path, hold, capsys):
    from .test_sample_cmd import _args, _tiny_sit_run

    run = _tiny_sit_run(tmp_path / "src")
    out = tmp_path / "out"
    pid = hold(out)
    assert main(["sample", *_args(run, out, num_samples=2)]) == 2
    _one_error_line(capsys.readouterr().err, pid)
    assert not list(out.glob("*.npz")) and not list(out.glob("*.parts"))


def test_pipeline_folder_lock_refuses_a_second_process_and_sweeps_temp_files(tmp_path, hold):
    from sendvae.pipeline.stages import Stages
    from sendvae.runtime.lock import FolderLockedError

    root = tmp_path / "demo"
    (root / "stages").mkdir(parents=True)
    leftovers = [root / ".report.html.x1y2.tmp", root / "stages" / ".sit.json.a8b9.tmp"]
    for p in leftovers:
        p.write_text("torn")
    st = Stages(root, echo=lambda line: None)
    with st.lock():
        assert not any(p.exists() for p in leftovers)
        with st.lock():  # re-entrant: the study running the demo's stages in the same folder
            pass
        code = f"from sendvae.pipeline.stages import Stages\nwith Stages({str(root)!r}).lock(): pass"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV)
        assert r.returncode != 0 and f"process {os.getpid()}" in r.stderr
    pid = hold(tmp_path / "other")
    with pytest.raises(FolderLockedError, match=str(pid)):
        with Stages(tmp_path / "other").lock():
            pass


# -- temp files of killed writes in export/ ----------------------------------------------------------------


def test_train_run_sweeps_temp_files_of_a_killed_export(tmp_path):
    args = tiny_train_args(tmp_path, steps=1)
    assert main(["train-vae", *args]) == 0
    export = tmp_path / "run" / "export"
    torn = [export / ".torn.tmp", export / "vae" / ".diffusion_pytorch_model.safetensors.k3j4.tmp"]
    for p in torn:
        p.write_bytes(b"half")
    assert main(["train-vae", *args]) == 0  # the same command: nothing to train, exports again
    assert not any(p.exists() for p in torn)


# -- workers stop when their launcher dies -----------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_torchrun_worker_asks_for_sigterm_when_its_parent_dies():
    code = textwrap.dedent(
        """
        import ctypes, signal
        from sendvae.runtime.distributed import init_distributed
        init_distributed("cpu")
        sig = ctypes.c_int(0)
        ctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0)  # PR_GET_PDEATHSIG
        print(sig.value == signal.SIGTERM)
        """
    )
    for env, expect in (({"LOCAL_RANK": "0"}, "True"), ({}, "False")):
        clean = {k: v for k, v in ENV.items() if k not in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID")}
        r = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True)
        assert r.stdout.strip() == expect, r.stderr


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_exit_when_the_launcher_is_killed(tmp_path):
    args = tiny_train_args(tmp_path, steps=100000)
    launcher = subprocess.Popen(
        [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "sendvae.cli", "train-vae", *args],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    workers: list[int] = []
    try:
        stats = tmp_path / "run" / "stats.jsonl"
        deadline = time.time() + 120
        while not (stats.exists() and stats.read_text().count("\n") >= 2):  # both ranks are training
            assert launcher.poll() is None and time.time() < deadline, "the run did not start"
            time.sleep(0.2)
        workers = _children(launcher.pid)
        assert len(workers) == 2, workers
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.time() + 20
        while any(_alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not [w for w in workers if _alive(w)], "workers kept running after their launcher died"
    finally:
        for pid in [launcher.pid, *workers]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
