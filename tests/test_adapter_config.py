"""Issue 23, kind 2: an adapter folder is validated on load. A config missing r / lora_alpha / target_modules
loads by an explicit, logged rule (rank from the weights, alpha = r, the weights' modules), never peft's silent
defaults (alpha 8: strength 2.0 at rank 4); wrong values are one clear error; another base is a warning."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft", reason="LoRA needs the [lora] extra (peft)")

sys.path.insert(0, str(Path(__file__).parent))
from test_lora import _forward, _inputs, _randomise_adapters  # noqa: E402
from tiny_t2v import tiny_latte  # noqa: E402

from opensora_plan.models import lora  # noqa: E402


def _adapter(tmp_path, rank=4, alpha=4, base=None):
    model = tiny_latte()
    extra = {} if base is None else {"base_model": base}
    lora.add_lora(model, lora.lora_config(rank, alpha=alpha, target_modules=["to_q", "to_v"], **extra))
    _randomise_adapters(model)
    folder = lora.save_lora(model, tmp_path / "adapter")
    return folder, _forward(model, _inputs(model))


def _edit(folder, **changes):
    path = folder / lora.ADAPTER_CONFIG_NAME
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            config.pop(key)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("rank", [4, 16])
def test_a_config_without_lora_alpha_loads_at_strength_one_and_says_so(tmp_path, caplog, rank):
    folder, expected = _adapter(tmp_path, rank=rank, alpha=rank)
    _edit(folder, lora_alpha=...)
    model = tiny_latte()
    with caplog.at_level(logging.WARNING):
        lora.load_lora(model, folder)
    torch.testing.assert_close(_forward(model, _inputs(model)), expected)  # peft's alpha 8 would be 2x / 0.5x
    assert any("no 'lora_alpha'; using lora_alpha = r" in r.getMessage() for r in caplog.records)


def test_missing_rank_and_targets_come_from_the_weights_with_a_log_line(tmp_path, caplog):
    folder, expected = _adapter(tmp_path, rank=4, alpha=8)
    _edit(folder, r=..., target_modules=...)
    model = tiny_latte()
    with caplog.at_level(logging.WARNING):
        lora.load_lora(model, folder)
    torch.testing.assert_close(_forward(model, _inputs(model)), expected)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "no 'r'; using rank 4" in messages and "names no target_modules" in messages


@pytest.mark.parametrize("changes, message", [
    (dict(r=8), r"says r=8 but its weights have rank 4"),
    (dict(r=0), r"'r' .* positive whole number"),
    (dict(lora_alpha=-1), r"'lora_alpha' .* positive number"),
    (dict(lora_alpha="four"), r"'lora_alpha' .* positive number"),
    (dict(target_modules=[1, 2]), r"'target_modules' .* list of module names"),
    (dict(use_dora=True), r"DoRA"),
])
def test_a_wrong_field_is_one_clear_error(tmp_path, changes, message):
    folder, _ = _adapter(tmp_path)
    _edit(folder, **changes)
    with pytest.raises(ValueError, match=message):
        lora.load_lora(tiny_latte(), folder)


def test_the_base_model_is_recorded_and_another_base_is_a_warning(tmp_path, caplog):
    base = tmp_path / "base"
    base.mkdir()
    folder, _ = _adapter(tmp_path, base=base)
    assert json.loads((folder / lora.ADAPTER_CONFIG_NAME).read_text())["base_model_name_or_path"] == str(base.resolve())
    with caplog.at_level(logging.WARNING):
        lora.check_lora_base(folder, base)
        assert not caplog.records
        lora.check_lora_base(folder, tmp_path / "other")
    assert any("was trained on" in r.getMessage() for r in caplog.records)
