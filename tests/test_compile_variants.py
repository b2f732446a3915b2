"""The compiled path replayed on CPU: torch.compile(backend="eager") traces and guards exactly as
the CUDA run's inductor backend does, without generating code, so the number of graphs a real
run compiles is counted here. Too many graphs for one function is a hard error under
fullgraph=True, and it would strike after training, before the artifact."""

import pytest

import train_gpt
from conftest import log_value, run_script, tiny_env

# The run's sequence of calls: warm-up and training with QAT off then on, periodic validation
# before and after QAT starts, the pre-quantization and roundtrip standard scores, and the final
# sliding evaluation, with the default evaluation batch settings. Graph counts depend on batch
# shapes and flags, not on the sequence length, which is cut to 512 to keep the test fast. The
# model is 256 wide so that its MLP matrices are big enough to be stored as int6, which is what
# makes QAT switch them to fake quantization (a new graph). The validation stream gives 5
# standard windows (fewer than one batch) and 33 sliding ones (one batch and a padded remainder).
REPLAY = dict(COMPILE=1, COMPILE_BACKEND="eager", MODEL_DIM=256, TRAIN_SEQ_LEN=512, TRAIN_BATCH_TOKENS=1024,
              GRAD_ACCUM_STEPS=1, ITERATIONS=6, WARMUP_STEPS=2, QAT_START_FRAC=0.5, VAL_LOSS_EVERY=2,
              VAL_MAX_TOKENS=2561, EVAL_STRIDE=64, TRAIN_LOG_EVERY=1000)


@pytest.mark.parametrize("eval_batch_seqs,val_batch_size", [(32, 524288), (7, 524288), (32, 65536)])  # defaults first
def test_a_compiled_run_needs_few_graphs_and_finishes(tiny_data, tmp_path, eval_batch_seqs, val_batch_size):
    env = tiny_env(tiny_data, tmp_path, EVAL_BATCH_SEQS=eval_batch_seqs, VAL_BATCH_SIZE=val_batch_size, **REPLAY)
    run = run_script(["train_gpt.py"], env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "qat_start step:3" in run.stdout  # validation at step 2 ran with QAT off, at step 4 with it on
    forward = log_value(run.stdout, "compile", "GPT.forward")
    # 2 training graphs (QAT off, on) + 2 periodic validation (QAT off, on) + at most 2 final
    # evaluations (standard, sliding); never one for a short last batch
    assert 4 <= forward <= 6
    assert log_value(run.stdout, "compile", "orthogonalize") == 5  # one per matrix shape, as at the defaults
    assert forward <= train_gpt.COMPILE_RECOMPILE_LIMIT // 4  # a wide margin under the limit
    assert (tmp_path / train_gpt.ARTIFACT_NAME).is_file()
    assert run.stdout.rstrip().splitlines()[-1].startswith("final_int8_zlib_roundtrip_exact")


def test_a_looped_run_compiles_both_orders_in_the_warm_up_and_none_at_the_switch(tiny_data, tmp_path):
    """Depth recurrence: the plain order, the looped one and the looped one under QAT are the training phases;
    the warm-up compiles all three, so switching the loop on (step 2) and QAT (step 3) compiles nothing."""
    env = tiny_env(tiny_data, tmp_path, **{**REPLAY, "VAL_LOSS_EVERY": 0, "WARMUP_STEPS": 3, "EVAL_STRIDE": 0},
                   NUM_LAYERS=2, NUM_LOOPS=1, LOOP_START=1, LOOP_END=1, ENABLE_LOOPING_AT=0.3, TORCH_LOGS="recompiles")
    run = run_script(["train_gpt.py"], env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "loop_start step:2" in run.stdout and "qat_start step:3" in run.stdout
    warmed, trained = (log_value(run.stdout, tag, "GPT.forward") for tag in ("warmup", "train_done"))
    assert warmed == trained == 3  # plain; looped; looped with QAT: none added while the clock ran
    forward = log_value(run.stdout, "compile", "GPT.forward")
    assert forward == 4  # and one for the final standard evaluation (no grad), in the looped order
    assert run.stderr.count("Recompiling function forward") == forward - 1  # TORCH_LOGS=recompiles says the same
