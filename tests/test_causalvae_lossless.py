"""Lossless temporal chunking of the CausalVAE decode: equal to the full decode, bounded working set."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from opensora_plan.models.causalvae import CausalVAEModel
from opensora_plan.models.causalvae.model import estimate_decode_memory
from opensora_plan.models.causalvae.streaming import GroupStats

ATOL = 1e-4  # the bound for fp32; measured deviations are ~1e-5 (rounding of conv windows)


def _noisy(vae: CausalVAEModel) -> CausalVAEModel:
    """The fixtures' recipe: default init, then noise on biases and norm weights (no identity layers)."""
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.02)
            elif p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return vae.eval()


@pytest.fixture(scope="module")
def fixture_vae(fixtures_dir):
    vae = CausalVAEModel.from_config(json.loads((fixtures_dir / "causalvae_tiny_config" / "config.json").read_text()))
    vae.load_state_dict(load_file(str(fixtures_dir / "causalvae_tiny_weights.safetensors")))
    return vae.eval()


@pytest.fixture(scope="module")
def two_level_vae():
    """2 levels, temporal x2 and spatial x2 at the upper level: 33 frames <-> 17 latent frames."""
    torch.manual_seed(0)
    config = {
        "hidden_size": 32, "hidden_size_mult": [1, 2], "num_res_blocks": 1,
        "encoder_resnet_blocks": ["ResnetBlock3D"] * 2, "decoder_resnet_blocks": ["ResnetBlock3D"] * 2,
        "encoder_spatial_downsample": ["SpatialDownsample2x", ""], "encoder_temporal_downsample": ["TimeDownsample2x", ""],
        "decoder_spatial_upsample": ["", "SpatialUpsample2x"], "decoder_temporal_upsample": ["", "TimeUpsample2x"],
    }
    return _noisy(CausalVAEModel.from_config(config))


def _decode(vae, z, **chunking):
    if chunking:
        vae.enable_temporal_chunking(**chunking)
    else:
        vae.disable_temporal_chunking()
    try:
        with torch.no_grad():
            return vae.decode(z).sample
    finally:
        vae.disable_temporal_chunking()


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_lossless_equals_full_decode_on_the_fixture_vae(fixture_vae, chunk):
    z = torch.randn(1, 4, 5, 4, 4, generator=torch.Generator().manual_seed(1))
    full = _decode(fixture_vae, z)
    lossless = _decode(fixture_vae, z, chunk_latent_frames=chunk, mode="lossless")
    assert lossless.shape == full.shape == (1, 3, 17, 32, 32)
    torch.testing.assert_close(lossless, full, rtol=0, atol=ATOL)


def test_lossless_reproduces_the_official_fixture_decode(fixture_vae, fixtures_dir):
    io = load_file(str(fixtures_dir / "causalvae_tiny_io.safetensors"))
    ours = _decode(fixture_vae, io["in.latent"], chunk_latent_frames=1)
    torch.testing.assert_close(ours, io["out.decode_latent"], rtol=0, atol=ATOL)


@pytest.mark.parametrize("chunk, batch", [(1, 1), (3, 2), (5, 1), (16, 1)])
def test_lossless_equals_full_decode_two_levels_33_frames(two_level_vae, chunk, batch):
    z = torch.randn(batch, 4, 17, 4, 4, generator=torch.Generator().manual_seed(2))
    full = _decode(two_level_vae, z)
    lossless = _decode(two_level_vae, z, chunk_latent_frames=chunk)
    assert full.shape == (batch, 3, 33, 8, 8)
    torch.testing.assert_close(lossless, full, rtol=0, atol=ATOL)


def test_lossless_is_far_closer_than_approximate(two_level_vae):
    z = torch.randn(1, 4, 17, 4, 4, generator=torch.Generator().manual_seed(3))
    full = _decode(two_level_vae, z)
    lossless = (_decode(two_level_vae, z, chunk_latent_frames=4) - full).abs().max()
    approx = (_decode(two_level_vae, z, chunk_latent_frames=4, context_latent_frames=4, mode="approximate")
              - full).abs().max()
    assert lossless <= ATOL < approx


def test_lossless_keeps_stage_outputs_on_the_offload_device_or_compute_device(two_level_vae):
    z = torch.randn(1, 4, 17, 4, 4, generator=torch.Generator().manual_seed(4))
    full = _decode(two_level_vae, z)
    for offload in ("cpu", None):
        torch.testing.assert_close(_decode(two_level_vae, z, chunk_latent_frames=3, offload_device=offload),
                                   full, rtol=0, atol=ATOL)


