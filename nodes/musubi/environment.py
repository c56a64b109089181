"""The Musubi Tuner Environment node: where musubi-tuner and its venv are."""

from __future__ import annotations

from comfy_api.latest import io

from ...musubi import env
from .paths import config_path
from .widgets import MusubiEnvT, boolean, string


class Environment(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MusubiTuner_Environment",
            display_name="Musubi Tuner Environment",
            category="MusubiTuner/setup",
            description=(
                "Where musubi-tuner is: its checkout folder and its venv's Python (musubi runs there, never inside "
                "ComfyUI). Checked on run: the folder, the interpreter, the scripts and accelerate. Empty fields fall "
                "back to <ComfyUI user dir>/speedkit/musubi.toml (musubi_root, python, [env]) and MUSUBI_TUNER_ROOT / "
                "MUSUBI_TUNER_PYTHON."
            ),
            inputs=[
                string("musubi_root", "The musubi-tuner checkout folder (holds pyproject.toml and src/musubi_tuner)."),
                string(
                    "python",
                    "musubi's venv folder or its interpreter: <venv>\\Scripts\\python.exe (Windows) or <venv>/bin/python. "
                    "Empty: <musubi_root>/.venv or venv.",
                ),
                string(
                    "extra_env",
                    "Extra environment variables, one KEY=VALUE per line, e.g. CUDA_VISIBLE_DEVICES=0.",
                    multiline=True,
                ),
                boolean(
                    "check_accelerate", "Start the venv's Python once to check that accelerate is installed.", True
                ),
            ],
            outputs=[MusubiEnvT.Output(display_name="musubi_env", tooltip="Connect to every MusubiTuner node.")],
        )

    @classmethod
    def execute(cls, musubi_root, python, extra_env, check_accelerate=True):
        e = env.resolve_env(musubi_root, python, extra_env, config_path=config_path())
        env.validate_env(e, ("cache_latents",), check_accelerate=check_accelerate)
        return io.NodeOutput(e)
