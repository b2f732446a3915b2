"""Issue 20: the first paid run hands in what it prints. The evaluation fits its 10 minutes by
construction (a plan from compiled, timed graphs; a guard that drops adaptation, never scoring), TTT
compiles no extra forward graph, every rank follows one training clock, and setup keeps the node's torch.
The causality of the legal methods under the guard is test_score_first_ttt.py's; here the wiring."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import eval_final
import score_first_ttt
import train_gpt
from conftest import REPO, log_format, log_value, run_script, run_torchrun, tiny_env

TTT = dict(USE_TTT=1, TTT_CHUNK_TOKENS=1024, TTT_LR=0.05)


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained_budget")
    env = tiny_env(tiny_data, out, ITERATIONS=10, AUTOCAST_BF16=0)
    run = run_script(["train_gpt.py"], env)
    assert run.returncode == 0, run.stderr[-3000:]
    return dict(env, CHECKPOINT=str(out / train_gpt.ARTIFACT_NAME))


def fields(text: str, tag: str) -> dict:
    return [line for line in log_format.read_lines(text) if line.tag == tag][-1].fields


def test_a_budget_that_bites_drops_adaptation_and_the_base_pass_never_scoring(trained, monkeypatch, capsys):
    """EVAL_MAX_SECONDS against an injected clock: every forward costs fake time (scoring 0.05 s, training
    0.2 s), so the warm-up measures the same rates the passes then take. A budget that fits TTT's scoring
    and about half its training skips the separate base pass, stops adapting part-way, scores every
    position exactly once, ends inside the budget and says what it dropped."""
    clock = {"t": 0.0}
    forward = train_gpt.GPT.forward

    def timed_forward(self, idx, *args, **kwargs):
        clock["t"] += 0.2 if torch.is_grad_enabled() else 0.05
        return forward(self, idx, *args, **kwargs)

    passes = []
    ttt_evaluate = score_first_ttt.ttt_evaluate

    def counted(*args, **kwargs):
        passes.append(ttt_evaluate(*args, **{**kwargs, "count_positions": True}))
        return passes[-1]

    monkeypatch.setattr(train_gpt.GPT, "forward", timed_forward)
    monkeypatch.setattr(score_first_ttt, "ttt_evaluate", counted)

    def evaluate(budget: float) -> str:
        for key, value in {**trained, **TTT, "EVAL_MAX_SECONDS": budget}.items():
            monkeypatch.setenv(key, str(value))
        clock["t"] = 0.0
        eval_final.main(started=0.0, clock=lambda: clock["t"])
        return capsys.readouterr().out

    free = evaluate(0)  # no budget: the plan, the passes as they come
    plan = fields(free, "time_plan")
    assert plan["base_pass"] == "run" and fields(free, "time_budget")["dropped"] == "none"
    # the plan's projection from the warm-up matches what the passes took on this clock
    spent = float(fields(free, "time_budget")["used_s"])
    assert abs(float(plan["projected_s"]) - spent) <= 0.1 * spent
    chunks = int(log_value(free, "ttt", "chunks"))
    fit = float(plan["elapsed_s"]) + float(plan["ttt_score_s"]) + 0.5 * float(plan["ttt_train_s"])
    budget = fit / (1 - eval_final.FINISH_RESERVE_FRACTION)
    tight = evaluate(budget)
    assert fields(tight, "eval_base").get("skipped") == "budget"
    result = passes[-1]
    assert 0 < result.chunks_adapted < chunks - 1 and result.stopped_at_chunk == result.chunks_adapted
    assert (result.scores.position_counts == 1).all()
    assert result.scores.token_count == log_value(free, "eval_base", "tokens")
    assert log_value(tight, "eval_ttt", "val_bpb") > 0  # the submission's figure, always
    spent = fields(tight, "time_budget")
    assert spent["within"] == "1" and float(spent["used_s"]) <= budget
    assert spent["dropped"] == f"base_pass,ttt_adaptation_from_chunk:{result.stopped_at_chunk}/{chunks}"


def test_ttt_compiles_one_forward_graph_more_than_a_plain_evaluation(trained):
    """COMPILE=1 with the eager backend traces and guards as inductor does. Scoring under no_grad (not
    inference_mode) reuses the base pass's graph; TTT adds only its training graph."""
    compiled = dict(trained, COMPILE="1", COMPILE_BACKEND="eager")
    plain = run_script(["eval_final.py"], compiled)
    with_ttt = run_script(["eval_final.py"], dict(compiled, **{k: str(v) for k, v in TTT.items()}))
    assert plain.returncode == 0 and with_ttt.returncode == 0, plain.stderr[-2000:] + with_ttt.stderr[-2000:]
    graphs_plain = log_value(plain.stdout, "compile", "GPT.forward")
    graphs_ttt = log_value(with_ttt.stdout, "compile", "GPT.forward")
    print(f"GPT.forward graphs: plain {graphs_plain:.0f}, with TTT {graphs_ttt:.0f}")
    assert graphs_plain == 1 and graphs_ttt == graphs_plain + 1


