"""Fake musubi-tuner script: prints musubi's real output formats and writes its files.

Copied under each real script name (``wan_train_network.py``, ``cache_latents.py`` ...) into
a temporary ``src/musubi_tuner/`` by :func:`fake_musubi.fakeroot.make_fake_root`; the
behaviour follows the script name. Environment switches for the tests:

- ``FAKE_MUSUBI_MODE``: ``ok`` (default), ``fail`` (exit with ``FAKE_MUSUBI_EXIT`` after a
  traceback, default 1), ``no_output`` (exit 0 without the final file), ``hang`` (print a
  few steps, then sleep forever, ignoring SIGTERM when ``FAKE_MUSUBI_IGNORE_TERM=1``).
- ``FAKE_MUSUBI_CHILD=1``: spawn a sleeping child process (like dataloader workers).
- ``FAKE_MUSUBI_PIDFILE``: append this process's (and the child's) pid, one per line.
- ``FAKE_MUSUBI_STEPS_PER_EPOCH`` (default 4), ``FAKE_MUSUBI_STEP_SLEEP`` seconds (default 0).
- ``FAKE_MUSUBI_ARGV``: write the received argv (JSON) to this file.

Merge-only runs (``--save_merged_model`` on a generate script) follow musubi v0.3.4: the
file is written only on the ``--lycoris`` path (Wan, FramePack, Qwen-Image, Z-Image,
HunyuanVideo 1.5; without it they exit 0 having saved nothing), and Qwen-Image / Z-Image
crash after saving (their ``main()`` goes on into generation without a model).

Generation (``hv_`` / ``wan_`` / ``fpack_generate_video``) writes, for each ``--output_type``,
the files the real save code writes, under the same names: PNG frames only for ``images``
(and FramePack's ``latent_images``), a latent and an MP4 for ``both``; one-frame runs (Wan
``--video_length 1``, FramePack ``--one_frame_inference``) put their PNGs straight into
``--save_path``. tests/integration/test_musubi_real_outputs.py holds this against musubi's
own save functions. The other architectures' scripts write what theirs do (see
``generate_other``): ``<time>_<seed>_000.png`` in ``--save_path`` (FLUX.1 Kontext, FLUX.2,
Qwen-Image, Z-Image), a frame folder (HunyuanVideo 1.5), the ``--save_path`` file (HiDream-O1),
``ideogram4_00.png``, ``<time>_<seed>.png`` (Krea 2), or the ``--output`` MP4 plus its first frame
as PNG (Kandinsky 5).

Training with ``--sample_prompts`` writes a sample after each epoch (``--sample_every_n_epochs``)
and before the first step (``--sample_at_first``) into ``<output_dir>/sample/`` under musubi's
names: a PNG for the image architectures, an MP4 for the video ones.
"""

import argparse
import datetime
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time

SCRIPT = os.path.splitext(os.path.basename(sys.argv[0]))[0]
MODE = os.environ.get("FAKE_MUSUBI_MODE", "ok")