def test_lossless_with_spatial_tiling_equals_tiled_full_decode(fixture_vae):
    z = torch.randn(1, 4, 3, 6, 6, generator=torch.Generator().manual_seed(5))
    fixture_vae.enable_tiling()
    saved = fixture_vae.tile_sample_min_size, fixture_vae.tile_latent_min_size
    fixture_vae.tile_sample_min_size, fixture_vae.tile_latent_min_size = 32, 4
    try:
        tiled = _decode(fixture_vae, z)
        both = _decode(fixture_vae, z, chunk_latent_frames=1)
    finally:
        fixture_vae.disable_tiling()
        fixture_vae.tile_sample_min_size, fixture_vae.tile_latent_min_size = saved
    assert tiled.shape == (1, 3, 9, 48, 48)
    torch.testing.assert_close(both, tiled, rtol=0, atol=ATOL)


def test_bf16_lossless_stays_as_close_as_bf16_full(two_level_vae):
    vae = CausalVAEModel.from_config(two_level_vae.config)
    vae.load_state_dict(two_level_vae.state_dict())
    vae = vae.eval().to(torch.bfloat16)
    z = torch.randn(1, 4, 9, 4, 4, generator=torch.Generator().manual_seed(6))
    reference = _decode(two_level_vae, z)  # fp32
    full = _decode(vae, z.bfloat16()).float()
    lossless = _decode(vae, z.bfloat16(), chunk_latent_frames=2).float()
    assert lossless.dtype == full.dtype and lossless.shape == full.shape
    # Same rounding budget as the bf16 full decode (chunk statistics are accumulated in fp32/fp64).
    assert (lossless - reference).abs().max() <= 2 * (full - reference).abs().max() + 1e-3


def test_group_stats_merge_equals_whole_tensor_statistics():
    x = torch.randn(2, 64, 11, 3, 5, dtype=torch.float64) * 3 + 100  # offset: cancellation would show
    stats = GroupStats(32)
    for start in (0, 1, 5, 6):
        stats.add(x[:, :, start:{0: 1, 1: 5, 5: 6, 6: 11}[start]].float())
    norm = torch.nn.GroupNorm(32, 64, eps=1e-6)
    scale, shift = stats.affine(norm)
    torch.testing.assert_close(x.float() * scale + shift, norm(x.float()), rtol=0, atol=2e-5)


# --------------------------------------------------------------------------------------------
# The switch and its errors
# --------------------------------------------------------------------------------------------


def test_mode_switch_defaults_and_errors(two_level_vae):
    vae = two_level_vae
    vae.enable_temporal_chunking(2)
    assert (vae.temporal_chunk_latent_frames, vae.temporal_chunking_mode) == (2, "lossless")
    vae.enable_temporal_chunking(3, 2, mode="approximate")
    assert (vae.temporal_chunking_mode, vae.temporal_context_latent_frames) == ("approximate", 2)
    vae.disable_temporal_chunking()
    assert vae.temporal_chunk_latent_frames is None
    with pytest.raises(ValueError, match="Unknown temporal chunking mode 'exact'"):
        vae.enable_temporal_chunking(2, mode="exact")
    with pytest.raises(ValueError, match="chunk_latent_frames >= 1"):
        vae.enable_temporal_chunking(0, mode="lossless")
    with pytest.raises(ValueError, match="context_latent_frames only applies to mode='approximate'"):
        vae.enable_temporal_chunking(2, 4, mode="lossless")
    with pytest.raises(ValueError, match="offload_device only applies to mode='lossless'"):
        vae.enable_temporal_chunking(2, 4, mode="approximate", offload_device=None)
    assert vae.temporal_chunk_latent_frames is None  # a rejected call changes nothing


def test_memory_estimate_orders_the_modes_and_rejects_bad_input():
    with torch.device("meta"):
        vae = CausalVAEModel()  # release architecture, no weights allocated
    shape = (1, 4, 17, 32, 32)  # 65x256x256
    full = estimate_decode_memory(vae, shape, torch.float32)
    lossless = estimate_decode_memory(vae, shape, torch.float32, mode="lossless", chunk_latent_frames=2)
    assert lossless < full / 4
    assert estimate_decode_memory(vae, shape, torch.bfloat16) == pytest.approx(full / 2, rel=0.05)
    longer = estimate_decode_memory(vae, (1, 4, 33, 32, 32), torch.float32, mode="lossless", chunk_latent_frames=2)
    assert longer < 1.25 * lossless  # about bounded: only the trunk and the 3-channel output grow
    with pytest.raises(ValueError, match="latent shape"):
        estimate_decode_memory(vae, (4, 17, 32, 32), torch.float32)
    with pytest.raises(ValueError, match="mode"):
        estimate_decode_memory(vae, shape, torch.float32, mode="fast")


