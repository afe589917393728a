"""Our RGT vs the official ``rgt_arch.RGT`` network: same weights, same input, alternating runs.

The official architecture file is read from the reference kit's source archive
(``opensora/models/super_resolution/basicsr/archs/rgt_arch.py``) and imported alone, with two stand-ins
(its ``basicsr`` package does not import at the tag, and timm is not installed here): a registry whose
``register()`` returns the class unchanged, and timm's ``DropPath`` (identity in eval mode) and
``trunc_normal_`` (torch's). Nothing it computes is changed.

    python benchmarks/upscale_vs_reference.py --size 64 --repeats 3 --threads 1

Prints ours/ref wall time per frame (median of the alternating runs) and the max abs difference.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

ARCHIVE = Path(os.environ.get("OPENSORA_PLAN_REFERENCE_SRC",
                              "/work/shared/reference/bench/refsrc-osp-v1.0.0.tar.gz"))
MEMBER = "opensora/models/super_resolution/basicsr/archs/rgt_arch.py"

_SHIMS = {
    "timm/__init__.py": "",
    "timm/models/__init__.py": "",
    "timm/models/layers.py": (
        "import torch\n"
        "class DropPath(torch.nn.Module):  # stand-in: identity (eval mode only)\n"
        "    def __init__(self, p=0.0):\n        super().__init__()\n"
        "    def forward(self, x):\n        assert not self.training, 'stand-in DropPath is eval-only'\n        return x\n"
        "trunc_normal_ = torch.nn.init.trunc_normal_\n"),
    "basicsr/__init__.py": "",
    "basicsr/utils/__init__.py": "",
    "basicsr/utils/registry.py": (
        "class _Registry:\n    def register(self):\n        return lambda cls: cls\n"
        "ARCH_REGISTRY = _Registry()\n"),
}


def load_official(folder: Path):
    """The official RGT class, imported from a temporary copy of its file beside the stand-ins."""
    for name, text in _SHIMS.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    with tarfile.open(ARCHIVE) as archive:
        member = next(m for m in archive.getmembers() if m.name.endswith(MEMBER))
        (folder / "rgt_arch.py").write_bytes(archive.extractfile(member).read())
    sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location("rgt_arch_official", folder / "rgt_arch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RGT


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=64, help="input side (full-size RGT x2)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile", action="store_true", help="print the top operators of one run of each")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from opensora_plan.models.rgt import RGTModel, rgt_config

    config = rgt_config("RGT-x2")
    with tempfile.TemporaryDirectory() as tmp:
        official_cls = load_official(Path(tmp))
        torch.manual_seed(0)
        ref = official_cls(in_chans=3, img_size=64, img_range=1.0, resi_connection="1conv",
                           **config).eval()
    with torch.no_grad():  # the fixture recipe: Linear weights at std fan_in^-1/2, noisy biases
        for name, prm in ref.named_parameters():
            if name.endswith("bias"):
                prm.add_(torch.randn_like(prm) * 0.02)
        for m in ref.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(m.weight.shape[1] ** -0.5 / 0.02)
    ours = RGTModel(**config).eval()
    state = ref.state_dict()
    for key in ours.official_buffers():
        state.pop(key)
    ours.load_state_dict(state, strict=True)
    x = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))

    times = {"ours": [], "ref": []}
    with torch.no_grad():
        ours(x[..., :32, :32]), ref(x[..., :32, :32])  # warm-up
        for _ in range(args.repeats):
            for name, model in (("ref", ref), ("ours", ours)):
                start = time.perf_counter()
                out = model(x)
                times[name].append(time.perf_counter() - start)
                if name == "ref":
                    expected = out
                else:
                    diff = (out - expected).abs().max().item()
        if args.profile:
            for name, model in (("ref", ref), ("ours", ours)):
                with torch.profiler.profile() as prof:
                    model(x)
                print(f"--- {name}\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    ref_t, ours_t = statistics.median(times["ref"]), statistics.median(times["ours"])
    print(f"RGT x2 full size, {args.size}x{args.size} input, {args.threads} thread(s), float32, "
          f"load average {os.getloadavg()[0]:.2f}, torch {torch.__version__}")
    print(f"ref {ref_t:.2f} s/frame  ours {ours_t:.2f} s/frame  ours/ref {ours_t / ref_t:.2f}  "
          f"(runs ref {', '.join(f'{t:.2f}' for t in times['ref'])}; ours {', '.join(f'{t:.2f}' for t in times['ours'])})")
    print(f"max abs diff {diff:.2e}")


if __name__ == "__main__":
    main()
