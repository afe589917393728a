"""Fast sampling paths: fused CPU kernels, step caching (TeaCache, First Block Cache), compiled blocks.

Each fast path is checked against the exact eager model: the fused kernels within float rounding,
a cache that never skips bit for bit, a cache that skips by how much it skipped, compilation within
the parity tolerance.
"""

from __future__ import annotations

import pytest
import torch

from opensora_plan.demo.evaluate import load_demo_pipeline
from opensora_plan.models.latte import build_latte
from opensora_plan.models.layers import SHORT_ATTENTION_MAX_KEYS, attention, fused_linear_kernels, inference_weight_cache, linear
from opensora_plan.models.step_cache import FAST_CACHE, FirstBlockCache, TeaCache, make_step_cache


def _tiny_inputs(batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 5, 8, 8, generator=g)
    captions = torch.randn(batch, 7, 48, generator=g)
    return x, captions


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_latte("LatteT2V-Tiny/122").eval()


@pytest.fixture(scope="module")
def demo_pipe():
    pipe, _ = load_demo_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe, steps=8, seed=0):
    embeds, negative = pipe.encode_prompt("a red circle moving left")
    return pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=steps, guidance_scale=3.0,
                generator=torch.Generator().manual_seed(seed), output_type="latent").frames


# ------------------------------------------------------------------------------- fused kernels


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_cpu_kernels_match_plain_linear(tiny_model, autocast):
    x, captions = _tiny_inputs()
    t = torch.tensor([10, 700])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        fused = tiny_model(x, t, captions).sample
        with fused_linear_kernels(False):
            plain = tiny_model(x, t, captions).sample
    tolerance = dict(atol=5e-2, rtol=5e-2) if autocast else dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fused, plain, **tolerance)


def test_fused_kernels_are_not_used_when_gradients_are_needed(tiny_model):
    x, captions = _tiny_inputs()
    out = tiny_model(x, torch.tensor([3, 3]), captions).sample
    out.square().mean().backward()  # the oneDNN op has no autograd formula: this would warn or fail
    assert all(p.grad is not None for p in tiny_model.transformer_blocks[0].attn1.to_q.parameters())
    tiny_model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("keys", [5, SHORT_ATTENTION_MAX_KEYS])
def test_short_low_precision_attention_matches_sdpa(keys):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(64, 3, n, 16, generator=g) for n in (keys, keys, keys))
    bias = torch.zeros(64, 1, 1, keys)
    bias[:, :, :, -2:] = float("-inf")  # masked keys, as a padded text mask
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    with torch.no_grad():
        short = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), bias)
    assert short.dtype == torch.bfloat16
    torch.testing.assert_close(short.float(), exact, atol=3e-2, rtol=3e-2)
    with torch.no_grad():  # float32 and long key sequences keep SDPA itself
        assert torch.equal(attention(q, k, v, bias), exact)


