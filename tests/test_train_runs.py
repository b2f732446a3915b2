"""End-to-end runs of train_gpt.py on a tiny configuration: CPU, gloo, a few steps each."""

from pathlib import Path

import pytest
import torch

import eval_final
import log_format
import train_gpt
from conftest import log_value, run_script, run_torchrun, tiny_env


def score_artifact_file(path: Path, tiny_data: dict, seq_len: int, stride: int, val_max_tokens: int) -> float:
    """A fresh, single-process scoring of an artifact file, sharing nothing with the run that wrote it."""
    artifact = train_gpt.read_artifact(path)
    model = eval_final.model_from_artifact(artifact, str(path), torch.device("cpu"))
    tokens = train_gpt.load_validation_tokens(tiny_data["data_path"], tiny_data["vocab_size"], seq_len, val_max_tokens)
    sp = train_gpt.load_tokenizer(tiny_data["tokenizer_path"], tiny_data["vocab_size"])
    result = train_gpt.evaluate(model, tokens, train_gpt.build_byte_tables(sp), seq_len, stride, 8,
                                torch.device("cpu"), autocast=False)
    return result.val_bpb


def test_two_process_gloo_run_roundtrip_equals_fresh_scoring(tiny_data, tmp_path):
    # MLP matrices big enough to be int6, so QAT quantizes them; fp32 pinned, as the fresh scoring below is
    env = tiny_env(tiny_data, tmp_path, MODEL_DIM=256, AUTOCAST_BF16=0)
    run = run_torchrun(2, "train_gpt.py", env)
    assert run.returncode == 0, run.stderr[-3000:]
    log = (tmp_path / "logs" / "test.txt").read_text()  # not stdout: torch 2.9.1's gloo prints there too
    assert log_value(log, "qat_start", "fake_quantized_matrices") == 4  # 2 layers x (fc, proj)
    assert log_value(log, "swa", "snapshots") >= 1
    artifact = tmp_path / train_gpt.ARTIFACT_NAME
    assert artifact.is_file()
    assert log.splitlines()[-1].startswith("final_int8_zlib_roundtrip_exact")
    logged = log_value(log, "final_int8_zlib_roundtrip_exact", "val_bpb")
    fresh = score_artifact_file(artifact, tiny_data, seq_len=64, stride=32, val_max_tokens=4097)
    assert abs(logged - fresh) < 1e-6