SKEWED = textwrap.dedent("""
    import json, os, sys, time
    import train_gpt
    rank = int(os.environ["RANK"])
    if rank == 1:  # this rank's clock runs three times as fast
        train_gpt.StepClock.now = staticmethod(lambda: 3.0 * time.perf_counter())
    events = []
    step_call, fake_quant, add = train_gpt.TrainStep.__call__, train_gpt.set_fake_quant, train_gpt.WeightAverage.add
    def record_step(self, step, elapsed_ms):
        events.append(["step", step])
        return step_call(self, step, elapsed_ms)
    def record_qat(model, enabled, rung=None, grids=None):
        events.append(["qat", bool(enabled)])
        return fake_quant(model, enabled, rung, grids)
    def record_swa(self, model):
        events.append(["swa"])
        return add(self, model)
    train_gpt.TrainStep.__call__, train_gpt.set_fake_quant, train_gpt.WeightAverage.add = record_step, record_qat, record_swa
    train_gpt.train(train_gpt.Settings.from_env())
    with open(sys.argv[1] + f".{rank}.json", "w") as f:
        json.dump(events, f)
    train_gpt.dist.destroy_process_group()
""")


def test_two_ranks_with_a_skewed_clock_follow_one_clock(tiny_data, tmp_path):
    """QAT's start, SWA's snapshots, the learning rate and the stop follow the slowest rank's clock on both
    ranks: the same events at the same steps (with each rank's own clock, rank 1 would start QAT at a third
    of rank 0's step)."""
    script = tmp_path / "skewed.py"
    script.write_text(SKEWED)
    env = tiny_env(tiny_data, tmp_path, ITERATIONS=100000, MAX_WALLCLOCK_SECONDS=6, WARMDOWN_ITERS=60,
                   QAT_START_FRAC=0.3, SWA_START_FRAC=0.5, SWA_EVERY=3, TRAIN_LOG_EVERY=1000)
    run = run_script(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                      str(script)], env)
    assert run.returncode == 0, run.stderr[-3000:]
    zero, one = (json.loads((tmp_path / f"skewed.py.{r}.json").read_text()) for r in (0, 1))
    assert zero == one
    switches = [i for i, e in enumerate(zero) if e[0] == "qat"]
    real = zero[switches[2] + 1 :]  # after the warm-up (WARMUP_STEPS=2: QAT off, on, then off as it is undone)
    qat_at = real.index(["qat", True])
    assert ["step", 1] in real[:qat_at] and ["swa"] in real[qat_at:]  # QAT started mid-run, SWA after it
    assert "stopping_early reason:wallclock_cap" in run.stdout


def test_setup_keeps_an_installed_torch(tmp_path):
    """scripts/setup_env.sh with a python that already has a recent torch (this suite's) installs none:
    the new .venv imports that torch, and its own site-packages holds no torch."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "setup_env.sh", tmp_path / "scripts")
    shutil.copy(REPO / "requirements.txt", tmp_path)
    env = {**os.environ, "PYTHON": sys.executable, "PIP_NO_INDEX": "1"}  # nothing may be downloaded
    run = subprocess.run(["bash", "scripts/setup_env.sh"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"using the installed torch {torch.__version__}" in run.stdout
    venv_python = tmp_path / ".venv" / "bin" / "python"
    where = subprocess.run([str(venv_python), "-c", "import torch, sysconfig; print(torch.__file__); "
                            "print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True, check=True)
    torch_file, own_site = where.stdout.split()
    assert torch_file == torch.__file__ and not (tmp_path / own_site / "torch").exists()
    again = subprocess.run(["bash", "scripts/setup_env.sh"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout == ""  # unchanged requirements: nothing to do


@pytest.mark.parametrize("value", ["-5", "soon", "nan"])
def test_a_bad_eval_budget_is_refused_before_anything_is_read(trained, value):
    run = run_script(["eval_final.py"], dict(trained, EVAL_MAX_SECONDS=value))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.count("\n") == 1 and "EVAL_MAX_SECONDS" in run.stderr, run.stderr


def test_the_code_bundle_runs_the_evaluation_it_counts(trained, tmp_path):
    """SHIP_CODE=bundle counts the evaluation's scripts as one self-extracting xz script: run through it,
    the evaluation gives the same score as the scripts themselves, and the bytes it counts for its code
    are the bundle file's."""
    names = train_gpt.EVALUATION_CODE["base"]
    bundle = tmp_path / train_gpt.BUNDLE_NAME
    bundle.write_bytes(train_gpt.code_bundle({n: (REPO / n).read_bytes() for n in names}))
    assert bundle.stat().st_size < 0.5 * train_gpt.code_bytes(*(REPO / n for n in names))
    direct = run_script(["eval_final.py"], trained)
    packed = run_script([str(bundle), "eval_final.py"], trained)
    assert direct.returncode == 0 and packed.returncode == 0, direct.stderr[-2000:] + packed.stderr[-2000:]
    assert fields(packed.stdout, "eval_base")["val_bpb"] == fields(direct.stdout, "eval_base")["val_bpb"]
    assert log_value(packed.stdout, "artifact_total", "eval_code_bytes") == bundle.stat().st_size
    assert log_value(direct.stdout, "artifact_total", "eval_code_bytes") == bundle.stat().st_size
    usage = run_script([str(bundle)], trained)
    assert usage.returncode != 0 and "eval_final.py" in usage.stderr
