"""``opensora-plan distill`` on tiny models: the loss maths against diffusers' LCMScheduler, exact resume, the student
run / folder / LoRA adapter sampling with its own defaults (one transformer evaluation per step at batch 1), and one
clear error per bad input."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from test_train_t2v import assets  # noqa: E402,F401  (module fixture: tiny T5, VAE and clips)
from train_helpers import read_log  # noqa: E402

from opensora_plan import cli  # noqa: E402
from opensora_plan.data.video_io import read_video  # noqa: E402
from opensora_plan.models.latte import LatteT2V, build_latte  # noqa: E402
from opensora_plan.train.distill import (DistillTask, boundary_scalings, phase_edge, phase_edges,  # noqa: E402
                                         save_student_folder, solver_timesteps)

PROMPT = "a red ball rolls to the left"


@pytest.fixture(scope="module")
def teacher(assets, tmp_path_factory):  # noqa: F811
    """A model folder: ``v/`` (a perturbed LatteT2V-Tiny, captions 32, latents 2 x 4 x 4), ``vae/`` and a
    ``sampling_config.json`` naming the version, the T5 and guidance 4 (the teacher's defaults)."""
    root, t5, _ = assets
    folder = tmp_path_factory.mktemp("teacher")
    torch.manual_seed(3)
    model = build_latte("LatteT2V-Tiny/122", caption_channels=32, sample_size=[4, 4], video_length=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder / "v")
    shutil.copytree(root / "vae", folder / "vae")
    (folder / "sampling_config.json").write_text(json.dumps(
        {"version": "v", "text_encoder": str(t5), "sample_method": "EulerAncestralDiscrete", "num_sampling_steps": 6,
         "guidance_scale": 4.0, "fps": 8}))
    return folder


def _argv(assets, teacher, out: Path, steps: int, *extra: str) -> list[str]:  # noqa: F811
    root, _, sizes = assets
    return ["distill", "--teacher", str(teacher), "--data_path", str(root / "data.json"),
            "--num_frames", str(sizes["num_frames"]), "--max_image_size", str(sizes["max_image_size"]),
            "--model_max_length", "16", "--train_batch_size", "2", "--max_train_steps", str(steps),
            "--checkpointing_steps", "2", "--mixed_precision", "no", "--report_to", "none", "--learning_rate", "1e-3",
            "--num_sampling_steps", "2", "--output_dir", str(out), *extra]


class _CountForwards:
    """Records the batch size of every LatteT2V forward (monkeypatched in)."""

    def __init__(self, monkeypatch):
        self.batches = []
        original = LatteT2V.forward

        def forward(model, hidden_states, *args, **kwargs):
            self.batches.append(hidden_states.shape[0])
            return original(model, hidden_states, *args, **kwargs)

        monkeypatch.setattr(LatteT2V, "forward", forward)


def _sample(out: Path, model_path: Path, *extra: str) -> torch.Tensor:
    argv = ["sample", PROMPT, "--model_path", str(model_path), "--save_img_path", str(out), "--seed", "2", *extra]
    assert cli.main(argv) == 0
    (video,) = sorted(out.glob("*.mp4"))
    return read_video(video)[0]


# --------------------------------------------------------------------------------------------
# The maths: the boundary condition and grid are LCMScheduler's
# --------------------------------------------------------------------------------------------


def test_boundary_condition_and_grid_match_diffusers_lcm_scheduler():
    from opensora_plan.diffusion.schedulers import create_scheduler

    scheduler = create_scheduler("LCM")
    t = torch.tensor([0, 19, 259, 999])
    c_skip, c_out = boundary_scalings(t)
    for i, step in enumerate(t.tolist()):
        expected = scheduler.get_scalings_for_boundary_condition_discrete(step)
        assert (float(c_skip[i]), float(c_out[i])) == pytest.approx(tuple(float(v) for v in expected), rel=1e-6)
    assert float(c_skip[0]) == 1.0 and float(c_out[0]) == 0.0  # f(x, 0) = x
    start, prev = solver_timesteps(torch.arange(50), 50)
    assert start[0] == 19 and start[-1] == 999 and prev[0] == 0 and torch.equal(prev[1:], start[:-1])
    for steps in (1, 2, 4, 8):  # the student is sampled only at timesteps it was trained on
        scheduler.set_timesteps(steps)
        assert set(scheduler.timesteps.tolist()) <= set(start.tolist())


def test_pcd_phases_are_where_the_tcd_sampler_lands():
    from opensora_plan.diffusion.schedulers import create_scheduler

    assert phase_edges(4).tolist() == [0, 259, 499, 759]
    start, _ = solver_timesteps(torch.arange(50), 50)
    for steps in (1, 2, 4, 8):
        scheduler = create_scheduler("TCD")
        scheduler.set_timesteps(steps)
        visited = scheduler.timesteps.tolist()
        edges = phase_edges(steps)
        assert edges.tolist() == sorted(visited[1:] + [0])
        assert set(visited) <= set(start.tolist())  # sampled only at timesteps it was trained on
        # each visited timestep's phase ends where the sampler's next step lands
        assert phase_edge(torch.tensor(visited), edges).tolist() == visited[1:] + [0]
    assert phase_edge(torch.tensor([19, 259, 260, 999]), phase_edges(4)).tolist() == [0, 0, 259, 759]


def _pcd_loss(method, teacher_model, index, guidance=1.0):
    """The consistency loss of a student that *is* the teacher, on one random latent and caption."""
    task = DistillTask(teacher_model, teacher_model, None, guidance_scale=guidance, method=method)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 2, 4, 4, generator=g)
    text, mask = torch.randn(1, 16, 32, generator=g), torch.ones(1, 16, dtype=torch.long)
    task._null = (torch.zeros(16, 32), torch.ones(16, dtype=torch.long))  # the empty caption's embedding
    noise = torch.randn(latents.shape, generator=g)
    with torch.no_grad():
        return float(task.consistency_loss(teacher_model, latents, text, mask, torch.tensor([index]), noise)[0][0])


