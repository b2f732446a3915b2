"""The seed's interface (openai/parameter-golf PR 232): every one of its settings gets its answer (ours by
name, an alias, or a refusal), near-miss names stop a run, EVAL_SEQ_LEN, BPB_LOSS_ALPHA, and its CRDT
correction tables read."""

import dataclasses
import re
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import build_correction_table
import correction_table as ct
import eval_final
import log_format
import train_gpt
from conftest import REPO, log_value, run_script, tiny_env
from eval_final import EvalSettings
from train_gpt import SEED_SETTINGS, InputError, Settings

# The seed's names, as its three scripts read them (train_gpt.py, eval_final.py, build_correction_table.py).
SEED_NAMES = {
    "train": """DATA_PATH TOKENIZER_PATH RUN_ID SEED VAL_BATCH_SIZE VAL_LOSS_EVERY TRAIN_LOG_EVERY ITERATIONS
        WARMDOWN_ITERS WARMUP_STEPS TRAIN_BATCH_TOKENS TRAIN_SEQ_LEN MAX_WALLCLOCK_SECONDS QK_GAIN_INIT VOCAB_SIZE
        NUM_UNIQUE_BLOCKS NUM_LOOPS NUM_KV_HEADS MODEL_DIM NUM_HEADS MLP_MULT TIE_EMBEDDINGS ROPE_BASE LOGIT_SOFTCAP
        EMBED_LR HEAD_LR TIED_EMBED_LR TIED_EMBED_INIT_STD MATRIX_LR SCALAR_LR MUON_MOMENTUM MUON_BACKEND_STEPS
        MUON_MOMENTUM_WARMUP_START MUON_MOMENTUM_WARMUP_STEPS BETA1 BETA2 ADAM_EPS GRAD_CLIP_NORM MUON_WD SWA_EVERY
        BPB_LOSS_ALPHA QUANT_BITS USE_SMEAR_GATE USE_BIGRAM_HASH BIGRAM_HASH_BUCKETS BIGRAM_HASH_DIM USE_STE_QAT
        STE_QAT_START_FRAC USE_MIXED_QUANT SWA_STEP_TIME_MS CONTROL_TENSOR_NAME_PATTERNS
        INT8_KEEP_FLOAT_FP32_NAME_PATTERNS""".split(),
    "eval": "CHECKPOINT USE_CORRECTION EVAL_STRIDE EVAL_SEQ_LEN USE_TTT TTT_LR TTT_RANK TTT_STEPS".split(),
    "build": "CHECKPOINT TABLE_BUDGET_KB OUTPUT".split(),
}
# The answers the issue documents for the names that are not ours: (our setting, unit) for an alias; the one
# value accepted for a fixed one; None for a refusal whatever the value.
ALIASES = {"MUON_WD": ("MUON_WEIGHT_DECAY", 1), "BETA1": ("ADAM_BETA1", 1), "BETA2": ("ADAM_BETA2", 1),
           "USE_STE_QAT": ("QAT_ENABLED", 1), "STE_QAT_START_FRAC": ("QAT_START_FRAC", 1),
           "BIGRAM_HASH_BUCKETS": ("BIGRAM_VOCAB_SIZE", 1), "BIGRAM_HASH_DIM": ("BIGRAM_DIM", 1),
           "TTT_STEPS": ("TTT_EPOCHS", 1), "TABLE_BUDGET_KB": ("CORRECTION_MAX_BYTES", 1024)}
REFUSALS = {"QUANT_BITS": "6", "USE_SMEAR_GATE": "1", "USE_BIGRAM_HASH": "1", "TIE_EMBEDDINGS": "1",
            "NUM_UNIQUE_BLOCKS": None, "EMBED_LR": None, "HEAD_LR": None, "SWA_STEP_TIME_MS": None,
            "CONTROL_TENSOR_NAME_PATTERNS": None, "INT8_KEEP_FLOAT_FP32_NAME_PATTERNS": None, "OUTPUT": None}


def settings_class(script: str):
    return Settings if script == "train" else EvalSettings


def read(script: str, env: dict):
    return settings_class(script).from_env(env, scope=script)


def field_named(cls, name: str):
    return next((f for f in dataclasses.fields(cls) if f.name.upper() == name), None)


