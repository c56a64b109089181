"""Monitor nodes: the loss curve of a run and the GPUs' state."""

from __future__ import annotations

from comfy_api.latest import io

from ...musubi import env, monitor
from .images import to_image
from .widgets import boolean, integer, string


class TrainingMonitor(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MusubiTuner_TrainingMonitor",
            display_name="Musubi Training Monitor",
            category="MusubiTuner/monitor",
            description="Plots the loss curve from a training log (avr_loss per step), or, with tensorboard_dir, the "
            "per-step scalars (loss/current, loss/average, lr/*) of the newest TensorBoard run there (needs the "
            "tensorboard package); loss/epoch goes to the summary.",
            not_idempotent=True,
            inputs=[
                string("log_path", "A trainer's log_path output (<name>_train.log)."),
                string(
                    "tensorboard_dir",
                    "Optional: <output_dir>/logs of a run with log_tensorboard (needs the tensorboard package). "
                    "Several runs there: the newest is plotted.",
                    advanced=True,
                ),
                integer("width", "Plot width in pixels.", 768, 128, 4096),
                integer("height", "Plot height in pixels.", 384, 128, 4096),
            ],
            outputs=[
                io.Image.Output(display_name="plot", tooltip="The curves as an image."),
                io.String.Output(display_name="summary", tooltip="Last values."),
            ],
        )

    @classmethod
    def execute(cls, log_path, tensorboard_dir, width, height):
        import numpy as np

        notes = []
        if tensorboard_dir.strip():
            tb = monitor.read_tensorboard(env.native_path(tensorboard_dir))
            series, per_epoch = monitor.split_epoch_series(tb.series)
            if len(tb.runs) > 1:
                notes.append(f"run {tb.run} (the newest of {len(tb.runs)} under {tensorboard_dir.strip()})")
            # musubi logs these at step = epoch number, not on the optimizer-step axis of the plot
            notes += [f"{k}: last {v[-1][1]:.5g} at epoch {v[-1][0]}" for k, v in per_epoch.items() if v]
        else:
            series = {"avr_loss": monitor.loss_from_log(env.native_path(log_path))}
        img = monitor.plot_series(series, width, height)
        summary = "\n".join(
            [f"{k}: {len(v)} points, last {v[-1][1]:.5g} at step {v[-1][0]}" for k, v in series.items() if v] + notes
        )
        return io.NodeOutput(to_image(img[np.newaxis]), summary or "no data yet")


class ResourceMonitor(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MusubiTuner_ResourceMonitor",
            display_name="Musubi Resource Monitor",
            category="MusubiTuner/monitor",
            description="GPU memory, utilisation, temperature and per-process memory from nvidia-smi.",
            not_idempotent=True,
            is_output_node=True,
            inputs=[
                boolean("fail_without_nvidia_smi", "Error (instead of a message) when nvidia-smi is missing.", False)
            ],
            outputs=[io.String.Output(display_name="report", tooltip="One line per GPU and per process.")],
        )

    @classmethod
    def execute(cls, fail_without_nvidia_smi):
        try:
            gpus, procs = monitor.nvidia_smi()
        except ValueError as exc:
            if fail_without_nvidia_smi:
                raise
            return io.NodeOutput(str(exc), ui={"text": [str(exc)]})
        report = monitor.format_status(gpus, procs)
        return io.NodeOutput(report, ui={"text": [report]})
