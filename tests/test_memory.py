"""Memory and dtypes of the text-to-video pipeline (issue 24): one dtype per loaded folder (``dtype=`` and
``torch_dtype=``), the memory plan's choices from given budgets, offload, and out-of-memory as one line."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import DiffusionPipeline

from opensora_plan.pipelines import OpenSoraPlanPipeline
from opensora_plan.utils import module_dtype
from tiny_t2v import TINY_VERSION, build_tiny_t2v


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory):
    return build_tiny_t2v(tmp_path_factory.mktemp("release"), seed=5)


def _dtypes(pipe) -> dict:
    return {name: module_dtype(getattr(pipe, name)) for name in ("text_encoder", "transformer", "vae")}


# --------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keyword", ["dtype", "torch_dtype"])
def test_from_release_takes_dtype_under_both_names(tiny_release, keyword):
    model_path, t5_path = tiny_release
    pipe = OpenSoraPlanPipeline.from_release(model_path, version=TINY_VERSION, text_encoder=t5_path,
                                             **{keyword: torch.bfloat16})
    assert set(_dtypes(pipe).values()) == {torch.bfloat16}


def test_from_release_refuses_two_different_dtypes_and_defaults_to_the_devices(tiny_release):
    model_path, t5_path = tiny_release
    with pytest.raises(ValueError, match="disagree"):
        OpenSoraPlanPipeline.from_release(model_path, version=TINY_VERSION, dtype=torch.bfloat16,
                                          torch_dtype=torch.float16)
    same = OpenSoraPlanPipeline.from_release(model_path, version=TINY_VERSION, dtype="bf16", torch_dtype=torch.bfloat16)
    assert same.transformer.dtype == torch.bfloat16
    default = OpenSoraPlanPipeline.from_release(model_path, version=TINY_VERSION, text_encoder=t5_path, device="cpu")
    assert set(_dtypes(default).values()) == {torch.float32}  # the CPU's default (fp16 on CUDA)


@pytest.mark.parametrize("loader", [OpenSoraPlanPipeline, DiffusionPipeline])
def test_a_folder_saved_in_bf16_comes_back_in_one_dtype(tiny_release, tmp_path, loader, caplog):
    model_path, t5_path = tiny_release
    OpenSoraPlanPipeline.from_release(model_path, version=TINY_VERSION, text_encoder=t5_path,
                                      dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    with caplog.at_level(logging.WARNING):
        asked = loader.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert set(_dtypes(asked).values()) == {torch.bfloat16}
    assert "not one dtype" not in caplog.text
    if loader is OpenSoraPlanPipeline:  # no dtype: the device's default for every model, not each file's own
        plain = loader.from_pretrained(tmp_path / "bf16")
        assert set(_dtypes(plain).values()) == {torch.float32}
        with pytest.raises(ValueError, match="disagree"):
            loader.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16, torch_dtype=torch.float32)


def test_models_of_different_dtypes_are_named_in_one_warning(tiny_release, caplog):
    model_path, t5_path = tiny_release
    pipe = OpenSoraPlanPipeline.from_release(model_path, version=TINY_VERSION, text_encoder=t5_path)
    with caplog.at_level(logging.WARNING):
        OpenSoraPlanPipeline(vae=pipe.vae, transformer=pipe.transformer, scheduler=pipe.scheduler,
                             text_encoder=pipe.text_encoder.to(torch.bfloat16), tokenizer=pipe.tokenizer)
    lines = [r.getMessage() for r in caplog.records if "not one dtype" in r.getMessage()]
    assert len(lines) == 1 and "text_encoder is bfloat16" in lines[0] and "vae" not in lines[0], lines
