"""The subprocess runner against the fake musubi CLI: progress, logs, failures, cancel."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_musubi.fakeroot import fake_env, make_fake_root

from speedkit.musubi import runner
from speedkit.musubi.runner import MusubiCancelled, MusubiRunError, group_alive, run_command

pytestmark = pytest.mark.skipif(os.name == "nt", reason="uses POSIX process groups and /proc")


@pytest.fixture
def root(tmp_path):
    return make_fake_root(tmp_path)


def train_argv(root: Path, out: Path, *extra: str) -> list[str]:
    script = root / "src" / "musubi_tuner" / "wan_train_network.py"
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--mixed_precision", "bf16",
        str(script), "--output_dir", str(out), "--output_name", "lora", "--max_train_epochs", "3",
        "--save_every_n_epochs", "1", *extra,
    ]  # fmt: skip


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_successful_run_parses_progress_and_writes_the_log(root, tmp_path):
    out = tmp_path / "out"
    events, lines = [], []
    result = run_command(
        train_argv(root, out),
        cwd=root,
        env=fake_env(),
        log_path=out / "train.log",
        expected_outputs=[out / "lora.safetensors"],
        on_line=lines.append,
        on_event=lambda ev, st: events.append((ev.kind, st.step)),
    )
    st = result.state
    assert result.returncode == 0 and (st.step, st.total) == (12, 12) and (st.epoch, st.epochs) == (3, 3)
    assert st.model_saved and len(st.loss_history) == 12 and st.loss < 0.5
    assert [Path(p).name for p in st.checkpoints] == ["lora-000001.safetensors", "lora-000002.safetensors"]
    kinds = [k for k, _ in events]
    assert kinds[:3] == ["total", "epoch", "steps"] and kinds.count("epoch") == 3 and kinds[-1] == "saved"
    assert ("checkpoint", 4) in events and ("checkpoint", 8) in events
    log = (out / "train.log").read_text()
    assert "accelerate.commands.launch" in log.splitlines()[0]
    assert "saving checkpoint:" in log and "model saved." in log and "12/12" in log
    # tqdm's \r redraws arrive as separate lines
    assert sum(1 for line in lines if line.startswith("steps:")) == 12


def test_child_gets_unbuffered_utf8_env_and_cwd(tmp_path):
    code = "import os,sys; print(os.environ['PYTHONUNBUFFERED'], os.environ['PYTHONIOENCODING'], os.getcwd(), 'é')"
    lines = []
    run_command([sys.executable, "-c", code], cwd=tmp_path, on_line=lines.append)
    assert lines == [f"1 utf-8 {tmp_path} é"]


def test_failure_raises_with_code_tail_and_log_path(root, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(MusubiRunError) as info:
        run_command(
            train_argv(root, out),
            cwd=root,
            env=fake_env({"FAKE_MUSUBI_MODE": "fail", "FAKE_MUSUBI_EXIT": "3"}),
            log_path=out / "train.log",
            expected_outputs=[out / "lora.safetensors"],
        )
    err = info.value
    assert err.returncode == 3 and err.log_path == out / "train.log"
    text = str(err)
    assert "exited with code 3" in text and "CUDA out of memory" in text and str(out / "train.log") in text
    assert "CUDA out of memory" in (out / "train.log").read_text()


def test_exit_zero_without_the_final_file_is_a_failure(root, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(MusubiRunError, match="did not write .*lora.safetensors") as info:
        run_command(
            train_argv(root, out),
            cwd=root,
            env=fake_env({"FAKE_MUSUBI_MODE": "no_output"}),
            expected_outputs=[out / "lora.safetensors"],
        )
    assert info.value.returncode == 0
    assert "lora-000002.safetensors" in str(info.value)  # says what was saved before


def test_a_file_left_from_an_earlier_run_does_not_count(root, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "lora.safetensors").write_bytes(b"from yesterday")
    os.utime(out / "lora.safetensors", (time.time() - 3600, time.time() - 3600))
    with pytest.raises(MusubiRunError, match="did not write .*lora.safetensors \\(missing, or older than this run\\)"):
        run_command(train_argv(root, out), cwd=root, env=fake_env({"FAKE_MUSUBI_MODE": "no_output"}),
                    expected_outputs=[out / "lora.safetensors"])  # fmt: skip
    # the same run that does write it passes
    run_command(train_argv(root, out), cwd=root, env=fake_env(), expected_outputs=[out / "lora.safetensors"])


def test_done_line_lets_a_crash_after_the_job_count(tmp_path):
    target = tmp_path / "merged.safetensors"
    code = (
        f"open({str(target)!r}, 'wb').write(b'x'); print('INFO:Merged model saved', flush=True); "
        "raise TypeError('main() went on without a model')"
    )
    argv = [sys.executable, "-c", code]
    result = run_command(argv, cwd=tmp_path, expected_outputs=[target], done_line="Merged model saved")
    assert result.returncode == 1 and result.outputs == [target]
    with pytest.raises(MusubiRunError, match="exited with code 1"):
        run_command(argv, cwd=tmp_path, expected_outputs=[target])  # without done_line a crash is a failure
    no_line = [sys.executable, "-c", f"open({str(target)!r}, 'wb').write(b'x'); raise SystemExit(1)"]
    with pytest.raises(MusubiRunError, match="exited with code 1"):
        run_command(no_line, cwd=tmp_path, expected_outputs=[target], done_line="Merged model saved")
    with pytest.raises(MusubiRunError, match="exited with code 1"):  # the line alone, without the file
        run_command(
            argv, cwd=tmp_path, expected_outputs=[tmp_path / "other.safetensors"], done_line="Merged model saved"
        )


def test_missing_interpreter_is_a_clear_error(tmp_path):
    with pytest.raises(MusubiRunError, match="could not start"):
        run_command([str(tmp_path / "nope" / "python")], cwd=tmp_path)


def _cancel_after_step(n: int):
    seen = {"step": 0}

    def on_event(ev, st):
        seen["step"] = st.step

    return on_event, lambda: seen["step"] >= n


@pytest.mark.parametrize("ignore_term", [False, True], ids=["sigterm", "needs-sigkill"])
def test_cancel_kills_the_whole_tree_within_5s(root, tmp_path, ignore_term):
    out, pid_file = tmp_path / "out", tmp_path / "pids"
    env = fake_env(
        {
            "FAKE_MUSUBI_MODE": "hang",
            "FAKE_MUSUBI_CHILD": "1",
            "FAKE_MUSUBI_PIDFILE": str(pid_file),
            "FAKE_MUSUBI_LAUNCHER_PIDFILE": str(tmp_path / "launcher"),
            "FAKE_MUSUBI_IGNORE_TERM": "1" if ignore_term else "0",
        }
    )
    on_event, should_cancel = _cancel_after_step(3)
    t0 = time.monotonic()
    with pytest.raises(MusubiCancelled, match="process tree was killed") as info:
        run_command(
            train_argv(root, out),
            cwd=root,
            env=env,
            log_path=out / "train.log",
            on_event=on_event,
            should_cancel=should_cancel,
            grace_s=1.0,
        )
    assert "lora-000001.safetensors" not in str(info.value)  # hung before the first epoch ended
    pids = [int(p) for p in pid_file.read_text().split()] + [int((tmp_path / "launcher").read_text())]
    assert len(pids) == 3  # launcher, script, script's child
    deadline = t0 + 5.0
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.05)
    assert not [p for p in pids if pid_alive(p)], "processes of the run are still alive"
    assert time.monotonic() - t0 < 5.0
    assert "process tree was killed" in (out / "train.log").read_text()


class Interrupted(Exception):
    """Stands in for comfy.model_management.InterruptProcessingException."""


def test_exception_from_a_progress_callback_cancels_and_propagates(root, tmp_path):
    pid_file = tmp_path / "pids"
    env = fake_env({"FAKE_MUSUBI_MODE": "hang", "FAKE_MUSUBI_CHILD": "1", "FAKE_MUSUBI_PIDFILE": str(pid_file)})

    def on_event(ev, st):
        if st.step >= 2:
            raise Interrupted()

    with pytest.raises(Interrupted):
        run_command(train_argv(root, tmp_path / "out"), cwd=root, env=env, on_event=on_event, grace_s=1.0)
    pids = [int(p) for p in pid_file.read_text().split()]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.05)
    assert not any(pid_alive(p) for p in pids)


def test_cancel_keeps_saved_checkpoints_and_names_them(root, tmp_path):
    out = tmp_path / "out"
    env = fake_env({"FAKE_MUSUBI_MODE": "hang", "FAKE_MUSUBI_STEPS_PER_EPOCH": "1"})
    with pytest.raises(MusubiCancelled) as info:
        run_command(
            train_argv(root, out), cwd=root, env=env, should_cancel=lambda: (out / "lora-000002.safetensors").exists()
        )
    assert (out / "lora-000001.safetensors").exists()
    assert "lora-000001.safetensors" in str(info.value)


def test_leftover_children_of_a_finished_run_are_reaped(tmp_path):
    code = (
        "import subprocess,sys; p=subprocess.Popen([sys.executable,'-c','import time; time.sleep(60)']); print(p.pid)"
    )
    lines = []
    run_command([sys.executable, "-c", code], cwd=tmp_path, on_line=lines.append, grace_s=1.0)
    child = int(lines[0])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and pid_alive(child):
        time.sleep(0.05)
    assert not pid_alive(child)


def test_group_alive_sees_a_running_group():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        assert group_alive(proc.pid)
    finally:
        runner.kill_process_tree(proc, grace_s=1.0)
    assert not group_alive(proc.pid)


def test_windows_kill_sequence_is_ctrl_break_then_taskkill_tree(monkeypatch):
    """The Windows branch, exercised with a stand-in process (this CI runs on Linux)."""
    import signal

    calls = []

    class FakeProc:
        pid = 4242

        def poll(self):
            return None

        def send_signal(self, sig):
            calls.append(("signal", sig))

        def wait(self, timeout=None):
            calls.append(("wait", timeout))
            raise subprocess.TimeoutExpired("x", timeout)

    monkeypatch.setattr(signal, "CTRL_BREAK_EVENT", 1, raising=False)
    monkeypatch.setattr(runner.subprocess, "run", lambda argv, **kw: calls.append(("run", argv)))
    runner._kill_tree_windows(FakeProc(), grace_s=0.5)
    assert calls[0] == ("signal", 1) and calls[1] == ("wait", 0.5)
    assert ("run", ["taskkill", "/T", "/F", "/PID", "4242"]) in calls
