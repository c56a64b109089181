"""musubi checkout / venv resolution and validation; output names; config file."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from speedkit.musubi import env as menv
from speedkit.musubi.env import MusubiEnv, check_output_name, parse_env_vars, resolve_env, validate_env, venv_python


def make_checkout(tmp_path: Path) -> Path:
    root = tmp_path / "musubi-tuner"
    (root / "src" / "musubi_tuner").mkdir(parents=True)
    (root / "src" / "musubi_tuner" / "wan_train_network.py").write_text("")
    return root


@pytest.mark.parametrize("layout", [("Scripts", "python.exe"), ("bin", "python")], ids=["windows", "posix"])
def test_venv_python_finds_both_layouts(tmp_path, layout):
    exe = tmp_path / "venv" / layout[0] / layout[1]
    exe.parent.mkdir(parents=True)
    exe.write_text("")
    assert venv_python(tmp_path / "venv") == exe
    assert venv_python(exe) == exe


def test_resolve_priority_inputs_then_file_then_environment(tmp_path):
    cfg = tmp_path / "musubi.toml"
    cfg.write_text('musubi_root = "/from/file"\npython = "/file/python"\n[env]\nCUDA_VISIBLE_DEVICES = "1"\n')
    environ = {"MUSUBI_TUNER_ROOT": "/from/env", "MUSUBI_TUNER_PYTHON": "/env/python"}
    e = resolve_env("", "", "HF_HOME=/h", config_path=cfg, environ=environ)
    assert e.root == Path("/from/file") and e.python == Path("/file/python")
    assert e.extra_env == {"CUDA_VISIBLE_DEVICES": "1", "HF_HOME": "/h"}
    e = resolve_env("/typed", "", "", config_path=None, environ=environ)
    assert e.root == Path("/typed") and e.python == Path("/env/python")
    with pytest.raises(ValueError, match="musubi_root is empty"):
        resolve_env("", "", "", config_path=None, environ={})


def test_default_python_is_the_checkout_venv(tmp_path):
    root = make_checkout(tmp_path)
    exe = root / ".venv" / "bin" / "python"
    exe.parent.mkdir(parents=True)
    exe.write_text("")
    assert resolve_env(str(root), environ={}).python == exe


def test_config_file_unknown_key(tmp_path):
    cfg = tmp_path / "musubi.toml"
    cfg.write_text('musubi_rot = "/x"\n')
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['musubi_rot'\]"):
        resolve_env("", config_path=cfg, environ={})


def test_env_vars_parsing():
    assert parse_env_vars("# c\nA=1\n\n B = two words \n") == {"A": "1", "B": "two words"}
    with pytest.raises(ValueError, match="line 1 'CUDA 0' is not KEY=VALUE"):
        parse_env_vars("CUDA 0")


def test_validation_messages(tmp_path):
    root = make_checkout(tmp_path)
    with pytest.raises(ValueError, match="is not a folder: clone it"):
        validate_env(MusubiEnv(tmp_path / "nope", Path(sys.executable)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is not a musubi-tuner checkout"):
        validate_env(MusubiEnv(tmp_path / "empty", Path(sys.executable)))
    with pytest.raises(ValueError, match=r"does not exist: give musubi's venv folder .*Scripts\\python.exe"):
        validate_env(MusubiEnv(root, tmp_path / "venv" / "bin" / "python"))
    with pytest.raises(ValueError, match="script hv_train_network.py is missing"):
        validate_env(MusubiEnv(root, Path(sys.executable)), ("hv_train_network",))
    validate_env(MusubiEnv(root, Path(sys.executable)), ("wan_train_network",))


def test_missing_accelerate_is_reported_with_the_fix(tmp_path):
    root = make_checkout(tmp_path)
    # A venv without accelerate, even where this interpreter has it: a package of that name
    # first on the path that fails to import, as a missing one does.
    shadow = tmp_path / "no_accelerate"
    (shadow / "accelerate").mkdir(parents=True)
    (shadow / "accelerate" / "__init__.py").write_text("raise ImportError('No module named accelerate')\n")
    e = MusubiEnv(root, Path(sys.executable), {"PYTHONPATH": str(shadow)})
    with pytest.raises(ValueError, match="accelerate is not installed in .*pip install -e"):
        validate_env(e, check_accelerate=True)


def test_fake_accelerate_passes_the_check(tmp_path):
    from fake_musubi.fakeroot import FAKE_SITE

    validate_env(MusubiEnv(make_checkout(tmp_path), Path(sys.executable), {"PYTHONPATH": str(FAKE_SITE)}), (), True)


def test_missing_lycoris_names_the_package_to_install(tmp_path):
    """Merge LoRA needs LyCORIS in musubi's venv for most architectures (see commands.MERGE_SPECS)."""
    root = make_checkout(tmp_path)
    site = tmp_path / "site"
    e = MusubiEnv(root, Path(sys.executable), {"PYTHONPATH": str(site)})
    try:
        import lycoris  # noqa: F401

        pytest.skip("lycoris is installed in this interpreter")
    except ImportError:
        pass
    with pytest.raises(ValueError, match=r"lycoris is not installed in .*pip install lycoris-lora"):
        validate_env(e, modules=("lycoris",))
    (site / "lycoris").mkdir(parents=True)
    (site / "lycoris" / "__init__.py").write_text("")
    validate_env(e, modules=("lycoris",))


def test_accelerate_command_is_explicit(tmp_path):
    e = MusubiEnv(make_checkout(tmp_path), Path("/venv/bin/python"))
    cmd = e.accelerate_cmd("wan_train_network", "fp16", "1")
    assert cmd[:3] == ["/venv/bin/python", "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--mixed_precision") + 1] == "fp16" and cmd[cmd.index("--gpu_ids") + 1] == "1"
    assert cmd[-1] == str(e.root / "src" / "musubi_tuner" / "wan_train_network.py")
    with pytest.raises(ValueError, match="mixed_precision='fp8'"):
        e.accelerate_cmd("x", "fp8")


@pytest.mark.parametrize("bad", ["../x", "a/b", "a\\b", "..", "x:y", "   "])
def test_output_name_rejects_paths(bad):
    with pytest.raises(ValueError, match="output_name"):
        check_output_name(bad)


def test_output_name_strips_extension_and_native_path():
    assert check_output_name("my_lora.safetensors") == "my_lora"
    assert menv.native_path(" ~/x/../y ") == os.path.normpath(os.path.expanduser("~/y"))
