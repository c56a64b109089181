"""LoRA / LoHa / LoKr files: recognised from their tensor names, and what each musubi consumer does.

The files are small synthetic safetensors with the tensor names and shapes musubi's
networks.loha / networks.lokr (and LyCORIS's kohya wrapper) save; the rules checked here were
read from musubi v0.3.4's scripts (lora_utils, hv/wan/fpack_generate_video, merge_lora,
convert_lora, lora_post_hoc_ema) and docs/loha_lokr.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from speedkit.musubi import lora_file
from speedkit.musubi.commands import GenerateJob, MergeJob, generate_argv, merge_argv
from speedkit.musubi.env import MusubiEnv

ENV = MusubiEnv(root=Path("/opt/musubi-tuner"), python=Path("/opt/venv/bin/python"))
MODULES = ("lora_unet_blocks_0_self_attn_q", "lora_unet_blocks_0_ffn_0")
OUT, IN, RANK = 32, 16, 4


@pytest.fixture(autouse=True)
def src_layout(monkeypatch):
    monkeypatch.setattr(MusubiEnv, "src_layout", property(lambda self: True))


def lora_sd(kind: str, tucker: bool = False, dora: bool = False) -> dict[str, torch.Tensor]:
    """Random weights with the names and shapes musubi saves for ``kind`` (per Linear OUT x IN)."""
    sd: dict[str, torch.Tensor] = {}
    for m in MODULES:
        if kind == "lora":
            sd[f"{m}.lora_down.weight"] = torch.randn(RANK, IN)
            sd[f"{m}.lora_up.weight"] = torch.randn(OUT, RANK)
        elif kind == "loha":
            sd[f"{m}.hada_w1_a"], sd[f"{m}.hada_w1_b"] = torch.randn(OUT, RANK), torch.randn(RANK, IN)
            sd[f"{m}.hada_w2_a"], sd[f"{m}.hada_w2_b"] = torch.randn(OUT, RANK), torch.randn(RANK, IN)
            if tucker:  # LyCORIS CP decomposition (conv layers)
                sd[f"{m}.hada_t1"], sd[f"{m}.hada_t2"] = torch.randn(RANK, RANK, 3, 3), torch.randn(RANK, RANK, 3, 3)
        elif kind == "lokr":  # OUT = 4 x 8, IN = 4 x 4; w2 low rank
            sd[f"{m}.lokr_w1"] = torch.randn(4, 4)
            sd[f"{m}.lokr_w2_a"], sd[f"{m}.lokr_w2_b"] = torch.randn(8, 2), torch.randn(2, 4)
        elif kind == "lokr_full":  # rank large enough: w2 stored as a full matrix
            sd[f"{m}.lokr_w1"], sd[f"{m}.lokr_w2"] = torch.randn(4, 4), torch.randn(8, 4)
        elif kind == "lokr_decomposed":  # LyCORIS decompose_both: w1 low rank too (musubi's loader skips it)
            sd[f"{m}.lokr_w1_a"], sd[f"{m}.lokr_w1_b"] = torch.randn(4, 2), torch.randn(2, 4)
            sd[f"{m}.lokr_w2_a"], sd[f"{m}.lokr_w2_b"] = torch.randn(8, 2), torch.randn(2, 4)
        if dora:
            sd[f"{m}.dora_scale"] = torch.randn(1, IN)
        sd[f"{m}.alpha"] = torch.tensor(float(RANK) / 2)
    return sd


def other_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The diffusers-style names convert_lora.py --target other writes (module path with dots)."""
    out = {}
    for key, value in sd.items():
        module, tensor = key.split(".", 1)
        path = module.removeprefix("lora_unet_").replace("_", ".").replace("self.attn", "self_attn")
        tensor = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}.get(tensor, tensor)
        out[f"diffusion_model.{path}.{tensor}"] = value
    return out


