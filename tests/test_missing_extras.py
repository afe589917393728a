"""Issue 23, kind 5: a missing optional extra is one ``error:`` line naming ``pip install "opensora-plan[...]"``,
in every command that needs one, before any model loads (never a traceback)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from opensora_plan import cli

DEMO = Path(cli.__file__).parent / "assets" / "demo" / "17x64x64"


def _hide(monkeypatch, *modules):
    """As if ``modules`` were not installed: an import of any of them raises ImportError."""
    for name in list(sys.modules):
        if name.split(".")[0] in modules:
            monkeypatch.delitem(sys.modules, name)
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)
    if "peft" in modules:  # diffusers decided at import that peft is there (package metadata)
        import diffusers.utils.import_utils as diffusers_imports

        monkeypatch.setattr(diffusers_imports, "_peft_available", False)


def _cases(tmp: Path):
    data = tmp / "data.json"
    data.write_text('[{"path": "a.mp4", "cap": "a red circle"}]')
    adapter = tmp / "adapter"
    adapter.mkdir()
    (adapter / "pytorch_lora_weights.safetensors").write_bytes(b"")
    run = ["--output_dir", str(tmp / "run"), "--max_train_steps", "1"]
    return {
        "train-t2v --sharding deepspeed": ("deepspeed", "deepspeed",
                                           ["train-t2v", *run, "--data_path", str(data), "--sharding", "deepspeed"]),
        "train-t2v --lora_rank": ("peft", "lora", ["train-t2v", *run, "--data_path", str(data), "--lora_rank", "4",
                                                   "--pretrained", str(DEMO)]),
        "sample --lora": ("peft", "lora", ["sample", "a red circle moving left", "--lora", str(adapter),
                                           "--save_img_path", str(tmp / "out")]),
        "demo eval --lora": ("peft", "lora", ["demo", "eval", "--lora", str(adapter)]),
        "serve": ("gradio", "ui", ["serve"]),
        "train-vae --report_to wandb": ("wandb", "wandb",
                                        ["train-vae", *run, "--video_path", str(tmp), "--report_to", "wandb"]),
    }


@pytest.mark.parametrize("case", ["train-t2v --sharding deepspeed",
                                  "train-t2v --lora_rank", "sample --lora", "demo eval --lora", "serve",
                                  "train-vae --report_to wandb"])
def test_a_missing_extra_is_one_line_naming_it(case, tmp_path, monkeypatch, capsys):
    module, extra, argv = _cases(tmp_path)[case]
    _hide(monkeypatch, module)
    monkeypatch.delenv("OPENSORA_PLAN_DEBUG", raising=False)
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert f'pip install "opensora-plan[{extra}]"' in err[0]
    assert "Traceback" not in err[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()  # refused before any work


def test_every_optional_import_goes_through_require_extra():
    """No module of the package imports an optional extra itself (each would be its own traceback)."""
    import re

    root = Path(cli.__file__).parent
    direct = re.compile(r"^\s*(?:import|from)\s+(deepspeed|peft|gradio|wandb)\b", re.M)
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py") if direct.search(p.read_text())]
    allowed = {"train/trainer.py"}  # WandbWriter imports wandb after require_wandb checked it (TrainConfig)
    assert "train/zero.py" not in offenders and "models/lora.py" not in offenders
    assert set(offenders) <= allowed, offenders
