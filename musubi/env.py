"""Where musubi-tuner lives: checkout, venv interpreter, extra environment variables.

musubi runs in its own venv (its pins - accelerate, diffusers, transformers - clash with
ComfyUI's), so every command starts that venv's Python. The settings come from the
Environment node or, when it is not wired, from a small config file / environment
variables, so a graph does not need the node everywhere.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..torch_utils import check_file_name
from . import tomlio

CONFIG_ENV_VAR = "SPEEDKIT_MUSUBI_CONFIG"
ROOT_ENV_VAR = "MUSUBI_TUNER_ROOT"
PYTHON_ENV_VAR = "MUSUBI_TUNER_PYTHON"
CONFIG_KEYS = ("musubi_root", "python", "env")
MIXED_PRECISIONS = ("bf16", "fp16", "no")


@dataclass(frozen=True)
class MusubiEnv:
    """A musubi-tuner checkout and the Python of its venv."""

    root: Path
    python: Path
    extra_env: Mapping[str, str] = field(default_factory=dict)

    @property
    def src_layout(self) -> bool:
        """v0.3.x keeps the scripts in ``src/musubi_tuner``; older checkouts at the root."""
        return (self.root / "src" / "musubi_tuner").is_dir()

    def script(self, name: str) -> Path:
        """Path of the script ``name`` (without ``.py``) in this checkout."""
        if self.src_layout:
            return self.root / "src" / "musubi_tuner" / f"{name}.py"
        return self.root / f"{name}.py"

    def run_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Extra environment for musubi's scripts: ``extra_env`` + ``src`` on PYTHONPATH.

        The scripts import ``musubi_tuner.*``; with ``src`` on the path they work even when the
        checkout was not ``pip install -e .``-ed into the venv.
        """
        base = os.environ if base is None else base
        env = dict(self.extra_env)
        paths = [str(self.root / "src")] if self.src_layout else [str(self.root)]
        for existing in (env.get("PYTHONPATH", ""), base.get("PYTHONPATH", "") if "PYTHONPATH" not in env else ""):
            paths += [p for p in existing.split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        return env

    def python_cmd(self, script: str) -> list[str]:
        """``[python, <script path>]`` for a plain (non-accelerate) script."""
        return [str(self.python), str(self.script(script))]

    def accelerate_cmd(
        self, script: str, mixed_precision: str = "bf16", gpu_ids: str = "", launch: Launch | None = None
    ) -> list[str]:
        """``python -m accelerate.commands.launch`` with every setting explicit.

        One process per listed GPU (one in all when ``gpu_ids`` names at most one) on the machines
        of ``launch``, so no ``accelerate config`` file is needed (and none a user made for another
        project is picked up for the values we pass).
        """
        if mixed_precision not in MIXED_PRECISIONS:
            raise ValueError(
                f"mixed_precision={mixed_precision!r} is not one of {MIXED_PRECISIONS}: pick bf16 (recommended), fp16 or no"
            )
        launch = launch or Launch(gpu_ids=gpu_ids)
        cmd = [str(self.python), "-m", "accelerate.commands.launch", *launch.process_args()]
        cmd += ["--mixed_precision", mixed_precision, "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1"]
        return cmd + launch.placement_args() + [str(self.script(script))]


@dataclass(frozen=True)
class Launch:
    """Where ``accelerate launch`` runs a training script: the GPUs of this machine and, for a run
    over several machines, how many, this one's rank and the main machine's address.

    The process count is the number of listed GPUs times the machine count (accelerate's
    ``--num_processes`` is the total over all machines); more than one process adds ``--multi_gpu``.
    """

    gpu_ids: str = ""
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str = ""
    main_process_port: int = 0

    def gpus(self) -> list[str]:
        """The listed GPU numbers ([] for none or ``all``)."""
        ids = check_gpu_ids(self.gpu_ids) if self.gpu_ids.strip() else ""
        return [] if ids in ("", "all") else ids.split(",")

    def check(self) -> None:
        if self.num_machines < 1:
            raise ValueError(f"num_machines={self.num_machines} must be >= 1 (1 = this machine only)")
        if self.num_machines == 1:
            return
        if not 0 <= self.machine_rank < self.num_machines:
            raise ValueError(
                f"machine_rank={self.machine_rank} must be 0..{self.num_machines - 1} (0 on the main machine)"
            )
        if not self.main_process_ip.strip():
            raise ValueError(
                f"main_process_ip is empty but num_machines={self.num_machines}: give the main machine's IP address "
                "(the same on every machine)"
            )
        if not re.fullmatch(r"[A-Za-z0-9.:\-\[\]]+", self.main_process_ip.strip()):
            raise ValueError(f"main_process_ip={self.main_process_ip!r} is not a host name or IP address")
        if not self.gpus():
            raise ValueError(
                f"gpu_ids={self.gpu_ids!r}: a run over {self.num_machines} machines needs this machine's GPUs listed, "
                "e.g. 0,1 (the process count is computed from them)"
            )
        if not 0 <= self.main_process_port <= 65535:
            raise ValueError(f"main_process_port={self.main_process_port} must be 0 (accelerate's default) .. 65535")

    def process_args(self) -> list[str]:
        """``--num_processes`` / ``--num_machines`` (and ``--multi_gpu`` for more than one process)."""
        self.check()
        processes = max(len(self.gpus()), 1) * self.num_machines
        multi = ["--multi_gpu"] if processes > 1 else []
        return [*multi, "--num_processes", str(processes), "--num_machines", str(self.num_machines)]

    def placement_args(self) -> list[str]:
        """``--gpu_ids`` and, over several machines, rank and main address."""
        a = ["--gpu_ids", check_gpu_ids(self.gpu_ids)] if self.gpu_ids.strip() else []
        if self.num_machines > 1:
            a += ["--machine_rank", str(self.machine_rank), "--main_process_ip", self.main_process_ip.strip()]
            if self.main_process_port:
                a += ["--main_process_port", str(self.main_process_port)]
        return a


def check_gpu_ids(gpu_ids: str) -> str:
    """accelerate's ``--gpu_ids``: GPU numbers separated by commas, or ``all``."""
    text = gpu_ids.strip().replace(" ", "")
    if text != "all" and not re.fullmatch(r"\d+(,\d+)*", text):
        raise ValueError(f"gpu_ids: {gpu_ids!r} must be GPU numbers separated by commas, e.g. 0 or 0,1 (or all)")
    return text


def venv_python(path: str | os.PathLike) -> Path:
    """The interpreter for ``path``: a python executable itself, or a venv folder.

    A venv holds ``Scripts\\python.exe`` on Windows and ``bin/python`` elsewhere; both are
    tried so a path typed on either system works.
    """
    p = Path(path).expanduser()
    if p.is_file():
        return p
    for rel in (("Scripts", "python.exe"), ("bin", "python"), ("bin", "python3")):
        candidate = p.joinpath(*rel)
        if candidate.is_file() or candidate.is_symlink():  # a broken link: validate_env says what broke
            return candidate
    return p


def parse_env_vars(text: str, name: str = "extra_env") -> dict[str, str]:
    """``KEY=VALUE`` lines (``#`` comments, blank lines ignored) -> dict."""
    env = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key or not key.replace("_", "").isalnum():
            raise ValueError(
                f"{name} line {number} {raw!r} is not KEY=VALUE: write one variable per line, "
                "e.g. CUDA_VISIBLE_DEVICES=0"
            )
        env[key] = value.strip()
    return env


def load_config_file(path: str | os.PathLike) -> dict:
    """Read the settings file (TOML or JSON): ``musubi_root``, ``python``, ``[env]``."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"musubi settings file {p} could not be read ({exc}): fix or delete it") from exc
    try:
        data = json.loads(text) if p.suffix.lower() == ".json" else tomlio.loads(text)
    except (ValueError, tomlio.TOMLError) as exc:
        raise ValueError(f"musubi settings file {p} could not be parsed: {exc}. Fix its syntax.") from exc
    if not isinstance(data, dict):
        raise ValueError(f"musubi settings file {p} must hold a table of settings ({list(CONFIG_KEYS)})")
    if unknown := sorted(set(data) - set(CONFIG_KEYS)):
        raise ValueError(f"musubi settings file {p}: unknown key(s) {unknown}; allowed keys are {list(CONFIG_KEYS)}")
    if "env" in data and not isinstance(data["env"], dict):
        raise ValueError(f"musubi settings file {p}: 'env' must be a table of NAME = \"value\" entries")
    return data


def resolve_env(
    musubi_root: str = "",
    python: str = "",
    extra_env: str | Mapping[str, str] = "",
    config_path: str | os.PathLike | None = None,
    environ: Mapping[str, str] | None = None,
) -> MusubiEnv:
    """Combine the node inputs with the settings file and environment variables.

    Priority: explicit inputs, then the settings file, then ``MUSUBI_TUNER_ROOT`` /
    ``MUSUBI_TUNER_PYTHON``. An empty ``python`` falls back to ``<root>/.venv`` or
    ``<root>/venv``. Nothing is checked here; see :func:`validate_env`.
    """
    environ = os.environ if environ is None else environ
    config: dict = {}
    if config_path and Path(config_path).is_file():
        config = load_config_file(config_path)
    root = musubi_root.strip() or str(config.get("musubi_root", "")) or environ.get(ROOT_ENV_VAR, "")
    if not root:
        raise ValueError(
            "musubi_root is empty: set the musubi-tuner checkout folder in MusubiTuner_Environment, "
            f'in the settings file ({config_path or "not found"}) as musubi_root = "...", '
            f"or in the {ROOT_ENV_VAR} environment variable"
        )
    root_path = Path(root).expanduser()
    py = python.strip() or str(config.get("python", "")) or environ.get(PYTHON_ENV_VAR, "")
    if py:
        py_path = venv_python(py)
    else:
        py_path = next(
            (venv_python(root_path / d) for d in (".venv", "venv") if venv_python(root_path / d).is_file()),
            root_path / ".venv" / ("Scripts/python.exe" if os.name == "nt" else "bin/python"),
        )
    env = {str(k): str(v) for k, v in config.get("env", {}).items()}
    env.update(parse_env_vars(extra_env) if isinstance(extra_env, str) else dict(extra_env))
    return MusubiEnv(root=root_path, python=py_path, extra_env=env)


INSTALL_HINTS = {
    "accelerate": "run `pip install -e .` in the musubi-tuner checkout (it installs accelerate)",
    "lycoris": "run `pip install lycoris-lora` (musubi's merge-only mode saves the merged DiT only through LyCORIS)",
}
"""How to install a module musubi's venv lacks, per module name."""


def validate_env(
    env: MusubiEnv, scripts: tuple[str, ...] = (), check_accelerate: bool = False, modules: tuple[str, ...] = ()
) -> None:
    """Raise a ``ValueError`` naming what is wrong and how to fix it.

    ``modules``: packages that must import in musubi's venv (``check_accelerate`` adds accelerate).
    """
    if env.root.is_file():
        raise ValueError(
            f"musubi_root: {str(env.root)!r} is a file, not a folder: give the musubi-tuner checkout folder that "
            "holds pyproject.toml and src/"
        )
    if not env.root.is_dir():
        raise ValueError(
            f"musubi_root {str(env.root)!r} is not a folder: clone it with "
            "`git clone https://github.com/kohya-ss/musubi-tuner` and give the path of that folder"
        )
    if not env.src_layout and not (env.root / "hv_train_network.py").is_file():
        raise ValueError(
            f"musubi_root {str(env.root)!r} is not a musubi-tuner checkout (no src/musubi_tuner folder): "
            "point it at the folder that holds pyproject.toml and src/"
        )
    _check_python(env.python)
    for name in scripts:
        if not env.script(name).is_file():
            raise ValueError(
                f"script {name}.py is missing from {str(env.root)!r}: this musubi-tuner checkout is too old or "
                "incomplete; update it with `git pull` (SpeedKit targets musubi-tuner v0.3.x)"
            )
    for module in (("accelerate",) if check_accelerate else ()) + tuple(modules):
        _require_module(env, module)


VENV_HELP = (
    "give musubi's venv folder or its interpreter (Windows: <venv>\\Scripts\\python.exe, Linux/macOS: "
    "<venv>/bin/python). Create the venv with `python -m venv .venv` in the checkout and `pip install -e .` there"
)


def _check_python(python: Path) -> None:
    """The interpreter must be a runnable file: say which of the usual venv breakages it is."""
    if python.is_dir():
        raise ValueError(
            f"python: {str(python)!r} is a folder without bin/python or Scripts\\python.exe, so not a usable venv: "
            f"{VENV_HELP}"
        )
    if python.is_symlink() and not python.exists():
        raise ValueError(
            f"python: {str(python)!r} is a broken link (the Python this venv was made from was moved or removed): "
            "recreate the venv with `python -m venv --clear .venv` in the checkout and `pip install -e .` there"
        )
    if not python.is_file():
        raise ValueError(f"python {str(python)!r} does not exist: {VENV_HELP}")
    if os.name != "nt" and not os.access(python, os.X_OK):
        raise ValueError(
            f"python: {str(python)!r} is not executable: give the venv's interpreter (<venv>/bin/python), or "
            "`chmod +x` it if it is one"
        )


def _require_module(env: MusubiEnv, module: str) -> None:
    try:
        proc = subprocess.run(
            [str(env.python), "-c", f"import {module}"],
            cwd=str(env.root),
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, **env.run_env()},
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ValueError(f"python {str(env.python)!r} could not be started: {exc}") from exc
    if proc.returncode != 0:
        hint = INSTALL_HINTS.get(module, f"run `pip install {module}`")
        raise ValueError(
            f"{module} is not installed in {str(env.python)!r}: activate musubi's venv and {hint} "
            f"(checkout {str(env.root)!r}). Python said: "
            f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}"
        )


def native_path(path: str | os.PathLike) -> str:
    """A user-typed path in this system's form (``~`` expanded, separators normalised)."""
    text = os.fspath(path).strip().strip('"')
    if not text:
        return ""
    return os.path.normpath(os.path.expanduser(text))


def check_output_name(name: str, input_name: str = "output_name") -> str:
    """A file name stem without folders (:func:`torch_utils.check_file_name`); a trailing
    ``.safetensors`` is dropped."""
    stem = check_file_name(name, input_name, "my_lora")
    if stem.lower().endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
    return stem
