"""Start a real headless ComfyUI with this pack loaded, and talk to it over HTTP.

Shared by the integration tier (CPU), the GPU server tier and the server benchmarks. The
server runs from the checkout named by ``COMFYUI_ROOT`` with every writable folder (input,
output, models, database) in a work directory and the pack made visible through
``--extra-model-paths-config``. On the CPU tier it gets ``--cpu``; on the GPU tier it starts
with ComfyUI's own defaults plus whatever flags a case names (``--highvram``, ...).

Bare GPU machines often lack two things ComfyUI imports but these tests never use: the
front-end package (replaced by a folder holding an ``index.html``, ``--front-end-root``) and
PyAV (replaced by an inert stand-in module on the server's ``PYTHONPATH``). Both are only
put in place when the real package is missing.

Timing comes from the server itself: ComfyUI stamps ``execution_start`` and
``execution_success`` (milliseconds) in the prompt's history entry.
"""

from __future__ import annotations

import importlib.util
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

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_DIR_NAME = "ComfyUI-SpeedKit"
PYAV_STAND_IN = '''"""Inert stand-in for PyAV (written by the SpeedKit test driver): ComfyUI imports it for
type annotations; no test or benchmark run here decodes or encodes video."""
import sys as _sys
import types as _types


class _Inert(_types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {"__module__": self.__name__})


for _name in ("container", "subtitles", "subtitles.stream", "video", "video.frame", "audio", "audio.frame"):
    _sys.modules.setdefault(__name__ + "." + _name, _Inert(__name__ + "." + _name))


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return type(name, (), {"__module__": __name__})
'''


def process_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (Linux ``/proc``)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PromptError(RuntimeError):
    """A prompt that ComfyUI rejected or that failed while executing; ``messages`` holds its status."""

    def __init__(self, text: str, messages: list | None = None) -> None:
        super().__init__(text)
        self.messages = messages or []