def sample_value(default) -> str:
    """A value of the default's type that differs from it."""
    kind = type(default)
    return str(int(not default)) if kind is bool else str(default + 3) if kind is int else \
        "0.125" if kind is float else "elsewhere"


@pytest.mark.parametrize("script,name", [(script, name) for script, names in SEED_NAMES.items() for name in names])
def test_every_seed_name_gets_its_documented_answer(script, name):
    cls = settings_class(script)
    if name in REFUSALS:
        accepted = REFUSALS[name]
        if accepted is not None:  # the value this trainer builds with is accepted quietly
            assert read(script, {name: accepted}).seed_notes == ()
        for value in ("8", "0", "some,pattern") if accepted is None else ({"1": "0", "0": "1"}.get(accepted, "8"),):
            with pytest.raises(InputError) as refused:
                read(script, {name: value})
            message = str(refused.value)
            assert message.startswith(f"{name}={value} is refused: ") and "\n" not in message
            assert re.search(r"\b(unset it|set [A-Z_]+)", message), f"the refusal says nothing to set: {message}"
    elif name in ALIASES:
        ours, unit = ALIASES[name]
        target = field_named(cls, ours)
        value = sample_value(target.default)
        settings = read(script, {name: value})
        expected = train_gpt.parse_setting(name, value, type(target.default))
        assert getattr(settings, target.name) == (expected * unit if unit != 1 else expected)
        note, = [log_format.parse_line(line) for line in settings.seed_notes]
        assert note.tag == "seed_alias" and note.fields["name"] == name and note.fields["setting"] == ours
        assert note.fields["setting_value"] == str(getattr(settings, target.name))
    else:  # ours by name, in the class that script reads
        target = field_named(cls, name)
        assert target is not None, f"the seed's {name} is neither ours, nor an alias, nor refused"
        value = sample_value(target.default)
        assert getattr(read(script, {name: value}), target.name) == \
            train_gpt.parse_setting(name, value, type(target.default))


def test_the_code_answers_exactly_the_names_the_tests_document():
    answered = {name: row for name, row in SEED_SETTINGS.items()}
    assert {n for n, row in answered.items() if row[0] == "alias"} == set(ALIASES)
    assert {n for n, row in answered.items() if row[0] != "alias"} == set(REFUSALS)
    for name, (where, what, detail) in answered.items():
        if where == "alias":
            assert (what.upper(), detail) == ALIASES[name]
        else:
            assert (None if what is None else str(int(what))) == REFUSALS[name]
            assert name in SEED_NAMES[where], f"{name} is refused by {where}, which the seed's {where} does not read"
    seed = {name for names in SEED_NAMES.values() for name in names}
    assert set(SEED_SETTINGS) <= seed


def test_an_alias_and_its_setting_must_agree():
    assert Settings.from_env({"MUON_WD": "0.04", "MUON_WEIGHT_DECAY": "4e-2"}).muon_weight_decay == 0.04
    with pytest.raises(InputError, match=r"^MUON_WD=0.02 and MUON_WEIGHT_DECAY=0.04 are one setting \(the seed's name "
                                         r"and ours\); set only one of them$"):
        Settings.from_env({"MUON_WD": "0.02", "MUON_WEIGHT_DECAY": "0.04"})
    assert EvalSettings.from_env({"TABLE_BUDGET_KB": "2", "CORRECTION_MAX_BYTES": "2048"}).correction_max_bytes == 2048
    with pytest.raises(InputError, match="TABLE_BUDGET_KB=2 and CORRECTION_MAX_BYTES=2000 are one setting"):
        EvalSettings.from_env({"TABLE_BUDGET_KB": "2", "CORRECTION_MAX_BYTES": "2000"})


def test_each_script_answers_only_its_own_seed_names():
    # one shell exports everything: the builder's OUTPUT and the trainer's QUANT_BITS stop only their own script
    env = {"OUTPUT": "seed_out.ptz", "QUANT_BITS": "8", "MUON_WD": "0.01", "TABLE_BUDGET_KB": "3"}
    with pytest.raises(InputError, match="QUANT_BITS=8 is refused"):
        Settings.from_env(env)
    evaluation = EvalSettings.from_env(env)
    assert evaluation.correction_max_bytes == 3072 and [n for n in evaluation.seed_notes if "MUON_WD" in n] == []
    with pytest.raises(InputError, match="OUTPUT=seed_out.ptz is refused: .*CORRECTION_EMBED=1"):
        EvalSettings.from_env(env, scope="build")