def test_one_and_two_processes_train_alike_with_the_same_global_batch(tiny_data, tmp_path):
    runs = {}
    for nproc in (1, 2):
        env = tiny_env(tiny_data, tmp_path / str(nproc), ITERATIONS=3, SWA_ENABLED=0, QAT_ENABLED=0, AUTOCAST_BF16=0,
                       GRAD_ACCUM_STEPS=4 // nproc)
        runs[nproc] = run_torchrun(nproc, "train_gpt.py", env) if nproc > 1 else run_script(["train_gpt.py"], env)
        assert runs[nproc].returncode == 0, runs[nproc].stderr[-3000:]
    for step in (1, 2, 3):
        one, two = (log_value(runs[n].stdout, "train_step", "train_loss", step=f"{step}/3") for n in (1, 2))
        assert abs(one - two) <= 1e-4
    one, two = (log_value(runs[n].stdout, "prequant_exact", "val_loss") for n in (1, 2))
    assert abs(one - two) < 1e-4


def test_same_seed_gives_byte_identical_artifacts(tiny_data, tmp_path):
    blobs = []
    for name in ("a", "b"):
        run = run_script(["train_gpt.py"], tiny_env(tiny_data, tmp_path / name, AUTOCAST_BF16=0))
        assert run.returncode == 0, run.stderr[-3000:]
        blobs.append((tmp_path / name / train_gpt.ARTIFACT_NAME).read_bytes())
    assert blobs[0] == blobs[1]
    other = run_script(["train_gpt.py"], tiny_env(tiny_data, tmp_path / "c", SEED=7, AUTOCAST_BF16=0))
    assert other.returncode == 0
    assert (tmp_path / "c" / train_gpt.ARTIFACT_NAME).read_bytes() != blobs[0]


def test_wallclock_cap_stops_training_with_the_learning_rate_near_zero(tiny_data, tmp_path):
    cap_s = 4.0
    env = tiny_env(tiny_data, tmp_path, ITERATIONS=100000, WARMDOWN_ITERS=40, MAX_WALLCLOCK_SECONDS=cap_s,
                   TRAIN_LOG_EVERY=1000)
    run = run_script(["train_gpt.py"], env)
    assert run.returncode == 0, run.stderr[-3000:]
    train_ms = log_value(run.stdout, "stopping_early", "train_time", reason="wallclock_cap")
    step_ms = log_value(run.stdout, "train_done", "step_avg")
    # the run stops after the step projected to reach the cap: within a step or so of it
    assert 1000 * cap_s - 2 * step_ms <= train_ms <= 1000 * cap_s + 3 * step_ms
    assert log_value(run.stdout, "stopping_early", "last_lr_scale") < 0.1
    assert log_value(run.stdout, "stopping_early", "steps_in_warmdown") >= 10


@pytest.mark.parametrize("case", ["missing_folder", "wrong_magic", "truncated", "id_out_of_vocab",
                                  "vocab_mismatch", "indivisible_batch"])
def test_bad_input_gives_one_clear_line_and_no_traceback(tiny_data, tmp_path, case):
    import numpy as np

    data = tmp_path / "data"
    data.mkdir()
    source = Path(tiny_data["data_path"])
    for shard in source.glob("*.bin"):
        (data / shard.name).write_bytes(shard.read_bytes())
    overrides, expect = {"DATA_PATH": data}, None
    train0 = data / "fineweb_train_000000.bin"
    if case == "missing_folder":
        overrides["DATA_PATH"], expect = tmp_path / "nowhere", "DATA_PATH="
    elif case == "wrong_magic":
        blob = bytearray(train0.read_bytes())
        blob[0] ^= 0xFF
        train0.write_bytes(bytes(blob))
        expect = "fineweb_train_000000.bin: not a token shard"
    elif case == "truncated":
        train0.write_bytes(train0.read_bytes()[:-7])
        expect = "fineweb_train_000000.bin: truncated"
    elif case == "id_out_of_vocab":
        tokens = np.array(train_gpt.load_data_shard(train0, 1 << 16))  # a writable copy of the memory map
        tokens[5] = tiny_data["vocab_size"]
        train_gpt.write_data_shard(train0, tokens.astype(np.uint16))
        expect = "outside the vocabulary"
    elif case == "vocab_mismatch":
        overrides["VOCAB_SIZE"], expect = 1024, "TOKENIZER_PATH="
    elif case == "indivisible_batch":
        overrides["TRAIN_BATCH_TOKENS"], expect = 1000, "TRAIN_BATCH_TOKENS=1000"
    run = run_script(["train_gpt.py"], tiny_env(tiny_data, tmp_path / "out", **overrides))
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expect in lines[0], run.stderr
    problem, _, fix = lines[0].partition("; ")
    assert fix, f"the message names no fix: {lines[0]}"


def test_a_failure_after_training_leaves_an_artifact_that_eval_final_scores(tiny_data, tmp_path, monkeypatch):
    """The first evaluation after training is forced to fail: the run fails, but the trained
    weights are already on disk, whole, and eval_final.py scores them."""
    env = tiny_env(tiny_data, tmp_path)
    def failing_evaluate(*args, **kwargs):
        raise RuntimeError("forced failure in the final evaluation")
    monkeypatch.setattr(train_gpt, "evaluate", failing_evaluate)  # VAL_LOSS_EVERY=0: no evaluation before the end
    with pytest.raises(RuntimeError, match="forced failure"):
        train_gpt.train(train_gpt.Settings.from_env(env))
    artifact = tmp_path / train_gpt.ARTIFACT_NAME
    tags = {line.tag for line in log_format.read_lines((tmp_path / "logs" / "test.txt").read_text())}
    assert "artifact" in tags and "final_int8_zlib_roundtrip_exact" not in tags
    run = run_script(["eval_final.py"], dict(env, CHECKPOINT=str(artifact)))
    assert run.returncode == 0, run.stderr[-3000:]
    assert log_value(run.stdout, "eval_base", "val_bpb") > 0


@pytest.mark.parametrize("fp32,bf16,chosen", [(219, 935, True), (183, 53, False), (130, 1.3, False),
                                              (100, 110, False), (100, 125, True), (100, 124.9, False)])
def test_auto_precision_takes_bf16_only_where_it_is_clearly_faster(fp32, bf16, chosen):
    assert train_gpt.prefer_bf16(fp32, bf16) is chosen


def test_a_run_logs_both_measured_speeds_and_the_precision_it_chose(tiny_data, tmp_path):
    run = run_script(["train_gpt.py"], tiny_env(tiny_data, tmp_path, ITERATIONS=2))  # AUTOCAST_BF16=auto
    assert run.returncode == 0, run.stderr[-3000:]
    fp32, bf16 = (log_value(run.stdout, "hardware", k) for k in ("matmul_fp32_gflops", "matmul_bf16_gflops"))
    forced = log_format.last_line(run.stdout, "hardware").fields.get("probe_forced")  # CPU_PRECISION_PROBE
    chosen = train_gpt.prefer_bf16(fp32, bf16) if forced is None else forced == "bf16"
    assert log_value(run.stdout, "hardware", "autocast_bf16") == int(chosen)
    precision = [t for t in run.stdout.splitlines()[-2].split() if t.startswith("precision:")]
    assert precision == ["precision:" + ("bf16" if chosen else "fp32")]


@pytest.mark.parametrize("answer", ["bf16", "fp32"])
def test_the_probe_can_be_told_its_answer_so_the_suite_runs_as_on_either_cpu(answer):
    """CPU_PRECISION_PROBE: one machine exercises what an Intel Xeon (bf16) and an AMD EPYC (fp32) pick."""
    chosen, figures = train_gpt.choose_cpu_precision(64, 192, 1, answer)
    assert chosen is (answer == "bf16") and f"probe_forced:{answer}" in figures and "matmul_fp32_gflops:" in figures
    s = train_gpt.Settings.from_env({"CPU_PRECISION_PROBE": answer, "DEVICE": "cpu"})
    assert train_gpt.init_runtime(s, (64, 192)).precision == answer
    with pytest.raises(train_gpt.InputError, match="CPU_PRECISION_PROBE=fast is not one of measure, bf16, fp32"):
        train_gpt.choose_cpu_precision(64, 192, 1, "fast")
    with pytest.raises(train_gpt.InputError, match="CPU_PRECISION_PROBE=fast"):  # before any work, on any device
        train_gpt.validate_settings(train_gpt.Settings.from_env({"CPU_PRECISION_PROBE": "fast"}))


def test_a_bf16_run_on_the_cpu_exports_and_eval_final_reproduces_its_score(tiny_data, tmp_path):
    env = tiny_env(tiny_data, tmp_path, AUTOCAST_BF16=1, ITERATIONS=3)
    run = run_script(["train_gpt.py"], env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "precision:bf16" in run.stdout
    logged = log_value(run.stdout, "final_int8_zlib_roundtrip_exact", "val_bpb")
    again = run_script(["eval_final.py"], dict(env, CHECKPOINT=str(tmp_path / train_gpt.ARTIFACT_NAME)))
    assert again.returncode == 0, again.stderr[-3000:]
    assert abs(log_value(again.stdout, "eval_base", "val_bpb") - logged) < 1e-6