def out(text):
    """A stdout line, flushed (the real scripts use accelerator.print / logging)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def log_pid(pid):
    path = os.environ.get("FAKE_MUSUBI_PIDFILE")
    if path:
        with open(path, "a") as f:
            f.write(f"{pid}\n")


def write_safetensors(path, keys, metadata=None):
    """A tiny valid .safetensors file: every tensor F32 of shape [2, 2] (zeros)."""
    header, offset = {"__metadata__": metadata or {"ss_network_module": "networks.lora"}}, 0
    for key in keys:
        header[key] = {
            "dtype": "F32",
            "shape": [2, 2] if not key.endswith(".alpha") else [],
            "data_offsets": [offset, offset + (16 if not key.endswith(".alpha") else 4)],
        }
        offset = header[key]["data_offsets"][1]
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + b"\0" * offset)


LORA_KEYS = [
    f"lora_unet_blocks_0_self_attn_q.{suffix}" for suffix in ("lora_down.weight", "lora_up.weight", "alpha")
] + [f"lora_unet_blocks_0_ffn_0.{suffix}" for suffix in ("lora_down.weight", "lora_up.weight", "alpha")]


def tqdm_line(desc, n, total, postfix=""):
    pct = int(100 * n / total) if total else 0
    bar = "#" * (pct // 10) + " " * (10 - pct // 10)
    extra = f", {postfix}" if postfix else ""
    return f"{desc}: {pct:3d}%|{bar}| {n}/{total} [00:0{n % 10}<00:10,  1.44it/s{extra}]"


def maybe_child():
    if os.environ.get("FAKE_MUSUBI_CHILD") == "1":
        child = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(1)"])
        log_pid(child.pid)


def hang():
    if os.environ.get("FAKE_MUSUBI_IGNORE_TERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.stdout.write("waiting forever\n")
    sys.stdout.flush()
    while True:
        time.sleep(0.5)


def fail():
    sys.stderr.write('Traceback (most recent call last):\n  File "x.py", line 1, in <module>\n')
    sys.stderr.write("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n")
    sys.stderr.flush()
    sys.exit(int(os.environ.get("FAKE_MUSUBI_EXIT", "1")))


IMAGE_TRAINERS = ("flux_kontext", "flux_2", "qwen_image", "zimage", "hidream_o1", "ideogram4", "krea2")
"""Training scripts (by prefix) whose samples are single images (PNG); the others render videos (MP4)."""


def write_sample(args, tag, index=0):
    """trainer_base.sample_image_inference: <output_name>_<e000001|000012>_<NN>_<YYYYmmddHHMMSS>[_seed]."""
    folder = os.path.join(args.output_dir, "sample")
    os.makedirs(folder, exist_ok=True)
    name = f"{args.output_name}_{tag}_{index:02d}_{time.strftime('%Y%m%d%H%M%S')}_42"
    out("INFO:musubi_tuner.training.trainer_base:generating sample images")
    if SCRIPT.startswith(IMAGE_TRAINERS):
        from PIL import Image

        Image.new("RGB", (64, 48), (200, 80, 40)).save(os.path.join(folder, f"{name}_000.png"))
    else:
        save_video(os.path.join(folder, f"{name}.mp4"), 5, 64, 48, 16)


def train(args):
    epochs = args.max_train_epochs or 2
    sampling = args.sample_prompts is not None
    per_epoch = int(os.environ.get("FAKE_MUSUBI_STEPS_PER_EPOCH", "4"))
    total = epochs * per_epoch
    sleep = float(os.environ.get("FAKE_MUSUBI_STEP_SLEEP", "0"))
    out("INFO:musubi_tuner.training.trainer_base:running training / 学習開始")
    out(f"  total optimization steps / 学習ステップ数: {total}")
    name = os.path.join(args.output_dir, args.output_name)
    step, loss = 0, 0.5
    if sampling and args.sample_at_first:
        write_sample(args, f"{0:06d}")
    for epoch in range(1, epochs + 1):
        out(f"\nepoch {epoch}/{epochs}")
        for _ in range(per_epoch):
            step += 1
            loss *= 0.9
            sys.stderr.write("\r" + tqdm_line("steps", step, total, f"avr_loss={loss:.4f}"))
            sys.stderr.flush()
            if sleep:
                time.sleep(sleep)
            if MODE == "hang" and step >= 3:
                sys.stderr.write("\n")
                hang()
            if MODE == "fail" and step >= 3:
                sys.stderr.write("\n")
                fail()
        if args.save_every_n_epochs and epoch % args.save_every_n_epochs == 0 and epoch < epochs:
            ckpt = f"{name}-{epoch:06d}.safetensors"
            out(f"\nsaving checkpoint: {ckpt}")
            write_safetensors(ckpt, LORA_KEYS)
        if sampling and args.sample_every_n_epochs and epoch % args.sample_every_n_epochs == 0:
            write_sample(args, f"e{epoch:06d}")
    sys.stderr.write("\n")
    if MODE != "no_output":
        write_safetensors(f"{name}.safetensors", LORA_KEYS)
    sys.stderr.write("INFO:musubi_tuner.training.trainer_base:model saved.\n")
    sys.stderr.flush()


def cache(args):
    for i in range(1, 4):
        sys.stderr.write(f"\r{i}it [00:0{i},  2.00it/s]")
        sys.stderr.flush()
    sys.stderr.write("\n")
    if MODE == "hang":
        hang()
    if MODE == "fail":
        fail()


# --- generation: the files each generate script's save code writes (musubi v0.3.4) -----------
# tests/integration/test_musubi_real_outputs.py runs the real save code next to this one and
# compares the files, so a change in musubi (or here) fails there.

OUTPUT_TYPES = {
    "hv_generate_video": ("video", "images", "latent", "both"),
    "wan_generate_video": ("video", "images", "latent", "both", "latent_images"),
    "fpack_generate_video": ("video", "images", "latent", "both", "latent_images"),
    "hv_1_5_generate_video": ("video", "images", "latent", "both", "latent_images"),
    "flux_kontext_generate_image": ("images", "latent", "latent_images"),
    "flux_2_generate_image": ("images", "latent", "latent_images"),
    "qwen_image_generate_image": ("images", "latent", "latent_images"),
    "zimage_generate_image": ("images", "latent", "latent_images"),
}
"""Each generate script's ``--output_type`` choices (the first is the default); the others have none."""