# --------------------------------------------------------------------------------------------
# Memory budget: automatic lossless chunking
# --------------------------------------------------------------------------------------------


def test_budget_switches_to_lossless_with_one_log_line(two_level_vae, caplog):
    vae = two_level_vae
    z = torch.randn(1, 4, 17, 4, 4, generator=torch.Generator().manual_seed(7))
    full = _decode(vae, z)
    shape_need = estimate_decode_memory(vae, z.shape, torch.float32)
    try:
        vae.set_decode_memory_budget(shape_need / 3 / 2**30)
        with caplog.at_level("INFO", logger="opensora_plan.models.causalvae.model"), torch.no_grad():
            budgeted = vae.decode(z).sample
        lines = [r.getMessage() for r in caplog.records if "decoding losslessly" in r.getMessage()]
        assert len(lines) == 1 and "over the" in lines[0] and "stage outputs on the compute device" in lines[0]
        torch.testing.assert_close(budgeted, full, rtol=0, atol=ATOL)
        assert vae.temporal_chunk_latent_frames is None  # the switch lasts for that call only
        caplog.clear()
        vae.set_decode_memory_budget(2 * shape_need / 2**30)  # fits: the plain decode, bit for bit
        with caplog.at_level("INFO", logger="opensora_plan.models.causalvae.model"), torch.no_grad():
            assert torch.equal(vae.decode(z).sample, full)
        assert not caplog.records
    finally:
        vae.set_decode_memory_budget(None)


def test_budget_auto_and_errors(two_level_vae):
    vae = two_level_vae
    z = torch.randn(1, 4, 3, 4, 4, generator=torch.Generator().manual_seed(8))
    try:
        vae.set_decode_memory_budget("auto")  # this machine's free memory: far more than needed
        with torch.no_grad():
            assert torch.equal(vae.decode(z).sample, _decode(vae, z))
    finally:
        vae.set_decode_memory_budget(None)
    for bad in (0, -1.5, "lots", float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match="positive finite number of GiB, 'auto' or None"):
            vae.set_decode_memory_budget(bad)


@pytest.mark.slow
def test_sample_cli_budget_decodes_losslessly_and_says_so(tmp_path, caplog):
    from opensora_plan import cli
    from tiny_t2v import TINY_VERSION, build_tiny_t2v

    model_path, t5_path = build_tiny_t2v(tmp_path / "models")
    args = ["sample", "a red ball", "--model_path", str(model_path), "--version", TINY_VERSION,
            "--text_encoder_name", str(t5_path), "--num_sampling_steps", "1", "--sample_method", "DDIM", "--fps", "8"]
    with caplog.at_level("INFO"):
        assert cli.main([*args, "--save_img_path", str(tmp_path / "out"), "--vae_memory_gb", "0.0001"]) == 0
    lines = [r.getMessage() for r in caplog.records if "decoding losslessly" in r.getMessage()]
    assert len(lines) == 1 and "over the 0.00 GiB budget" in lines[0]
    assert len(list((tmp_path / "out").glob("*.mp4"))) == 1
    caplog.clear()
    with caplog.at_level("INFO"):  # default "auto": this tiny decode fits, nothing is switched
        assert cli.main([*args, "--save_img_path", str(tmp_path / "auto")]) == 0
    assert not [r for r in caplog.records if "decoding losslessly" in r.getMessage()]
    with pytest.raises(SystemExit):
        cli.main([*args, "--vae_memory_gb", "-1"])


def test_lossless_chunks_stay_the_requested_size_through_time_upsampling(fixture_vae, monkeypatch):
    """The working set is one chunk: no stage may let frames pile up (TimeUpsample2x delays one frame)."""
    from opensora_plan.models.causalvae import streaming

    seen: list[int] = []
    original = streaming._Store.append
    monkeypatch.setattr(streaming._Store, "append", lambda self, x: (seen.append(x.shape[2]), original(self, x))[1])
    z = torch.randn(1, 4, 7, 4, 4, generator=torch.Generator().manual_seed(9))
    _decode(fixture_vae, z, chunk_latent_frames=2)
    # 7 latent frames -> 25 pixel frames; chunks of 2 latent frames are at most 2 * 4 pixel frames.
    assert max(seen) == 2 * fixture_vae.temporal_compression
    assert sum(seen) > 25  # every stage wrote its chunks
