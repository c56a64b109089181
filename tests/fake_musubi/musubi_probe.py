"""Check command lines and dataset configs with musubi-tuner's OWN code (integration tier).

Run as a separate process (never inside ComfyUI or pytest): ``python musubi_probe.py``
with a JSON request on stdin::

    {"root": "<musubi checkout>", "argv_checks": [{"script": "wan_train_network", "argv": [...]}],
     "dataset_checks": ["<toml path>", ...], "architecture": "wan",
     "accelerate_checks": [[...launch flags...]],
     "save_checks": [{"script": "wan_generate_video", "argv": [...], "frames": 5}],
     "keep_real": ["torch", ...]}

Each script's module is imported from the checkout and its ``main()`` is run with the
argv until its parser has parsed it (``ArgumentParser.parse_args`` is intercepted, so no
model is loaded). Packages missing from this interpreter (torch, transformers, ...) are
replaced by inert stubs, so the parser is musubi's real one even without its venv.
The answer (JSON on stdout) says, per check, ``ok`` or the parser's error message.

A save check runs a generate script's real save code (``save_output``, or the end of
hv_generate_video's ``main()``) on a stand-in decoded video and lists the files it wrote;
it needs real torch, torchvision, einops, PyAV, safetensors and Pillow (``keep_real`` keeps
those real when the rest is stubbed).
"""

import argparse
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import io
import json
import sys
import types


class _Stub:
    """Inert stand-in for anything from a missing package."""

    def __init__(self, name="stub"):
        self._name = name

    def __getattr__(self, key):
        if key.startswith("__") and key.endswith("__"):
            raise AttributeError(key)
        return _Stub(f"{self._name}.{key}")

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and not kwargs and isinstance(args[0], (types.FunctionType, type)):
            return args[0]  # used as a decorator
        return _Stub(self._name + "()")

    def __mro_entries__(self, bases):
        return ()  # `class X(stub.Module)` -> plain class

    def __iter__(self):
        return iter(())

    def __len__(self):
        return 0

    def __bool__(self):
        return False

    def __getitem__(self, key):
        return _Stub(self._name + "[]")

    def __or__(self, other):
        return self

    __ror__ = __or__
    __add__ = __radd__ = __sub__ = __mul__ = __rmul__ = __truediv__ = __or__

    def __lt__(self, other):
        return False

    __le__ = __gt__ = __ge__ = __lt__

    def __hash__(self):
        return id(self)

    def __repr__(self):
        return f"<stub {self._name}>"

    def __str__(self):
        return "0.0.0"


class _StubModule(types.ModuleType):
    def __getattr__(self, key):
        if key == "__version__":
            return "99.0.0"
        if key.startswith("__") and key.endswith("__"):
            raise AttributeError(key)
        return _Stub(f"{self.__name__}.{key}")


class _StubLoader(importlib.abc.Loader):
    def create_module(self, spec):
        mod = _StubModule(spec.name)
        mod.__path__ = []
        return mod

    def exec_module(self, module):
        pass


class _StubFinder(importlib.abc.MetaPathFinder):
    """Last on sys.meta_path: whatever no real finder found becomes a stub package."""

    def __init__(self, names):
        self.names = names
        self.stubbed = set()

    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top not in self.names:
            return None  # only what musubi itself imports; other optional imports stay missing
        self.stubbed.add(name.split(".")[0])
        return importlib.machinery.ModuleSpec(name, _StubLoader(), is_package=True)


def third_party_imports(package_dir, stub_all=False, keep_real=()):
    """Top-level names musubi's modules import that are neither stdlib nor musubi itself."""
    import ast
    import pathlib

    names = set()
    for path in pathlib.Path(package_dir).rglob("*.py"):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    skip = set(sys.stdlib_module_names) | set(sys.builtin_module_names) | {"musubi_tuner"}
    if stub_all:
        # Not musubi's venv: stub every heavy package (a half-matching mix of real torch /
        # transformers / accelerate versions breaks at import). Only the light schema libraries stay real.
        keep = {"voluptuous", "toml", *keep_real}
        return {n for n in names if n not in skip and (n not in keep or importlib.util.find_spec(n) is None)}
    return {n for n in names if n not in skip and importlib.util.find_spec(n) is None}


class _Parsed(Exception):
    pass