TYPOS = [("MATRIX_LRR", "MATRIX_LR"), ("MUON_WEIGT_DECAY", "MUON_WEIGHT_DECAY"), ("EVAL_STRID", "EVAL_STRIDE"),
         ("MATIRX_LR", "MATRIX_LR"), ("TTT_STEP", "TTT_STEPS"), ("BIGRAM_HASH_BUCKET", "BIGRAM_HASH_BUCKETS"),
         ("matrix_lr", "MATRIX_LR")]


@pytest.mark.parametrize("typo,meant,cls", [(t, m, cls) for t, m in TYPOS for cls in (Settings, EvalSettings)]
                         + [("USE_CORECTION", "USE_CORRECTION", EvalSettings)])
def test_a_misspelt_name_stops_the_scripts_that_read_it_naming_the_setting_it_looks_like(typo, meant, cls):
    with pytest.raises(InputError, match=rf"^{typo} is no setting of these scripts or the seed's, but looks like "
                                         rf"{meant}; correct its name, or unset {typo}"):
        cls.from_env({typo: "0.03"})


def test_a_near_miss_of_an_evaluation_setting_is_left_to_the_evaluation():
    # train_gpt.py may not import eval_final.py, so it knows only its own and the seed's names: USE_CORRECTION
    # changes nothing in training, and eval_final.py and the builder, which read it, refuse the typo
    assert Settings.from_env({"USE_CORECTION": "1"}).seed_notes == ()


def test_other_programs_variables_and_every_scripts_own_names_pass_untouched():
    foreign = ["PATH", "HOME", "OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "TORCH_LOGS", "TORCH_COMPILE_DEBUG",
               "TORCHINDUCTOR_CACHE_DIR", "TORCHELASTIC_RUN_ID", "NCCL_DEBUG", "NCCL_P2P_DISABLE", "RANK", "WORLD_SIZE",
               "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT",
               "PYTHONPATH", "MKL_NUM_THREADS", "NUM_THREADS", "LANG", "TERM"]
    ours = [f.name.upper() for cls in (Settings, EvalSettings) for f in dataclasses.fields(cls)]
    seed = [name for names in SEED_NAMES.values() for name in names]
    for cls in (Settings, EvalSettings):
        train_gpt.check_spelling(dict.fromkeys(foreign + ours + seed, "1"),
                                 {f.name.upper() for f in dataclasses.fields(cls)})
    shell = dict(MATRIX_LR="0.02", USE_CORRECTION="1", CHECKPOINT="final_model.int6.ptz", TTT_LR="0.002",
                 EVAL_SEQ_LEN="4096", TTT_STEPS="1", OUTPUT="seed_out.ptz", QUANT_BITS="6", OMP_NUM_THREADS="1")
    assert Settings.from_env(shell).matrix_lr == 0.02 and EvalSettings.from_env(shell).eval_seq_len == 4096


def test_no_setting_of_the_scripts_beside_train_gpt_looks_like_a_typo_to_it():
    """One shell exports the settings of every script; train_gpt.py, which may not import eval_final.py, knows
    only its own and the seed's names: no evaluation setting may be one slip from those."""
    evaluation = {f.name.upper() for f in dataclasses.fields(EvalSettings)}
    train_gpt.check_spelling(dict.fromkeys(evaluation, "1"), {f.name.upper() for f in dataclasses.fields(Settings)})