def test_pcd_loss_holds_the_boundary_at_each_phase_edge(teacher):
    """pcd's f(x, t) is the DDIM jump to the phase's lower edge: a student equal to the teacher (guidance 1) takes
    the teacher's own step when that step ends on the edge (loss 0), but not inside a phase, and lcd's x0-mapped
    consistency function is not the teacher's step either."""
    model = LatteT2V.from_pretrained(teacher / "v").eval()
    just_above_edge = 13  # t_n = 279, t_prev = 259: the edge of phase (259, 499]
    inside = 20  # t_n = 419, t_prev = 399
    assert _pcd_loss("pcd", model, just_above_edge) < 1e-10
    assert _pcd_loss("pcd", model, inside) > 1e-6
    assert _pcd_loss("lcd", model, just_above_edge) > 1e-6
    assert _pcd_loss("pcd", model, 0) < 1e-10  # t_n = 19 -> 0: the last phase's edge


# --------------------------------------------------------------------------------------------
# Training: the shared loop, exact resume, the run's sampling_config.json
# --------------------------------------------------------------------------------------------


def test_distill_resumes_exactly_and_records_its_sampling_defaults(assets, teacher, tmp_path):  # noqa: F811
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert cli.main(_argv(assets, teacher, full, 3, "--use_ema")) == 0
    log = read_log(full)
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["loss"] > 0 for r in log)
    assert cli.main(_argv(assets, teacher, resumed, 2, "--use_ema")) == 0
    assert cli.main(_argv(assets, teacher, resumed, 3, "--use_ema", "--resume_from_checkpoint", "latest")) == 0
    for a, b in zip(log, read_log(resumed)):
        assert (a["step"], a["loss"], a["grad_norm"]) == (b["step"], b["loss"], b["grad_norm"])
    for folder in ("model", "ema"):
        wa = load_file(str(full / "checkpoint-3" / folder / "diffusion_pytorch_model.safetensors"))
        wb = load_file(str(resumed / "checkpoint-3" / folder / "diffusion_pytorch_model.safetensors"))
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # The student moved away from the teacher; the teacher folder is untouched.
    student = load_file(str(full / "checkpoint-3" / "model" / "diffusion_pytorch_model.safetensors"))
    original = load_file(str(teacher / "v" / "diffusion_pytorch_model.safetensors"))
    assert any(not torch.equal(student[k], original[k]) for k in original)
    for folder in (full, full / "checkpoint-3"):
        config = json.loads((folder / "sampling_config.json").read_text())
        assert (config["sample_method"], config["num_sampling_steps"], config["guidance_scale"]) == ("LCM", 2, 1.0)
        assert config["_distillation"]["guidance_scale"] == 4.0  # the teacher folder's, baked in
    options = json.loads((full / "options.json").read_text())
    assert options["task"] == "DistillTask" and options["extra"]["guidance_scale"] == 4.0