DEFAULT_FPS = {"hv_generate_video": 24, "wan_generate_video": 16, "fpack_generate_video": 30}
IMAGE_GRID_SCRIPTS = ("flux_kontext_generate_image", "flux_2_generate_image", "qwen_image_generate_image",
                      "zimage_generate_image")  # fmt: skip
"""save_images with create_subdir=False: ``<save_path>/<time>_<seed>_000.png``."""


def time_flag():
    """hv_generate_video.get_time_flag: local time to the millisecond."""
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")[:-3]


def framepack_frames(video_seconds, latent_window_size=9, one_frame=False):
    """About the frame count FramePack decodes: one 4 * window - 3 frame stretch per section."""
    if one_frame:
        return 1
    sections = max(round(video_seconds * 30 / (latent_window_size * 4)), 1)
    return sections * (latent_window_size * 4 - 3)


def save_latent(path, args, seed, height, width):
    """A safetensors file with one ``latent`` tensor and metadata, like the scripts' save_latent."""
    write_safetensors(path, ["latent"], {"seeds": str(seed), "prompt": str(args.prompt), "height": str(height),
                                         "width": str(width)})  # fmt: skip
    out(f"INFO:musubi_tuner:Latent saved to: {path}")


def save_video(path, frames, width, height, fps):
    """An MP4 (H.264 with PyAV when this interpreter has it, else just an MP4 header)."""
    try:
        import av
        import numpy as np
    except ImportError:
        with open(path, "wb") as f:
            f.write(b"\0\0\0\x18ftypmp42")
    else:
        with av.open(path, mode="w") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for i in range(frames):
                pixels = np.full((height, width, 3), (i * 40 % 256, 80, 160), np.uint8)
                container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
            container.mux(stream.encode())
    out(f"INFO:musubi_tuner:Video saved to: {path}")


def save_images(save_path, image_name, frames, width, height, subfolder=True):
    """hv_generate_video.save_images_grid: <save_path>/<name>/<name>_NNN.png (or flat)."""
    from PIL import Image

    folder = os.path.join(save_path, image_name) if subfolder else save_path
    os.makedirs(folder, exist_ok=True)
    for i in range(frames):
        Image.new("RGB", (width, height), (i * 40 % 256, 80, 160)).save(
            os.path.join(folder, f"{image_name}_{i:03d}.png")
        )
    out(f"INFO:musubi_tuner:Sample images saved to: {save_path}/{image_name}")