def check_argv(script, argv):
    """Run musubi's parser for ``script`` on ``argv``: None if accepted, else the error.

    Where the script has a module-level ``parse_args()`` (the generate scripts), that function
    runs to its end, so its checks after parsing (e.g. "Either --prompt, --from_file ... must
    be specified", "install lycoris") are musubi's verdict too; ``main()`` stops when it returns.
    """
    module = importlib.import_module(f"musubi_tuner.{script}")
    original = argparse.ArgumentParser.parse_args
    err = io.StringIO()
    result = {}
    wrapper_active = {"on": False}

    def parse_args(self, args=None, namespace=None):
        real_err, sys.stderr = sys.stderr, err
        try:
            ns = original(self, args, namespace)
        finally:
            sys.stderr = real_err
        result["namespace"] = {k: v for k, v in vars(ns).items() if isinstance(v, (str, int, float, bool, list))}
        if wrapper_active["on"]:
            return ns  # the module's parse_args() goes on with its own checks
        raise _Parsed()

    module_parse = getattr(module, "parse_args", None)
    if not isinstance(module_parse, types.FunctionType) or module_parse.__module__ != module.__name__:
        module_parse = None

    def module_parse_args(*args, **kwargs):
        wrapper_active["on"] = True
        try:
            module_parse(*args, **kwargs)
        finally:
            wrapper_active["on"] = False
        raise _Parsed()

    argparse.ArgumentParser.parse_args = parse_args
    if module_parse is not None:
        module.parse_args = module_parse_args
    old_argv = sys.argv
    sys.argv = [f"{script}.py", *argv]
    try:
        module.main()
        return {"ok": False, "error": "main() returned without parsing arguments"}
    except _Parsed:
        return {"ok": True, "namespace": result["namespace"], "validated": module_parse is not None}
    except SystemExit as exc:
        lines = err.getvalue().strip().splitlines()
        return {"ok": False, "error": lines[-1] if lines else f"SystemExit({exc.code})"}
    except (ValueError, AssertionError) as exc:
        if "namespace" not in result:
            raise
        return {"ok": False, "error": f"after parsing: {type(exc).__name__}: {exc}"}
    finally:
        argparse.ArgumentParser.parse_args = original
        if module_parse is not None:
            module.parse_args = module_parse
        sys.argv = old_argv


IMAGE_SAVE_OUTPUT = ("flux_kontext_generate_image", "flux_2_generate_image", "qwen_image_generate_image",
                     "zimage_generate_image")  # fmt: skip
"""Image scripts whose ``save_output(args, vae, latent, device)`` decodes and saves."""

HV_SAVE_START = "output_type"
"""hv_generate_video.py saves inside main(): from ``output_type = args.output_type`` to its end."""


