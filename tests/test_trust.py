"""Trustworthy outputs (issue 10): no silent wrong result, no traceback, the gate checks what training reads.

Each test names the kind of fault it guards against; the inputs are small and built here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import warnings
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from opensora_plan import cli
from opensora_plan.data.video_io import VideoReader, decord_available, list_videos, read_video, write_gif, write_video


def _one_error_line(capsys, pattern: str) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and re.search(pattern, lines[-1]), err
    assert "Traceback" not in err, err
    return lines[-1]


# --------------------------------------------------------------------------------------------
# Item 5: identical frames -> identical bytes
# --------------------------------------------------------------------------------------------


def _smooth_frames(seed: int, t: int = 17, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 255, (t, size, size, 3), dtype=np.uint8)
    return (np.cumsum(noise, axis=1) % 256).astype(np.uint8)  # (T, H, W, 3) uint8


def test_written_mp4_bytes_depend_only_on_the_frames(tmp_path):
    """x264's macroblock-tree rate control read memory that earlier encodes had left behind, so the same
    frames gave different files (3 of 6 writes of this demo video before the fix, pixels up to 22 levels
    apart). The frames are the shipped demo model's video; a larger encode between writes varies that
    memory the way a sampling process does."""
    assert cli.main(["sample", "a red circle moving left", "--seed", "2", "--num_sampling_steps", "5",
                     "--save_img_path", str(tmp_path / "a")]) == 0
    assert cli.main(["sample", "a red circle moving left", "--seed", "2", "--num_sampling_steps", "5",
                     "--save_img_path", str(tmp_path / "b")]) == 0
    first, second = (next((tmp_path / d).glob("*.mp4")).read_bytes() for d in "ab")
    assert first == second
    frames, _ = read_video(next((tmp_path / "a").glob("*.mp4")))
    digests = set()
    for i in range(6):
        write_video(tmp_path / "other.mp4", _smooth_frames(i + 1, t=9, size=256), fps=8)
        digests.add(hashlib.sha256(write_video(tmp_path / f"{i}.mp4", frames, fps=8).read_bytes()).hexdigest())
    assert len(digests) == 1
    gifs = {hashlib.sha256(write_gif(tmp_path / f"{i}.gif", frames, fps=8).read_bytes()).hexdigest() for i in range(2)}
    assert len(gifs) == 1


# --------------------------------------------------------------------------------------------
# Item 6: rotation metadata
# --------------------------------------------------------------------------------------------


def _rotated_mp4(path: Path, degrees: int, coded_w: int = 64, coded_h: int = 48, frames: int = 5) -> Path:
    """A phone-style clip: coded landscape, a display matrix saying 'turn by `degrees` counter-clockwise'.
    A white block marks the top-left corner of the coded frame."""
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = coded_w, coded_h, "yuv420p"
        stream.set_display_rotation(degrees)
        for i in range(frames):
            image = np.zeros((coded_h, coded_w, 3), np.uint8)
            image[:8, :16] = 255
            image[:, :, 1] = 30 * i
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.mark.parametrize("degrees, corner", [(90, "bottom-left"), (-90, "top-right"), (180, "bottom-right")])
def test_rotated_video_comes_back_in_display_orientation_from_every_backend(tmp_path, degrees, corner):
    path = _rotated_mp4(tmp_path / "phone.mp4", degrees)
    backends = ["pyav", "auto"] + (["decord"] if decord_available() else [])
    outputs = {}
    for backend in backends:
        with VideoReader(path, backend=backend) as reader:
            expected_hw = (48, 64) if degrees == 180 else (64, 48)
            assert (reader.height, reader.width) == expected_hw
            outputs[backend] = reader.get_frames(range(reader.num_frames))
            assert outputs[backend].shape == (5, *expected_hw, 3)
    for backend in backends[1:]:
        assert torch.equal(outputs[backend], outputs["pyav"]), backend
    white = (outputs["pyav"][0, :, :, 0] > 200).nonzero().float().mean(0)  # (row, col) of the marker
    h, w = outputs["pyav"].shape[1:3]
    rows = "top" if white[0] < h / 2 else "bottom"
    cols = "left" if white[1] < w / 2 else "right"
    assert f"{rows}-{cols}" == corner


def test_data_check_reports_the_size_training_reads(tmp_path):
    from opensora_plan.data.check import check_dataset
    from opensora_plan.data.datasets import VideoCaptionDataset

    _rotated_mp4(tmp_path / "phone.mp4", 90, frames=9)
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"path": "phone.mp4", "cap": "a phone clip"}]))
    report = check_dataset(data, progress=False)
    assert report["readable"] == 1 and report["height"]["max"] == 64 and report["width"]["max"] == 48
    with VideoReader(tmp_path / "phone.mp4") as reader:  # what the dataset opens
        assert (reader.height, reader.width) == (64, 48)
    sample = VideoCaptionDataset(data, num_frames=5, max_image_size=32)[0]
    assert sample["skipped"] == [] and sample["video"].shape == (3, 5, 32, 32)


# --------------------------------------------------------------------------------------------
# One video-listing function
# --------------------------------------------------------------------------------------------


def test_one_video_listing_function(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.mp4", "b.MOV", "sub/c.webm", "sub/d.mkv", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_videos(tmp_path)] == ["a.mp4", "b.MOV"]
    assert [p.relative_to(tmp_path).as_posix() for p in list_videos(tmp_path, recursive=True)] == [
        "a.mp4", "b.MOV", "sub/c.webm", "sub/d.mkv"]
    import opensora_plan.data.datasets as datasets

    assert not hasattr(datasets, "find_videos") and not hasattr(datasets, "VIDEO_SUFFIXES")


# --------------------------------------------------------------------------------------------
# The shipped demo model as a pipeline (real T5 tokenizer, trained weights, seconds on a CPU)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_pipe():
    from opensora_plan.demo.model import default_model_path, load_demo_info
    from opensora_plan.diffusion.schedulers import create_scheduler
    from opensora_plan.models.causalvae import CausalVAEModel
    from opensora_plan.models.latte import LatteT2V
    from opensora_plan.models.text_encoder import load_t5
    from opensora_plan.pipelines.pipeline_opensora_plan import OpenSoraPlanPipeline

    folder = default_model_path()
    tokenizer, text_encoder = load_t5(folder / "text_encoder")
    pipe = OpenSoraPlanPipeline(
        vae=CausalVAEModel.from_pretrained(folder / "vae"),
        transformer=LatteT2V.from_pretrained(folder / load_demo_info(folder)["version"]),
        scheduler=create_scheduler("DDIM"), text_encoder=text_encoder, tokenizer=tokenizer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------------------------
# Item 1: non-finite values stop sampling with the step named
# --------------------------------------------------------------------------------------------


def test_nan_in_initial_latents_is_an_error_not_a_black_video(demo_pipe):
    from opensora_plan.utils import NonFiniteError

    frames, height, width = demo_pipe.default_size()
    lat = torch.randn(demo_pipe._latent_shape(1, frames, height, width), generator=torch.Generator().manual_seed(0))
    lat[0, 0, 2, 3, 3] = float("nan")
    with pytest.raises(NonFiniteError, match="initial latents .*1 of .* NaN or infinite"):
        demo_pipe("a red circle moving left", num_inference_steps=5, latents=lat)


def test_nan_during_denoising_names_the_step(demo_pipe, monkeypatch):
    from opensora_plan.utils import NonFiniteError

    forward, calls = demo_pipe.transformer.forward, []

    def nan_on_third_call(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            out.sample[:, :, 0, 0, 0] = float("inf")
        return out

    monkeypatch.setattr(demo_pipe.transformer, "forward", nan_on_third_call)
    with pytest.raises(NonFiniteError, match=r"Denoising step 3 of 5 \(timestep \d+\) produced non-finite latents"):
        demo_pipe("a red circle moving left", num_inference_steps=5, generator=torch.Generator().manual_seed(0))


def test_nan_after_decode_is_an_error(demo_pipe, monkeypatch):
    from opensora_plan.utils import NonFiniteError

    decode = demo_pipe.vae.decode

    def nan_decode(z):
        out = decode(z)
        out.sample[0, 0, 0, 0, 0] = float("nan")
        return out

    monkeypatch.setattr(demo_pipe.vae, "decode", nan_decode)
    with pytest.raises(NonFiniteError, match="VAE decoded"):
        demo_pipe("a red circle moving left", num_inference_steps=2, generator=torch.Generator().manual_seed(0))


def test_float16_non_finite_message_suggests_bf16_or_fp32():
    from opensora_plan.utils import NonFiniteError, check_finite

    check_finite(torch.ones(3), "fine")
    with pytest.raises(NonFiniteError, match="float16 overflows.*--dtype bf16 or fp32"):
        check_finite(torch.tensor([1.0, float("inf")], dtype=torch.float16), "step 1", torch.float16)


def test_reconstruct_with_a_broken_vae_stops_with_one_line(tmp_path, capsys):
    from opensora_plan.demo.model import default_model_path
    from opensora_plan.models.causalvae import CausalVAEModel

    vae = CausalVAEModel.from_pretrained(default_model_path() / "vae")
    with torch.no_grad():
        next(vae.decoder.parameters()).fill_(float("nan"))
    vae.save_pretrained(tmp_path / "vae")
    write_video(tmp_path / "in.mp4", _smooth_frames(0, t=5), fps=8)
    argv = ["reconstruct", "--model_path", str(tmp_path / "vae"), "--video_path", str(tmp_path / "in.mp4"),
            "--rec_path", str(tmp_path / "out.mp4"), "--num_frames", "5", "--resolution", "64", "--device", "cpu"]
    assert cli.main(argv) == 1
    _one_error_line(capsys, "VAE decoded the latents to non-finite pixels")
    assert not (tmp_path / "out.mp4").exists()


# --------------------------------------------------------------------------------------------
# Item 2: a prompt that caption cleaning empties
# --------------------------------------------------------------------------------------------

CJK_PROMPT = "红色圆圈向左移动"  # "red circle moving left"


def test_prompt_emptied_by_cleaning_is_refused(demo_pipe):
    with pytest.raises(ValueError, match="empty after caption cleaning.*--no_clean_caption"):
        demo_pipe(CJK_PROMPT, num_inference_steps=2)
    with pytest.raises(ValueError, match="prompt 1 .*empty after caption cleaning"):
        demo_pipe(["a red circle moving left", "http://example.com"], num_inference_steps=2)
    video = demo_pipe(CJK_PROMPT, num_inference_steps=2, clean_caption=False, output_type="latent").frames
    assert torch.isfinite(video).all()


def test_prompt_mostly_removed_by_cleaning_is_a_warning(demo_pipe, caplog):
    from opensora_plan.models.text_encoder import preprocess_prompts

    with caplog.at_level(logging.WARNING):
        assert preprocess_prompts("a red circle 红色圆圈向左移动的红色圆圈向左移动") == ["a red circle"]
    assert "removed most of the prompt" in caplog.text and "'a red circle'" in caplog.text


def test_sample_cli_refuses_cjk_prompt_before_loading(tmp_path, capsys):
    assert cli.main(["sample", CJK_PROMPT, "--save_img_path", str(tmp_path / "out")]) == 1
    _one_error_line(capsys, "empty after caption cleaning")
    assert not (tmp_path / "out").exists()
    assert cli.main(["sample", CJK_PROMPT, "--no_clean_caption", "--num_sampling_steps", "2",
                     "--save_img_path", str(tmp_path / "out")]) == 0
    assert len(list((tmp_path / "out").glob("*.mp4"))) == 1


# --------------------------------------------------------------------------------------------
# Item 3: truncation is announced; the negative prompt keeps its tokens
# --------------------------------------------------------------------------------------------


def test_long_prompt_truncation_is_warned_with_the_count(demo_pipe, caplog):
    from opensora_plan.models.text_encoder import MAX_LENGTH

    prompt = "a red circle moving left " * 70
    count = len(demo_pipe.tokenizer(prompt.strip().lower()).input_ids)
    assert count > MAX_LENGTH
    with caplog.at_level(logging.WARNING):
        demo_pipe.encode_prompt_with_masks(prompt)
    assert f"has {count} tokens but the model reads {MAX_LENGTH}: the last {count - MAX_LENGTH}" in caplog.text
    assert caplog.text.count("tokens but the model reads") == 1


def test_negative_prompt_keeps_its_tokens_by_default(demo_pipe, caplog):
    prompt, negative = "a red circle", "a blue square moving up and a green triangle moving down, white circle left"
    n_prompt = len(demo_pipe.tokenizer(prompt).input_ids)
    n_negative = len(demo_pipe.tokenizer(negative.replace(",", ", ")).input_ids)
    assert n_negative > n_prompt
    cond, cond_mask, uncond, uncond_mask = demo_pipe.encode_prompt_with_masks(prompt, negative)
    assert int(cond_mask.sum()) == n_prompt and int(uncond_mask.sum()) >= n_negative - 1
    assert cond.shape[1] == uncond.shape[1] == int(uncond_mask.sum())
    with caplog.at_level(logging.WARNING):
        _, reference_uncond = demo_pipe.encode_prompt(prompt, negative)  # the reference: cut to the prompt's length
    assert reference_uncond.shape[1] == n_prompt
    assert "negative prompt" in caplog.text and "dropping" in caplog.text
    # The reference mode is still there, and gives another video when the negative is cut.
    run = lambda mode: demo_pipe(prompt, negative_prompt=negative, num_inference_steps=3, output_type="latent",  # noqa: E731
                                 generator=torch.Generator().manual_seed(0), text_conditioning=mode).frames
    assert not torch.allclose(run("per_prompt"), run("reference"))


def test_single_prompt_with_short_negative_is_the_reference_conditioning(demo_pipe):
    cond, cond_mask, uncond, uncond_mask = demo_pipe.encode_prompt_with_masks("a red circle moving left")
    ref_cond, ref_uncond = demo_pipe.encode_prompt("a red circle moving left")
    assert bool(cond_mask.all()) and bool(uncond_mask.all())  # no mask reaches the transformer
    torch.testing.assert_close(cond, ref_cond)
    torch.testing.assert_close(uncond, ref_uncond, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# Item 4: one prompt + one seed -> one video, whatever the batch
# --------------------------------------------------------------------------------------------

BATCH_PROMPTS = ["a red circle moving left", "a green square moving up", "a white triangle moving down quickly"]


# EulerAncestral draws noise in every step (one generator per prompt); the CLI test below samples with it too.
@pytest.mark.parametrize("scheduler", ["DDIM", pytest.param("EulerAncestralDiscrete", marks=pytest.mark.slow)])
def test_prompt_alone_equals_prompt_in_batch(demo_pipe, scheduler):
    from opensora_plan.diffusion.schedulers import create_scheduler

    demo_pipe.scheduler = create_scheduler(scheduler)
    gens = lambda: [torch.Generator().manual_seed(10 + i) for i in range(3)]  # noqa: E731
    # Final latents (B, 4, F, h, w): the video is their per-sample decode (checked end to end through the CLI below).
    batch = demo_pipe(BATCH_PROMPTS, num_inference_steps=3, generator=gens(), output_type="latent").frames
    reference = demo_pipe(BATCH_PROMPTS, num_inference_steps=3, generator=gens(), output_type="latent",
                          text_conditioning="reference").frames
    for i, prompt in enumerate(BATCH_PROMPTS):
        alone = demo_pipe(prompt, num_inference_steps=3, generator=torch.Generator().manual_seed(10 + i),
                          output_type="latent").frames
        # Float noise of batched matmuls only.
        torch.testing.assert_close(batch[i : i + 1], alone, atol=1e-4 * float(alone.abs().max()), rtol=0)
    assert (reference - batch).abs().max() > 0.05 * float(batch.abs().max())  # the reference's rule really differs
    demo_pipe.scheduler = create_scheduler("DDIM")


def test_sample_cli_prompt_file_batch_equals_each_prompt_alone(tmp_path, monkeypatch):
    import opensora_plan.data.video_io as video_io

    written, write = {}, video_io.write_video

    def keep_frames(path, frames, fps, **kwargs):  # the frames handed to the encoder (H.264 is lossy)
        written[Path(path)] = frames.clone()
        return write(path, frames, fps, **kwargs)

    monkeypatch.setattr(video_io, "write_video", keep_frames)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(BATCH_PROMPTS + [BATCH_PROMPTS[0]]) + "\n")  # a repeated prompt: its own file
    assert cli.main(["sample", "--prompt_file", str(prompts), "--batch_size", "4", "--num_sampling_steps", "4",
                     "--seed", "5", "--save_img_path", str(tmp_path / "batch")]) == 0
    batch_files = sorted((tmp_path / "batch").glob("*.mp4"))
    assert len(batch_files) == 4  # no output overwrote another
    for i, prompt in enumerate(BATCH_PROMPTS):
        out = tmp_path / f"alone{i}"
        assert cli.main(["sample", prompt, "--num_sampling_steps", "4", "--seed", str(5 + i),
                         "--save_img_path", str(out)]) == 0
        alone, in_batch = written[next(out.glob("*.mp4"))], written[batch_files[i]]
        diff = (alone.int() - in_batch.int()).abs()  # uint8 (T, H, W, 3)
        assert diff.max() <= 1 and (diff == 0).float().mean() > 0.999, (prompt, diff.max())


# --------------------------------------------------------------------------------------------
# Item 7: the data gate decodes what training reads; read errors name the file
# --------------------------------------------------------------------------------------------


def _partly_decodable_mp4(path: Path, frames: int = 33) -> Path:
    """An mp4 whose index (moov first) lists every frame but whose data stops half way."""
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for _ in range(frames):
            image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_data_check_fails_a_partly_decodable_video_that_training_skips(tmp_path, capsys):
    from opensora_plan.data.datasets import VideoCaptionDataset

    _partly_decodable_mp4(tmp_path / "half.mp4")
    write_video(tmp_path / "good.mp4", _smooth_frames(1, t=9), fps=8)
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"path": "half.mp4", "cap": "a"}, {"path": "good.mp4", "cap": "b"}]))
    assert cli.main(["data", "check", str(data)]) == 1
    out = capsys.readouterr().out
    assert "1 readable, 1 unreadable" in out and re.search(r"UNREADABLE   entry 0: .*half\.mp4.*training skips", out)
    sample = VideoCaptionDataset(data, num_frames=17, max_image_size=32)[0]  # what training does with it
    assert sample["index"] == 1 and "half.mp4" in sample["skipped"][0]["path"]
    assert cli.main(["data", "check", "--no_decode", str(data)]) == 0  # the quick mode only opens files


def test_data_check_given_a_video_names_the_file(tmp_path, capsys):
    video = write_video(tmp_path / "some.mp4", _smooth_frames(0, t=5), fps=8)
    assert cli.main(["data", "check", str(video)]) == 1
    _one_error_line(capsys, r"Dataset file .*some\.mp4 is a video; give a dataset JSON list, or the folder")
    assert cli.main(["sample", "--prompt_file", str(video)]) == 1
    _one_error_line(capsys, r"Prompt file .*some\.mp4 is not UTF-8 text")


# --------------------------------------------------------------------------------------------
# Item 8: one clear error line (and no output) instead of a traceback or a wrong success
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, pattern", [
    (["--version", "vae"], r"vae/config\.json is not a LatteT2V config.*not vae"),
    (["--device", "tpu"], r"--device tpu is not supported; use cpu, cuda or cuda:N"),
    (["--gif", "--force_images"], r"--gif needs videos but --force_images"),
    (["--text_conditioning", "nope"], None),  # argparse: usage + error, exit 2
])
def test_sample_bad_options_are_one_line(tmp_path, capsys, extra, pattern):
    argv = ["sample", "a red circle moving left", "--save_img_path", str(tmp_path / "out"), *extra]
    if pattern is None:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err
    else:
        assert cli.main(argv) == 1
        _one_error_line(capsys, pattern)
    assert not (tmp_path / "out").exists()


def test_sample_into_an_existing_file_is_one_line(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("mine")
    assert cli.main(["sample", "a red circle moving left", "--save_img_path", str(target)]) == 1
    _one_error_line(capsys, r"--save_img_path .*taken is an existing file")
    assert target.read_text() == "mine"


@pytest.mark.parametrize("name", ["prompts.lst", "prompts.TXT", "prompts.txt"])
def test_prompt_files_need_their_flag_and_are_never_guessed(tmp_path, capsys, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).write_text("a red circle moving left\n\na green square moving up\n")
    assert cli.main(["sample", "--text_prompt", name, "--save_img_path", "out"]) == 1
    _one_error_line(capsys, rf"The prompt '{re.escape(name)}' names an existing file.*--prompt_file {re.escape(name)}")
    assert cli.main(["sample", "--text_prompt", "missing.txt", "--save_img_path", "out"]) == 1
    _one_error_line(capsys, r"looks like a file name.*--prompt_file")
    from opensora_plan.pipelines.sample_t2v import read_prompts

    assert read_prompts(prompt_file=name) == ["a red circle moving left", "a green square moving up"]
    assert read_prompts("a cat reading notes.txt") == ["a cat reading notes.txt"]  # a sentence is a prompt
    assert cli.main(["sample", "a cat", "--prompt_file", name]) == 1
    _one_error_line(capsys, "one way only")


@pytest.mark.parametrize("rec_path, pattern", [
    ("out.txt", r"--rec_path out\.txt has the suffix '\.txt'"),
    ("afile", r"--rec_path afile is an existing file"),
])
def test_reconstruct_rec_path_must_be_mp4_or_folder(tmp_path, capsys, monkeypatch, rec_path, pattern):
    from opensora_plan.demo.model import default_model_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("mine")
    write_video(tmp_path / "in.mp4", _smooth_frames(0, t=5), fps=8)
    argv = ["reconstruct", "--model_path", str(default_model_path() / "vae"), "--video_path", "in.mp4",
            "--rec_path", rec_path, "--num_frames", "5", "--resolution", "64", "--device", "cpu"]
    assert cli.main(argv) == 1
    _one_error_line(capsys, pattern)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "in.mp4"]


@pytest.fixture()
def t2v_inputs(tmp_path):
    """Folders that exist (the checks that fail here run before any model loads) and two unreadable videos."""
    for name in ("t5", "vae"):
        (tmp_path / name).mkdir()
    (tmp_path / "b1.mp4").write_bytes(b"not a video")
    (tmp_path / "b2.mp4").write_bytes(b"not one either")
    (tmp_path / "data.json").write_text(json.dumps([{"path": "b1.mp4", "cap": "a"}, {"path": "b2.mp4", "cap": "b"}]))
    return tmp_path


def _t2v_argv(root: Path, *extra: str) -> list[str]:
    return ["train-t2v", "--model", "LatteT2V-Tiny/122", "--text_encoder_name", str(root / "t5"), "--ae_path",
            str(root / "vae"), "--data_path", str(root / "data.json"), "--num_frames", "5", "--max_image_size", "32",
            "--max_train_steps", "2", "--mixed_precision", "no", "--report_to", "none",
            "--output_dir", str(root / "run"), *extra]


@pytest.mark.parametrize("batch", ["1", "2"])
def test_train_t2v_with_only_unreadable_videos_is_one_line(t2v_inputs, capsys, batch):
    assert cli.main(_t2v_argv(t2v_inputs, "--train_batch_size", batch)) == 1
    _one_error_line(capsys, r"None of the 2 entries of .*data\.json .* has a usable video.*data check")
    assert not (t2v_inputs / "run").exists()


@pytest.mark.parametrize("extra, pattern", [
    (["--num_frames", "16"], r"--num_frames 16 is not a length the CausalVAEModel_4x8x8 accepts; use 1 \+ 4k"),
    (["--max_image_size", "20"], r"--max_image_size 20 must be a positive multiple of 8"),
    (["--cfg_dropout", "1.5"], r"--cfg_dropout is a probability"),
    (["--pretrained", "nowhere.pt"], r"--pretrained nowhere\.pt does not exist"),
    (["--train_batch_size", "0"], r"--train_batch_size must be at least 1"),
])
def test_train_t2v_options_are_checked_before_any_work(t2v_inputs, capsys, extra, pattern):
    assert cli.main(_t2v_argv(t2v_inputs, *extra)) == 1
    _one_error_line(capsys, pattern)
    assert not (t2v_inputs / "run").exists()  # no options.json / log.jsonl left behind


def test_train_vae_on_an_empty_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "videos").mkdir()
    argv = ["train-vae", "--video_path", str(tmp_path / "videos"), "--model_config", str(tmp_path / "nope.json"),
            "--output_dir", str(tmp_path / "run")]
    assert cli.main(argv) == 1
    _one_error_line(capsys, r"No videos \(\.mp4/\.avi/\.webm/\.mkv/\.mov\) under .*videos")
    assert not (tmp_path / "run").exists()


def test_run_summary_says_what_was_skipped_in_words():
    from opensora_plan.data.datasets import SkippedVideos

    skipped = SkippedVideos()
    skipped.update([{"path": "bad.mp4", "reason": "broken"}])
    skipped.reset()  # a new epoch: the run's count stays
    skipped.update([{"path": "bad.mp4", "reason": "broken"}])
    line = cli._train_summary_line({"step": 3, "skipped_steps": 0, "output_dir": "runs/x", **skipped.run_report()})
    assert line == ("trained to step 3; 0 optimizer steps skipped for a non-finite loss; 2 samples replaced because "
                    "the video was unreadable (1 file, listed in the log); checkpoints in runs/x")
    assert "(0 skipped)" not in line


# --------------------------------------------------------------------------------------------
# Item 9: no run overwrites one of its own outputs
# --------------------------------------------------------------------------------------------


def test_reconstruct_folder_with_shared_stems_writes_every_output(tmp_path, capsys):
    from opensora_plan.demo.model import default_model_path
    from opensora_plan.pipelines.reconstruct import output_names

    assert output_names([Path("a.mp4"), Path("a.avi"), Path("b.mov")]) == ["a.mp4.mp4", "a.avi.mp4", "b.mp4"]
    videos = tmp_path / "videos"
    videos.mkdir()
    for i, name in enumerate(["clip.mp4", "clip.mov", "other.webm"]):
        write_video(videos / name, _smooth_frames(i, t=5), fps=8)  # mp4 data; readers go by content
    argv = ["reconstruct", "--model_path", str(default_model_path() / "vae"), "--video_path", str(videos),
            "--rec_path", str(tmp_path / "rec"), "--num_frames", "5", "--resolution", "64", "--device", "cpu", "--gif"]
    assert cli.main(argv) == 0
    outputs = sorted(p.name for p in (tmp_path / "rec").iterdir())
    assert outputs == ["clip.mov.gif", "clip.mov.mp4", "clip.mp4.gif", "clip.mp4.mp4", "metrics.json", "other.gif",
                       "other.mp4"]
    results = json.loads((tmp_path / "rec" / "metrics.json").read_text())["results"]
    assert len({r["output_path"] for r in results}) == 3


# --------------------------------------------------------------------------------------------
# Item 10: dependency noise goes through logging, one line per real problem
# --------------------------------------------------------------------------------------------


NOISY_RUN = """
import sys, warnings
import opensora_plan.pipelines.sample_t2v as sample_t2v
from opensora_plan import cli

