"""
recipes.py: presets of train_gpt.py's settings, as data (RECIPE=frontier; docs/frontier_recipe.md).

A recipe is a table: each row a setting, the value the recipe gives it, the record it comes from and what
it was worth there. RECIPE=name fills every setting of the table that is not given by hand (a hand setting
wins, and a row also yields to the hand settings it names, e.g. WARMDOWN_FRAC to WARMDOWN_ITERS); each row
logs where its value came from. Rows whose value is None name what the product chooses elsewhere (the TTT
settings on training text, the export's grids by rate and distortion): named there, never forced here.

Imported by train_gpt.py's Settings.from_env only when RECIPE is set: training's code (TRAINING_MODULES), never
an evaluation's, since the artifact records the model the recipe made (model_config) and the recipe's name.
"""

from __future__ import annotations

from dataclasses import dataclass

from run_files import InputError, log_value


@dataclass(frozen=True)
class Row:
    setting: str  # train_gpt.py's environment name
    value: str | None  # as it would be typed; None: the product chooses it elsewhere (worth says where)
    record: str  # the public record (openai/parameter-golf PR) the value comes from
    worth: str  # what it was worth there, from the records' own figures (SPEC section 12)
    yields_to: tuple[str, ...] = ()  # hand settings that keep this row unfilled: one meaning, two names, or a row
    # the hand setting would make wrong (the loop's span without the loop, the lanes' start in another depth)


# The best merged record's stack (PR #1855, 1.06108 BPB; SPEC section 12.1), as far as the product holds it.
FRONTIER = (
    Row("VOCAB_SIZE", "8192", "#1394, #1729", "SP4096 1.0979 -> SP8192 1.0856; case operators 1.0678 (#1729); the data "
        "itself is DATA_PATH and TOKENIZER_PATH, by hand (docs/caseops.md)"),
    Row("NUM_LAYERS", "11", "#1855", "the 11-layer family of every record since March"),
    Row("MODEL_DIM", "512", "#1855", "as the records"),
    Row("NUM_HEADS", "8", "#1855", "as the records"),
    Row("NUM_KV_HEADS", "4", "#1855", "as the records"),
    Row("MLP_MULT", "4", "#1855", "MLP 2048 with LeakyReLU(0.5)^2; not ablated alone"),
    Row("MLP_LEAKY_SLOPE", "0.5", "#493", "-0.0024 to -0.0045 (#493, #549, #784, #1859)"),
    Row("TRAIN_SEQ_LEN", "2048", "#1855", "as the records"),
    Row("TRAIN_BATCH_TOKENS", "786432", "#1855", "as the records"),
    Row("QK_GAIN_INIT", "5.0", "#1276", "the default from #1276 on; not ablated alone in #1855"),
    Row("LOGIT_SOFTCAP", "30", "#1855", "as the upstream baseline"),
    Row("ROPE_DIMS", "16", "#315", "with LAYER_NORM_SCALE: -0.0023 (record 2026-03-21, 1.1271 -> 1.1248)"),
    Row("LAYER_NORM_SCALE", "1", "#315", "see ROPE_DIMS"),
    Row("XSA_LAST_LAYERS", "1000", "#478", "all layers (any count past the virtual layers): -0.006 against the last 4 "
        "(#638); the last 4 -0.010 (#784)"),
    Row("NUM_LOOPS", "2", "#1344", "layers 3-5 run three times: 1.09124 -> 1.08995 with retuned WD/LR (#1331)"),
    Row("LOOP_START", "3", "#1344", "see NUM_LOOPS", ("NUM_LOOPS",)),
    Row("LOOP_END", "5", "#1344", "see NUM_LOOPS", ("NUM_LOOPS",)),
    Row("ENABLE_LOOPING_AT", "0.35", "#1204", "a late start: 1.1163 -> 1.1153 (#1204)", ("NUM_LOOPS",)),
    Row("PARALLEL_RESIDUAL_START", "8", "#1530", "two lanes from layer 8 (#1529: from 7 to 8); no delta published alone",
        ("NUM_LAYERS", "NUM_LOOPS", "LOOP_START", "LOOP_END")),
    Row("WARMDOWN_FRAC", "0.85", "#1855", "one of 9 values chosen by greedy forward selection together (0.75 before)",
        ("WARMDOWN_ITERS",)),
    Row("LR_FLOOR", "0.1", "#1787", "part of #1787's stack; no delta published alone"),
    Row("MATRIX_LR", "0.026", "#1586", "part of #1586's stack; no delta published alone"),
    Row("MUON_MOMENTUM", "0.97", "#1523", "0.99 -> 0.97 in #1523's stack; no delta published alone"),
    Row("TIED_EMBED_LR", "0.03", "#1855", "as #1855's run"),
    Row("SCALAR_LR", "0.02", "#1855", "as #1855's run"),
    Row("ADAM_BETA2", "0.99", "#1855", "one of the 9 greedy-selected values (0.95 before)"),
    Row("ADAM_WEIGHT_DECAY", "0.02", "#1855", "as #1855's run"),
    Row("MUON_WEIGHT_DECAY", "0.095", "#1855", "retuned with the loops (#1331)"),
    Row("EMBED_WEIGHT_DECAY", "0.085", "#1855", "the embedding's own decay, retuned with the loops"),
    Row("GRAD_CLIP_NORM", "0.3", "#1855", "as the records"),
    Row("EMA_HORIZON", "0.058", "#1855", "EMA 0.9965 over 4,931 steps (a time constant of 286 steps, 0.058 of the "
        "run); 0.997 beside SWA -0.0006 (record 2026-03-22)", ("EMA_DECAY",)),
    Row("SWA_ENABLED", "0", "#1855", "the EMA alone is exported"),
    Row("EXPORT_ALLOCATION", "rd", "#1855", "the export chooses each group's grid by rate and distortion, #1855's "
        "int6/int7 grids its starting point (docs/export.md); the full-size model fits only so"),
    Row("ttt", None, "#1855", "phased LoRA TTT (rank 80, alpha 144, lr 1e-4, 48-token chunks, 3 phases): 1.07380 -> "
        "1.06108; here build_ttt_settings.py chooses TTT's settings on training text and the artifact carries them"),
    Row("lqer", None, "#1797", "rank-4 LQER on the 3 worst tensors, about -0.009 for 30 KB; EXPORT_ALLOCATION=rd "
        "stores none, its grids chosen per group instead"),
    Row("bos_fix", None, "#1855", "always on here, no setting (the unmasked SmearGate flattered a record by 0.00255, "
        "#1797)"),
)

