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
