"""OpenSoraPlanPipeline: parity with the reference sampler, prompt-embedding rules, validation, schedulers."""

from __future__ import annotations

import weakref

import pytest
import torch
from safetensors.torch import load_file

from opensora_plan.diffusion.schedulers import SCHEDULERS, TRAINING_SCHEDULE, create_scheduler, scheduler_names
from opensora_plan.models.causalvae import CausalVAEModel
from opensora_plan.models.latte import LatteT2V
from opensora_plan.models.text_encoder import MAX_LENGTH, encode_texts, load_t5, preprocess_texts
from opensora_plan.pipelines import OpenSoraPlanPipeline
from tiny_t2v import TINY_VERSION, build_tiny_t2v, fixture_model_folders

# --------------------------------------------------------------------------------------------
# Parity with the official VideoGenPipeline (fixtures/e2e_sampling.safetensors)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fixture_models(fixtures_dir, tmp_path_factory):
    latte_dir, vae_dir = fixture_model_folders(fixtures_dir, tmp_path_factory.mktemp("fixture_models"))
    return LatteT2V.from_pretrained(latte_dir), CausalVAEModel.from_pretrained(vae_dir)


@pytest.mark.parametrize("run, method", [("e2e_pndm", "PNDM"), ("e2e_ddim", "DDIM")])
def test_sampling_reproduces_reference_fixture(fixtures_dir, fixture_models, run, method):
    fx = {k[len(run) + 1:]: v for k, v in load_file(fixtures_dir / "e2e_sampling.safetensors").items()
          if k.startswith(run + ".")}
    transformer, vae = fixture_models
    pipe = OpenSoraPlanPipeline(vae=vae, transformer=transformer, scheduler=create_scheduler(method))
    pipe.set_progress_bar_config(disable=True)
    noise = fx["in.noise"]
    t_factor, s_factor = vae.temporal_compression, vae.spatial_compression
    latents = pipe(
        prompt_embeds=fx["in.prompt_embeds"],
        negative_prompt_embeds=fx["in.negative_prompt_embeds"],
        latents=noise,
        num_frames=t_factor * (noise.shape[2] - 1) + 1,
        height=noise.shape[3] * s_factor,
        width=noise.shape[4] * s_factor,
        num_inference_steps=int(fx["meta.num_inference_steps"]),
        guidance_scale=7.5,
        output_type="latent",
    ).frames

    assert torch.equal(pipe.scheduler.timesteps.cpu(), fx["timesteps"])
    ref = fx["out.final_latents"]
    assert latents.shape == ref.shape
    assert (latents - ref).abs().max() <= 1e-3 * ref.abs().max()

    decoded = pipe.decode_latents_float(latents)  # (B, T, C, H, W)
    assert decoded.shape == fx["out.decoded_float_btchw"].shape
    torch.testing.assert_close(decoded, fx["out.decoded_float_btchw"], atol=1e-3, rtol=0)

    video = pipe.decode_latents(latents)  # (B, T, H, W, 3) uint8
    ref_video = fx["out.video_uint8_bthwc"]
    assert video.dtype == torch.uint8 and video.shape == ref_video.shape
    diff = (video.int() - ref_video.int()).abs()
    assert diff.max() <= 1 and (diff == 0).float().mean() > 0.99


def test_decode_latents_truncates_to_uint8(fixture_models):
    """uint8 by truncation, as the reference: 254.99 -> 254, not 255."""
    _, vae = fixture_models
    pipe = OpenSoraPlanPipeline(vae=vae, transformer=fixture_models[0], scheduler=create_scheduler())
    fake = torch.full((1, 2, 3, 4, 4), 0.999)  # (B, T, C, H, W): (x/2 + 0.5) * 255 = 254.87
    pipe.decode_latents_float = lambda latents: fake
    video = pipe.decode_latents(torch.zeros(1))
    assert video.shape == (1, 2, 4, 4, 3) and (video == 254).all()