def test_the_seeds_looped_stack_is_refused_by_name_and_built_as_its_refusal_says():
    """NUM_UNIQUE_BLOCKS x NUM_LOOPS (the seed: U blocks, the whole stack run L times in all) is refused by name,
    because our NUM_LOOPS counts passes beyond the first as the records do; the refusal's spelling builds it."""
    with pytest.raises(InputError, match=r"^NUM_UNIQUE_BLOCKS=4 is refused: .*: set NUM_LAYERS=U LOOP_START=0 "
                                         r"LOOP_END=U-1 NUM_LOOPS=L-1 \(ours counts passes beyond the first"):
        Settings.from_env({"NUM_UNIQUE_BLOCKS": "4", "NUM_LOOPS": "3"})
    s = Settings.from_env({"NUM_LAYERS": "4", "LOOP_START": "0", "LOOP_END": "3", "NUM_LOOPS": "2"})  # U=4, L=3
    cfg = train_gpt.ModelConfig.from_settings(s)
    assert cfg.layer_order() == (0, 1, 2, 3) * 3  # 12 virtual layers from 4 blocks
    looped, plain = train_gpt.GPT(cfg), train_gpt.GPT(dataclasses.replace(cfg, num_loops=0, loop_end=-1))
    extra = {n: p.numel() for n, p in looped.named_parameters()}.items() - \
        {n: p.numel() for n, p in plain.named_parameters()}.items()
    assert dict(extra) == {"skip_weights": 6 * cfg.model_dim}  # only the U-Net's 6 skips, not 2: no block added
    assert Settings.from_env({"NUM_LOOPS": "2"}).num_loops == 2  # ours by name, read as the records count it


@pytest.mark.parametrize("script,env,expect", [
    ("train_gpt.py", {"QUANT_BITS": "8"}, "QUANT_BITS=8 is refused: the artifact is int6 + zstd"),
    ("train_gpt.py", {"MATRIX_LRR": "0.03"}, "MATRIX_LRR is no setting of these scripts or the seed's, but looks "
                                             "like MATRIX_LR"),
    ("eval_final.py", {"EVAL_STRID": "64"}, "looks like EVAL_STRIDE"),
    ("train_gpt.py", {"NUM_LOOPS": "1"}, "the seed's NUM_LOOPS=1, the plain stack, is NUM_LOOPS=0"),  # no span: said
    ("build_correction_table.py", {"OUTPUT": "x.ptz"}, "OUTPUT=x.ptz is refused"),
])
def test_a_refusal_is_one_line_and_exit_2(tiny_data, tmp_path, script, env, expect):
    run = run_script([script], tiny_env(tiny_data, tmp_path, **env))
    assert run.returncode == 2 and "Traceback" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: ") and expect in lines[0], run.stderr


SCRIPTS = {"train": "train_gpt.py", "build": "build_correction_table.py"}


def docs_rows() -> list[str]:
    """docs/seed_settings.md's table of the seed's names that are not ours, as SEED_SETTINGS answers them."""
    rows = []
    for name, (where, what, detail) in SEED_SETTINGS.items():
        if where == "alias":
            answer = f"read as `{what.upper()}`" + (f" (x {detail})" if detail != 1 else "")
        else:
            accepted = f"`{name}={int(what)}` accepted, other values refused" if what is not None else "refused"
            answer = f"{accepted} by `{SCRIPTS[where]}`: {detail}"
        rows.append(f"| `{name}` | {answer} |")
    return rows


def test_docs_coming_from_the_seed_matches_the_table():
    page = (REPO / "docs" / "seed_settings.md").read_text()
    table = [line for line in page.splitlines() if line.startswith("| `")]
    expected = "\n".join(docs_rows())
    assert table == docs_rows(), f"docs/seed_settings.md's rows should read:\n{expected}"


# ----- BPB_LOSS_ALPHA --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model_and_batch(tiny_data):
    import sentencepiece as spm

    tables = train_gpt.build_byte_tables(spm.SentencePieceProcessor(model_file=tiny_data["tokenizer_path"]))
    cfg = dataclasses.replace(train_gpt.ModelConfig.from_settings(Settings()), vocab_size=tiny_data["vocab_size"],
                              num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, bigram_vocab_size=64,
                              bigram_dim=8)
    torch.manual_seed(0)
    model = train_gpt.GPT(cfg)
    with torch.no_grad():  # branch outputs start at zero: give them weights so the loss depends on the input
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    stream = train_gpt.load_validation_tokens(tiny_data["data_path"], cfg.vocab_size, 32)
    second_document = int(np.flatnonzero(stream.numpy()[1:] == 1)[0]) + 1  # BOS: a target of no bytes
    tokens = stream[second_document - 64 : second_document + 4 * 32 - 63]
    x, y = tokens[:-1].view(4, 32), tokens[1:].view(4, 32)
    return model, tables, x, y