def generate_other(args):
    """The save code of the generate scripts after the first three (musubi v0.3.4)."""
    seed = args.seed if args.seed is not None else random.randint(0, 2**32 - 1)
    from PIL import Image

    def png(path, width, height):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        Image.new("RGB", (width, height), (60, 120, 200)).save(path)
        out(f"INFO:musubi_tuner:Saved image: {path}")

    if SCRIPT in IMAGE_GRID_SCRIPTS:
        height, width = args.image_size or (256, 256)
        # save_output passes the empty original name on as "", which save_images turns into "_" (not Z-Image)
        name = f"{time_flag()}_{seed}" + ("" if SCRIPT == "zimage_generate_image" else "_")
        if args.output_type in ("latent", "latent_images"):
            save_latent(f"{args.save_path}/{time_flag()}_{seed}_latent.safetensors", args, seed, height, width)
        if args.output_type in ("images", "latent_images"):
            png(f"{args.save_path}/{name}_000.png", width, height)
    elif SCRIPT == "hv_1_5_generate_video":
        os.makedirs(args.save_path, exist_ok=True)
        height, width = args.video_size or (256, 256)
        frames, kind, name = args.video_length or 1, args.output_type, f"{time_flag()}_{seed}_"
        if kind in ("latent", "both", "latent_images"):
            save_latent(f"{args.save_path}/{time_flag()}_{seed}_latent.safetensors", args, seed, height, width)
        if kind in ("video", "both"):
            save_video(f"{args.save_path}/{name}.mp4", frames, width, height, args.fps or 24)
        elif kind == "images":
            save_images(args.save_path, name, frames, width, height, subfolder=frames > 1)
    elif SCRIPT == "kandinsky5_generate_video":
        width, height, frames = args.width or 512, args.height or 512, args.frames or 1
        if frames > 1:
            save_video(args.output, frames, width, height, 24)
            png(os.path.splitext(args.output)[0] + ".png", width, height)
        else:
            png(args.output, width, height)
    elif SCRIPT == "hidream_o1_generate_image":
        height, width = args.image_size or (2048, 2048)
        png(args.save_path, width, height)
    elif SCRIPT == "ideogram4_generate_image":
        height, width = args.image_size or (1024, 1024)
        single = os.path.splitext(args.save_path)[1]
        png(args.save_path if single else os.path.join(args.save_path, "ideogram4_00.png"), width, height)
    elif SCRIPT == "krea2_generate_image":
        stamp = time_flag()
        for i in range(args.num_images):
            png(os.path.join(args.save_path, f"{stamp}_{seed + i}.png"), args.width or 1024, args.height or 1024)
    else:
        sys.exit(f"fake musubi: no generation for {SCRIPT}")


def caption(args):
    """caption_images_by_qwen_vl: <image>.txt next to each image, or one JSONL file."""
    exts = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
    images = sorted(os.path.join(args.image_dir, f) for f in os.listdir(args.image_dir) if f.lower().endswith(exts))
    if args.output_format == "jsonl":
        with open(args.output_file, "w", encoding="utf-8") as f:
            for path in images:
                f.write(json.dumps({"image_path": path, "caption": "a fake caption"}) + "\n")
    else:
        for path in images:
            with open(os.path.splitext(path)[0] + ".txt", "w", encoding="utf-8") as f:
                f.write("a fake caption")


def generate(args):
    if SCRIPT not in DEFAULT_FPS:
        return generate_other(args)
    steps = args.infer_steps or 4
    for i in range(1, steps + 1):
        sys.stderr.write("\r" + tqdm_line("", i, steps))
        sys.stderr.flush()
    sys.stderr.write("\n")
    if MODE == "fail":
        fail()
    if MODE == "no_output":
        return
    height, width = args.video_size or (48, 64)
    seed = args.seed if args.seed is not None else random.randint(0, 2**32 - 1)
    kind, save = args.output_type, args.save_path
    fps = args.fps or DEFAULT_FPS[SCRIPT]
    os.makedirs(save, exist_ok=True)
    if SCRIPT == "hv_generate_video":
        # main() saves inline: "<time>_<batch index>_<seed>"
        frames, base = args.video_length or 129, f"{time_flag()}_0_{seed}"
        if kind in ("latent", "both"):
            save_latent(f"{save}/{base}_latent.safetensors", args, seed, height, width)
        if kind in ("video", "both"):
            save_video(f"{save}/{base}.mp4", frames, width, height, fps)
        elif kind == "images":
            save_images(save, base, frames, width, height)
        return
    # wan / fpack save_output: the empty original name still adds "_" to the video and image names
    if SCRIPT == "wan_generate_video":
        frames = args.video_length or 81
        one_frame, images = frames == 1, ("images",)
    else:
        one_frame = args.one_frame_inference is not None
        frames = framepack_frames(args.video_seconds, args.latent_window_size, one_frame)
        images = ("images", "latent_images")
    if kind in ("latent", "both", "latent_images"):
        save_latent(f"{save}/{time_flag()}_{seed}_latent.safetensors", args, seed, height, width)
    if kind in ("video", "both"):
        save_video(f"{save}/{time_flag()}_{seed}_.mp4", frames, width, height, fps)
    elif kind in images:
        save_images(save, f"{time_flag()}_{seed}_", frames, width, height, subfolder=not one_frame)


