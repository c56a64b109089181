"""ComfyUI adapter for musubi/: nodes that drive kohya-ss/musubi-tuner's CLI scripts.

musubi is never imported here: every node builds an argument list with
:mod:`speedkit.musubi.commands` and runs it in musubi's own venv through
:func:`speedkit.musubi.runner.run_command` (see :mod:`.running`), which streams progress into
ComfyUI's progress bar and the node's live log (``web/js/musubi.js``) and kills the process
tree on Cancel. The Train LoRA and Generate Video nodes are built per architecture from the
table in ``musubi/arch.py``.

Modules: :mod:`.widgets` (input helpers), :mod:`.paths` (folders, outputs, change markers),
:mod:`.running` (run + progress + live log), :mod:`.images` (IMAGE <-> frames), and one
module per group of nodes.
"""

from __future__ import annotations

from comfy_api.latest import io

from .cache_nodes import CacheLatents, CacheTextEncoder
from .config_nodes import MemoryOptimizer, OptimizerConfig, SamplingConfig, TrainingConfig
from .dataset_nodes import DatasetConfig, DatasetConfigLoader, DatasetViewer
from .environment import Environment
from .generate_nodes import BatchProcessor, GenerateVideoFramePack, GenerateVideoHunyuanVideo, GenerateVideoWan
from .lora_tools import ConvertLoRA, MergeLoRA, PostHocEMA
from .monitor_nodes import ResourceMonitor, TrainingMonitor
from .running import LOG_EVENT
from .train_nodes import TrainLoRAFramePack, TrainLoRAHunyuanVideo, TrainLoRAWan
from .video_nodes import VideoInput, VideoOutput

NODES: list[type[io.ComfyNode]] = [
    Environment,
    DatasetConfig,
    DatasetConfigLoader,
    DatasetViewer,
    CacheLatents,
    CacheTextEncoder,
    TrainingConfig,
    OptimizerConfig,
    SamplingConfig,
    MemoryOptimizer,
    TrainLoRAHunyuanVideo,
    TrainLoRAWan,
    TrainLoRAFramePack,
    GenerateVideoHunyuanVideo,
    GenerateVideoWan,
    GenerateVideoFramePack,
    ConvertLoRA,
    MergeLoRA,
    PostHocEMA,
    VideoInput,
    VideoOutput,
    BatchProcessor,
    TrainingMonitor,
    ResourceMonitor,
]

__all__ = [
    "LOG_EVENT",
    "NODES",
    "BatchProcessor",
    "CacheLatents",
    "CacheTextEncoder",
    "ConvertLoRA",
    "DatasetConfig",
    "DatasetConfigLoader",
    "DatasetViewer",
    "Environment",
    "GenerateVideoFramePack",
    "GenerateVideoHunyuanVideo",
    "GenerateVideoWan",
    "MemoryOptimizer",
    "MergeLoRA",
    "OptimizerConfig",
    "PostHocEMA",
    "ResourceMonitor",
    "SamplingConfig",
    "TrainLoRAFramePack",
    "TrainLoRAHunyuanVideo",
    "TrainLoRAWan",
    "TrainingConfig",
    "TrainingMonitor",
    "VideoInput",
    "VideoOutput",
]