RECIPES = {"frontier": FRONTIER}


def fill(env, seed_settings: dict) -> tuple[dict, list[str]]:
    """(env with the recipe's values for every row not given by hand, the log lines saying where each came from).
    seed_settings: train_gpt.SEED_SETTINGS, whose aliases given by hand count as their settings given."""
    name = env["RECIPE"].strip()
    if name not in RECIPES:
        raise InputError(f"RECIPE={name} is no recipe; set RECIPE to one of {', '.join(RECIPES)}, or none")
    aliases = {what.upper(): key for key, (where, what, _) in seed_settings.items() if key in env and where == "alias"}
    hand = {key.upper() for key in env} | set(aliases)
    filled, lines, counts = {**env, "RECIPE": name}, [], {"recipe": 0, "hand": 0, "elsewhere": 0}
    for row in RECIPES[name]:
        if row.value is None:
            source, fields = "elsewhere", ""
        elif row.setting in hand or hand & set(row.yields_to):
            source = "hand"
            first = next(n for n in (row.setting, *row.yields_to) if n in hand)
            given = first if first in env else aliases.get(first, first)  # a seed's name for it
            fields = (f" value:{log_value(env[given])} given:{given}" if first == row.setting  # else: left at its
                      else f" value:unset yields_to:{given}") + f" recipe_value:{row.value}"  # default, as told

        else:
            source, filled[row.setting] = "recipe", row.value
            fields = f" value:{row.value}"
        counts[source] += 1
        lines.append(f"recipe_setting setting:{log_value(row.setting)} source:{source}{fields} record:{log_value(row.record)}")
    head = f"recipe name:{name} from_recipe:{counts['recipe']} by_hand:{counts['hand']} elsewhere:{counts['elsewhere']}"
    return filled, [head + " # a setting given by hand wins", *lines]
