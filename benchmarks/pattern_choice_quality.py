"""Is the search worth running? The CLI's chosen pattern against the uniform one on held-out text, in bits per byte.

The shipped trained checkpoint (16 DSA layers, top-64) is saved as a transformers-style directory (config.json +
model.safetensors). ``fx-indexcache search`` runs twice, with the same calibration windows: on the directory
(``--model DIR --calibration windows.npy``) and on the built-in path (no ``--model``); both greedy runs go down to 2
F layers, so their steps at 8 and 4 F layers are the patterns ``--keep 0.5`` and ``--keep 0.25`` return (greedy
search is deterministic and each run passes through the shorter budgets). Each chosen pattern and the evenly spaced
one with as many F layers are then scored on held-out windows (files the model and the search never saw) with the
hand-written IndexCache (``evaluation.bits_per_byte``). The record goes to ``--out`` (JSON), with the commands.

    python benchmarks/pattern_choice_quality.py --out benchmarks/results/pattern_choice_quality.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy
import torch

from fx_indexcache import PatternChoice
from fx_indexcache.models.reference import corpus
from fx_indexcache.models.reference.checkpoint import load_checkpoint
from fx_indexcache.models.reference.evaluation import bits_per_byte
from fx_indexcache.models.reference.hf_directory import save_directory
from fx_indexcache.tools.calibration import TRAINED_SEQ_LEN, calibration_windows

BUDGETS = {"1/2": 8, "1/4": 4, "1/8": 2}  # F layers of 16


def run_search(argv: list[str], log: Path) -> float:
    command = [sys.executable, "-m", "fx_indexcache", "search", *argv]
    start = time.perf_counter()
    with log.open("w") as handle:
        subprocess.run(command, check=True, stdout=handle, stderr=subprocess.STDOUT)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--calibration-windows", type=int, default=16, help="256-byte calibration windows")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--held-out-windows", type=int, default=32, help="1024-byte held-out windows, evenly spread")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = args.calibration_windows // args.batch_size
    work = Path(tempfile.mkdtemp(prefix="pattern_choice_quality_"))

    model = load_checkpoint()
    directory = save_directory(model, work / "dsa_bytes_16l")  # float32, as the built-in path loads it
    windows = calibration_windows(TRAINED_SEQ_LEN, batches * args.batch_size, seed=0)
    numpy.save(work / "calibration.npy", windows.numpy())
    common = ["--keep", "2", "--batches", str(batches), "--batch-size", str(args.batch_size),
              "--threads", str(args.threads)]
    from_dir = ["--model", str(directory), "--calibration", str(work / "calibration.npy"), *common,
                "--save", str(work / "dir.json"), "--out", str(work / "dir.png")]
    built_in = [*common, "--save", str(work / "built_in.json"), "--out", str(work / "built_in.png")]
    seconds_dir = run_search(from_dir, work / "dir.log")
    seconds_built_in = run_search(built_in, work / "built_in.log")
    chosen, reference = PatternChoice.load(work / "dir.json"), PatternChoice.load(work / "built_in.json")

    tokens = corpus.as_tokens(corpus.read_files(corpus.HELD_OUT_FILES))
    every = corpus.windows(tokens, 1024)
    picks = torch.linspace(0, every.shape[0] - 1, args.held_out_windows).round().long()
    held_out = every[picks]
    all_f = bits_per_byte(model, held_out, None)
    rows = []
    for budget, f_layers in BUDGETS.items():
        (step,) = [s for s in chosen.steps if s.pattern.count("F") == f_layers]
        (same,) = [s for s in reference.steps if s.pattern.count("F") == f_layers]
        uniform = "".join("F" if i % (16 // f_layers) == 0 else "S" for i in range(16))
        searched_bpb, uniform_bpb = bits_per_byte(model, held_out, step.pattern), bits_per_byte(model, held_out, uniform)
        rows.append({
            "budget": budget, "f_layers": f_layers,
            "chosen_pattern": step.pattern, "chosen_held_out_bpb": round(searched_bpb, 4),
            "uniform_pattern": uniform, "uniform_held_out_bpb": round(uniform_bpb, 4),
            "chosen_minus_uniform_bpb": round(searched_bpb - uniform_bpb, 4),
            "chosen_beats_uniform": searched_bpb < uniform_bpb,
            "chosen_calibration_kl": step.score,
            "built_in_path_pattern": same.pattern, "same_pattern_as_built_in_path": same.pattern == step.pattern,
        })
        print(rows[-1], flush=True)
    record = {
        "what": "fx-indexcache search --model DIR (the shipped checkpoint saved as config.json + model.safetensors) "
                "against the uniform pattern at the same budget, held-out bits per byte",
        "command": "python benchmarks/pattern_choice_quality.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "search_commands": {
            "directory": "fx-indexcache search " + " ".join(from_dir).replace(str(work) + "/", "$WORK/"),
            "built_in": "fx-indexcache search " + " ".join(built_in).replace(str(work) + "/", "$WORK/"),
        },
        "calibration": f"{windows.shape[0]} windows of {TRAINED_SEQ_LEN} bytes at seeded random offsets (seed 0) "
                       f"of {', '.join(corpus.CALIBRATION_FILES)} (tools.calibration.calibration_windows)",
        "calibration_digest": chosen.calibration_digest,
        "objective": chosen.metric,
        "held_out": f"{held_out.shape[0]} windows of 1024 bytes evenly spread over {', '.join(corpus.HELD_OUT_FILES)}",
        "all_f_held_out_bpb": round(all_f, 4),
        "rows": rows,
        "search_seconds": {"directory": round(seconds_dir, 1), "built_in": round(seconds_built_in, 1)},
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "device": "cpu",
                        "cpu": platform.processor() or platform.machine(), "threads": args.threads,
                        "cpu_count": os.cpu_count()},
        "library_version": chosen.library_version,
    }
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
