"""Score-first TTT with settings chosen on held-out training text: this builder against the previous one, on CPU.

For each corpus and seed, through the real scripts (subprocesses, as a user runs them):
  1. data/prepare.py makes the shards; the last training shard is held out of training (the run trains
     on a folder of links to the others), so the documents the settings are chosen on are new text to the model;
  2. train_gpt.py trains the demo's model (scripts/demo.py TRAIN_ENV) for --steps steps;
  3. build_ttt_settings.py chooses the settings on that held-out shard, each into its own copy of the artifact:
     this builder (whole documents at the shard's end, TTT_PHASES searched, both modes tried, the better stored),
     and the previous builder (commit PREVIOUS, unpacked from git: the shard's last tokens, one mode given,
     phased by default) in each of --previous-modes;
  4. eval_final.py scores the validation stream with each copy (the base pass, then TTT).
Corpora: demo, the built-in corpus split as the demo splits it (its first 80 documents, the pydoc help topics,
are validation); vim, the help files of the Vim editor installed on this machine (/usr/share/vim/*/doc/*.txt,
English prose about an editor with its commands in it), cut into sections at their ==== rules, shuffled with
a fixed seed, the first 120 sections validation.

    python bench/phased_ttt_compare.py --corpus demo vim --seeds 1 2 [--steps 400] [--work /tmp/phased_cmp]
        [--val-tokens 40960] [--calibrate-tokens 16384] [--chunk-tokens 4096] [--previous-modes [phased full]]
"""

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "records"))
sys.path.insert(0, str(REPO / "scripts"))
import log_format  # noqa: E402
from demo import DemoSettings, TRAIN_ENV, VAL_DOCS  # noqa: E402

VAL_TOKENS = 40_960  # targets scored: a multiple of the window
CALIBRATE_TOKENS = 16_384
CHUNK_TOKENS = 4_096  # the chunked mode's chunks: 10 in the validation stream, 4 in the slice
DOC_CHUNK_TOKENS = 64  # the phased mode's: a quarter of the demo's 256-token window
SHARD_TOKENS = 400_000  # several training shards, so the last one can be held out
VIM_VAL_DOCS = 120
VIM_SECTION_RULE = re.compile(r"^={20,}\s*$", re.MULTILINE)
PREVIOUS = "66fd1a6"  # the builder before whole held-out documents, the phases' search and the mode's choice


def run(args: list[str], env: dict | None = None, cwd: Path = REPO) -> list[str]:
    full = {**os.environ, "PYTHONPATH": str(cwd), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            **{k: str(v) for k, v in (env or {}).items()}}
    t0 = time.time()
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=full, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    print(f"compare_child seconds:{time.time() - t0:.0f} # {' '.join(args)}", flush=True)
    return proc.stdout.splitlines()


def vim_sections(out: Path) -> Path:
    files = sorted(Path("/usr/share").glob("vim/vim*/doc/*.txt"))
    if not files:
        sys.exit("--corpus vim: no /usr/share/vim/vim*/doc/*.txt on this machine; install vim or use --corpus demo")
    sections = [s.strip() for f in files for s in VIM_SECTION_RULE.split(f.read_text(errors="replace"))]
    sections = [s for s in sections if len(s) >= 400]
    random.Random(0).shuffle(sections)
    path = out / "vim_sections.jsonl"
    path.write_text("".join(json.dumps({"text": s}) + "\n" for s in sections))
    return path


def prepare(corpus: str, work: Path) -> tuple[Path, Path, Path]:
    """(the folder with every shard, the training folder without the last training shard, the tokenizer)."""
    full, train, tokenizer = work / corpus / "full", work / corpus / "train", work / corpus / "tok.model"
    if not (full / "manifest.json").is_file():
        full.mkdir(parents=True, exist_ok=True)
        source = (["--builtin", "--val-docs", str(VAL_DOCS)] if corpus == "demo" else
                  ["--input", str(vim_sections(work / corpus)), "--val-docs", str(VIM_VAL_DOCS)])
        run(["data/prepare.py", *source, "--vocab-size", "1024", "--out-dir", str(full), "--tokenizer-out",
             str(tokenizer), "--shard-tokens", str(SHARD_TOKENS)])
    shards = sorted(full.glob("fineweb_train_*.bin"))
    if len(shards) < 2:
        sys.exit(f"{full}: one training shard; nothing to hold out")
    train.mkdir(exist_ok=True)
    for shard in [*full.glob("fineweb_val_*.bin"), *shards[:-1]]:
        if not (train / shard.name).exists():
            (train / shard.name).symlink_to(shard)
    return full, train, tokenizer


def fields(lines: list[str], tag: str) -> dict:
    return log_format.last_line(lines, tag).fields


def previous_builder(work: Path) -> Path:
    """The builder as it was before whole held-out documents (commit PREVIOUS), unpacked once with its modules."""
    tree = work / f"previous_{PREVIOUS[:8]}"
    if not (tree / "build_ttt_settings.py").is_file():
        tree.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", PREVIOUS], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


def trained(corpus: str, seed: int, steps: int, work: Path) -> tuple[Path, Path, Path]:
    """(the run's folder, its artifact, the tokenizer): the demo's model trained on all training shards but the
    last, once per corpus and seed (an artifact already there is kept)."""
    full, train, tokenizer = prepare(corpus, work)
    out = work / corpus / f"seed{seed}"
    artifact = out / "final_model.int6.ptz"
    schedule = DemoSettings(train_seconds=steps / TRAIN_ENV["ITERATIONS"] * 420).schedule
    if not artifact.is_file():
        out.mkdir(parents=True, exist_ok=True)
        run(["train_gpt.py"], {**TRAIN_ENV, **schedule, "ITERATIONS": steps, "MAX_WALLCLOCK_SECONDS": 0,
                               "DATA_PATH": train, "TOKENIZER_PATH": tokenizer, "OUTPUT_DIR": out, "SEED": seed,
                               "RUN_ID": f"cmp{seed}", "VAL_MAX_TOKENS": VAL_TOKENS + 1, "GPTQ_RESERVE_SECONDS": 0})
    return out, artifact, tokenizer


