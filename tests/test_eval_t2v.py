"""eval-t2v: CLIP score (cross-checked with torchmetrics) and FVD on a folder laid out like `sample`'s."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from opensora_plan.cli import main
from opensora_plan.data.video_io import read_video, write_video
from opensora_plan.metrics import frechet_distance_from_features
from opensora_plan.models.clip import CLIPScorer
from opensora_plan.pipelines.evaluate_t2v import (
    clip_frame_indices,
    evaluate_t2v,
    fvd_clip_indices,
    fvd_preprocess,
    prompt_from_filename,
    resolve_prompts,
)
from opensora_plan.pipelines.sample_t2v import video_filename
from tiny_eval_models import build_tiny_clip, save_tiny_i3d_torchscript

PROMPTS = ["a red circle moving left", "a blue square moving up", "a green triangle moving right"]
COLOURS = [(230, 30, 30), (30, 30, 230), (30, 200, 30), (220, 220, 40)]


def moving_square(seed: int, frames: int = 17, height: int = 64, width: int = 64) -> np.ndarray:
    """uint8 (T, H, W, 3): a coloured square sliding over a dark, slightly noisy background."""
    rng = np.random.default_rng(seed)
    video = rng.integers(0, 30, (frames, height, width, 3), dtype=np.uint8)
    side = min(height, width) // 3
    top = int(rng.integers(0, height - side))
    for t in range(frames):
        left = int((width - side) * t / max(frames - 1, 1))
        video[t, top : top + side, left : left + side] = COLOURS[seed % len(COLOURS)]
    return video


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip"), seed=2)


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """The folder layout `opensora-plan sample --text_prompt prompts.txt` writes, plus the prompt file."""
    folder = tmp_path_factory.mktemp("samples")
    for index, prompt in enumerate(PROMPTS):
        write_video(folder / video_filename(index, prompt), moving_square(index), fps=8)
    prompt_file = folder.parent / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n")
    return folder, prompt_file


@pytest.fixture(scope="module")
def real_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("real")
    for index in range(3):  # non-square and longer than the FVD clip, as real footage is
        write_video(folder / f"real_{index}.mp4", moving_square(10 + index, frames=20, height=48, width=80), fps=8)
    return folder


@pytest.fixture(scope="module")
def i3d_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("i3d") / "i3d_torchscript.pt"
    net = save_tiny_i3d_torchscript(path)
    return path, net


class _TensorFeatures(torch.nn.Module):
    """torchmetrics 1.9 expects get_*_features to return tensors; transformers 5 returns model outputs."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, pixel_values):
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output

    def get_text_features(self, input_ids, attention_mask):
        return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


@pytest.mark.parametrize("seed", [2, 0])  # seed 2: positive cosines; seed 0: negative ones, clamped to 0
def test_clip_scores_match_torchmetrics_clip_score(tmp_path, seed):
    clip_score = pytest.importorskip("torchmetrics.functional.multimodal").clip_score
    scorer = CLIPScorer.from_folder(build_tiny_clip(tmp_path / "clip", seed=seed))
    frames = np.concatenate([moving_square(1, frames=3, height=40, width=56), moving_square(2, frames=3)[:, :40, :56]])
    prompt = PROMPTS[0]
    ours = scorer.frame_scores(frames, prompt)
    theirs = torch.stack([
        clip_score(torch.from_numpy(frame).permute(2, 0, 1), prompt,
                   model_name_or_path=lambda: (_TensorFeatures(scorer.model), scorer.processor))
        for frame in frames
    ]).float()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    if seed == 2:
        assert (ours > 1).all()  # a real comparison, not 0 == 0
    else:
        assert (ours == 0).all()


