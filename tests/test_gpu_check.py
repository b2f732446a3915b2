"""scripts/gpu_check.sh in its tiny CPU mode: the same pipeline the GPU check runs, end to end."""

import json
import math
import os
import subprocess

from conftest import REPO


def test_gpu_check_cpu_tiny_runs_the_pipeline_and_reports_every_figure(tmp_path):
    run = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu-tiny", "--quick", "--out", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["steps"] == 4 and report["devices"] == 1
    assert report["step_avg_ms"] > 0 and report["tokens_per_s_per_device"] > 0
    assert 0 < report["mfu_vs_fastest_peak"] < 1
    assert set(report["peak_matmul_tflops"]) == {"bfloat16", "float32"}
    assert report["compiled_graphs"]["GPT.forward"] >= 2  # training and evaluation
    assert 0 < report["artifact_model_bytes"] < report["artifact_total_bytes"] and not report["over_cap"]
    # the cap counts the legal evaluation's code, as the export does
    assert report["artifact_counted_for"] == "legal" and report["code_shipped_as"] == "bundle"
    assert report["raw_code_bytes"] > 2 * report["counted_code_bytes"] and report["counted_code_bytes"] > 50_000
    assert report["artifact_total_bytes"] >= report["artifact_model_bytes"] + report["counted_code_bytes"]
    assert report["validation_tokens_scored"] == 4096  # --cpu-tiny's slice of the stream
    assert report["projected_steps_in_600s_on_8"] > 0 and report["projected_full_val_sliding_eval_s_on_8"] > 0
    assert math.isfinite(report["final_val_bpb"])
    summary = [line for line in run.stdout.splitlines() if line.startswith("gpu_check ")]
    assert len(summary) == 1 and "step_avg_ms:" in summary[0]


def test_gpu_check_with_the_frontier_recipe_projects_its_steps_and_evaluation(tmp_path):
    """--recipe frontier (its shape at the tiny size, loop and lanes by hand): the loop switches on inside the check,
    and the report projects the steps in 600 s from the step times before and after it, and the evaluation's parts
    over the validation stream of the run's own tokenization."""
    run = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu-tiny", "--quick", "--recipe", "frontier", "--out",
                          str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    p = report["recipe_projection"]
    assert report["recipe"] == "frontier" and "recipe name:frontier" in run.stdout and "loop_start step:2" in run.stdout
    assert p["train_seconds"] == 590 and p["switch_at"] == 0.35 and 0 < p["steps_before_switch"] < p["steps"]
    assert p["steps"] == round(590 * 1000 * (0.35 / p["plain_ms"] + 0.65 / p["looped_ms"]))
    # the tiny check's data is the built-in corpus at sp1024, plain: the stream counted is sp1024's, at its measured rate
    assert (p["validation_targets"], p["targets_source"], p["doc_tokens"]) == (62_021_632, "SPEC section 3", 1240)
    assert p["base_pass_s"] == round(report["projected_full_val_sliding_eval_s_on_8"], 1)
    assert p["phased_over_base"] == 1.5 and math.isclose(p["eval_parts_s"]["ttt_phased"], 1.5 * p["base_pass_s"],
                                                          rel_tol=1e-3)
    assert p["eval_total_s"] == round(sum(p["eval_parts_s"].values()), 1) and p["eval_parts_s"]["ttt_phased"] > 0
    assert [line.split()[0] for line in report["projection_lines"]] == ["frontier_train_projection",
                                                                        "frontier_eval_projection"]
