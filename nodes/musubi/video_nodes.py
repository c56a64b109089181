"""Video file nodes: load a video as frames, save frames as a video."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from comfy_api.latest import io

from ...musubi import env, media
from ...torch_utils import check_file_name
from .images import to_image, to_numpy
from .paths import output_directory, output_folder
from .widgets import check_finite, choice, integer, number, string


class VideoInput(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MusubiTuner_VideoInput",
            display_name="Musubi Video Input",
            category="MusubiTuner/video",
            description="Loads a video file into frames. GIF/WebP need nothing extra; MP4/WebM/MOV need PyAV.",
            inputs=[
                string("video_path", "Video file path."),
                integer("frame_stride", "Keep every n-th frame.", 1, 1, 1000),
                integer("max_frames", "Most frames kept (after the stride); 0 = all.", 0, 0, 100000),
                integer("start_frame", "First frame index.", 0, 0, 10_000_000),
            ],
            outputs=[
                io.Image.Output(display_name="frames", tooltip="Frames as an IMAGE batch."),
                io.Float.Output(display_name="fps", tooltip="Frame rate after the stride (0 if unknown)."),
                io.Int.Output(display_name="frame_count", tooltip="Number of frames returned."),
            ],
        )

    @classmethod
    def execute(cls, video_path, frame_stride, max_frames, start_frame):
        frames, fps = media.read_video(env.native_path(video_path), frame_stride, max_frames, start_frame, "video_path")
        return io.NodeOutput(to_image(frames), float(fps), int(frames.shape[0]))


class VideoOutput(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MusubiTuner_VideoOutput",
            display_name="Musubi Video Output",
            category="MusubiTuner/video",
            description="Saves frames as animated WebP or GIF (Pillow only) or MP4/WebM (needs PyAV) in the output folder.",
            is_output_node=True,
            inputs=[
                io.Image.Input("frames", tooltip="Frames to save."),
                number("fps", "Frames per second.", 16.0, 0.1, 240.0),
                choice("format", "webp and gif work without ffmpeg/PyAV.", media.VIDEO_FORMATS),
                integer("quality", "Quality 1-100 (webp 100 = lossless).", 90, 1, 100),
                string("filename_prefix", "File name prefix in the output folder.", "musubi/video"),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="The saved file.")],
        )

    @classmethod
    def execute(cls, frames, fps, format, quality, filename_prefix):
        check_finite(cls, fps=fps)
        prefix = check_file_name(filename_prefix or "musubi/video", "filename_prefix", "musubi/video", subfolders=True)
        arr = media.frames_to_uint8(to_numpy(frames), "frames")
        out_dir = output_directory()
        stem = f"{prefix}_{time.strftime('%Y%m%d-%H%M%S')}_{uuid.uuid4().hex[:4]}"
        output_folder((out_dir / stem).parent, "filename_prefix")
        path = media.write_video(arr, out_dir / stem, fps, format, quality)
        rel = path.relative_to(out_dir)
        preview = {
            "filename": rel.name,
            "subfolder": rel.parent.as_posix() if rel.parent != Path(".") else "",
            "type": "output",
        }
        # ComfyUI's front end plays an output in a <video> element only when it is flagged animated and
        # is not .webp/.png (like core's SaveVideo); webp/gif animate in a plain <img>.
        ui = {"images": [preview], "animated": [format in ("mp4", "webm")]}
        return io.NodeOutput(str(path), ui=ui)