def write(tmp_path: Path, name: str, sd: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / f"{name}.safetensors"
    save_file(sd, str(path), metadata={"ss_network_module": "networks.loha"})
    return path


def info(tmp_path: Path, name: str, sd: dict[str, torch.Tensor], input_name: str = "lora_1") -> lora_file.LoraInfo:
    return lora_file.inspect_files({input_name: str(write(tmp_path, name, sd))})[0]


@pytest.mark.parametrize(
    "kind, label, musubi_reads_all",
    [("lora", "LoRA", True), ("loha", "LoHa", True), ("lokr", "LoKr", True), ("lokr_full", "LoKr", True),
     ("lokr_decomposed", "LoKr", False)],
)  # fmt: skip
def test_kinds_are_recognised_from_real_files(tmp_path, kind, label, musubi_reads_all):
    i = info(tmp_path, kind, lora_sd(kind))
    assert (i.label, i.layout, i.musubi_reads_all) == (label, "default", musubi_reads_all)
    assert i.is_lycoris == (kind != "lora")
    assert lora_file.detect_lora_format(lora_file.read_safetensors_keys(tmp_path / f"{kind}.safetensors")[0]) == (
        "default"
    )


def test_other_layout_and_tensors_musubi_does_not_read(tmp_path):
    loha_other = info(tmp_path, "loha_other", other_layout(lora_sd("loha")))
    assert (loha_other.kind, loha_other.layout) == ("loha", "other")
    assert info(tmp_path, "lora_other", other_layout(lora_sd("lora"))).layout == "other"
    tucker = info(tmp_path, "tucker", lora_sd("loha", tucker=True))
    assert tucker.not_read_by_musubi == ("hada_t1", "hada_t2") and not tucker.musubi_reads_all
    dora = info(tmp_path, "dora", lora_sd("lora", dora=True))
    assert dora.not_read_by_musubi == ("dora_scale",) and not dora.is_lycoris
    mixed = info(tmp_path, "mixed", {**lora_sd("lora"), "lora_unet_x.hada_w1_a": torch.zeros(2, 2)})
    assert mixed.kind == "mixed" and not mixed.musubi_reads_all


def test_a_checkpoint_is_still_not_a_lora(tmp_path):
    path = write(tmp_path, "dit", {"blocks.0.self_attn.q.weight": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match=r"lora_2 is not a LoRA: .*LoHa \(hada_w1_a ...\) or LoKr \(lokr_w1 ...\)"):
        lora_file.inspect_files({"lora_2": str(path)})


# --- generation: which runs need --lycoris --------------------------------------------------


@pytest.mark.parametrize(
    "arch, kind, lycoris",
    [
        ("wan", "loha", False),  # built into wan_generate_video's loader (lora_utils)
        ("framepack", "lokr", False),
        ("wan", "lokr_full", False),
        ("hunyuan_video", "loha", True),  # hv_generate_video's plain path ignores hada_* tensors
        ("hunyuan_video", "lokr", True),
        ("wan", "lokr_decomposed", True),  # musubi's LoKr merge skips lokr_w1_a/b: the library reads them
        ("hunyuan_video", "lora", False),
        ("wan", "lora", False),
    ],
)
def test_generate_lycoris_per_architecture(tmp_path, arch, kind, lycoris):
    infos = [info(tmp_path, kind, lora_sd(kind)), info(tmp_path, "plain", lora_sd("lora"), "lora_2")]
    assert lora_file.generate_lycoris(arch, infos) is lycoris


def test_generate_argv_passes_lycoris(tmp_path):
    base = dict(prompt="p", save_path="s", dit="d", vae="v", text_encoder1="t", text_encoder2="t2")
    loha = str(write(tmp_path, "loha", lora_sd("loha")))
    lycoris = lora_file.generate_lycoris("hunyuan_video", lora_file.inspect_files({"lora_1": loha}))
    argv = generate_argv(ENV, GenerateJob(arch="hunyuan_video", loras=((loha, 0.7),), lycoris=lycoris, **base))
    assert argv[argv.index("--lora_weight") + 1] == loha and "--lycoris" in argv
    plain = generate_argv(ENV, GenerateJob(arch="hunyuan_video", loras=((loha, 0.7),), **base))
    assert "--lycoris" not in plain  # only when asked: old command lines are unchanged
    with pytest.raises(ValueError, match="lycoris applies LoRA files"):
        generate_argv(ENV, GenerateJob(arch="hunyuan_video", lycoris=True, **base))


def test_generate_refuses_what_no_musubi_path_loads(tmp_path):
    other = info(tmp_path, "loha_other", other_layout(lora_sd("loha")), "lora_3")
    with pytest.raises(ValueError, match="lora_3 is a LoHa in the diffusers-style 'other' layout.*to_musubi"):
        lora_file.generate_lycoris("wan", [other])
    # --lycoris covers every LoRA of the run; the library finds modules by musubi's names only
    infos = [info(tmp_path, "loha", lora_sd("loha")), info(tmp_path, "p", other_layout(lora_sd("lora")), "lora_2")]
    with pytest.raises(ValueError, match="lora_2 is in the diffusers-style 'other' layout, but a LoHa/LoKr"):
        lora_file.generate_lycoris("hunyuan_video", infos)
    assert lora_file.generate_lycoris("wan", infos) is False  # Wan's own loader needs no --lycoris


# --- merging, converting, EMA ---------------------------------------------------------------


def test_merge_lycoris_per_architecture(tmp_path):
    loha, plain = info(tmp_path, "loha", lora_sd("loha"), "lora_2"), info(tmp_path, "plain", lora_sd("lora"))
    with pytest.raises(ValueError, match="lora_2 is a LoHa: musubi's merge_lora.py \\(HunyuanVideo\\) merges plain"):
        lora_file.merge_lycoris("hunyuan_video", [plain, loha], always=False)
    assert lora_file.merge_lycoris("hunyuan_video", [plain], always=False) is False
    assert lora_file.merge_lycoris("flux_kontext", [plain], always=False) is False
    assert lora_file.merge_lycoris("flux_kontext", [plain, loha], always=False) is True
    assert lora_file.merge_lycoris("wan", [plain, loha], always=True) is True
    base = dict(dit="dit", loras=(("a", 1.0),), output="/m/o.safetensors", vae="ae", text_encoder1="t5",
                text_encoder2="clip", prompt_file="/m/p.txt")  # fmt: skip
    assert "--lycoris" in merge_argv(ENV, MergeJob(arch="flux_kontext", lycoris=True, **base))
    assert "--lycoris" not in merge_argv(ENV, MergeJob(arch="flux_kontext", **base))
    with pytest.raises(ValueError, match="merge_lora.py \\(HunyuanVideo\\) has no LyCORIS path"):
        merge_argv(ENV, MergeJob(arch="hunyuan_video", dit="d", loras=(("a", 1.0),), output="o", lycoris=True))


def test_merge_refuses_other_layout_loha(tmp_path):
    other = info(tmp_path, "lokr_other", other_layout(lora_sd("lokr")))
    with pytest.raises(ValueError, match="lora_1 is a LoKr in the diffusers-style 'other' layout \\(merging"):
        lora_file.merge_lycoris("qwen_image", [other], always=True)


def test_merge_refuses_other_layout_plain_lora_where_only_lycoris_saves(tmp_path):
    """Wan/Qwen-Image/Z-Image/HV 1.5 merges save only through --lycoris, whose loader matches
    musubi's lora_unet_* names: a diffusers-style plain LoRA would merge nothing."""
    other = info(tmp_path, "plain_other", other_layout(lora_sd("lora")))
    with pytest.raises(ValueError, match="merging into a wan DiT saves only through musubi's --lycoris path"):
        lora_file.merge_lycoris("wan", [other], always=True)
    # merge_lycoris only decides the flag; the node refuses this layout first (require_musubi_layout)
    assert lora_file.merge_lycoris("flux_kontext", [other], always=False) is False


def test_other_layout_refused_where_musubi_would_apply_nothing(tmp_path):
    other = info(tmp_path, "plain_other", other_layout(lora_sd("lora")), "lora_2")
    plain = info(tmp_path, "plain", lora_sd("lora"))
    for arch in ("wan", "hunyuan_video", "flux_kontext", "qwen_image"):
        with pytest.raises(
            ValueError, match=f"lora_2 is a LoRA in the diffusers-style 'other' layout .*musubi's {arch}"
        ):
            lora_file.require_musubi_layout(arch, [plain, other], "generation")
    lora_file.require_musubi_layout("framepack", [plain, other], "merge")  # its script converts them itself
    lora_file.require_musubi_layout("wan", [plain], "merge")


def test_plain_lora_with_dora_tensors_goes_through_lycoris_or_is_refused(tmp_path):
    """musubi's plain LoRA loader ignores dora_scale; LyCORIS applies it."""
    dora = info(tmp_path, "dora", lora_sd("lora", dora=True), "lora_1")
    plain = info(tmp_path, "plain", lora_sd("lora"))
    assert lora_file.generate_lycoris("wan", [dora]) is True
    assert lora_file.generate_lycoris("hunyuan_video", [dora, plain]) is True
    assert lora_file.generate_lycoris("wan", [plain]) is False
    assert lora_file.merge_lycoris("flux_kontext", [dora], always=False) is True
    with pytest.raises(ValueError, match="lora_1 has dora_scale tensors \\(DoRA\\), which musubi's merge_lora.py"):
        lora_file.merge_lycoris("hunyuan_video", [dora], always=False)


def test_convert_accepts_loha_lokr_but_not_dora_or_mixed(tmp_path):
    for kind in ("loha", "lokr", "lokr_full"):
        lora_file.check_convertible(info(tmp_path, kind, lora_sd(kind), "lora"))  # convert_lora.py maps hada_/lokr_
    lora_file.check_convertible(info(tmp_path, "o", other_layout(lora_sd("loha")), "lora"))
    with pytest.raises(ValueError, match="lora has DoRA tensors \\(dora_scale\\): musubi's convert_lora.py drops"):
        lora_file.check_convertible(info(tmp_path, "dora", lora_sd("lora", dora=True), "lora"))
    mixed = {**lora_sd("lora"), **lora_sd("loha")}
    with pytest.raises(ValueError, match="lora mixes loha, lora modules"):
        lora_file.check_convertible(info(tmp_path, "mixed", mixed, "lora"))


def test_ema_needs_checkpoints_of_one_run(tmp_path):
    a = lora_file.read_safetensors_keys(write(tmp_path, "a", lora_sd("lokr")))[0]
    b = lora_file.read_safetensors_keys(write(tmp_path, "b", lora_sd("lokr")))[0]
    lora_file.check_same_tensors([("checkpoints line 1", a), ("checkpoints line 2", b)])
    c = lora_file.read_safetensors_keys(write(tmp_path, "c", lora_sd("lokr_full")))[0]
    with pytest.raises(ValueError, match="checkpoints line 3 does not have the same tensors as checkpoints line 1"):
        lora_file.check_same_tensors([("checkpoints line 1", a), ("checkpoints line 2", b), ("checkpoints line 3", c)])
