"""ComfyUI adapter for musubi/: nodes that drive kohya-ss/musubi-tuner's CLI scripts.

musubi is never imported here: every node builds an argument list with
:mod:`speedkit.musubi.commands` and runs it in musubi's own venv through
:func:`speedkit.musubi.runner.run_command` (see :mod:`.running`), which streams progress into
ComfyUI's progress bar and the node's live log (``web/js/musubi.js``) and kills the process
tree on Cancel. The training and generate nodes are built per architecture from the table in
``musubi/arch.py``.

Modules: :mod:`.widgets` (input helpers), :mod:`.paths` (folders, outputs, change markers),
:mod:`.running` (run + progress + live log + training samples), :mod:`.images` (IMAGE <->
frames), and one module per group of nodes.
"""

from __future__ import annotations

from comfy_api.latest import io

from .cache_nodes import CacheLatents, CacheTextEncoder
from .config_nodes import MemoryOptimizer, OptimizerConfig, SamplingConfig, TrainingConfig
from .dataset_nodes import DatasetConfig, DatasetConfigLoader, DatasetViewer
from .environment import Environment
from .generate_nodes import BatchProcessor, GenerateVideoFramePack, GenerateVideoHunyuanVideo, GenerateVideoWan
from .image_nodes import GEN_NODES
from .lora_tools import ConvertLoRA, MergeLoRA, PostHocEMA
from .monitor_nodes import ResourceMonitor, TrainingMonitor
from .running import LOG_EVENT
from .tool_nodes import CaptionImages, ExtractLoRAQwenImage
from .train_nodes import FINETUNE_NODES, TRAIN_NODES, TrainLoRAFramePack, TrainLoRAHunyuanVideo, TrainLoRAWan
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
    # added later: every other architecture musubi-tuner v0.3.4 ships, full fine-tuning, helpers
    *TRAIN_NODES[3:],
    *GEN_NODES,
    *FINETUNE_NODES,
    CaptionImages,
    ExtractLoRAQwenImage,
]

__all__ = [
    "LOG_EVENT",
    "NODES",
    "BatchProcessor",
    "CacheLatents",
    "CaptionImages",
    "CacheTextEncoder",
    "ConvertLoRA",
    "DatasetConfig",
    "DatasetConfigLoader",
    "DatasetViewer",
    "Environment",
    "ExtractLoRAQwenImage",
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