def test_dry_run_reports_the_teacher_and_writes_nothing(assets, teacher, tmp_path, capsys, monkeypatch):  # noqa: F811
    from opensora_plan.models import text_encoder

    _, t5, _ = assets
    t5_parameters = sum(p.numel() for p in text_encoder.load_text_encoder(t5).parameters())
    # No T5 weights are read (T5-XXL's are 19 GB in float32: a full-size dry run was killed for memory), yet counted.
    monkeypatch.setattr(text_encoder, "load_text_encoder", lambda *a, **k: pytest.fail("--dry_run read T5's weights"))
    out = tmp_path / "dry"
    assert cli.main(_argv(assets, teacher, out, 3, "--dry_run")) == 0
    report = capsys.readouterr().out
    assert "distill --dry_run" in report and "frozen teacher" in report and "guidance 4.0 baked in" in report
    assert re.search(r"text_encoder +([\d,]+) total", report).group(1) == f"{t5_parameters:,}"
    assert not out.exists()


def test_held_out_consistency_loss_is_reproducible(assets, teacher, tmp_path):  # noqa: F811
    root, _, _ = assets
    runs = []
    for name in ("a", "b"):
        assert cli.main(_argv(assets, teacher, tmp_path / name, 1, "--validation_data_path", str(root / "data.json"),
                              "--validation_steps", "1", "--validation_num_timesteps", "3")) == 0
        runs.append([{k: v for k, v in r.items() if k.startswith("val_")} for r in read_log(tmp_path / name)
                     if "val_loss" in r])
    assert runs[0] == runs[1] and len(runs[0]) == 2  # before the first step and after the last
    assert runs[0][0]["val_clips"] == 5  # the broken clip is left out
    assert {"val_loss_t179", "val_loss_t519", "val_loss_t839"} <= runs[0][0].keys()
    assert runs[0][0]["val_loss"] != runs[0][1]["val_loss"]  # the step changed the student


# --------------------------------------------------------------------------------------------
# Sampling the student with its own defaults: one evaluation per step at batch 1
# --------------------------------------------------------------------------------------------


def test_student_run_and_folder_sample_with_their_own_defaults(assets, teacher, tmp_path, capsys,  # noqa: F811
                                                               monkeypatch):
    run = tmp_path / "run"
    assert cli.main(_argv(assets, teacher, run, 2, "--use_ema")) == 0
    counter = _CountForwards(monkeypatch)
    capsys.readouterr()
    from_run = _sample(tmp_path / "out_run", run)
    assert "(LCM, 2 steps)" in capsys.readouterr().out
    assert counter.batches == [1, 1]  # no classifier-free-guidance batch
    # A shipped folder inside the teacher's: shares its VAE and T5 by relative path.
    student = save_student_folder(run, teacher / "student", "v")
    config = json.loads((student / "sampling_config.json").read_text())
    assert config["vae"] == "../vae" and config["version"] == "v"
    counter.batches.clear()
    from_folder = _sample(tmp_path / "out_folder", student)
    assert counter.batches == [1, 1] and torch.equal(from_folder, from_run)  # same EMA weights, same settings
    with pytest.raises(ValueError, match="exists"):
        save_student_folder(run, student, "v")
    # The teacher itself still samples with its own defaults (6 steps, guidance 4: batch 2).
    counter.batches.clear()
    capsys.readouterr()
    _sample(tmp_path / "out_teacher", teacher)
    assert "(EulerAncestralDiscrete, 6 steps)" in capsys.readouterr().out and counter.batches == [2] * 6
    shutil.rmtree(student)


