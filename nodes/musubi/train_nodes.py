"""Train LoRA nodes, one per trainable architecture, built from the table in ``musubi/arch.py``.

Every trainer shares the same inputs around the architecture's own (``ArchSpec.train_inputs``:
its model files and switches); the node maps those onto :class:`musubi.commands.TrainJob` and
runs ``accelerate launch <arch>_train_network.py`` in musubi's venv.
"""

from __future__ import annotations

import os
from pathlib import Path

from comfy_api.latest import io

from ...musubi import arch as archs
from ...musubi import commands, configs, env
from .paths import checked_env, default_lora_dir, output_folder, register_loras
from .running import run
from .widgets import (
    DatasetT,
    MemoryT,
    OptimizerT,
    SamplingT,
    TrainingT,
    env_input,
    extra_args_input,
    from_table,
    string,
)


def train_inputs(spec: archs.ArchSpec) -> list:
    return [
        env_input(),
        DatasetT.Input("dataset", tooltip="Cached dataset (after Cache Latents and Cache Text Encoder)."),
        TrainingT.Input("training_config", optional=True, tooltip="Unplugged: TrainingConfig defaults."),
        OptimizerT.Input("optimizer_config", optional=True, tooltip="Unplugged: AdamW8bit, constant LR."),
        SamplingT.Input("sampling_config", optional=True, tooltip="Sample videos during training."),
        MemoryT.Input("memory_config", optional=True, tooltip="Overrides the memory settings of training_config."),
        string("dit", "Base DiT checkpoint path."),
        *(from_table(row) for row in spec.train_inputs),
        string("output_name", "LoRA file name without folder or extension.", "my_lora"),
        string("output_dir", "Folder for the LoRA; empty = models/loras/musubi (shows up in LoRA loaders)."),
        string("gpu_ids", "accelerate --gpu_ids, e.g. 0 or 1; empty = default.", advanced=True),
        extra_args_input(),
    ]


def train_outputs() -> list:
    return [
        io.String.Output(display_name="lora_path", tooltip="The final LoRA .safetensors."),
        io.String.Output(display_name="checkpoints", tooltip="Intermediate checkpoints, one path per line."),
        io.String.Output(display_name="log_path", tooltip="Full console log of the run."),
    ]


class TrainLoRANode(io.ComfyNode):
    """Shared schema and run of the Train LoRA nodes; :func:`train_node` makes one per architecture."""

    ARCH = ""
    NODE_ID = ""

    @classmethod
    def define_schema(cls):
        spec = archs.ARCHS[cls.ARCH]
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name=f"Musubi Train LoRA ({spec.label})",
            category="MusubiTuner/train",
            description=spec.train_description,
            is_output_node=True,
            hidden=[io.Hidden.unique_id],
            inputs=train_inputs(spec),
            outputs=train_outputs(),
        )

    @classmethod
    def execute(cls, dataset, dit, output_name, output_dir, gpu_ids, extra_args, musubi_env=None,
                training_config=None, optimizer_config=None, sampling_config=None, memory_config=None,
                **arch_values):  # fmt: skip
        spec = archs.ARCHS[cls.ARCH]
        e = checked_env(musubi_env, (spec.train,), accelerate=True)
        values = {row: arch_values.get(row.name, row.default) for row in spec.train_inputs}
        settings = {row.field: v for row, v in values.items() if row.role == "job"}
        # errors name the input (t5, clip), TrainModels gets the field (text_encoder1, image_encoder)
        models = {row.name: v for row, v in values.items() if row.role == "model"}
        fields = {row.name: row.field for row in values if row.role == "model"}
        checked = commands.require_paths({"dit": dit, **models}, optional=tuple(models))
        paths = {fields.get(name, name): path for name, path in checked.items()}
        env.check_output_name(output_name)
        if sampling_config is not None:
            sampling_config.validate()
        folder = Path(env.native_path(output_dir)) if output_dir.strip() else default_lora_dir()
        out_dir = output_folder(folder, "output_dir")
        job = commands.TrainJob(
            arch=cls.ARCH,
            models=commands.TrainModels(**paths),
            dataset_config=dataset["toml"],
            output_dir=str(out_dir),
            output_name=output_name,
            training=training_config or configs.TrainingConfig(),
            optimizer=optimizer_config or configs.OptimizerConfig(),
            sampling=sampling_config,
            memory=memory_config,
            gpu_ids=gpu_ids.strip(),
            extra=extra_args,
            **settings,
        )
        prompt_file = sampling_config.write_prompt_file(job.prompt_file) if sampling_config else None
        argv = commands.train_argv(e, job, prompt_file)
        register_loras(out_dir)
        result = run(
            argv, e, node_id=cls.hidden.unique_id, log_path=job.log_path, expected=[job.final_path],
            what=f"{spec.label} LoRA training",
        )  # fmt: skip
        ckpts = [p for p in result.state.kept_checkpoints if os.path.exists(p)]
        return io.NodeOutput(str(job.final_path), "\n".join(ckpts), str(job.log_path))

    @classmethod
    def fingerprint_inputs(cls, **kw):
        """Training is expensive: queueing the same inputs again reuses the finished run.

        The dataset object carries a signature of the data files, so new or edited files retrain;
        so does changing any input (e.g. seed or output_name). A failed run is never reused.
        """
        return f"{env.native_path(str(kw.get('output_dir', '')))}|{kw.get('output_name', '')}"


def train_node(arch: str, node_id: str) -> type[TrainLoRANode]:
    """The TrainLoRA node class of ``arch``; its ``node_id`` is frozen (saved workflows refer to it)."""
    name = node_id.removeprefix("MusubiTuner_").replace("_", "")
    return type(
        name, (TrainLoRANode,), {"ARCH": arch, "NODE_ID": node_id, "__module__": __name__, "__qualname__": name}
    )


TrainLoRAHunyuanVideo = train_node("hunyuan_video", node_id="MusubiTuner_TrainLoRA_HunyuanVideo")
TrainLoRAWan = train_node("wan", node_id="MusubiTuner_TrainLoRA_Wan")
TrainLoRAFramePack = train_node("framepack", node_id="MusubiTuner_TrainLoRA_FramePack")