def noisy(**kwargs):
    from diffusers.utils import logging as diffusers_logging

    for _ in range(2):  # libraries repeat theirs, e.g. on every reload of a config
        warnings.warn("this API is deprecated", FutureWarning)
        diffusers_logging.get_logger("diffusers.configuration_utils").warning(
            "The config attributes {'x': 1} were passed to X, but are not expected and will be ignored.")
    return []

sample_t2v.sample_t2v = noisy
warnings.simplefilter("always")
sys.exit(cli.main(["sample", "a red circle moving left", "--save_img_path", sys.argv[1]]))
"""


def test_dependency_warnings_are_logged_once_without_source_lines(tmp_path):
    import os
    import subprocess
    import sys

    script = tmp_path / "noisy.py"
    script.write_text(NOISY_RUN)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "out")], capture_output=True, text=True,
                            env=env, timeout=300)
    err = result.stderr
    assert result.returncode == 0, err
    assert err.count("this API is deprecated") == 1 and err.count("will be ignored") == 1, err
    assert "warnings.warn(" not in err  # Python's default format repeats the source line
    assert re.search(r"WARNING py\.warnings: FutureWarning: this API is deprecated \(noisy\.py:\d+\)", err), err
    assert re.search(r"WARNING diffusers\.configuration_utils: The config attributes", err), err


def test_caption_cleaning_of_url_like_prompts_is_silent():
    from opensora_plan.models.text_encoder import clean_caption

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # BeautifulSoup's MarkupResemblesLocatorWarning would raise here
        assert clean_caption("www.example.com/cat.html") == ""
        assert clean_caption("cat.html") == "cat. html"  # the reference cleaner's own spacing


@pytest.mark.skipif(not decord_available(), reason="decord not installed")
def test_decord_log_lines_do_not_reach_the_terminal(tmp_path, capfd, caplog):
    from opensora_plan.data.video_io import VideoReadError

    broken = _partly_decodable_mp4(tmp_path / "broken.mp4")  # decord prints "[mov,mp4,...] partial file" on it
    with caplog.at_level(logging.DEBUG, logger="opensora_plan.data.video_io"):
        with pytest.raises(VideoReadError, match="broken.mp4"):
            VideoReader(broken, backend="decord")
    err = capfd.readouterr().err
    assert "partial file" not in err and "video_reader.cc" not in err, err
    assert "partial file" in caplog.text  # still there for `opensora-plan -v`


def test_data_check_lists_captions_that_cleaning_empties(tmp_path):
    from opensora_plan.data.check import check_dataset, format_check_report

    write_video(tmp_path / "a.mp4", _smooth_frames(0, t=5), fps=8)
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"path": "a.mp4", "cap": ["a red circle", CJK_PROMPT]}]))
    report = check_dataset(data, progress=False)
    assert report["captions"]["emptied_by_cleaning"] == [{"index": 0, "caption": CJK_PROMPT}]
    assert "1 caption becomes empty after caption cleaning" in format_check_report(report)


def test_read_errors_name_the_file(tmp_path):
    from opensora_plan.train.t2v import load_stage_config

    (tmp_path / "stage.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"--config file .*stage\.json is not valid JSON"):
        load_stage_config(str(tmp_path / "stage.json"))
    with pytest.raises(ValueError, match=r"Prompt file .*is a folder"):
        from opensora_plan.pipelines.sample_t2v import read_prompts

        read_prompts(prompt_file=str(tmp_path))


def test_output_path_refused_by_the_system_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"path": "missing.mp4", "cap": "a"}]))
    assert cli.main(["data", "check", str(data), "--json_out", str(tmp_path / "file" / "report.json")]) == 1
    _one_error_line(capsys, r"file")


def test_validation_prompts_are_never_guessed_from_file_names(t2v_inputs, capsys):
    from opensora_plan.train.t2v import validate_t2v_options, T2V_DEFAULTS

    (t2v_inputs / "val.txt").write_text("a red ball\n\nwaves\n")
    opts = {**T2V_DEFAULTS, "output_dir": str(t2v_inputs / "run"), "data_path": str(t2v_inputs / "data.json"),
            "validation_prompt_file": str(t2v_inputs / "val.txt"), "validation_steps": 1}
    validate_t2v_options(opts)
    assert opts["validation_prompts"] == ["a red ball", "waves"]
    assert cli.main(_t2v_argv(t2v_inputs, "--validation_prompts", str(t2v_inputs / "val.txt"),
                              "--validation_steps", "1")) == 1
    _one_error_line(capsys, r"names an existing file.*--validation_prompt_file")


def test_demo_eval_refuses_repeated_seeds_before_work(tmp_path, capsys):
    assert cli.main(["demo", "eval", "--seeds", "0", "0", "--num_prompts", "1", "--save_dir", str(tmp_path / "v")]) == 1
    _one_error_line(capsys, "repeated seeds")
    assert not (tmp_path / "v").exists()