def test_eval_t2v_cli_on_a_sample_folder(samples, real_folder, clip_folder, i3d_file, tmp_path, capsys):
    folder, _ = samples
    i3d_path, net = i3d_file
    json_out = tmp_path / "eval.json"
    code = main(["eval-t2v", "--videos", str(folder), "--real", str(real_folder), "--clip_model", str(clip_folder),
                 "--i3d_model", str(i3d_path), "--device", "cpu", "--json_out", str(json_out)])
    printed = capsys.readouterr().out
    assert code == 0
    result = json.loads(json_out.read_text())
    assert [v["prompt"] for v in result["videos"]] == PROMPTS  # read back from sample's file names
    assert "CLIP score" in printed and "FVD" in printed and "biased upward at small N" in printed

    # CLIP score: mean over all frames per video, then over videos, recomputed here.
    scorer = CLIPScorer.from_folder(clip_folder)
    per_video = [float(scorer.frame_scores(read_video(folder / video_filename(i, p))[0], p).mean())
                 for i, p in enumerate(PROMPTS)]
    assert [v["clip_score"] for v in result["videos"]] == pytest.approx(per_video, rel=1e-5)
    assert result["clip_score"] == pytest.approx(np.mean(per_video), rel=1e-5)
    assert all(v["clip_frames"] == 17 for v in result["videos"])

    # FVD: the first 16 frames, StyleGAN-V preprocessing, I3D logits, Fréchet distance, recomputed here.
    def features(paths):
        with torch.no_grad():
            return torch.cat([net(fvd_preprocess(read_video(p, indices=range(16))[0])[None]) for p in paths]).double()

    fake = features(sorted(folder.glob("*.mp4")))
    real = features(sorted(real_folder.glob("*.mp4")))
    assert result["fvd"] > 0.1  # the two sets differ, so this is a real comparison
    assert result["fvd"] == pytest.approx(frechet_distance_from_features(fake, real), rel=1e-4)
    assert (result["fvd_num_generated"], result["fvd_num_real"]) == (3, 3)
    assert result["settings"]["i3d_sha256"] and result["settings"]["num_frames"] == 16


def test_fvd_of_a_set_against_itself_is_zero_and_real_stats_can_be_reused(samples, i3d_file, tmp_path):
    folder, _ = samples
    stats = tmp_path / "real_stats.npz"
    first = evaluate_t2v(folder, metrics=["fvd"], real=folder, i3d_model=i3d_file[0], device="cpu",
                         json_out=tmp_path / "a.json", save_real_stats=stats)
    assert abs(first.fvd) < 1e-6
    again = evaluate_t2v(folder, metrics=["fvd"], real=stats, i3d_model=i3d_file[0], device="cpu",
                         json_out=tmp_path / "b.json")
    assert again.fvd == pytest.approx(first.fvd, abs=1e-9) and again.fvd_num_real == 3
    with pytest.raises(ValueError, match="recompute"):
        evaluate_t2v(folder, metrics=["fvd"], real=stats, i3d_model=i3d_file[0], num_frames=12, json_out=tmp_path / "c.json")


def test_videos_too_short_for_fvd_are_listed_but_still_clip_scored(samples, clip_folder, i3d_file, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for index, prompt in enumerate(PROMPTS):
        write_video(folder / video_filename(index, prompt), moving_square(index, frames=10 if index == 0 else 17), fps=8)
    summary = evaluate_t2v(folder, real=samples[0], clip_model=clip_folder, i3d_model=i3d_file[0], device="cpu",
                           prompts=samples[1], clip_frames=5)
    assert summary.fvd_num_generated == 2 and len(summary.videos) == 3
    assert summary.videos[0].clip_score is not None and not summary.videos[0].in_fvd
    assert summary.videos[0].clip_frames == 5
    assert "left out of FVD: 10 frames" in summary.skipped[0][1]
    assert (folder / "eval_t2v.json").is_file()


def test_prompts_come_from_a_txt_a_json_or_the_file_names(tmp_path):
    videos = [tmp_path / video_filename(i, p) for i, p in enumerate(PROMPTS)]
    assert [prompt_from_filename(v) for v in videos] == PROMPTS
    txt = tmp_path / "prompts.txt"
    txt.write_text("A red circle, moving left!\n\nA blue square moving up.\nThe third one\n")
    assert list(resolve_prompts(videos, txt).values()) == ["A red circle, moving left!", "A blue square moving up.", "The third one"]
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"path": f"clips/{v.name}", "cap": [f"caption {i}"]} for i, v in enumerate(videos)]))
    assert list(resolve_prompts(videos, data).values()) == ["caption 0", "caption 1", "caption 2"]
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({v.stem: f"p{i}" for i, v in enumerate(videos)}))
    assert list(resolve_prompts(videos, mapping).values()) == ["p0", "p1", "p2"]
    txt.write_text("only one prompt\n")
    with pytest.raises(ValueError, match="2 videos have no prompt"):
        resolve_prompts(videos, txt)


