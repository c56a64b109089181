"""Sample prompts (kohya-style lines), the held-out split and the validation loss."""

from __future__ import annotations

import pytest
import torch
from test_lora_trainer import make_run

from speedkit.lora_train import sample_prompts, trainer, validation

DEFAULTS = dict(width=1024, height=1024, seed=5, steps=20, cfg=7.0)


def test_plain_lines_take_the_node_defaults_and_distinct_seeds():
    got = sample_prompts.parse_prompts("a dog\n\n# a comment\n  a cat  \n", **DEFAULTS)
    assert [(p.prompt, p.seed, p.width, p.height, p.steps, p.cfg, p.negative) for p in got] == [
        ("a dog", 5, 1024, 1024, 20, 7.0, ""),
        ("a cat", 6, 1024, 1024, 20, 7.0, ""),
    ]


def test_kohya_options_override_per_line():
    (p,) = sample_prompts.parse_prompts(
        "sks dog on a beach, sunset --n blurry, lowres --w 768 --h 1216 --d 42 --s 28 --l 6.5", **DEFAULTS
    )
    assert p == sample_prompts.SamplePrompt("sks dog on a beach, sunset", "blurry, lowres", 768, 1216, 42, 28, 6.5)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("a dog --w 1000x", r"line 1: width '1000x' is not a whole number"),
        ("a dog --w 1020", r"line 1: width 1020 is not a multiple of 8; use 1016"),
        ("a dog --h 32", r"line 1: height 32 is out of range; use 64 to 4096"),
        ("a dog --s 0", r"line 1: steps 0 is out of range; use 1 to 150"),
        ("a dog --l nan", r"line 1: CFG scale nan is out of range"),
        ("a dog --l high", r"line 1: CFG scale 'high' is not a number"),
        ("a dog --q 3", r"line 1: unknown option --q; the options are --n \(negative prompt\)"),
        ("a dog --d 1 --d 2", r"line 1: --d is given twice"),
        ("--w 512", r"line 1: the line has options but no prompt text"),
        ("a dog --d -4", r"line 1: seed -4 is out of range"),
        ("a dog --s", r"line 1: --s has no value"),
    ],
)
def test_bad_lines_name_the_line_option_and_fix(line, message):
    with pytest.raises(ValueError, match=message):
        sample_prompts.parse_prompts(line, **DEFAULTS)


def test_too_many_prompts_are_refused():
    text = "\n".join(f"prompt {k}" for k in range(sample_prompts.MAX_PROMPTS + 1))
    with pytest.raises(ValueError, match="at most 16 are rendered"):
        sample_prompts.parse_prompts(text, **DEFAULTS)


def test_holdout_split_is_seeded_disjoint_and_never_empties_training():
    train, held = validation.split_holdout(10, 0.2, seed=3)
    assert len(held) == 2 and sorted(train + held) == list(range(10))
    assert validation.split_holdout(10, 0.2, seed=3) == (train, held)
    assert validation.split_holdout(10, 0.2, seed=4) != (train, held)
    assert validation.split_holdout(3, 0.05, seed=0)[1] != []  # at least one image held out
    assert validation.split_holdout(5, 0.0, seed=0) == ([0, 1, 2, 3, 4], [])
    with pytest.raises(ValueError, match="leaves none to train on"):
        validation.split_holdout(1, 0.5, seed=0)
    for bad in (-0.1, 0.9, float("nan")):
        with pytest.raises(ValueError, match="validation_split: .* out of range"):
            validation.split_holdout(10, bad, seed=0)


def test_validation_loss_is_deterministic_and_falls_as_the_lora_learns():
    tr, *_ = make_run(steps=120)
    held = tr.samples[:2]
    before = tr.validation_loss(held)
    assert before == tr.validation_loss(held)  # fixed timesteps and noise
    state = {k: v.clone() for k, v in tr.lora.state_dict().items()}
    for _ in range(120):
        tr.train_step()
    after = tr.validation_loss(held)
    assert after < before * 0.8, (before, after)
    assert any(not torch.equal(v, state[k]) for k, v in tr.lora.state_dict().items())
    assert tr.validation_loss(held) == after  # evaluating does not train


def test_periodic_callbacks_run_between_steps_and_after_the_last(tmp_path):
    tr, *_ = make_run(steps=10)
    calls: list[tuple[str, int, int]] = []
    info = trainer.RunInfo(
        output_name="t", base_model_version="sd_v1", architecture="a", implementation="i", resolution=32
    )
    tr.run(
        tmp_path,
        info,
        every=[(4, lambda s: calls.append(("a", s, tr.step))), (0, lambda s: calls.append(("off", s, 0)))],
    )
    assert calls == [("a", 4, 4), ("a", 8, 8), ("a", 10, 10)]