# generate scripts that save a merged DiT only through LyCORIS, and those that crash afterwards
MERGE_NEEDS_LYCORIS = (
    "wan_generate_video", "fpack_generate_video", "qwen_image_generate_image", "zimage_generate_image",
    "hv_1_5_generate_video",
)  # fmt: skip
MERGE_CRASHES_AFTER_SAVE = ("qwen_image_generate_image", "zimage_generate_image")


def merge_only(args):
    if args.from_file is not None:
        with open(args.from_file, encoding="utf-8") as f:
            if not [line for line in f if line.strip()]:
                sys.exit("fake musubi: the prompt file is empty")
    out("INFO:musubi_tuner:Loading text encoder")
    if MODE == "fail":
        fail()
    if SCRIPT in MERGE_NEEDS_LYCORIS and not args.lycoris:
        out("INFO:musubi_tuner:Loading DiT model")  # merged at load time, then nothing is saved
        return
    out(f"INFO:musubi_tuner:Saving merged model to {args.save_merged_model}")
    if MODE != "no_output":
        write_safetensors(args.save_merged_model, ["blocks.0.self_attn.q.weight"])
    out("INFO:musubi_tuner:Merged model saved")
    if SCRIPT in MERGE_CRASHES_AFTER_SAVE:
        sys.stderr.write("Traceback (most recent call last):\nTypeError: 'NoneType' object is not subscriptable\n")
        sys.exit(1)


def copy_file(src, dst):
    with open(src, "rb") as f:
        data = f.read()
    with open(dst, "wb") as f:
        f.write(data)


def main():
    argv_file = os.environ.get("FAKE_MUSUBI_ARGV")
    if argv_file:
        with open(argv_file, "w") as f:
            json.dump([SCRIPT, *sys.argv[1:]], f)
    log_pid(os.getpid())
    maybe_child()
    p = argparse.ArgumentParser()
    for flag in (
        "--output_dir",
        "--output_name",
        "--save_path",
        "--input",
        "--output",
        "--save_merged_model",
        "--output_file",
        "--from_file",
    ):
        p.add_argument(flag)
    p.add_argument("--lycoris", action="store_true")
    for flag in ("--max_train_epochs", "--save_every_n_epochs", "--infer_steps", "--video_length", "--seed", "--fps"):
        p.add_argument(flag, type=int)
    p.add_argument("--video_size", type=int, nargs=2)
    p.add_argument("--image_size", type=int, nargs=2)
    for flag in ("--width", "--height", "--frames", "--max_new_tokens", "--dim"):
        p.add_argument(flag, type=int)
    p.add_argument("--num-images", dest="num_images", type=int, default=1)
    for flag in ("--image_dir", "--output_format", "--save_to", "--sample_prompts"):
        p.add_argument(flag)
    p.add_argument("--sample_every_n_epochs", type=int)
    p.add_argument("--sample_at_first", action="store_true")
    types = OUTPUT_TYPES.get(SCRIPT)
    p.add_argument("--output_type", default=types[0] if types else "video", choices=types)
    p.add_argument("--prompt")
    p.add_argument("--video_seconds", type=float, default=5.0)
    p.add_argument("--latent_window_size", type=int, default=9)
    p.add_argument("--one_frame_inference")
    p.add_argument("--lora_weight", nargs="*")
    args, _ = p.parse_known_args()
    if SCRIPT.endswith(("train_network", "_train")):
        train(args)
    elif "cache" in SCRIPT:
        cache(args)
    elif "generate" in SCRIPT and args.save_merged_model:
        merge_only(args)
    elif "generate" in SCRIPT:
        generate(args)
    elif SCRIPT == "convert_lora":
        if MODE == "fail":
            fail()
        copy_file(args.input, args.output)
    elif SCRIPT == "merge_lora":
        write_safetensors(args.save_merged_model, ["blocks.0.self_attn.q.weight"])
    elif SCRIPT == "lora_post_hoc_ema":
        write_safetensors(args.output_file, LORA_KEYS)
    elif SCRIPT == "caption_images_by_qwen_vl":
        caption(args)
    elif SCRIPT == "qwen_extract_lora":
        write_safetensors(args.save_to, LORA_KEYS)
    else:
        sys.exit(f"fake musubi: unknown script {SCRIPT}")


if __name__ == "__main__":
    main()