def one(corpus: str, seed: int, steps: int, work: Path, previous_modes: list[str]) -> dict:
    out, artifact, tokenizer = trained(corpus, seed, steps, work)
    full = work / corpus / "full"
    common = {"DATA_PATH": full, "TOKENIZER_PATH": tokenizer, "EVAL_STRIDE": 64, "DEVICE": "cpu", "COMPILE": 0,
              "VAL_MAX_TOKENS": VAL_TOKENS + 1}
    chunks = {"full": {"TTT_CHUNK_TOKENS": CHUNK_TOKENS}, "phased": {"TTT_DOC_CHUNK_TOKENS": DOC_CHUNK_TOKENS}}
    # (name, the builder's folder, its environment): the previous builder per mode, then this one with both modes
    builders = [(f"previous_{mode}", previous_builder(work), {"TTT_MODE": mode, **chunks[mode]})
                for mode in previous_modes]
    builders.append(("chosen", REPO, {**chunks["full"], **chunks["phased"]}))
    figures = {}
    for name, tree, env in builders:  # each slice's size its own files: a run at another size builds afresh
        chosen = out / f"final_model.int6.{name}.{CALIBRATE_TOKENS}.ptz"
        log = out / f"calibrate_{name}.{CALIBRATE_TOKENS}.txt"
        if not chosen.is_file():
            lines = run(["build_ttt_settings.py"], {**common, "CHECKPOINT": artifact,
                                                    "CALIBRATE_TTT_TOKENS": CALIBRATE_TOKENS, **env}, cwd=tree)
            log.write_text("\n".join(lines))
            (out / "final_model.int6.with_ttt.ptz").rename(chosen)
        picked = fields(log.read_text().splitlines(), "ttt_chosen")
        lines = run(["eval_final.py"], {**common, "CHECKPOINT": chosen, "USE_TTT": 1})
        base, ttt = fields(lines, "eval_base"), fields(lines, "eval_ttt")
        seconds = float(ttt["eval_time"].removesuffix("ms")) / 1000
        figures[name] = dict(base=float(base["val_bpb"]), ttt=float(ttt["val_bpb"]), seconds=seconds,
                             base_seconds=float(base["eval_time"].removesuffix("ms")) / 1000,
                             slice_gain=float(picked["gain_bpb"]), mode=picked["ttt_mode"],
                             chosen=" ".join(f"{k}:{v}" for k, v in picked.items() if k.startswith("ttt_")))
        f = figures[name]
        print(f"compare corpus:{corpus} seed:{seed} builder:{name} base_val_bpb:{f['base']:.5f} "
              f"ttt_val_bpb:{f['ttt']:.5f} gain_bpb:{f['base'] - f['ttt']:.5f} ttt_s:{seconds:.1f} "
              f"base_s:{f['base_seconds']:.1f} slice_gain_bpb:{f['slice_gain']:.5f} {f['chosen']}", flush=True)
    return figures


def main() -> None:
    global VAL_TOKENS, CALIBRATE_TOKENS, CHUNK_TOKENS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", nargs="+", default=["demo", "vim"], choices=["demo", "vim"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--work", type=Path, default=Path("/tmp/phased_ttt_compare"))
    parser.add_argument("--val-tokens", type=int, default=VAL_TOKENS)
    parser.add_argument("--calibrate-tokens", type=int, default=CALIBRATE_TOKENS)
    parser.add_argument("--chunk-tokens", type=int, default=CHUNK_TOKENS, help="the chunked mode's TTT_CHUNK_TOKENS")
    parser.add_argument("--previous-modes", nargs="*", default=["phased", "full"], choices=["phased", "full"],
                        help="the previous builder's modes; none (the option alone): this builder only")
    args = parser.parse_args()
    VAL_TOKENS, CALIBRATE_TOKENS, CHUNK_TOKENS = args.val_tokens, args.calibrate_tokens, args.chunk_tokens
    print(f"compare_bench steps:{args.steps} val_tokens:{VAL_TOKENS} calibrate_tokens:{CALIBRATE_TOKENS} "
          f"chunk_tokens:{CHUNK_TOKENS} threads:{os.environ.get('OMP_NUM_THREADS', '1')}", flush=True)
    rows = []
    names = [f"previous_{m}" for m in args.previous_modes] + ["chosen"]
    for corpus in args.corpus:
        for seed in args.seeds:
            f = one(corpus, seed, args.steps, args.work, args.previous_modes)
            cells = [f"{f[n]['ttt']:.4f} ({f[n]['ttt'] - f[n]['base']:+.4f}, {f[n]['seconds']:.0f} s)" for n in names]
            rows.append(f"| {corpus} | {seed} | {f['chosen']['base']:.4f} | {' | '.join(cells)} | "
                        f"{f['chosen']['mode']} | {f['chosen']['base_seconds']:.0f} s |")
    print(f"| corpus | seed | base | {' | '.join(n.replace('_', ' builder, ') for n in names)} | its mode | base pass |")
    print("| --- | --- | --- | " + "--- | " * len(names) + "--- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
