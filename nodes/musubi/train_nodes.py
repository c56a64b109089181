"""Training nodes, built from the table in ``musubi/arch.py``: a Train LoRA node per architecture
and a Fine-Tune node per full fine-tuning script.

Every trainer shares the same inputs around the architecture's own (``ArchSpec.train_inputs`` or
``Trainer.inputs``: its model files and switches); the node maps those onto
:class:`musubi.commands.TrainJob` and runs ``accelerate launch <script>.py`` in musubi's venv.
Inputs added after the first release (resume, several machines) come last and are optional, so
saved workflows keep their widget values.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from comfy_api.latest import io

from ...musubi import arch as archs
from ...musubi import commands, configs, env, samples, table_commands
from .paths import checked_env, default_lora_dir, default_model_dir, output_folder, register_loras
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
    integer,
    string,
)

LATER_INPUTS = ("resume", "num_machines", "machine_rank", "main_process_ip", "main_process_port")


def later_inputs() -> list:
    """Optional inputs every trainer gained after the first release (appended: positional widget values)."""
    return [
        string(
            "resume",
            "State folder to continue from (<output_name>-state or a -step/-epoch -state folder, written with "
            "Training Config save_state); empty = start fresh.",
            optional=True,
            advanced=True,
        ),
        integer(
            "num_machines",
            "Machines the run spans (1 = this one). More than 1: start the same graph on every machine.",
            1,
            1,
            1024,
            optional=True,
            advanced=True,
        ),
        integer(
            "machine_rank", "This machine's number, 0 on the main machine.", 0, 0, 1023, optional=True, advanced=True
        ),  # fmt: skip
        string("main_process_ip", "Several machines: the main machine's IP address.", optional=True, advanced=True),
        integer(
            "main_process_port",
            "Several machines: the main machine's port; 0 = accelerate's default.",
            0,
            0,
            65535,
            optional=True,
            advanced=True,
        ),  # fmt: skip
    ]


def train_inputs(spec: archs.ArchSpec, rows: tuple[archs.NodeInput, ...], what: str, out_dir_tip: str) -> list:
    return [
        env_input(),
        DatasetT.Input("dataset", tooltip="Cached dataset (after Cache Latents and Cache Text Encoder)."),
        TrainingT.Input("training_config", optional=True, tooltip="Unplugged: TrainingConfig defaults."),
        OptimizerT.Input("optimizer_config", optional=True, tooltip="Unplugged: AdamW8bit, constant LR."),
        SamplingT.Input(
            "sampling_config", optional=True, tooltip="Sample prompts rendered during training, shown on this node."
        ),
        MemoryT.Input("memory_config", optional=True, tooltip="Overrides the memory settings of training_config."),
        string("dit", "Base DiT checkpoint path."),
        *(from_table(row) for row in rows),
        string("output_name", f"{what} file name without folder or extension.", f"my_{what.lower()}"),
        string("output_dir", out_dir_tip),
        string(
            "gpu_ids",
            "accelerate --gpu_ids: e.g. 0, or 0,1 for one process per GPU (multi-GPU); empty = default.",
            advanced=True,
        ),
        extra_args_input(),
        *later_inputs(),
    ]


def train_outputs(what: str) -> list:
    return [
        io.String.Output(display_name="lora_path", tooltip=f"The final {what} .safetensors."),
        io.String.Output(display_name="checkpoints", tooltip="Intermediate checkpoints, one path per line."),
        io.String.Output(display_name="log_path", tooltip="Full console log of the run."),
    ]


class TrainLoRANode(io.ComfyNode):
    """Shared schema and run of the training nodes; :func:`train_node` / :func:`finetune_node` make one each."""

    ARCH = ""
    NODE_ID = ""
    TRAINER = ""  # "" = the architecture's LoRA trainer, else a Trainer.function (FineTune)

    @classmethod
    def rows(cls) -> tuple[archs.NodeInput, ...]:
        spec = archs.ARCHS[cls.ARCH]
        return table_commands.trainer_of(spec, cls.TRAINER).inputs if cls.TRAINER else spec.train_inputs

    @classmethod
    def define_schema(cls):
        spec = archs.ARCHS[cls.ARCH]
        if cls.TRAINER:
            trainer = table_commands.trainer_of(spec, cls.TRAINER)
            display, description, what = f"Musubi Fine-Tune ({spec.label})", trainer.description, "model"
            tip = "Folder for the model; empty = models/diffusion_models/musubi."
        else:
            display, description, what = f"Musubi Train LoRA ({spec.label})", spec.train_description, "LoRA"
            tip = "Folder for the LoRA; empty = models/loras/musubi (shows up in LoRA loaders)."
        outputs = train_outputs(what)
        if cls.TRAINER:
            outputs[0] = io.String.Output(display_name="model_path", tooltip="The fine-tuned DiT .safetensors.")
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name=display,
            category="MusubiTuner/train",
            description=description
            + " Queued again with unchanged inputs and data, the finished run is reused. Samples (sampling_config) "
            "appear on the node as they are rendered.",
            is_output_node=True,
            hidden=[io.Hidden.unique_id],
            inputs=train_inputs(spec, cls.rows(), what, tip),
            outputs=outputs,
        )

    @classmethod
    def execute(cls, dataset, dit, output_name, output_dir, gpu_ids, extra_args, musubi_env=None,
                training_config=None, optimizer_config=None, sampling_config=None, memory_config=None,
                resume="", num_machines=1, machine_rank=0, main_process_ip="", main_process_port=0,
                **arch_values):  # fmt: skip
        spec = archs.ARCHS[cls.ARCH]
        script = table_commands.trainer_of(spec, cls.TRAINER).script if cls.TRAINER else spec.train
        e = checked_env(musubi_env, (script,), accelerate=True)
        values = {row: arch_values.get(row.name, row.default) for row in cls.rows()}
        settings = {row.field: v for row, v in values.items() if row.role == "job"}
        # errors name the input (t5, clip), TrainModels gets the field (text_encoder1, image_encoder)
        models = {row.name: v for row, v in values.items() if row.role in ("model", "flag") and row.kind == "path"}
        checked = commands.require_paths({"dit": dit, **models}, optional=tuple(models))  # all but dit are optional
        fields = {row.name: row.field for row in values if row.role == "model"}
        paths = {fields.get(name, name): p for name, p in checked.items() if name == "dit" or name in fields}
        flags = tuple((row.field, checked.get(row.name, v)) for row, v in values.items() if row.role == "flag")
        name = env.check_output_name(output_name)  # musubi names samples <output_name>_...
        if sampling_config is not None:
            sampling_config.validate()
        if resume.strip() and not os.path.isdir(env.native_path(resume)):
            raise ValueError(
                f"resume: {resume!r} is not a folder: give a state folder a run saved with save_state "
                "(e.g. <output_dir>/<output_name>-state), or leave it empty"
            )
        default = default_model_dir if cls.TRAINER else default_lora_dir
        folder = Path(env.native_path(output_dir)) if output_dir.strip() else default()
        out_dir = output_folder(folder, "output_dir")
        training = training_config or configs.TrainingConfig()
        if cls.TRAINER and training_config is None:
            training = dataclasses.replace(training, learning_rate=table_commands.FINETUNE_LEARNING_RATE)
        launch = env.Launch(gpu_ids.strip(), num_machines, machine_rank, main_process_ip.strip(), main_process_port)
        job = commands.TrainJob(
            arch=cls.ARCH, models=commands.TrainModels(**paths), dataset_config=dataset["toml"],
            output_dir=str(out_dir), output_name=output_name, training=training,
            optimizer=optimizer_config or configs.OptimizerConfig(), sampling=sampling_config, memory=memory_config,
            gpu_ids=gpu_ids.strip(), extra=extra_args, resume=env.native_path(resume), launch=launch, flags=flags,
            trainer=cls.TRAINER, **settings,
        )  # fmt: skip
        prompt_file = sampling_config.write_prompt_file(job.prompt_file) if sampling_config else None
        argv = table_commands.build_train_argv(e, job, prompt_file)
        if not cls.TRAINER:
            register_loras(out_dir)
        watch = samples.SampleWatch(samples.sample_folder(out_dir), name) if prompt_file else None
        kind = "full fine-tuning" if cls.TRAINER else "LoRA training"
        result = run(
            argv, e, node_id=cls.hidden.unique_id, log_path=job.log_path, expected=[job.final_path],
            what=f"{spec.label} {kind}", samples=watch,
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


def train_node(arch: str, node_id: str, trainer: str = "") -> type[TrainLoRANode]:
    """The training node class of ``arch`` (``trainer``: e.g. FineTune); its ``node_id`` is frozen."""
    name = node_id.removeprefix("MusubiTuner_").replace("_", "")
    attrs = {"ARCH": arch, "NODE_ID": node_id, "TRAINER": trainer, "__module__": __name__, "__qualname__": name}
    return type(name, (TrainLoRANode,), attrs)


TrainLoRAHunyuanVideo = train_node("hunyuan_video", node_id="MusubiTuner_TrainLoRA_HunyuanVideo")
TrainLoRAWan = train_node("wan", node_id="MusubiTuner_TrainLoRA_Wan")
TrainLoRAFramePack = train_node("framepack", node_id="MusubiTuner_TrainLoRA_FramePack")
TrainLoRAFluxKontext = train_node("flux_kontext", node_id="MusubiTuner_TrainLoRA_FluxKontext")
TrainLoRAQwenImage = train_node("qwen_image", node_id="MusubiTuner_TrainLoRA_QwenImage")
TrainLoRAZImage = train_node("zimage", node_id="MusubiTuner_TrainLoRA_ZImage")
TrainLoRAHunyuanVideo15 = train_node("hunyuan_video_1_5", node_id="MusubiTuner_TrainLoRA_HunyuanVideo15")
TrainLoRAFlux2 = train_node("flux_2", node_id="MusubiTuner_TrainLoRA_Flux2")
TrainLoRAKandinsky5 = train_node("kandinsky5", node_id="MusubiTuner_TrainLoRA_Kandinsky5")
TrainLoRAHiDreamO1 = train_node("hidream_o1", node_id="MusubiTuner_TrainLoRA_HiDreamO1")
TrainLoRAIdeogram4 = train_node("ideogram4", node_id="MusubiTuner_TrainLoRA_Ideogram4")
TrainLoRAKrea2 = train_node("krea2", node_id="MusubiTuner_TrainLoRA_Krea2")
FineTuneHunyuanVideo = train_node("hunyuan_video", node_id="MusubiTuner_FineTune_HunyuanVideo", trainer="FineTune")
FineTuneQwenImage = train_node("qwen_image", node_id="MusubiTuner_FineTune_QwenImage", trainer="FineTune")
FineTuneZImage = train_node("zimage", node_id="MusubiTuner_FineTune_ZImage", trainer="FineTune")
FineTuneHiDreamO1 = train_node("hidream_o1", node_id="MusubiTuner_FineTune_HiDreamO1", trainer="FineTune")

TRAIN_NODES = [
    TrainLoRAHunyuanVideo, TrainLoRAWan, TrainLoRAFramePack, TrainLoRAFluxKontext, TrainLoRAQwenImage,
    TrainLoRAZImage, TrainLoRAHunyuanVideo15, TrainLoRAFlux2, TrainLoRAKandinsky5, TrainLoRAHiDreamO1,
    TrainLoRAIdeogram4, TrainLoRAKrea2,
]  # fmt: skip
FINETUNE_NODES = [FineTuneHunyuanVideo, FineTuneQwenImage, FineTuneZImage, FineTuneHiDreamO1]