def _hv_save_block(module):
    """hv_generate_video.main()'s save statements as a function of the names they read."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(module))
    main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
    start = next(
        i
        for i, node in enumerate(main.body)
        if isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == [HV_SAVE_START]
    )
    params = "args, latents, seeds, original_base_names, height, width, video_length, num_inference_steps, device"
    body = "\n".join(ast.unparse(node) for node in main.body[start:])
    source = f"def _save({params}):\n" + "\n".join("    " + line for line in body.splitlines())
    namespace = {}
    exec(compile(source, module.__file__, "exec"), module.__dict__, namespace)  # noqa: S102 - musubi's own code
    return namespace["_save"]


def _listing(folder):
    """Relative paths of the files under ``folder``; a .safetensors file with its tensor names."""
    import pathlib
    import struct

    out = []
    for path in sorted(pathlib.Path(folder).rglob("*")):
        if path.is_file():
            entry = {"path": path.relative_to(folder).as_posix(), "size": path.stat().st_size}
            if path.suffix == ".safetensors":
                with open(path, "rb") as f:
                    header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
                entry["tensors"] = sorted(k for k in header if k != "__metadata__")
            out.append(entry)
    return out


def check_save(script, argv, frames):
    """Run ``script``'s real save code for ``argv`` on a decoded video of ``frames`` frames.

    The model is never loaded: the decode function is replaced by one returning a grey video of
    the asked size; everything after it (file names, folders, formats) is musubi's code. Returns
    the files written under ``--save_path`` and the parser's ``--output_type`` choices.
    """
    import torch

    module = importlib.import_module(f"musubi_tuner.{script}")
    parsers = []
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        parsers.append(self)
        return original(self, args, namespace)

    old_argv, sys.argv = sys.argv, [f"{script}.py", *argv]
    argparse.ArgumentParser.parse_args = parse_args
    try:
        args = module.parse_args() if hasattr(module, "parse_args") else module.setup_parser().parse_args()
    finally:
        argparse.ArgumentParser.parse_args = original
        sys.argv = old_argv
    choices = next((a.choices for a in parsers[-1]._actions if a.dest == "output_type"), None) or []
    size = getattr(args, "video_size", None) or getattr(args, "image_size", None)
    height, width = size if size else (args.height, args.width)
    video = torch.zeros(3, frames, height, width)  # the scripts' decoders return [C, F, H, W]
    latent = torch.zeros(16, (frames - 1) // 4 + 1, height // 8, width // 8)
    if script in IMAGE_SAVE_OUTPUT:
        # decode_latent returns [3, H, W] (Qwen-Image: [layers, 3, H, W]); save_output(args, vae, latent, device)
        layers = script == "qwen_image_generate_image"
        module.decode_latent = lambda *a, **kw: (
            torch.zeros(1, 3, height, width) if layers else torch.zeros(3, height, width)
        )
        module.save_output(args, object(), torch.zeros(1, 16, 1, height // 8, width // 8), "cpu")
    elif script == "hv_1_5_generate_video":
        module.decode_latent = lambda latent, args: video
        module.save_output(latent, args, height, width)
    elif script == "krea2_generate_image":
        from PIL import Image

        module.save_images([Image.new("RGB", (width, height))] * args.num_images, args.save_path, args.seed)
    elif script == "ideogram4_generate_image":
        from PIL import Image

        module._save_images([Image.new("RGB", (width, height))], args.save_path)
    elif script == "hv_generate_video":
        module.decode_latents = lambda args, latents, device: (video + 0.5).unsqueeze(0)  # [B, C, F, H, W] in 0..1
        save = _hv_save_block(module)
        save(args, latent.unsqueeze(0), [args.seed], None, height, width, frames, args.infer_steps, "cpu")
    elif script == "wan_generate_video":
        module.decode_latent = lambda latent, args, cfg: video
        module.save_output(latent, args, None, height, width)
    elif script == "fpack_generate_video":
        module.decode_latent = lambda *a, **kw: video
        module.save_output(args, object(), latent, "cpu")
    else:
        return {"ok": False, "error": f"no save check for {script}"}
    return {"ok": True, "files": _listing(args.save_path), "output_types": list(choices)}


def check_dataset(path, architecture):
    from musubi_tuner.dataset import config_utils

    try:
        user_config = config_utils.load_user_config(path)
        sanitizer = config_utils.ConfigSanitizer()
        blueprint = config_utils.BlueprintGenerator(sanitizer).generate(
            user_config, argparse.Namespace(debug_dataset=False), architecture=architecture
        )
    except Exception as exc:  # noqa: BLE001 - report musubi's own error text
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    datasets = [
        {
            "is_image": d.is_image_dataset,
            **{k: list(v) if isinstance(v, tuple) else v for k, v in vars(d.params).items()},
        }
        for d in blueprint.dataset_group.datasets
    ]
    return {"ok": True, "datasets": datasets}


def check_accelerate(flags):
    try:
        from accelerate.commands.launch import launch_command_parser
    except ImportError as exc:
        return {"ok": False, "skipped": f"accelerate not importable: {exc}"}
    if isinstance(launch_command_parser, _Stub):
        return {"ok": False, "skipped": "accelerate is not installed in this interpreter"}
    parser = launch_command_parser()
    err = io.StringIO()
    real_err, sys.stderr = sys.stderr, err
    try:
        ns = parser.parse_args(flags)
    except SystemExit:
        lines = err.getvalue().strip().splitlines()
        return {"ok": False, "error": lines[-1] if lines else "rejected"}
    finally:
        sys.stderr = real_err
    return {"ok": True, "training_script": ns.training_script, "mixed_precision": ns.mixed_precision}


def main():
    request = json.load(sys.stdin)
    sys.path.insert(0, request["root"] + "/src")
    keep_real = request.get("keep_real", [])
    try:
        if request.get("stub_all") and "torch" not in keep_real:
            raise ImportError("torch is stubbed")
        import torch

        if not torch.cuda.is_available():
            # musubi evaluates torch.cuda.current_device() in default arguments at import time
            torch.cuda.current_device = lambda: 0
    except ImportError:
        pass
    finder = _StubFinder(
        third_party_imports(request["root"] + "/src/musubi_tuner", request.get("stub_all", False), keep_real)
    )
    if request.get("stub_all"):
        sys.meta_path.insert(0, finder)
    else:
        sys.meta_path.append(finder)
    real_out, sys.stdout = sys.stdout, io.StringIO()  # musubi modules may print at import
    import logging

    logging.disable(logging.CRITICAL)
    try:
        answer = {
            "argv": [check_argv(c["script"], c["argv"]) for c in request.get("argv_checks", [])],
            "datasets": [
                check_dataset(p, request.get("architecture", "wan")) for p in request.get("dataset_checks", [])
            ],
            "accelerate": [check_accelerate(f) for f in request.get("accelerate_checks", [])],
            "saves": [check_save(c["script"], c["argv"], c["frames"]) for c in request.get("save_checks", [])],
        }
    finally:
        sys.stdout = real_out
    answer["stubbed"] = sorted(finder.stubbed)
    try:
        import voluptuous

        answer["voluptuous_real"] = not isinstance(voluptuous, _StubModule)
    except ImportError:
        answer["voluptuous_real"] = False
    json.dump(answer, sys.stdout)


if __name__ == "__main__":
    main()