def test_pcd_student_samples_with_tcd_at_batch_one(assets, teacher, tmp_path, capsys, monkeypatch):  # noqa: F811
    run = tmp_path / "run"
    assert cli.main(_argv(assets, teacher, run, 2, "--method", "pcd")) == 0
    config = json.loads((run / "sampling_config.json").read_text())
    assert (config["sample_method"], config["num_sampling_steps"], config["guidance_scale"]) == ("TCD", 2, 1.0)
    assert config["_distillation"]["method"].startswith("phased consistency distillation")
    counter = _CountForwards(monkeypatch)
    capsys.readouterr()
    first = _sample(tmp_path / "a", run)
    assert "(TCD, 2 steps)" in capsys.readouterr().out and counter.batches == [1, 1]
    assert torch.equal(first, _sample(tmp_path / "b", run, "--seed", "2"))  # eta 0: deterministic given the noise
    # `demo eval` judges a run (its latest checkpoint) with the student's own settings, as `sample` does.
    capsys.readouterr()
    assert cli.main(["demo", "eval", "--model_path", str(run), "--num_prompts", "1", "--seeds", "0"]) == 0
    assert "TCD 2 steps, guidance 1.0" in capsys.readouterr().out
    # Resuming with the other method is refused (it is the student's definition).
    assert cli.main(_argv(assets, teacher, run, 3, "--resume_from_checkpoint", "latest")) == 1
    assert "--method lcd differs from the run's pcd" in capsys.readouterr().err
    assert cli.main(_argv(assets, teacher, run, 3, "--method", "pcd", "--student", str(teacher),
                          "--resume_from_checkpoint", "latest")) == 1
    assert "differs from the run's unset" in capsys.readouterr().err  # not "the run's None"


def test_dmd_gradient_vanishes_when_the_fake_score_is_the_real_one(teacher):
    """DMD's update is (x0_fake - x0_real) / mean|x0 - x0_real|: with the fake score equal to the teacher and no
    guidance it is 0 (loss 0); with the teacher's guidance baked in it is not."""
    model = LatteT2V.from_pretrained(teacher / "v").eval()
    losses = {}
    for guidance in (1.0, 4.0):
        task = DistillTask(model, model, None, guidance_scale=guidance, method="dmd", num_sampling_steps=2)
        task._null = (torch.zeros(16, 32), torch.ones(16, dtype=torch.long))
        g = torch.Generator().manual_seed(0)
        text, mask = torch.randn(2, 16, 32, generator=g), torch.ones(2, 16, dtype=torch.long)
        torch.manual_seed(1)
        loss, x0 = task.distribution_matching_loss(model, model, (2, 4, 2, 4, 4), text, mask)
        assert x0.shape == (2, 4, 2, 4, 4) and not x0.requires_grad
        losses[guidance] = float(loss.detach())
    assert losses[1.0] == 0.0 and losses[4.0] > 1e-4
    assert task.timesteps == [999, 499]  # the student's own LCM steps (backward simulation)