def test_alpha_0_is_the_plain_loss_and_its_weights_reproduce_it(tiny_model_and_batch):
    model, tables, x, y = tiny_model_and_batch
    assert train_gpt.byte_loss_weights(tables, x, y, 0.0) is None  # the training step's plain path, unchanged
    plain = model(x, y)
    assert torch.equal(plain, F.cross_entropy(model(x).view(-1, model.cfg.vocab_size), y.reshape(-1)))
    uniform = torch.full(y.shape, 1 / y.numel())
    assert torch.allclose(model(x, y, uniform), plain, rtol=1e-6)


def test_alpha_weighs_each_targets_gradient_by_its_bytes(tiny_model_and_batch, monkeypatch):
    """A target's loss reaches the model only through its own position's hidden state, so the gradient
    there is that target's weight times what plain CE gives it: with alpha = 1, bytes / sum(bytes)."""
    model, tables, x, y = tiny_model_and_batch
    hidden = model.hidden(x).detach()
    grads = {}
    for alpha in (0.0, 0.5, 1.0):
        h = hidden.clone().requires_grad_()
        monkeypatch.setattr(model, "hidden", lambda idx: h)
        weights = train_gpt.byte_loss_weights(tables, x, y, alpha)
        (model(x, y) if weights is None else model(x, y, weights)).backward()
        grads[alpha] = h.grad.norm(dim=-1)  # (B, T)
    nbytes = tables.target_bytes(x, y).double()
    assert (nbytes == 0).any() and (nbytes > 2).any(), "the batch should hold zero-byte and long targets"
    plain = grads[0.0].double() * y.numel()  # each position's gradient at weight 1
    for alpha in (0.5, 1.0):
        expected = plain * ((1 - alpha) / y.numel() + alpha * nbytes / nbytes.sum())
        assert torch.allclose(grads[alpha].double(), expected, rtol=1e-4, atol=1e-9)
    assert (grads[1.0][nbytes == 0] == 0).all()  # a target that stands for no byte no longer teaches anything
    ratio = grads[1.0].double() / grads[0.0].double()
    assert ratio[nbytes > 2].min() > ratio[(nbytes == 1)].max()  # the more bytes, the more weight


def test_training_steps_with_alpha_train_on_the_mixed_loss(tiny_data, tmp_path):
    """The training step passes the byte tables through: a run with BPB_LOSS_ALPHA logs the mixed loss."""
    def first_loss(alpha):
        env = tiny_env(tiny_data, tmp_path / f"a{alpha}", ITERATIONS=1, WARMUP_STEPS=0, BPB_LOSS_ALPHA=alpha)
        s = Settings.from_env(env)
        rt = train_gpt.Runtime(0, 1, 0, torch.device("cpu"), False, False)
        import sentencepiece as spm
        tables = train_gpt.build_byte_tables(spm.SentencePieceProcessor(model_file=tiny_data["tokenizer_path"]))
        torch.manual_seed(0)
        model = train_gpt.GPT(train_gpt.ModelConfig.from_settings(s))
        loader = train_gpt.DistributedTokenLoader(train_gpt.list_shards(s.data_path, "train"), s.vocab_size, 0, 1,
                                                  rt.device)
        return float(train_gpt.TrainStep(s, rt, model, loader, tables)(0, 0.0)[0]), model
    (plain, _), (mixed, _) = first_loss(0.0), first_loss(0.5)
    assert plain != mixed and abs(mixed - plain) < 0.5 * plain  # a different, comparable objective


# ----- EVAL_SEQ_LEN and the seed's tables, on a tiny trained artifact -------------------------------

@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("seed_trained")
    env = tiny_env(tiny_data, out, ITERATIONS=20, AUTOCAST_BF16=0)
    run = run_script(["train_gpt.py"], env)
    assert run.returncode == 0, run.stderr[-3000:]
    env["CHECKPOINT"] = str(out / train_gpt.ARTIFACT_NAME)
    return {"env": env, "out": out}


def eval_run(trained, expect_rc=0, **overrides):
    run = run_script(["eval_final.py"], dict(trained["env"], **{k: str(v) for k, v in overrides.items()}))
    assert run.returncode == expect_rc, run.stderr[-3000:]
    return run.stdout if expect_rc == 0 else run.stderr


def fields_of(text: str, tag: str, key: str = "") -> dict:
    """The fields of the one `tag` line (that has `key`)."""
    lines = [line for line in log_format.read_lines(text) if line.tag == tag and (not key or key in line.fields)]
    assert len(lines) == 1, f"{len(lines)} {tag} lines in:\n{text[-3000:]}"
    return lines[0].fields


