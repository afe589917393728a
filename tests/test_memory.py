"""Memory and dtypes of the text-to-video pipeline (issue 24): one dtype per loaded folder (``dtype=`` and
``torch_dtype=``), the memory plan's choices from given budgets, offload, and out-of-memory as one line."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest
import torch
from diffusers import DiffusionPipeline

from opensora_plan.pipelines import OpenSoraPlanPipeline
from opensora_plan.pipelines.memory_plan import (CPU_RUNTIME_BYTES, CUDA_WORKSPACE_BYTES, HEADROOM_FRACTION,
                                                 PipelineSizes, plan_memory, usable_memory, weight_bytes)
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


# --------------------------------------------------------------------------------------------
# The memory plan: choices from given budgets (arithmetic only)
# --------------------------------------------------------------------------------------------

GIB = 2**30


@dataclass(frozen=True)
class _Decode:  # what CausalVAEModel.decode_plan returns, for a decoder that needs 6 GiB whole, 1 GiB per frame
    chunk: int | None
    peak: int


def _sizes(full=6 * GIB, per_frame=GIB, frames=17, tiled_full=2 * GIB):
    def decode(budget, tiled):
        need = tiled_full if tiled else full
        if budget is None or need <= budget:
            return _Decode(None, need)
        chunk = max(1, min(frames - 1, int(budget // (per_frame // (3 if tiled else 1)))))
        return _Decode(chunk, chunk * per_frame // (3 if tiled else 1))

    return PipelineSizes(weights={"text_encoder": 9 * GIB, "transformer": 2 * GIB, "vae": GIB // 2},
                         largest_block={"text_encoder": GIB // 4, "transformer": GIB // 8, "vae": GIB // 64},
                         encode=GIB // 4, denoise=GIB, decode=decode)


def test_headroom_is_a_margin_and_a_workspace_term():
    assert usable_memory(40 * GIB, "cuda") == int(40 * GIB * (1 - HEADROOM_FRACTION)) - CUDA_WORKSPACE_BYTES
    assert usable_memory(12 * GIB, "cpu") == int(12 * GIB * (1 - HEADROOM_FRACTION)) - CPU_RUNTIME_BYTES
    assert usable_memory(GIB // 2, "cpu") == 0


@pytest.mark.parametrize("memory_gb, offload, text_encoder, decode", [
    (40, "none", "device", "full"),        # everything resident, the whole video at once
    (20, "none", "device", "lossless"),    # resident, the decode in lossless chunks
    (14, "model", "device", "full"),       # each model on the device during its stage only
    (8, "none", "cpu", "lossless"),        # T5 (9 GiB) no longer fits: it runs on the CPU
    (4.5, "model", "cpu", "lossless"),     # T5 on the CPU, the others in turn
    (2.5, "sequential", "cpu", "lossless"),  # the transformer alone is too much: layer by layer
])
def test_cuda_plan_offloads_only_as_far_as_the_budget_needs(memory_gb, offload, text_encoder, decode):
    plan = plan_memory(_sizes(), int(memory_gb * GIB), "cuda", one_shot=False)
    assert (plan.offload, plan.text_encoder, plan.vae_decode) == (offload, text_encoder, decode), plan.describe()
    assert plan.fits and max(plan.peaks.values()) <= plan.usable
    if decode == "lossless":
        assert plan.vae_chunk is not None and plan.vae_budget <= plan.usable


def test_a_one_shot_run_encodes_before_the_transformer_loads():
    plan = plan_memory(_sizes(), 12 * GIB, "cpu", one_shot=True)  # 9 GiB T5 + 2.5 GiB others would not fit
    assert (plan.offload, plan.text_encoder) == ("none", "released")
    assert plan.peaks["encode"] == 9 * GIB + GIB // 2 + GIB // 4  # T5, the VAE and the activations only
    assert plan.fits


def test_tiles_only_when_lossless_chunks_cannot_fit_and_over_budget_is_said():
    sizes = _sizes(full=30 * GIB, per_frame=8 * GIB, tiled_full=3 * GIB)  # one latent frame: 8 GiB untiled
    plan = plan_memory(sizes, 12 * GIB, "cpu", one_shot=True)
    assert plan.vae_decode == "tiles" and plan.fits
    hopeless = plan_memory(_sizes(), 4 * GIB, "cpu", one_shot=True)
    assert not hopeless.fits and "OVER the usable memory" in hopeless.describe()


def test_flags_override_the_plan_and_offload_needs_cuda():
    plan = plan_memory(_sizes(), 40 * GIB, "cuda", offload="model", vae_memory=GIB, one_shot=False)
    assert plan.offload == "model" and plan.vae_budget == GIB and plan.vae_decode == "lossless"
    assert plan_memory(_sizes(), 40 * GIB, "cuda", vae_memory=None).vae_decode == "full"
    with pytest.raises(ValueError, match="on the CPU there is nowhere to move them"):
        plan_memory(_sizes(), 40 * GIB, "cpu", offload="model")
    with pytest.raises(ValueError, match="offload 'disk' is not one of"):
        plan_memory(_sizes(), 40 * GIB, "cuda", offload="disk")


def _tiny_ddim_pipe(tiny_release):
    """``(pipe, run)``: the tiny release pipeline with DDIM, and a seeded 2-step call returning its frames."""
    model_path, t5_path = tiny_release
    pipe = OpenSoraPlanPipeline.from_release(model_path, version=TINY_VERSION, text_encoder=t5_path, scheduler="DDIM")
    pipe.set_progress_bar_config(disable=True)
    return pipe, lambda: pipe("a cat playing the piano", num_inference_steps=2,
                              generator=torch.Generator().manual_seed(0), output_type="pt").frames


def test_pipeline_plan_uses_the_vaes_own_chunking_and_keeps_the_video(tiny_release):
    pipe, run = _tiny_ddim_pipe(tiny_release)
    reference = run()
    shape = pipe._latent_shape(1, *pipe.default_size())
    need = pipe.vae.decode_plan(shape, None).need
    # A budget whose usable part leaves the VAE a third of its plain decode
    weights = sum(weight_bytes(m) for m in (pipe.text_encoder, pipe.transformer, pipe.vae))
    memory = (weights + need / 3 + CPU_RUNTIME_BYTES) / (1 - HEADROOM_FRACTION) / GIB
    plan = pipe.enable_memory_plan(memory_gb=memory, device="cpu")
    assert plan.vae_decode == "lossless" and plan.vae_chunk == pipe.vae.decode_plan(shape, plan.vae_budget).chunk
    assert pipe.memory_plan is plan and pipe.vae.decode_memory_budget == plan.vae_budget / GIB
    torch.testing.assert_close(run(), reference, rtol=0, atol=2e-5)  # lossless chunks: the same video


def test_model_cpu_offload_works_as_in_diffusers(tiny_release):
    pipe, run = _tiny_ddim_pipe(tiny_release)
    reference = run()
    pipe.enable_model_cpu_offload(device="cpu")  # the hooks run here too; on CUDA they move each model in and out
    torch.testing.assert_close(run(), reference, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# sample: --dry_run, the plan's log line, out of memory as one line
# --------------------------------------------------------------------------------------------


def test_dry_run_prints_the_plan_reads_no_weights_and_writes_nothing(tiny_release, tmp_path, capsys, monkeypatch):
    from opensora_plan import cli
    from opensora_plan.models import loading

    model_path, t5_path = tiny_release
    monkeypatch.setattr(loading, "read_state_dict", lambda *a, **k: pytest.fail("--dry_run read weights"))
    out = tmp_path / "out"
    assert cli.main(["sample", "a cat", "--model_path", str(model_path), "--version", TINY_VERSION,
                     "--text_encoder_name", str(t5_path), "--save_img_path", str(out), "--memory_gb", "12",
                     "--dry_run", "--sample_method", "DDIM"]) == 0
    printed = capsys.readouterr().out
    assert "Memory plan for 12.0 GiB (--memory_gb 12" in printed and "text encoder released" in printed
    assert all(f"  {stage}" in printed for stage in ("encode", "denoise", "decode"))
    assert not out.exists()


def test_dry_run_over_an_existing_output_still_prints_the_plan(tiny_release, tmp_path, capsys, caplog):
    """The collision the real run would refuse is one warning; the plan is printed; the file is untouched."""
    from opensora_plan import cli
    from opensora_plan.pipelines.sample_t2v import video_filename

    model_path, t5_path = tiny_release
    out = tmp_path / "out"
    out.mkdir()
    earlier = out / video_filename(0, "a cat")
    earlier.write_bytes(b"an earlier video")
    assert cli.main(["sample", "a cat", "--model_path", str(model_path), "--version", TINY_VERSION,
                     "--text_encoder_name", str(t5_path), "--save_img_path", str(out), "--memory_gb", "12",
                     "--dry_run", "--sample_method", "DDIM"]) == 0
    assert "Memory plan for 12.0 GiB" in capsys.readouterr().out
    assert "already exists" in caplog.text and earlier.read_bytes() == b"an earlier video"


@pytest.mark.parametrize("where, error, stage, flag", [
    ("decode", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), "decoding with the VAE",
     "--vae_memory_gb"),
    ("denoise", RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you "
                             "tried to allocate 43980465111 bytes."), "denoising", "--memory_gb"),
    ("encode", MemoryError(), "encoding the prompts", "--offload model"),
])
def test_out_of_memory_is_one_line_naming_stage_plan_and_flag(tiny_release, tmp_path, capsys, monkeypatch, where,
                                                             error, stage, flag):
    from opensora_plan import cli
    from opensora_plan.models.latte import LatteT2V
    from opensora_plan.models.text_encoder import encode_texts  # noqa: F401  (patched where the pipeline uses it)
    from opensora_plan.pipelines import pipeline_opensora_plan

    def fail(*args, **kwargs):
        raise error

    target = {"decode": (OpenSoraPlanPipeline, "decode_latents_float"), "denoise": (LatteT2V, "forward"),
              "encode": (pipeline_opensora_plan, "encode_texts")}[where]
    monkeypatch.setattr(*target, fail)
    model_path, t5_path = tiny_release
    code = cli.main(["sample", "a cat", "--model_path", str(model_path), "--version", TINY_VERSION,
                     "--text_encoder_name", str(t5_path), "--save_img_path", str(tmp_path / "out"),
                     "--sample_method", "DDIM", "--num_sampling_steps", "2", "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith(f"error: Out of memory while {stage} under the memory plan (") and flag in err[0]
    assert "offload none, text encoder released" in err[0] and "Traceback" not in err[0]


def test_a_plan_with_model_offload_and_t5_on_the_cpu_hooks_the_others_only(tiny_release):
    from opensora_plan.pipelines.memory_plan import MemoryPlan

    pipe, run = _tiny_ddim_pipe(tiny_release)
    reference = run()
    plan = MemoryPlan("cuda", 8 * GIB, "given", 6 * GIB, "model", "cpu", "full", None, None, {"decode": GIB})
    pipe.apply_memory_plan(plan, device="cpu")  # the CPU stands in for the GPU: the same hooks run
    assert hasattr(pipe.transformer, "_hf_hook") and hasattr(pipe.vae, "_hf_hook")
    assert not hasattr(pipe.text_encoder, "_hf_hook")
    torch.testing.assert_close(run(), reference, rtol=0, atol=0)
