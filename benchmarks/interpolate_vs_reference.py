"""Time per frame pair of our AMT-G against the official v1.0.0 network, side by side.

The official network file (``opensora/models/frame_interpolation/networks/AMT-G.py`` from the reference
tarball, CC BY-NC 4.0) is imported from an unpacked copy — it needs only torch, numpy and Pillow — and
both models get the same random weights (ours' state dict loaded strictly into the official one) and the
same frames. Calls alternate (official, ours, official, ...) in one process with one thread by default;
prints the median seconds per pair of each (wall clock and CPU time: on a shared machine the CPU-time ratio is
the steadier one), ours/official, the load average and the max abs difference of the outputs (parity
tolerance of tests/test_amt.py: 1e-5 on images).

Example:
  OMP_NUM_THREADS=1 python benchmarks/interpolate_vs_reference.py --size 256 --repeats 5
  (--ref_tree DIR: an unpacked reference tree, e.g. REF_TREE from shared/reference/bench/refenv.sh)
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

TARBALL = Path(__file__).resolve().parents[2] / "shared" / "reference" / "bench" / "refsrc-osp-v1.0.0.tar.gz"
NETWORK_DIR = "opensora/models/frame_interpolation"


def official_model(tree: Path):
    """The official AMT-G ``Model`` class, imported the way its driver does (its folder first on sys.path)."""
    folder = tree / NETWORK_DIR
    sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location("official_amt_g", folder / "networks" / "AMT-G.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Model(corr_radius=3, corr_lvls=4, num_flows=5)


def unpack(tarball: Path, target: Path) -> Path:
    with tarfile.open(tarball) as tar:
        members = [m for m in tar.getmembers() if m.name.lstrip("./").startswith(NETWORK_DIR)]
        tar.extractall(target, members=members, filter="data")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs="+", default=[256], help="square frame sides")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each model per size (after a warm-up)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ref_tree", default=None, help="unpacked reference tree (default: unpack the tarball)")
    parser.add_argument("--tarball", default=str(TARBALL))
    parser.add_argument("--corr_chunk", type=int, default=0, help="ours: correlation chunk (0: whole volume)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from opensora_plan.models.amt import build_amt

    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(args.ref_tree) if args.ref_tree else unpack(Path(args.tarball), Path(tmp))
        ref = official_model(tree).eval()
    torch.manual_seed(0)
    ours = build_amt("AMT-G").eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    ours.set_correlation_chunk(args.corr_chunk or None)
    print(f"AMT-G fp32, {args.threads} thread(s), load average {os.getloadavg()[0]:.1f} at start")
    print(f"{'size':>6} {'official s':>11} {'ours s':>8} {'ours/official':>14} {'CPU ratio':>10} {'load':>5} "
          f"{'max |diff|':>11}")
    for size in args.size:
        g = torch.Generator().manual_seed(size)
        img0, img1 = torch.rand(2, 1, 3, size, size, generator=g)
        embt = torch.full((1, 1, 1, 1), 0.5)
        wall = {"official": [], "ours": []}
        cpu = {"official": [], "ours": []}
        with torch.no_grad():
            ref_out = ref(img0, img1, embt, eval=True)["imgt_pred"]  # warm-up of both
            our_out = ours(img0, img1, embt).imgt_pred
            for _ in range(args.repeats):
                for name in ("official", "ours"):
                    w, c = time.perf_counter(), time.process_time()
                    if name == "official":
                        ref(img0, img1, embt, eval=True)
                    else:
                        ours(img0, img1, embt)
                    wall[name].append(time.perf_counter() - w)
                    cpu[name].append(time.process_time() - c)
        t_ref, t_ours = statistics.median(wall["official"]), statistics.median(wall["ours"])
        c_ratio = statistics.median(cpu["ours"]) / statistics.median(cpu["official"])
        diff = (ref_out - our_out).abs().max().item()
        print(f"{size:>6} {t_ref:>11.3f} {t_ours:>8.3f} {t_ours / t_ref:>14.2f} {c_ratio:>10.2f} "
              f"{os.getloadavg()[0]:>5.1f} {diff:>11.2e}", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