def test_eval_seq_len_equal_to_training_reproduces_the_base_score_bit_for_bit(trained):
    default, same = eval_run(trained), eval_run(trained, EVAL_SEQ_LEN=64)
    assert fields_of(same, "eval_base")["val_bpb"] == fields_of(default, "eval_base")["val_bpb"]
    assert fields_of(same, "eval_base")["val_loss"] == fields_of(default, "eval_base")["val_loss"]
    assert "eval_context" not in {line.tag for line in log_format.read_lines(same)}


@pytest.mark.parametrize("length,stride", [(128, 32), (32, 16)])
def test_other_windows_score_every_target_exactly_once(trained, length, stride):
    base = fields_of(eval_run(trained), "eval_base")
    out = eval_run(trained, EVAL_SEQ_LEN=length, EVAL_STRIDE=stride)
    scored = fields_of(out, "eval_base")
    assert scored["tokens"] == base["tokens"] and scored["bytes"] == base["bytes"]  # the same targets
    assert fields_of(out, "settings")["seq_len"] == str(length)
    num_targets = int(base["tokens"])
    starts, scored_from, width = train_gpt.window_plan(num_targets, length, stride)
    coverage = np.zeros(num_targets, dtype=np.int64)
    for start, first in zip(starts, scored_from):
        coverage[start + first : start + width] += 1
    assert width == length and (coverage == 1).all()
    assert np.isfinite(float(scored["val_bpb"])) and scored["val_bpb"] != base["val_bpb"]
    if length > 64:
        context = fields_of(out, "eval_context")
        cfg = train_gpt.read_artifact(trained["env"]["CHECKPOINT"]).model_config
        d = cfg.model_dim // cfg.num_heads
        assert float(context["rope_base"]) == pytest.approx(cfg.rope_base * (length / 64) ** (d / (d - 2)), rel=1e-5)