# --------------------------------------------------------------------------------------------
# Tiny random models with a real (tiny) T5
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    model_path, t5_path = build_tiny_t2v(tmp_path_factory.mktemp("tiny"))
    tokenizer, text_encoder = load_t5(t5_path)
    pipe = OpenSoraPlanPipeline(
        vae=CausalVAEModel.from_pretrained(model_path / "vae"),
        transformer=LatteT2V.from_pretrained(model_path / TINY_VERSION),
        scheduler=create_scheduler("DDIM"),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_single_prompt_embeddings_are_cut_to_valid_tokens(tiny_pipe):
    prompt = "a cat playing the piano"
    full, mask = encode_texts(tiny_pipe.tokenizer, tiny_pipe.text_encoder, preprocess_texts(prompt))
    negative_full, _ = encode_texts(tiny_pipe.tokenizer, tiny_pipe.text_encoder, [""])
    n = int(mask.sum())
    cond, uncond = tiny_pipe.encode_prompt(prompt)
    assert 1 < n < MAX_LENGTH and cond.shape == uncond.shape == (1, n, full.shape[-1])
    torch.testing.assert_close(cond, full[:, :n])
    torch.testing.assert_close(uncond, negative_full[:, :n])  # the negative is cut to the *prompt's* length


def test_batch_embeddings_keep_300_tokens_and_zero_prompt_padding_only(tiny_pipe):
    prompts = ["a cat playing the piano", "a drone shot of waves crashing on a rocky coast at sunset"]
    full, mask = encode_texts(tiny_pipe.tokenizer, tiny_pipe.text_encoder, preprocess_texts(prompts))
    cond, uncond = tiny_pipe.encode_prompt(prompts)
    assert cond.shape == uncond.shape == full.shape == (2, MAX_LENGTH, full.shape[-1])
    torch.testing.assert_close(cond, full * mask[:, :, None])
    assert (cond[mask == 0] == 0).all()
    assert (uncond[:, 5:].abs().sum(-1) > 0).all()  # reference quirk: the negative side is not masked


def test_given_embeddings_are_used_unchanged(tiny_pipe):
    width = tiny_pipe.transformer.config.caption_channels
    cond, uncond = torch.randn(1, 7, width), torch.randn(1, 7, width)
    out_cond, out_uncond = tiny_pipe.encode_prompt(None, prompt_embeds=cond, negative_prompt_embeds=uncond)
    assert torch.equal(out_cond, cond) and torch.equal(out_uncond, uncond)


def test_text_to_video_is_seeded_and_shaped_from_the_config(tiny_pipe):
    frames, height, width = tiny_pipe.default_size()
    run = lambda seed, **kw: tiny_pipe(  # noqa: E731
        "a cat playing the piano", num_inference_steps=2, generator=torch.Generator().manual_seed(seed), **kw
    ).frames
    video = run(0)
    assert video.dtype == torch.uint8 and video.shape == (1, frames, height, width, 3)
    latents = run(0, output_type="latent")
    assert torch.equal(latents, run(0, output_type="latent"))
    assert not torch.equal(latents, run(1, output_type="latent"))
    # The negative prompt enters through classifier-free guidance.
    assert not torch.allclose(latents, run(0, output_type="latent", negative_prompt="a red car"))


def test_batch_of_prompts_with_one_generator_per_video(tiny_pipe):
    prompts = ["a cat playing the piano", "a red car driving through a snowy forest"]
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    latents = tiny_pipe(prompts, num_inference_steps=2, generator=gens, output_type="latent").frames
    assert latents.shape[0] == 2 and torch.isfinite(latents).all()
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        tiny_pipe(prompts, num_inference_steps=2, generator=gens + gens[:1], output_type="latent")


def test_image_mode_generates_one_frame_without_temporal_attention(tiny_pipe, monkeypatch):
    calls = []
    forward = tiny_pipe.transformer.forward

    def spy(*args, **kwargs):
        calls.append(kwargs["enable_temporal_attentions"])
        assert kwargs.get("encoder_attention_mask") is None  # the reference samples without a text mask
        return forward(*args, **kwargs)

    monkeypatch.setattr(tiny_pipe.transformer, "forward", spy)
    _, height, width = tiny_pipe.default_size()
    video = tiny_pipe("a cat", num_frames=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0)).frames
    assert video.shape == (1, 1, height, width, 3) and calls == [False, False]


