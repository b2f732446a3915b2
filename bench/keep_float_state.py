"""
keep_float_state.py: train_gpt.py as it is, keeping the float weights and the GPTQ calibration beside the artifact.

    OUTPUT_DIR=/work/cpu_model ... python bench/keep_float_state.py

The training run is train_gpt.train unchanged; the export's inputs (the float state dict the export quantizes, the
meta, and the Calibration from training tokens) are written to OUTPUT_DIR/float_state.pt before the export runs, so
that bench/export_rd.py and bench/row_order.py can measure other exports of the very same weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import train_gpt  # noqa: E402

FLOAT_STATE_NAME = "float_state.pt"


def keeping(export, out_dir: Path):
    def export_keeping(state, meta, *args, **kwargs):
        calibration = next((a for a in (*args, *kwargs.values()) if isinstance(a, train_gpt.quantize.Calibration)), None)
        path = out_dir / FLOAT_STATE_NAME
        torch.save({"state": state, "meta": meta, "calibration": calibration}, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
        print(f"float_state path:{path} tensors:{len(state)} calibration:{int(calibration is not None)}", flush=True)
        return export(state, meta, *args, **kwargs)
    return export_keeping


def main() -> None:
    s = train_gpt.Settings.from_env()
    out_dir = Path(s.output_dir)
    train_gpt.export_artifact = keeping(train_gpt.export_artifact, out_dir)
    train_gpt.export_rd = keeping(train_gpt.export_rd, out_dir)
    train_gpt.train(s)


if __name__ == "__main__":
    train_gpt.run_main(main, "bench/keep_float_state.py")