def test_longer_windows_rescale_rope_and_nothing_else(trained):
    s = EvalSettings.from_env(dict(trained["env"], EVAL_SEQ_LEN="128", EVAL_STRIDE="32"))
    scored = eval_final.load_for_scoring(s)
    cfg = scored.artifact.model_config
    base = eval_final.ntk_rope_base(cfg, 128, 64)
    assert base == pytest.approx(cfg.rope_base * 2 ** (16 / 14))
    rotaries = [m for m in scored.model.modules() if isinstance(m, train_gpt.Rotary)]
    assert len(rotaries) == cfg.num_layers
    for m in rotaries:
        assert torch.equal(m.inv_freq, train_gpt.Rotary(16, base).inv_freq)
    reference = eval_final.model_from_artifact(scored.artifact, "", torch.device("cpu"))
    for (name, a), (_, b) in zip(scored.model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name


def test_standard_windows_that_leave_targets_unscored_are_refused(trained):
    err = eval_run(trained, expect_rc=2, EVAL_SEQ_LEN=96, EVAL_STRIDE=0)
    assert "EVAL_SEQ_LEN=96 does not divide the 4096 targets" in err and "Traceback" not in err


def test_a_negative_window_is_refused_before_anything_is_scored():
    with pytest.raises(InputError, match="EVAL_SEQ_LEN=-1 is negative; set it to a window length, or 0"):
        eval_final.eval_context(EvalSettings(eval_seq_len=-1), torch.nn.Identity(), None, 64, 4096)


def seed_table_bytes(seed_positions, tokens) -> bytes:
    """A table as the seed's build_correction_table.py writes it, spelled out by hand."""
    out, previous = bytearray(struct.pack("<4sI", b"CRDT", len(seed_positions))), 0
    for position, token in zip(seed_positions, tokens):
        gap = position - previous
        while gap >= 0x80:
            out.append(gap & 0x7F | 0x80)
            gap >>= 7
        out.append(gap)
        out += struct.pack("<H", token)
        previous = position
    return bytes(out)


def test_a_hand_written_crdt_table_reads_back_at_our_positions():
    # the seed's positions index the target token in the stream: ours (the predicting position) + 1
    blob = seed_table_bytes([1, 2, 130, 20000, 20001], [5, 0, 1023, 77, 300])
    assert blob[:11] == b"CRDT" + struct.pack("<I", 5) + bytes([1, 5, 0])  # gap 1 from 0, token 5 little-endian
    table = ct.decode_table(blob, expect_vocab_size=1024, expect_val_length=20001)
    np.testing.assert_array_equal(table.positions, [0, 1, 129, 19999, 20000])
    np.testing.assert_array_equal(table.tokens, [5, 0, 1023, 77, 300])
    assert (table.fmt, table.fingerprint, table.vocab_size, table.val_length) == (ct.TABLE_FORMAT_SEED, b"", 1024,
                                                                                   20001)
    assert ct.decode_table(seed_table_bytes([], [])).positions.size == 0


@pytest.mark.parametrize("blob,problem", [
    (seed_table_bytes([3, 300], [1, 2])[:-1], "truncated inside entry 1 of 2"),
    (seed_table_bytes([3, 9], [1, 2]) + b"\0", "1 unexpected bytes follow its 2 entries"),
    (b"CRDT\x05", "shorter than the seed's 8-byte header"),
    (b"CRDT" + struct.pack("<I", 1000) + bytes(30), "cannot hold the 1000 entries"),
    (seed_table_bytes([3, 3], [1, 2]), "one entry to a position"),
    (seed_table_bytes([0, 3], [1, 2]), "must rise from 1"),
    (seed_table_bytes([3, 101], [1, 2]), "a position lies beyond the 100 validation targets"),
    (seed_table_bytes([3, 9], [1, 2000]), "a token id lies outside [0, 1024)"),
])
def test_a_damaged_or_foreign_crdt_table_is_refused(blob, problem):
    with pytest.raises(ct.CorrectionTableError, match=re.escape(problem)):
        ct.decode_table(blob, source="seed.bin", expect_vocab_size=1024, expect_val_length=100)


def test_the_seeds_table_applies_like_ours_and_is_logged_unverified(trained, tmp_path):
    s = EvalSettings.from_env(trained["env"])
    scored = eval_final.load_for_scoring(s)
    losses = scored.evaluate(keep_positions=True).position_losses.numpy()
    positions = np.sort(np.argsort(-losses)[:40])
    tokens = scored.targets[positions]
    tokens[::4] = (tokens[::4] + 1) % 512  # a few wrong ones: the boost goes to the table's token regardless
    (tmp_path / "seed_table.bin").write_bytes(seed_table_bytes(positions + 1, tokens))
    ours = ct.encode_table(positions, tokens, vocab_size=512, val_length=losses.size, fingerprint=scored.fingerprint)
    (tmp_path / "ours.ctab").write_bytes(ours)
    seed_run = eval_run(trained, CORRECTION_TABLE=tmp_path / "seed_table.bin")
    ours_run = eval_run(trained, CORRECTION_TABLE=tmp_path / "ours.ctab")
    warning = fields_of(seed_run, "warning", "table")
    assert warning["verified"] == "0" and warning["table"].endswith("seed_table.bin")
    assert not [line for line in log_format.read_lines(ours_run) if line.tag == "warning" and "table" in line.fields]
    assert fields_of(seed_run, "correction")["format"] == "0" and fields_of(seed_run, "correction")["entries"] == "40"
    corrected = log_value(seed_run, "eval_corrected_valderived", "val_bpb")
    assert corrected == pytest.approx(log_value(ours_run, "eval_corrected_valderived", "val_bpb"), abs=1e-9)
    assert corrected < log_value(seed_run, "eval_base", "val_bpb")

    # the same table carried inside the artifact under the seed's checkpoint key
    checkpoint = trained["out"] / "final_model.int6.ptz"
    carrying = tmp_path / "carrying.ptz"
    carrying.write_bytes(build_correction_table.add_artifact_extras(
        checkpoint.read_bytes(), {ct.SEED_TABLE_EXTRA_NAME: (tmp_path / "seed_table.bin").read_bytes()}, "test"))
    carried_run = eval_run(trained, CHECKPOINT=carrying)
    assert fields_of(carried_run, "correction")["carried"] == "1"
    assert fields_of(carried_run, "warning", "table")["verified"] == "0"
    assert log_value(carried_run, "eval_corrected_valderived", "val_bpb") == pytest.approx(corrected, abs=1e-9)
    assert ct.CARRIED_TABLE_NAMES[0] == ct.TABLE_EXTRA_NAME  # an artifact carrying both applies ours