def test_weight_cache_reuses_casts_within_the_block_and_never_serves_stale_weights(tiny_model):
    x, captions = _tiny_inputs()
    t = torch.tensor([10, 700])
    weight, bias, inputs = torch.randn(24, 16), torch.randn(24), torch.randn(5, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = tiny_model(x, t, captions).sample
        with inference_weight_cache():
            assert torch.equal(tiny_model(x, t, captions).sample, plain)
            assert torch.equal(tiny_model(x, t, captions).sample, plain)  # served from the cache
            first = linear(inputs, weight, bias)
            weight.mul_(2)  # an in-place change (loading, fuse_lora) must be seen
            second = linear(inputs, weight, bias)
        assert not torch.equal(first, second)
        torch.testing.assert_close(second, linear(inputs, weight, bias), atol=0, rtol=0)


# ------------------------------------------------------------------------------- step cache


@pytest.mark.parametrize("method", ["teacache", "first_block"])
def test_cache_that_never_skips_gives_the_exact_video(demo_pipe, method):
    exact = _sample(demo_pipe)
    demo_pipe.enable_cache(method, threshold=0.0)
    try:
        cached = _sample(demo_pipe)
        assert demo_pipe.cache_stats.skipped == 0
    finally:
        demo_pipe.disable_cache()
    assert torch.equal(cached, exact)
    assert torch.equal(_sample(demo_pipe), exact)  # disabled again: exact, no state left behind


@pytest.mark.parametrize("method", ["teacache", "first_block"])
def test_cache_that_always_skips_skips_every_step_but_the_first_and_last(demo_pipe, method):
    steps = 12
    exact = _sample(demo_pipe, steps)
    demo_pipe.enable_cache(method, threshold=1e9)  # skip every step it may
    try:
        cached = _sample(demo_pipe, steps)
        stats = demo_pipe.cache_stats
    finally:
        demo_pipe.disable_cache()
    # warm-up step and final step always compute, everything between is skipped
    assert (stats.computed, stats.skipped) == (2, steps - 2)
    assert torch.isfinite(cached).all()
    assert not torch.equal(cached, exact)


def test_cache_is_ignored_with_gradients_and_on_shape_change(tiny_model):
    x, captions = _tiny_inputs()
    t = torch.tensor([500, 500])
    with torch.no_grad():
        exact = tiny_model(x, t, captions).sample
    cache = TeaCache(threshold=100.0)
    tiny_model.enable_step_cache(cache)
    try:
        with_grad = tiny_model(x, t, captions).sample  # training-style call: never cached
        assert cache.stats.computed == cache.stats.skipped == 0
        torch.testing.assert_close(with_grad.detach(), exact, atol=1e-5, rtol=1e-4)
        with torch.no_grad():
            tiny_model(x, t, captions)  # warm-up: computes
            tiny_model(x, t, captions)  # skipped
            x1, c1 = _tiny_inputs(batch=1)
            tiny_model(x1, t[:1], c1)  # new batch size: must compute
        assert (cache.stats.computed, cache.stats.skipped) == (2, 1)
    finally:
        tiny_model.disable_step_cache()


def test_teacache_accumulates_until_the_threshold():
    cache = TeaCache(threshold=0.25)
    cache.reset(num_steps=6)
    base = torch.ones(4)
    shape = torch.Size([4])
    decisions = []
    for value in (1.0, 1.1, 1.2, 1.3, 1.4, 1.5):  # about 0.1 relative change per step
        decisions.append(cache.decide(base * value, shape))
        cache.residual = torch.zeros(4)
    # step 0 warm-up; then 0.1, 0.19 (skip, skip), 0.27 -> compute and restart; 0.08 skip; last step forced
    assert decisions == [True, False, False, True, False, True]


def test_first_block_cache_compares_against_the_last_computed_probe():
    cache = FirstBlockCache(threshold=0.15)
    cache.reset(num_steps=None)
    shape = torch.Size([3])
    decisions = []
    for value in (1.0, 1.1, 1.2, 1.05):
        decisions.append(cache.decide(torch.full((3,), value), shape))
        cache.residual = torch.zeros(3)
    assert decisions == [True, False, True, False]  # 0.1 skip; 0.2 vs 1.0 compute; 0.125 vs 1.2 skip


def test_cache_options_are_validated(demo_pipe):
    with pytest.raises(ValueError, match="Unknown cache"):
        demo_pipe.enable_cache("deepcache")
    with pytest.raises(ValueError, match="Bad options"):
        demo_pipe.enable_cache("teacache", treshold=0.1)
    with pytest.raises(ValueError, match="threshold must be a number >= 0"):
        make_step_cache("first_block", threshold=-1)
    demo_pipe.enable_cache("none")
    assert demo_pipe.transformer.step_cache is None


def test_fast_preset_comes_from_the_model_folder(demo_pipe):
    demo_pipe.enable_cache("fast")
    try:
        options = demo_pipe.transformer.step_cache.options()
    finally:
        demo_pipe.disable_cache()
    preset = dict(demo_pipe.fast_cache_options)
    assert options["method"] == preset.pop("method")
    assert all(options[k] == v for k, v in preset.items())


def test_fast_preset_of_a_pipeline_loaded_with_from_pretrained():
    from opensora_plan.demo.model import default_model_path, load_demo_info
    from opensora_plan.pipelines import OpenSoraPlanPipeline

    pipe = OpenSoraPlanPipeline.from_pretrained(default_model_path())
    pipe.enable_cache("fast")
    expected = load_demo_info(default_model_path())["cache_fast"]
    assert {k: pipe.transformer.step_cache.options()[k] for k in expected} == expected
    built = OpenSoraPlanPipeline(vae=pipe.vae, transformer=pipe.transformer, scheduler=pipe.scheduler)
    built.enable_cache("fast")  # no folder behind it: the generic preset
    assert built.transformer.step_cache.options()["threshold"] == FAST_CACHE["threshold"]


# ------------------------------------------------------------------------------- compile


@pytest.mark.slow
def test_compiled_blocks_match_eager():
    torch.manual_seed(0)
    model = build_latte("LatteT2V-Tiny/122").eval()
    x, captions = _tiny_inputs()
    t = torch.tensor([10, 700])
    with torch.no_grad():
        eager = model(x, t, captions).sample
        model.compile_blocks()
        compiled = model(x, t, captions).sample
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_gpu_check_script_runs_on_cpu_in_smoke_mode(tmp_path):
    """benchmarks/gpu_check.py is the one script a lent GPU runs; a broken script would waste that time."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, str(script), "--device", "cpu", "--smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    student = "distilled student: LCM 4 steps, guidance 1 (batch 1), per video"  # issue 21's row
    assert [r["row"] for r in result["denoising"]] == ["eager", student, "eager + cache teacache 0.1", "compiled",
                                                       "compiled + cache teacache 0.1"]
    assert all(r["step_s"] > 0 for r in result["denoising"] if r["row"] != student)
    (row,) = [r for r in result["denoising"] if r["row"] == student]
    assert row["video_s"] > 0 and row["speedup"] > 0
    assert {r["mode"] for r in result["vae"]} == {"full", "lossless", "approximate", "tiling"}