def test_dmd_from_an_lcd_student_resumes_exactly_with_its_fake_score(assets, teacher, tmp_path, capsys,  # noqa: F811
                                                                    caplog):
    from opensora_plan.train.distill import build_distill

    lcd = tmp_path / "lcd"
    assert cli.main(_argv(assets, teacher, lcd, 2, "--use_ema")) == 0
    dmd = ["--method", "dmd", "--student", str(lcd), "--learning_rate", "1e-4", "--use_ema"]
    # The student starts from the lcd run's EMA weights; the fake score from the teacher's.
    root, _, sizes = assets
    task, _ = build_distill({"teacher": str(teacher), "data_path": str(root / "data.json"), "model_max_length": 16,
                             "num_frames": sizes["num_frames"], "max_image_size": sizes["max_image_size"],
                             "output_dir": str(tmp_path / "x"), "method": "dmd", "student": str(lcd),
                             "max_train_steps": 1})
    start = load_file(str(lcd / "checkpoint-2" / "ema" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(v, start[k]) for k, v in task.models["model"].state_dict().items())
    original = load_file(str(teacher / "v" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(v, original[k]) for k, v in task.models["fake_score"].state_dict().items())
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert cli.main(_argv(assets, teacher, full, 3, *dmd)) == 0
    assert cli.main(_argv(assets, teacher, resumed, 2, *dmd)) == 0
    # Resumed without --student (QA 6): the run keeps the student it recorded, and resumes exactly.
    without_student = [a for a in dmd if a not in ("--student", str(lcd))]
    assert cli.main(_argv(assets, teacher, resumed, 3, *without_student, "--resume_from_checkpoint", "latest")) == 0
    assert json.loads((resumed / "options.json").read_text())["extra"]["student"] == str(lcd.resolve())
    recorded = json.loads((resumed / "checkpoint-3" / "sampling_config.json").read_text())["_distillation"]
    assert recorded["student"] == str(lcd.resolve())
    log = read_log(full)
    assert all(r["loss"] > 0 and r["fake_score_loss"] > 0 for r in log)
    for a, b in zip(log, read_log(resumed)):
        assert (a["loss"], a["fake_score_loss"], a["grad_norm"]) == (b["loss"], b["fake_score_loss"], b["grad_norm"])
    for folder in ("model", "ema", "fake_score"):
        wa = load_file(str(full / "checkpoint-3" / folder / "diffusion_pytorch_model.safetensors"))
        wb = load_file(str(resumed / "checkpoint-3" / folder / "diffusion_pytorch_model.safetensors"))
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    config = json.loads((full / "sampling_config.json").read_text())
    assert config["sample_method"] == "LCM" and config["_distillation"]["method"].startswith("distribution matching")
    assert config["_distillation"]["student"] == str(lcd.resolve())
    # A run's own options.json is a --config (QA 6: the recorded --model, derived from --teacher, was refused).
    assert cli.main(["distill", "--config", str(full / "options.json"), "--output_dir", str(tmp_path / "cfg"),
                     "--dry_run"]) == 0
    # A distilled student given as --teacher is said (QA 6: it was taken without a word).
    with caplog.at_level("INFO"):
        assert cli.main(_argv(assets, full, tmp_path / "again", 1, "--dry_run")) == 0
    assert "is itself a distilled student" in caplog.text
    assert "--method lcd) into a full-weights student, starting from the teacher's weights" in caplog.text


def test_lora_student_loads_and_samples_with_its_own_defaults(assets, teacher, tmp_path, capsys,  # noqa: F811
                                                               monkeypatch):
    pytest.importorskip("peft")
    run = tmp_path / "lora"
    assert cli.main(_argv(assets, teacher, run, 2, "--lora_rank", "4")) == 0
    assert (run / "checkpoint-2" / "model" / "pytorch_lora_weights.safetensors").is_file()
    counter = _CountForwards(monkeypatch)
    capsys.readouterr()
    direct = _sample(tmp_path / "direct", run)  # the run: its base is the teacher
    assert "(LCM, 2 steps)" in capsys.readouterr().out and counter.batches == [1, 1]
    counter.batches.clear()
    flag = _sample(tmp_path / "flag", teacher, "--lora", str(run))  # the teacher + --lora: the adapter's defaults
    assert "(LCM, 2 steps)" in capsys.readouterr().out and counter.batches == [1, 1]
    assert torch.equal(direct, flag)
    plain = _sample(tmp_path / "plain", teacher, "--lora", str(run), "--lora_scale", "0", "--sample_method", "LCM",
                    "--num_sampling_steps", "2", "--guidance_scale", "1")
    assert not torch.equal(plain, direct)  # the adapter does something
    # demo eval judges the adapter (a run folder, as sample takes it) with its own sampler (QA 7: the teacher's)
    capsys.readouterr()
    assert cli.main(["demo", "eval", "--model_path", str(teacher), "--lora", str(run), "--num_prompts", "1",
                     "--seeds", "0"]) == 0
    assert "LCM 2 steps, guidance 1.0" in capsys.readouterr().out
    with pytest.raises(ValueError, match="LoRA student"):
        save_student_folder(run, tmp_path / "folder", "v")


def test_a_student_or_teacher_spelled_another_way_resumes(assets, teacher, tmp_path, monkeypatch):  # noqa: F811
    """QA 7: a relative --student (as the docs' recipe gives it) was refused on resume, as were a teacher with a
    trailing slash or through a symlink: paths are compared resolved."""
    assert cli.main(_argv(assets, teacher, tmp_path / "lcd", 1)) == 0
    (tmp_path / "link").symlink_to(teacher, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    first = _argv(assets, Path("link"), Path("dmd"), 1, "--method", "dmd", "--student", "lcd")
    assert cli.main(first) == 0
    again = _argv(assets, teacher, Path("dmd"), 2, "--method", "dmd", "--student", "./lcd/",
                  "--resume_from_checkpoint", "latest")
    again[again.index("--teacher") + 1] = f"{teacher}/"
    assert cli.main(again) == 0
    assert [r["step"] for r in read_log(tmp_path / "dmd")] == [1, 2]


def test_lora_student_shares_the_teachers_weights_and_trains_as_with_a_copy(assets, teacher, tmp_path, capsys,  # noqa: F811
                                                                             monkeypatch):
    """Under DDP a LoRA student's frozen base is the teacher's own parameters (one copy of the weights less per
    process; the dry run counts them once), and the adapters train exactly as on a copied base."""
    pytest.importorskip("peft")
    import copy

    from opensora_plan.train import distill as distill_module

    assert cli.main(_argv(assets, teacher, tmp_path / "dry", 2, "--lora_rank", "4", "--dry_run")) == 0
    assert re.search(r"frozen teacher +0\.000 MiB +\(the LoRA student's frozen base", capsys.readouterr().out)
    shared_run, copied_run = tmp_path / "shared", tmp_path / "copied"
    assert cli.main(_argv(assets, teacher, shared_run, 2, "--lora_rank", "4")) == 0
    monkeypatch.setattr(distill_module, "copy", type("NoSharing", (), {
        "deepcopy": staticmethod(lambda model, memo=None: copy.deepcopy(model))}))
    assert cli.main(_argv(assets, teacher, copied_run, 2, "--lora_rank", "4")) == 0
    weights = [load_file(run / "checkpoint-2" / "model" / "pytorch_lora_weights.safetensors")
               for run in (shared_run, copied_run)]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


# --------------------------------------------------------------------------------------------
# One clear error per bad input, before anything is written
# --------------------------------------------------------------------------------------------


def _fails(argv: list[str], capsys, *words: str) -> None:
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, err


def test_bad_inputs_fail_with_one_line(assets, teacher, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    argv = _argv(assets, teacher, out, 1)
    without_teacher = [a for i, a in enumerate(argv) if a != "--teacher" and argv[i - 1] != "--teacher"]
    _fails(without_teacher, capsys, "needs --teacher")
    _fails(_argv(assets, tmp_path / "missing", out, 1), capsys, "--teacher", "does not exist")
    (tmp_path / "empty").mkdir()
    _fails(_argv(assets, tmp_path / "empty", out, 1), capsys, "is not a LatteT2V model")
    _fails(argv + ["--guidance_scale", "0.5"], capsys, "--guidance_scale must be a finite number >= 1")
    _fails(argv + ["--num_ddim_timesteps", "30"], capsys, "--num_ddim_timesteps must divide")
    _fails(argv + ["--num_ddim_timesteps", "4", "--num_sampling_steps", "8"], capsys, "more than the 4 timesteps")
    # A grid the sampler does not land on: the student would be sampled at timesteps it never trained on.
    _fails(argv + ["--num_ddim_timesteps", "40", "--num_sampling_steps", "4"], capsys, "visits timesteps [759, 259]")
    _fails(argv + ["--huber_c", "0.1"], capsys, "no effect without --loss_type huber")
    _fails(argv + ["--use_image_num", "1"], capsys, "video clips only")
    _fails(argv + ["--fake_score_learning_rate", "1e-3"], capsys, "no effect without --method dmd")
    _fails(argv + ["--method", "dmd", "--fake_score_learning_rate", "0"], capsys, "must be a positive number")
    _fails(argv + ["--method", "dmd", "--lora_rank", "4"], capsys, "--lora_rank is not supported with --method dmd")
    _fails(argv + ["--student", str(tmp_path / "missing")], capsys, "--student", "does not exist")
    _fails(argv + ["--student", str(teacher / "vae")], capsys, "--student", "is not a LatteT2V model")
    _fails(argv + ["--method", "dmd", "--sharding", "deepspeed"], capsys, "DeepSpeed takes one")
    _fails(argv + ["--method", "dmd", "--num_ddim_timesteps", "20"], capsys, "not supported with --method dmd")
    _fails(argv + ["--method", "dmd", "--huber_c", "0.01"], capsys, "no effect with --method dmd")
    _fails(argv + ["--student", str(teacher), "--lora_rank", "4"], capsys, "--student with --lora_rank")
    other = tmp_path / "other"
    build_latte("LatteT2V-Tiny/122", caption_channels=32, sample_size=[4, 4], video_length=1).save_pretrained(other)
    _fails(argv + ["--student", str(other)], capsys, "is not the teacher's architecture (video_length differs)")
    with pytest.raises(SystemExit):  # not offered: argparse's usage error
        cli.main(argv + ["--pretrained", "x"])
    assert "unrecognized arguments: --pretrained" in capsys.readouterr().err
    config = tmp_path / "options.json"
    config.write_text(json.dumps({"cfg_dropout": 0.2}))
    _fails(argv + ["--config", str(config)], capsys, "does not offer --cfg_dropout")
    assert not out.exists()


def test_cached_features_of_another_shape_fail_before_training(assets, teacher, tmp_path, capsys):  # noqa: F811
    from opensora_plan.data.features import extract_features

    root, t5, sizes = assets
    extract_features(root / "data.json", tmp_path / "cache", text_encoder_name=t5, ae_path=root / "vae",
                     num_frames=1, max_image_size=sizes["max_image_size"], model_max_length=16, device="cpu",
                     text_dtype="fp32", progress=False)
    capsys.readouterr()  # the T5 loader's progress bar
    _fails(["distill", "--teacher", str(teacher), "--cached_features", str(tmp_path / "cache"), "--output_dir",
            str(tmp_path / "out"), "--max_train_steps", "1", "--report_to", "none"], capsys,
           "--cached_features holds latents of shape")
    assert not (tmp_path / "out").exists()


def test_cached_features_train_at_the_given_batch_size(assets, teacher, tmp_path, capsys, monkeypatch):  # noqa: F811
    """--train_batch_size reaches the extract cache's shard sampler (it trained at batch 1 whatever was asked): per
    step, the student runs on the batch with gradients and without, the guided teacher on twice the batch."""
    from opensora_plan.data.features import extract_features

    root, t5, sizes = assets
    extract_features(root / "data.json", tmp_path / "cache", text_encoder_name=t5, ae_path=root / "vae",
                     num_frames=sizes["num_frames"], max_image_size=sizes["max_image_size"], model_max_length=16,
                     device="cpu", text_dtype="fp32", progress=False)
    capsys.readouterr()
    counter = _CountForwards(monkeypatch)
    assert cli.main(["distill", "--teacher", str(teacher), "--cached_features", str(tmp_path / "cache"),
                     "--output_dir", str(tmp_path / "out"), "--train_batch_size", "2", "--max_train_steps", "2",
                     "--mixed_precision", "no", "--report_to", "none"]) == 0
    assert counter.batches == [2, 4, 2] * 2
    assert [r["epoch"] for r in read_log(tmp_path / "out")] == [0, 0]  # 2 x 2 clips of the cache's 5: one epoch


def test_shipped_demo_student_samples_with_its_own_defaults(tmp_path, capsys, monkeypatch):
    """assets/demo/student/: the distilled demo (docs/demo.md) shares the demo's VAE and T5 and samples with LCM in
    4 steps at batch 1; the demo's own default stays the teacher's (the student did not win the judged table)."""
    from opensora_plan.demo.model import default_model_path
    from opensora_plan.pipelines.sample_t2v import resolve_sample_defaults

    student = default_model_path() / "student"
    defaults = resolve_sample_defaults(student)
    assert (defaults["sample_method"], defaults["num_sampling_steps"], defaults["guidance_scale"]) == ("LCM", 4, 1.0)
    assert resolve_sample_defaults()["sample_method"] == "EulerAncestralDiscrete"
    counter = _CountForwards(monkeypatch)
    capsys.readouterr()
    video = _sample(tmp_path / "out", student)
    assert "(LCM, 4 steps)" in capsys.readouterr().out and counter.batches == [1, 1, 1, 1]
    assert video.shape == (17, 64, 64, 3) and video.float().std() > 1  # not blank


def test_a_lora_train_t2v_run_is_a_teacher_with_its_adapter_folded_in(assets, teacher, tmp_path):  # noqa: F811
    pytest.importorskip("peft")
    from test_train_t2v import _argv as t2v_argv

    from opensora_plan.pipelines.training_run import load_run_transformer, resolve_training_output
    from opensora_plan.train.distill import resolve_teacher

    run = tmp_path / "t2v_lora"
    assert cli.main(t2v_argv(assets, run, 2, "--model", str(teacher / "v"), "--pretrained", str(teacher / "v"),
                             "--lora_rank", "4", "--learning_rate", "1e-2", "--use_image_num", "0")) == 0
    spec = resolve_teacher(str(run))
    assert spec.guidance_scale == 4.0  # the run's base model's guidance (as `sample` of the run uses), not 7.5
    folded = spec.load()
    assert not any("lora" in k for k in folded.state_dict())  # a plain LatteT2V: the student copies it
    with_adapter = load_run_transformer(resolve_training_output(run), torch.float32, "cpu")
    x, t = torch.randn(1, 4, 2, 4, 4), torch.tensor([500])
    text = torch.randn(1, 16, 32)
    with torch.no_grad():
        expected = with_adapter(x, t, encoder_hidden_states=text, return_dict=False)[0]
        got = folded(x, t, encoder_hidden_states=text, return_dict=False)[0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert cli.main(_argv(assets, run, tmp_path / "student", 1)) == 0  # distils from the run


def test_guidance_on_top_of_a_student_is_said():
    """QA 3: --guidance_scale (or another sampler) on a student with guidance baked in was accepted silently."""
    import warnings

    from opensora_plan.pipelines.model_folder import default_model_path
    from opensora_plan.pipelines.sample_t2v import resolve_sample_defaults

    student = default_model_path() / "student"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_sample_defaults(student)["sample_method"] == "LCM"  # its own defaults: no warning
    with pytest.warns(UserWarning, match="distilled student .*guidance 3 baked in.*applies guidance on top") as said:
        resolve_sample_defaults(student, guidance_scale=3.0)
    assert "not the sampler" not in str(said[0].message)
    # QA 6: another sampler at guidance 1 said "applies guidance on top", which it does not; it gives poor videos.
    with pytest.warns(UserWarning, match="--sample_method DDIM is not the sampler it was distilled for") as said:
        resolve_sample_defaults(student, sample_method="DDIM")
    assert "on top" not in str(said[0].message)


# --------------------------------------------------------------------------------------------
# Many processes: the shared trainer's DDP / FSDP2 / DeepSpeed under torchrun (2 CPU processes, gloo)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_distill_under_torchrun_ddp_fsdp2_and_deepspeed(assets, teacher, tmp_path):  # noqa: F811
    """lcd under DDP (the trainer checks the replicas' weight hashes) and DeepSpeed ZeRO-2 (when installed), dmd (two optimizers)
    under DDP and FSDP2: two steps each on two processes; dmd under DeepSpeed is one error (one optimizer only)."""
    import os
    import subprocess

    def torchrun(out: Path, *extra: str) -> subprocess.CompletedProcess:
        argv = _argv(assets, teacher, out, 2, *extra)
        argv[argv.index("--checkpointing_steps") + 1] = "1"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "opensora_plan", *argv]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))

    runs = {"lcd_ddp": ("--sharding", "ddp"), "dmd_ddp": ("--method", "dmd", "--sharding", "ddp"),
            "dmd_fsdp2": ("--method", "dmd", "--sharding", "fsdp2")}
    try:
        import deepspeed  # noqa: F401

        runs["lcd_deepspeed"] = ("--sharding", "deepspeed", "--deepspeed_config", "zero2")
    except ImportError:
        pass
    for name, extra in runs.items():
        result = torchrun(tmp_path / name, *extra)
        assert result.returncode == 0, (name, result.stderr[-4000:])
        log = read_log(tmp_path / name)
        assert [r["step"] for r in log] == [1, 2] and all(r["loss"] > 0 for r in log), name
        if "dmd" in name:
            assert all(r["fake_score_loss"] > 0 for r in log)
            assert (tmp_path / name / "checkpoint-2" / "fake_score").is_dir()
    # The same data and noise on the same two processes: DDP and FSDP2 agree on the first step's losses.
    assert read_log(tmp_path / "dmd_ddp")[0]["loss"] == pytest.approx(read_log(tmp_path / "dmd_fsdp2")[0]["loss"],
                                                                      rel=1e-5)
    if "lcd_deepspeed" in runs:
        result = torchrun(tmp_path / "dmd_ds", "--method", "dmd", "--sharding", "deepspeed", "--deepspeed_config",
                          "zero2")
        assert result.returncode != 0 and "optimizer phases" in result.stderr
