"""Issue 23, kind 1: an option changed on resume is never silently ignored. One rule per option name for every
train command (trainer.RESUME_REFUSED / RESUME_QUIET, the table in docs/training.md): refused before any model
loads, applied silently (bookkeeping), or applied with one warning line; options.json records every resume."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_train_t2v import _argv, assets  # noqa: E402,F401  (module fixture: tiny T5, VAE and clips)
from train_helpers import read_log  # noqa: E402

from opensora_plan import cli  # noqa: E402


def test_a_new_learning_rate_on_resume_is_applied_said_and_recorded(assets, tmp_path, caplog):  # noqa: F811
    run = tmp_path / "run"
    assert cli.main(_argv(assets, run, 3)) == 0  # --learning_rate 1e-3
    with caplog.at_level(logging.WARNING):
        assert cli.main([*_argv(assets, run, 6), "--learning_rate", "1e-4", "--resume_from_checkpoint", "latest"]) == 0
    told = [r.getMessage() for r in caplog.records if "changed options" in r.getMessage()]
    assert len(told) == 1 and "--learning_rate 0.001 -> 0.0001" in told[0] and "max_train_steps" not in told[0]
    lrs = {record["step"]: record["lr"] for record in read_log(run)}
    assert [lrs[s] for s in (1, 2, 3)] == [1e-3] * 3
    assert [lrs[s] for s in (4, 5, 6)] == [pytest.approx(1e-4)] * 3  # was 1e-3: the checkpoint's optimizer state
    options = json.loads((run / "options.json").read_text())
    assert options["extra"]["learning_rate"] == 1e-4  # what runs from the resume on
    (resume,) = options["resumes"]  # and what ran before it
    assert resume["step"] == 3 and resume["checkpoint"].endswith("checkpoint-3")
    assert resume["changed"]["learning_rate"] == {"before": 1e-3, "after": 1e-4}
    assert resume["changed"]["max_train_steps"] == {"before": 3, "after": 6}
    assert cli.main(["train-t2v", "--config", str(run / "options.json"), "--dry_run"]) == 0  # still a config


def test_a_new_schedule_on_resume_is_applied_at_the_restored_step(assets, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    assert cli.main(_argv(assets, run, 2)) == 0
    assert cli.main([*_argv(assets, run, 4), "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "4",
                     "--resume_from_checkpoint", "latest"]) == 0
    lrs = {record["step"]: record["lr"] for record in read_log(run)}
    assert [lrs[3], lrs[4]] == [pytest.approx(1e-3 * 2 / 4), pytest.approx(1e-3 * 3 / 4)]  # warm-up at steps 2, 3


@pytest.mark.parametrize("flag, value", [("--seed", "1"), ("--model_max_length", "8")])
def test_a_change_to_what_made_the_checkpoint_is_refused_before_any_work(assets, tmp_path, capsys, flag, value):  # noqa: F811
    run = tmp_path / "run"
    assert cli.main(_argv(assets, run, 2)) == 0
    record = (run / "options.json").read_bytes()
    capsys.readouterr()
    assert cli.main([*_argv(assets, run, 4), flag, value, "--resume_from_checkpoint", "latest"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{flag} {value} differs from the run's" in err[0] and "new --output_dir" in err[0]
    assert (run / "options.json").read_bytes() == record and not (run / "checkpoint-4").exists()


def test_every_option_of_every_train_command_has_a_resume_rule():
    """The rule is by name: the refused and quiet sets name only real options, and docs/training.md's table
    lists every option of the five train commands in exactly one row."""
    import dataclasses
    import re

    from opensora_plan.options import option_fields
    from opensora_plan.train.distill import DistillOptions
    from opensora_plan.train.sr import SRTrainOptions
    from opensora_plan.train.t2v import T2VTrainOptions
    from opensora_plan.train.trainer import RESUME_QUIET, RESUME_REFUSED
    from opensora_plan.train.vae import VAETrainOptions
    from opensora_plan.train.vfi import VFITrainOptions

    names = {f.name for cls in (T2VTrainOptions, VAETrainOptions, VFITrainOptions, SRTrainOptions, DistillOptions)
             for f in option_fields(cls)} - {"config"}
    assert RESUME_REFUSED <= names and RESUME_QUIET <= names and not RESUME_REFUSED & RESUME_QUIET
    docs = (Path(__file__).parents[1] / "docs" / "training.md").read_text()
    table = docs[docs.index("### Changing options on resume"):]
    table = table[: table.index("\n\n", table.index("| ---"))]
    rows = {rule.strip(): set(re.findall(r"`--(\w+)`", flags)) for flags, rule in
            (line.strip("|").split("|")[:2] for line in table.splitlines()[2:] if line.startswith("|"))}
    documented = [n for flags in rows.values() for n in flags]
    assert sorted(documented) == sorted(set(documented)) and set(documented) == names
    assert rows["refused"] == set(RESUME_REFUSED) and rows["applied"] == set(RESUME_QUIET)
    assert dataclasses.is_dataclass(T2VTrainOptions)


def test_a_refused_switch_says_to_drop_it_not_to_give_its_old_value(assets, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "run"
    assert cli.main(_argv(assets, run, 2)) == 0
    capsys.readouterr()
    assert cli.main([*_argv(assets, run, 4), "--use_ema", "--resume_from_checkpoint", "latest"]) == 1
    err = capsys.readouterr().err.strip()
    assert "drop --use_ema" in err and "Give False" not in err and "False again" not in err