def test_fvd_preprocessing_and_frame_choice():
    frames = torch.full((16, 48, 80, 3), 51, dtype=torch.uint8)  # 51 / 255 = 0.2 -> -0.6
    clip = fvd_preprocess(frames, 224)
    assert clip.shape == (3, 16, 224, 224)
    torch.testing.assert_close(clip, torch.full_like(clip, -0.6))
    ramp = torch.arange(80, dtype=torch.uint8).mul(3).view(1, 1, 80, 1).expand(16, 48, 80, 3).contiguous()
    out = fvd_preprocess(ramp, 224)  # short side 48 -> 224, long side ceil(80 * 224 / 48) = 374, crop from 75
    source_x = (75 + 0.5) * 80 / 374 - 0.5  # bilinear, align_corners=False: where output column 0 samples
    assert float(out[0, 0, 0, 0]) == pytest.approx(3 * source_x / 255 * 2 - 1, abs=1e-4)
    assert float(out[0, 0, 0, :].mean()) == pytest.approx(3 * 39.5 / 255 * 2 - 1, abs=2e-3)  # centred window
    assert fvd_clip_indices(17, 16, 1) == list(range(16)) and fvd_clip_indices(15, 16, 1) is None
    assert fvd_clip_indices(40, 16, 2) == list(range(0, 32, 2))
    assert clip_frame_indices(17, 0) == list(range(17)) and clip_frame_indices(17, 5) == [0, 4, 8, 12, 16]


@pytest.mark.parametrize("args,message", [
    (["--metrics", "clip_score,is"], "subset of clip_score,fvd"),
    (["--metrics", "clip_score"], "needs --clip_model"),
    (["--metrics", "fvd", "--i3d_model", "x.pt"], "needs --real"),
    (["--metrics", "fvd", "--real", "R", "--i3d_model", "x.pt", "--num_frames", "8"], "--num_frames >= 9"),
    (["--metrics", "fvd", "--real", "R", "--i3d_model", "missing.pt"], "missing.pt does not exist"),
])
def test_bad_options_are_one_error_line_before_any_model_loads(samples, args, message, capsys):
    folder = samples[0]
    args = [str(folder) if a == "R" else a for a in args]
    assert main(["eval-t2v", "--videos", str(folder), *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


@pytest.mark.slow  # samples 3 videos with the shipped demo model first (~20 s on 2 cores)
def test_eval_t2v_on_what_sample_writes_with_the_demo_model(clip_folder, i3d_file, real_folder, tmp_path, capsys):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a red circle moving left\na blue square moving up, fast!\na green triangle moving right\n")
    out = tmp_path / "samples"
    assert main(["sample", "--prompt_file", str(prompt_file), "--save_img_path", str(out), "--device", "cpu"]) == 0
    assert main(["eval-t2v", "--videos", str(out), "--prompts", str(prompt_file), "--real", str(real_folder),
                 "--clip_model", str(clip_folder), "--i3d_model", str(i3d_file[0]), "--device", "cpu"]) == 0
    result = json.loads((out / "eval_t2v.json").read_text())
    assert [v["prompt"] for v in result["videos"]] == prompt_file.read_text().splitlines()  # exact, punctuation kept
    assert result["clip_score_num_videos"] == 3 and result["fvd_num_generated"] == 3 and result["fvd"] > 0
