"""Seams: PSNR of tiled RGT output against the whole-frame output on a real frame, blended vs the official paste.

Models: ``fixture`` (the parity fixtures' tiny x2 RGT, tests/fixtures), ``demo`` (the shipped demo upscaler),
``full`` (the released x2 configuration, 13.2M parameters, random weights seeded as benchmarks/upscale.py
builds them). The frame: an image file (e.g. tests/data/big_buck_bunny_256.jpg) or a frame of a video, optionally area-downscaled by ``--downscale``. For every ``--tiles T/O`` the blended tiles of
``upscale_tensor`` (side T, overlap O) are compared with the whole frame; the official ``use_chop`` hard paste
(``upscale_official_chop``) is measured on the same input. Float32, CPU, outputs clamped to [0, 1].

    OMP_NUM_THREADS=1 python benchmarks/upscale_seams.py tests/data/big_buck_bunny_256.jpg --model fixture \
        --tiles 224/64 192/48
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from opensora_plan.data.video_io import VIDEO_EXTENSIONS, VideoReader
from opensora_plan.metrics import psnr
from opensora_plan.models import RGTModel
from opensora_plan.models.rgt import load_rgt
from opensora_plan.pipelines.model_folder import stage_model
from opensora_plan.pipelines.upscale import upscale_official_chop, upscale_tensor

REPO = Path(__file__).resolve().parents[1]


def build(name: str, seed: int) -> torch.nn.Module:
    if name == "fixture":
        fixtures = REPO / "tests" / "fixtures" / "reference" / "fixtures"
        model = RGTModel.from_config(json.loads((fixtures / "rgt_tiny_config.json").read_text())["network_g"])
        model.load_state_dict(load_file(fixtures / "rgt_tiny_weights.safetensors"))
        return model.eval()
    if name == "demo":
        return load_rgt(stage_model("upscale", None), device="cpu")
    sys.path.insert(0, str(Path(__file__).parent))
    from upscale import build as build_full  # benchmarks/upscale.py: the released x2 size, seeded random weights

    return build_full(seed, "cpu")


def timed(fn, *args):
    start = time.perf_counter()
    with torch.no_grad():
        out = fn(*args).clamp(0, 1)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("frame", help="an image file, or a video (see --frame_index)")
    parser.add_argument("--frame_index", type=int, default=0, help="which frame of a video")
    parser.add_argument("--model", choices=["fixture", "demo", "full"], default="fixture")
    parser.add_argument("--seed", type=int, default=0, help="seed of the full-size model's random weights")
    parser.add_argument("--downscale", type=int, default=1, help="area-downscale the frame by this factor first")
    parser.add_argument("--tiles", nargs="*", default=["224/64"], metavar="T/O", help="tile side / overlap pairs")
    parser.add_argument("--no-chop", action="store_true", help="skip the official hard paste")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    if Path(args.frame).suffix.lower() in VIDEO_EXTENSIONS:
        with VideoReader(args.frame) as reader:
            x = reader.get_frames([args.frame_index]).permute(0, 3, 1, 2).float() / 255
    else:
        with Image.open(args.frame) as image:
            x = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[None].float() / 255
    if args.downscale > 1:
        x = (F.interpolate(x, scale_factor=1 / args.downscale, mode="area") * 255).round() / 255
    model = build(args.model, args.seed)
    size = f"{x.shape[-1]}x{x.shape[-2]}"
    whole, seconds = timed(model, x)
    name = Path(args.frame).name + (f"#{args.frame_index}" if Path(args.frame).suffix.lower() in VIDEO_EXTENSIONS else "")
    print(f"{args.model} on {name} {size}: whole frame {seconds:.1f} s")
    print("| model | frame | size | tiles | blended PSNR (dB) | s | hard paste PSNR (dB) | s |")
    print("|---|---|---|---|---|---|---|---|")
    chop = "" if args.no_chop else "{:.2f} | {:.1f}".format(*(lambda o, s: (psnr(o, whole).item(), s))(
        *timed(upscale_official_chop, model, x)))
    for spec in args.tiles:
        tile, overlap = (int(v) for v in spec.split("/"))
        out, seconds = timed(upscale_tensor, model, x, tile, overlap)
        print(f"| {args.model} | {name} | {size} | {tile} / {overlap} | {psnr(out, whole).item():.2f} | "
              f"{seconds:.1f} | {chop or '-'} |", flush=True)


if __name__ == "__main__":
    main()
