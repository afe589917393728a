"""Tiny text-to-video model folders for pipeline and ``sample`` tests (imported by test modules).

``build_tiny_t2v`` writes the release layout (``<model_path>/<version>/`` LatteT2V, ``<model_path>/vae/``
CausalVAE) with small random models plus a tiny T5 folder, all through ``save_pretrained``, so the tests
load them with the real loaders. ``fixture_model_folders`` turns the reference fixture weights into
loadable folders (config.json + diffusion_pytorch_model.safetensors).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from opensora_plan.models.causalvae import CausalVAEModel
from opensora_plan.models.latte import build_latte
from opensora_plan.demo.tiny_t5 import build_tiny_t5

TINY_VERSION = "tiny-17x64x64"
CAPTIONS = [
    "a cat playing the piano",
    "a drone shot of waves crashing on a rocky coast at sunset",
    "a red car driving through a snowy forest",
    "time lapse of clouds over a mountain lake",
]


def tiny_latte(seed: int = 0):
    """LatteT2V-Tiny (width 32, 2 layers, captions 48, latents 5x8x8) with every parameter perturbed.

    Zero-initialised layers (as in DiT-style init) would make the output ignore the text and the
    noise; the perturbation makes guidance, prompts and seeds matter, as in a trained model.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_latte("LatteT2V-Tiny/122")
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def tiny_vae(seed: int = 0):
    """CausalVAE 4x8x8 with the release's block layout but width 32 and one res block per level."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CausalVAEModel(hidden_size=32, hidden_size_mult=(1, 1, 2, 2), num_res_blocks=1).eval()


def build_tiny_t2v(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """``(model_path, t5_path)``: ``model_path/{TINY_VERSION,vae}`` and a tiny T5 whose width matches."""
    model_path = Path(root) / "models"
    latte = tiny_latte(seed)
    latte.save_pretrained(model_path / TINY_VERSION)
    tiny_vae(seed).save_pretrained(model_path / "vae")
    t5_path = build_tiny_t5(Path(root) / "t5", CAPTIONS, d_model=latte.config.caption_channels, seed=seed)
    return model_path, t5_path


def fixture_model_folders(fixtures_dir: Path, root: Path) -> tuple[Path, Path]:
    """``(latte_folder, vae_folder)`` made loadable from the fixtures' config folders + weight files."""
    folders = []
    for name, config, weights in (
        ("latte", "latte_tiny_config", "latte_tiny_weights.safetensors"),
        ("vae", "causalvae_tiny_config", "causalvae_tiny_weights.safetensors"),
    ):
        folder = Path(root) / name
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(fixtures_dir / config / "config.json", folder / "config.json")
        os.symlink(fixtures_dir / weights, folder / "diffusion_pytorch_model.safetensors")
        folders.append(folder)
    return folders[0], folders[1]
