"""The ``sample`` command's start-up stays light: a fresh process imports only what sampling uses and runs its
start-up without the cyclic garbage collector (then freezes it, opensora_plan/cli.py ``_quick_start``), while a
caller of ``main(argv)`` keeps its collector untouched. docs/distill.md, "Measured on the demo", has the numbers.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

from opensora_plan import cli
from opensora_plan.pipelines.model_folder import default_model_path

# Modules the demo sample must not import: the schedulers it does not use (imported one by one,
# diffusion/schedulers.py; DEIS alone pulls scipy.stats in through diffusers' package), and the
# training, web UI and evaluation stacks.
NOT_ON_THE_SAMPLE_PATH = (
    "diffusers.schedulers.scheduling_deis_multistep",
    "diffusers.schedulers.scheduling_unipc_multistep",
    "diffusers.schedulers.scheduling_dpmsolver_singlestep",
    "diffusers.schedulers.scheduling_k_dpm_2_ancestral_discrete",
    "diffusers.schedulers.scheduling_ddpm",
    "gradio",
    "pyarrow",
    "opensora_plan.train.trainer",
    "opensora_plan.ui.app",
    "opensora_plan.metrics",
    "opensora_plan.models.clip",
)

_CHILD = """
import gc, json, sys
from opensora_plan.cli import main
sys.argv = ["opensora-plan", "sample", "a red circle moving left", "--model_path", sys.argv[1],
            "--save_img_path", sys.argv[2], "-q"]
code = main()
print(json.dumps({"code": code, "frozen": gc.get_freeze_count(), "enabled": gc.isenabled(),
                  "modules": sorted(sys.modules)}))
"""


def test_fresh_sample_process_imports_only_its_path_and_freezes_the_start_up(tmp_path):
    student = default_model_path() / "student"
    result = subprocess.run([sys.executable, "-c", _CHILD, str(student), str(tmp_path / "out")], capture_output=True,
                            text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["code"] == 0 and len(list((tmp_path / "out").glob("*.mp4"))) == 1
    assert report["enabled"] and report["frozen"] > 100_000  # the imported libraries, frozen; the collector back on
    modules = set(report["modules"])
    assert "diffusers.schedulers.scheduling_lcm" in modules  # the student's own scheduler (a sanity check)
    assert not modules & set(NOT_ON_THE_SAMPLE_PATH), sorted(modules & set(NOT_ON_THE_SAMPLE_PATH))


def test_main_with_argv_leaves_the_callers_collector_alone(tmp_path):
    frozen = gc.get_freeze_count()
    assert cli.main(["sample", "a cat", "--model_path", str(tmp_path / "missing"), "-q"]) == 1
    assert gc.isenabled() and gc.get_freeze_count() == frozen
