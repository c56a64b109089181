"""Start a real headless ComfyUI with this pack loaded, and talk to it over HTTP.

Used by the integration tier only. The server runs on CPU from the checkout named by
``COMFYUI_ROOT``, with every writable folder (input, output, models, database) in a
temporary directory, and the pack made visible through ``--extra-model-paths-config``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PACK_DIR_NAME = "ComfyUI-SpeedKit"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ComfyServer:
    """A running ComfyUI process and the folders it writes to."""

    root: Path
    work: Path
    port: int
    process: subprocess.Popen | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.base = self.work / "base"
        self.input_dir = self.base / "input"
        self.output_dir = self.base / "output"
        self.models_dir = self.base / "models"
        self.custom_nodes = self.work / "custom_nodes"
        self.log_path = self.work / "comfyui.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 240.0) -> None:
        for d in (self.input_dir, self.output_dir, self.models_dir, self.custom_nodes, self.base / "custom_nodes"):
            d.mkdir(parents=True, exist_ok=True)
        link = self.custom_nodes / PACK_DIR_NAME
        if not link.exists():
            link.symlink_to(REPO_ROOT, target_is_directory=True)
        config = self.work / "extra_model_paths.yaml"
        config.write_text(f"speedkit_tests:\n    custom_nodes: {self.custom_nodes}\n")
        python = os.environ.get("COMFYUI_PYTHON", sys.executable)
        cmd = [
            python,
            "main.py",
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-api-nodes",
            "--base-directory",
            str(self.base),
            "--database-url",
            f"sqlite:///{self.work / 'comfyui.db'}",
            "--extra-model-paths-config",
            str(config),
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                cmd, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.process.returncode}:\n{self.log_text()[-4000:]}")
            try:
                self.get("/system_stats", timeout=2)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {timeout} s:\n{self.log_text()[-4000:]}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path: str, timeout: float = 30) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path: str, payload: dict, timeout: float = 30) -> dict:
        req = urllib.request.Request(
            self.url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
                return json.loads(body) if body.strip() else {}
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"POST {path} -> HTTP {exc.code}: {exc.read().decode(errors='replace')}") from exc

    def object_info(self) -> dict:
        return self.get("/object_info", timeout=120)

    def run_prompt(self, prompt: dict, timeout: float = 600) -> dict:
        """Queue an API-format prompt, wait until it finishes, return its history entry.

        Raises ``RuntimeError`` with ComfyUI's error message if execution failed.
        """
        answer = self.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
        prompt_id = answer["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if (
                entry
                and entry.get("status", {}).get("completed") is not None
                and (entry["status"].get("completed") or entry["status"].get("status_str") == "error")
            ):
                if entry["status"].get("status_str") == "error":
                    raise RuntimeError(f"prompt failed: {json.dumps(entry['status'].get('messages'))[-20000:]}")
                return entry
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s")

    def interrupt(self) -> None:
        self.post("/interrupt", {})

    def pack_nodes(self, info: dict) -> dict:
        """The object_info entries that this pack registered."""
        return {k: v for k, v in info.items() if PACK_DIR_NAME in str(v.get("python_module", ""))}