@dataclass
class ComfyServer:
    """A running ComfyUI process and the folders it writes to.

    ``cpu``: start with ``--cpu`` (the integration tier); otherwise on the default device with
    ComfyUI's defaults. ``extra_args``: further command-line flags. ``custom_nodes``: extra
    node folders linked beside the pack (test probes).
    """

    root: Path
    work: Path
    port: int
    cpu: bool = True
    extra_args: tuple[str, ...] = ()
    extra_nodes: tuple[Path, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None
    log_path: Path = field(init=False)
    _info: dict | None = field(default=None, init=False, repr=False)

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

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def _python(self) -> str:
        return os.environ.get("COMFYUI_PYTHON", sys.executable)

    def _stand_ins(self) -> tuple[list[str], list[str]]:
        """Extra arguments and PYTHONPATH entries replacing packages this machine lacks."""
        args: list[str] = []
        paths: list[str] = []
        same_python = self._python() == sys.executable
        if same_python and importlib.util.find_spec("comfyui_frontend_package") is None:
            front = self.work / "frontend"
            front.mkdir(parents=True, exist_ok=True)
            (front / "index.html").write_text("<!doctype html><title>ComfyUI (headless test server)</title>\n")
            args += ["--front-end-root", str(front)]
        if same_python and importlib.util.find_spec("av") is None:
            site = self.work / "stand_ins"
            (site / "av").mkdir(parents=True, exist_ok=True)
            (site / "av" / "__init__.py").write_text(PYAV_STAND_IN)
            paths.append(str(site))
        return args, paths

    def command(self) -> list[str]:
        """The command line the server is started with (without stand-ins)."""
        cmd = [self._python(), "main.py"]
        if self.cpu:
            cmd.append("--cpu")
        cmd += [
            "--listen", "127.0.0.1",
            "--port", str(self.port),
            "--disable-api-nodes",
            "--base-directory", str(self.base),
            "--database-url", f"sqlite:///{self.work / 'comfyui.db'}",
            "--extra-model-paths-config", str(self.work / "extra_model_paths.yaml"),
            *self.extra_args,
        ]  # fmt: skip
        return cmd

    def start(self, timeout: float = 240.0) -> None:
        for d in (self.input_dir, self.output_dir, self.models_dir, self.custom_nodes, self.base / "custom_nodes"):
            d.mkdir(parents=True, exist_ok=True)
        for target, name in [(REPO_ROOT, PACK_DIR_NAME), *((p, p.name) for p in self.extra_nodes)]:
            link = self.custom_nodes / name
            if not link.exists():
                link.symlink_to(target, target_is_directory=True)
        (self.work / "extra_model_paths.yaml").write_text(f"speedkit_tests:\n    custom_nodes: {self.custom_nodes}\n")
        stand_in_args, stand_in_paths = self._stand_ins()
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        if stand_in_paths:
            env["PYTHONPATH"] = os.pathsep.join([*stand_in_paths, *filter(None, [env.get("PYTHONPATH")])])
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command() + stand_in_args,
                cwd=self.root,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
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

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

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
            raise PromptError(f"POST {path} -> HTTP {exc.code}: {exc.read().decode(errors='replace')}") from exc

    def object_info(self) -> dict:
        return self.get("/object_info", timeout=120)

    def with_defaults(self, prompt: dict) -> dict:
        """``prompt`` with every widget input it leaves out set to the node's default, as the
        front end would send it (API prompts must name every required input)."""
        if self._info is None:
            self._info = self.object_info()
        out = {}
        for node_id, node in prompt.items():
            inputs = dict(node["inputs"])
            entry = self._info.get(node["class_type"])
            for name, kind, opts in widget_specs(entry) if entry else []:
                if kind != "EXTRA" and name not in inputs and "default" in opts:
                    inputs[name] = opts["default"]
                elif kind == "COMBO" and name not in inputs and opts.get("options"):
                    inputs[name] = opts["options"][0]
            out[node_id] = {**node, "inputs": inputs}
        return out

    def queue_prompt(self, prompt: dict, fill_defaults: bool = True) -> str:
        if fill_defaults:
            prompt = self.with_defaults(prompt)
        return self.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        """Wait for a queued prompt; return its history entry or raise :class:`PromptError`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            status = (entry or {}).get("status", {})
            if (
                entry
                and status.get("completed") is not None
                and (status.get("completed") or status.get("status_str") == "error")
            ):
                if status.get("status_str") == "error":
                    messages = status.get("messages") or []
                    raise PromptError(f"prompt failed: {json.dumps(messages)[-20000:]}", messages)
                return entry
            if not self.alive():
                raise PromptError(
                    f"ComfyUI died (exit code {self.process.returncode}) while running the prompt:\n"
                    + self.log_text()[-6000:]
                )
            time.sleep(0.05)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s")

    def run_prompt(self, prompt: dict, timeout: float = 600, fill_defaults: bool = True) -> dict:
        """Queue an API-format prompt, wait until it finishes, return its history entry.

        Widget inputs the prompt leaves out get their defaults (``fill_defaults``). Raises
        :class:`PromptError` with ComfyUI's error message if execution failed.
        """
        return self.wait(self.queue_prompt(prompt, fill_defaults), timeout)

    def interrupt(self) -> None:
        self.post("/interrupt", {})

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        """Ask ComfyUI to unload models and/or drop its execution cache (applied before the next prompt)."""
        self.post("/free", {"unload_models": unload_models, "free_memory": free_memory})

    def pack_nodes(self, info: dict) -> dict:
        """The object_info entries that this pack registered."""
        return {k: v for k, v in info.items() if PACK_DIR_NAME in str(v.get("python_module", ""))}


def execution_seconds(entry: dict) -> float:
    """Seconds from the server's ``execution_start`` to its ``execution_success`` message."""
    stamps = {event: data.get("timestamp") for event, data in entry["status"]["messages"]}
    if stamps.get("execution_start") is None or stamps.get("execution_success") is None:
        raise ValueError(f"no execution timestamps in {entry['status']['messages']}")
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000.0


def executed_nodes(entry: dict) -> list[str] | None:
    """Node ids ComfyUI reported as cached (so not run) for this prompt, or None if unknown."""
    for event, data in entry["status"]["messages"]:
        if event == "execution_cached":
            return list(data.get("nodes", []))
    return None


# ---------------------------------------------------------------------------------------
# Example workflows (the UI's graph format) -> API prompts
# ---------------------------------------------------------------------------------------
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def widget_inputs(info: dict, node: str, **values) -> dict:
    """Every widget input of ``node`` (from /object_info ``info``) at its default, overridden by ``values``."""
    out = {}
    for section in ("required", "optional"):
        for name, spec in info[node]["input"].get(section, {}).items():
            opts = spec[1] if len(spec) > 1 else {}
            if isinstance(spec[0], list):
                out[name] = opts.get("default", spec[0][0])
            elif spec[0] == "COMBO":
                out[name] = opts.get("default", opts.get("options", [None])[0])
            elif spec[0] in ("INT", "FLOAT", "STRING", "BOOLEAN") and "default" in opts:
                out[name] = opts["default"]
    out.update(values)
    return out


def widget_specs(entry: dict) -> list[tuple[str, str, dict]]:
    """(name, type, options) for each widget of a node, in the order of its ``widgets_values``.

    Widgets that the front end adds a companion value for (``control_after_generate``
    seeds, image upload buttons) are followed by an ``EXTRA`` placeholder.
    """
    specs = []
    order = entry.get("input_order", {})
    for section in ("required", "optional"):
        inputs = entry["input"].get(section, {})
        for name in order.get(section, list(inputs)):
            spec = inputs[name]
            kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
            if isinstance(kind, list):
                kind, opts = "COMBO", {**opts, "options": kind}
            elif kind == "COMBO":
                opts = {**opts, "options": opts.get("options", [])}
            if kind not in WIDGET_TYPES or opts.get("forceInput"):
                continue
            specs.append((name, kind, opts))
            if opts.get("control_after_generate") or opts.get("image_upload"):
                specs.append((name + ":extra", "EXTRA", {}))
    return specs


def workflow_to_prompt(workflow: dict, info: dict, overrides: dict[str, dict] | None = None) -> dict:
    """Turn a saved UI workflow into the API prompt the front end would queue.

    ``overrides`` maps a node type (or a node id as a string) to input values that replace
    the saved ones (e.g. fewer steps for a test run). Links become ``[source id, slot]``.
    """
    overrides = overrides or {}
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt: dict = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (2, 4):  # muted / bypassed nodes are not queued
            continue
        kind = node["type"]
        if kind not in info:
            raise KeyError(f"node type {kind} is not registered in this ComfyUI")
        inputs: dict = {}
        values = node.get("widgets_values") or []
        specs = widget_specs(info[kind])
        if isinstance(values, dict):
            inputs.update({k: v for k, v in values.items() if k in {s[0] for s in specs}})
        else:
            for (name, wkind, _), value in zip(specs, values, strict=False):
                if wkind != "EXTRA":
                    inputs[name] = value
        for slot in node.get("inputs", []):
            link = links.get(slot.get("link"))
            if link is not None:
                inputs[slot["name"]] = [str(link[1]), link[2]]
        inputs.update(overrides.get(kind, {}))
        inputs.update(overrides.get(str(node["id"]), {}))
        prompt[str(node["id"])] = {"class_type": kind, "inputs": inputs}
    return prompt