def test_release_text_encoder_then_sample_from_embeddings(tmp_path):
    model_path, t5_path = build_tiny_t2v(tmp_path, seed=1)
    tokenizer, text_encoder = load_t5(t5_path)
    pipe = OpenSoraPlanPipeline(
        vae=CausalVAEModel.from_pretrained(model_path / "vae"),
        transformer=LatteT2V.from_pretrained(model_path / TINY_VERSION),
        scheduler=create_scheduler("DDIM"), text_encoder=text_encoder, tokenizer=tokenizer,
    )
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="latent", release_text_encoder=False).frames
    cond, uncond = pipe.encode_prompt("a cat")
    encoder_ref = weakref.ref(text_encoder)
    del text_encoder
    pipe.release_text_encoder()
    assert pipe.text_encoder is None and encoder_ref() is None  # really freed, not just detached
    with pytest.raises(ValueError, match="text encoder was released.*prompt_embeds"):
        pipe("a cat", num_inference_steps=2)
    got = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=2,
               generator=torch.Generator().manual_seed(0), output_type="latent").frames
    torch.testing.assert_close(got, expected)


def test_vae_tiling_switch(tiny_pipe):
    tiny_pipe.enable_vae_tiling(0.5)
    assert tiny_pipe.vae.use_tiling and tiny_pipe.vae.tile_overlap_factor == 0.5
    tiny_pipe.disable_vae_tiling()
    assert not tiny_pipe.vae.use_tiling
    with pytest.raises(ValueError, match=r"tile_overlap_factor must be in \[0, 1\)"):
        tiny_pipe.enable_vae_tiling(1.0)


# --------------------------------------------------------------------------------------------
# Validation before heavy work
# --------------------------------------------------------------------------------------------


def _bad_inputs(pipe):
    frames, height, width = pipe.default_size()
    cfg = pipe.transformer.config
    cases = {
        "frames not 1+4k": (dict(num_frames=frames + 1), r"num_frames=\d+ is not 1 \+ 4k.*use \d+"),
        "frames of another version": (dict(num_frames=frames + 4), r"does not match this transformer.*num_frames="),
        "height not /16": (dict(height=height + 8), r"height=\d+ is not divisible by 16"),
        "width of another version": (dict(width=width + 16), r"width=\d+ does not match this transformer"),
        "caption width": (
            dict(prompt=None, prompt_embeds=torch.zeros(1, 5, cfg.caption_channels + 1)),
            rf"{cfg.caption_channels + 1} wide but the transformer expects caption_channels={cfg.caption_channels}",
        ),
        "embeds shapes differ": (
            dict(prompt=None, prompt_embeds=torch.zeros(1, 5, cfg.caption_channels),
                 negative_prompt_embeds=torch.zeros(1, 6, cfg.caption_channels)),
            "must have the same shape",
        ),
        "prompt and embeds": (dict(prompt_embeds=torch.zeros(1, 5, cfg.caption_channels)), "exactly one of prompt"),
        "latents shape": (dict(latents=torch.zeros(1, 4, 1, 2, 2)), r"latents have shape .* expected"),
        "output type": (dict(output_type="mp4"), "output_type 'mp4' is not supported"),
        "steps": (dict(num_inference_steps=0), "num_inference_steps must be at least 1"),
        "PNDM steps": (dict(num_inference_steps=3), "PNDM with Runge-Kutta warm-up needs at least 4 steps"),
    }
    assert list(cases) == BAD_CASES
    return cases


BAD_CASES = [
    "frames not 1+4k", "frames of another version", "height not /16", "width of another version", "caption width",
    "embeds shapes differ", "prompt and embeds", "latents shape", "output type", "steps", "PNDM steps",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_invalid_inputs_fail_before_any_model_runs(tiny_pipe, monkeypatch, case):
    kwargs, message = _bad_inputs(tiny_pipe)[case]
    boom = lambda *a, **k: pytest.fail("a model ran before the inputs were validated")  # noqa: E731
    monkeypatch.setattr(tiny_pipe.transformer, "forward", boom)
    monkeypatch.setattr(tiny_pipe.text_encoder, "forward", boom)
    monkeypatch.setattr(tiny_pipe, "scheduler", create_scheduler("PNDM"))
    call = dict(prompt="a cat", num_inference_steps=4) | kwargs
    with pytest.raises(ValueError, match=message):
        tiny_pipe(**call)


def test_a_size_mismatch_names_the_trained_size_as_width_x_height(tiny_pipe, monkeypatch):
    """Every frame size in a message reads width x height, as sample's and upscale's summary lines print them."""
    frames, height, width = tiny_pipe.default_size()
    monkeypatch.setattr(tiny_pipe, "default_size", lambda: (frames, height, width + 32))  # a wide version
    with pytest.raises(ValueError, match=f"trained at {width + 32}x{height};"):
        tiny_pipe("a cat", num_inference_steps=2, width=width)


def test_vae_with_other_latent_channels_is_rejected(tiny_pipe):
    vae8 = CausalVAEModel(hidden_size=32, hidden_size_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=8, embed_dim=8)
    pipe = OpenSoraPlanPipeline(vae=vae8, transformer=tiny_pipe.transformer, scheduler=create_scheduler(),
                                text_encoder=tiny_pipe.text_encoder, tokenizer=tiny_pipe.tokenizer)
    with pytest.raises(ValueError, match="VAE has 8 latent channels but the transformer expects 4"):
        pipe("a cat", num_inference_steps=2)


# --------------------------------------------------------------------------------------------
# Scheduler factory
# --------------------------------------------------------------------------------------------


def test_scheduler_names_are_the_reference_ones_plus_unipc_lcm_and_tcd():
    assert scheduler_names() == [
        "DDIM", "EulerDiscrete", "DDPM", "DPMSolverMultistep", "DPMSolverSinglestep", "PNDM", "HeunDiscrete",
        "EulerAncestralDiscrete", "DEISMultistep", "KDPM2AncestralDiscrete", "UniPCMultistep", "LCM", "TCD",
    ]
    assert isinstance(create_scheduler(), SCHEDULERS["PNDM"])  # PNDM is the default
    assert isinstance(create_scheduler("ddim"), SCHEDULERS["DDIM"])  # case-insensitive


def test_schedulers_use_diffusers_defaults_like_the_reference():
    pndm, ddim = create_scheduler("PNDM"), create_scheduler("DDIM")
    assert pndm.config.skip_prk_steps is False and pndm.config.set_alpha_to_one is False
    assert ddim.config.clip_sample is True and ddim.config.set_alpha_to_one is True
    for name in scheduler_names():
        assert dict(create_scheduler(name).config) == dict(SCHEDULERS[name](**TRAINING_SCHEDULE).config)


def test_every_scheduler_uses_the_training_noise_schedule():
    """Fixed reference bug: diffusers' Heun / KDPM2Ancestral defaults are SD's betas (0.00085..0.012)."""
    assert SCHEDULERS["HeunDiscrete"]().config.beta_start == 0.00085  # why the fix is needed
    for name in scheduler_names():
        cfg = create_scheduler(name).config
        assert (cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.beta_schedule) == (1000, 1e-4, 0.02, "linear")
        assert cfg.prediction_type == "epsilon"
    assert create_scheduler("DDIM", clip_sample=False).config.clip_sample is False  # overrides pass through


def test_unknown_scheduler_lists_the_names():
    with pytest.raises(ValueError, match=r"Unknown sample method 'Karras'; choose one of DDIM, .*UniPCMultistep"):
        create_scheduler("Karras")


@pytest.mark.parametrize("name", scheduler_names())
def test_every_scheduler_samples_finite_latents(tiny_pipe, name):
    tiny_pipe.scheduler = create_scheduler(name)
    try:
        latents = tiny_pipe("a cat", num_inference_steps=4, generator=torch.Generator().manual_seed(0),
                            output_type="latent").frames
    finally:
        tiny_pipe.scheduler = create_scheduler("DDIM")
    assert latents.shape == tiny_pipe._latent_shape(1, *tiny_pipe.default_size()) and torch.isfinite(latents).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_sampling_tracks_float32(tmp_path_factory, tiny_pipe, dtype):
    model_path, t5_path = build_tiny_t2v(tmp_path_factory.mktemp("half"))  # same seed as tiny_pipe's models
    tokenizer, text_encoder = load_t5(t5_path, torch_dtype=dtype)
    pipe = OpenSoraPlanPipeline(
        vae=CausalVAEModel.from_pretrained(model_path / "vae", torch_dtype=dtype),
        transformer=LatteT2V.from_pretrained(model_path / TINY_VERSION, torch_dtype=dtype),
        scheduler=create_scheduler("DDIM"), text_encoder=text_encoder, tokenizer=tokenizer,
    )
    pipe.set_progress_bar_config(disable=True)
    run = lambda p: p("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0),  # noqa: E731
                      output_type="latent").frames
    half, full = run(pipe), run(tiny_pipe)
    assert half.dtype == dtype and torch.isfinite(half).all()
    # Mean, not max: guidance 7.5 amplifies half-precision rounding in a few elements.
    err = (half.float() - full).abs().mean() / full.abs().mean()
    assert err < 0.05
