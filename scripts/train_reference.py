"""Train the shipped DSA checkpoint, then measure the paper's quality table at small scale.

    python scripts/train_reference.py --out DIR [--seed 0] [--steps N | --time-budget S]   # one GPU
    python scripts/train_reference.py --smoke --out DIR                                    # CPU, seconds
    python scripts/train_reference.py --eval-only CHECKPOINT --out DIR                     # the table again

Model: ``ReferenceDSAModel`` (MLA + lightning indexer + top-k sparse attention, dense SwiGLU MLP), 16 layers,
hidden 128, byte-level vocabulary (256), context 1024, top-k 64. Data: the running Python's standard library
source (``fx_indexcache.models.reference.corpus``: named calibration and held-out files, every other file trains).

Training follows DeepSeek-V3.2's recipe for the indexer (``fx_indexcache.models.reference.training``): a dense
warm-up (dense attention; the indexer fit by KL to the attention distribution, its inputs detached), then
sparse training through the top-k (LM loss on the model; the indexer fit by KL to the attention over the
keys it selected). ``--time-budget`` measures a few steps first and fixes the step count from it; the log
names that count, and ``--steps N`` with the same seed repeats the run.

After training the checkpoint is saved (bf16 safetensors), loaded back, and scored on the held-out files
(bits per byte) with every layer F, uniform 1/2, 1/4, 1/8 patterns and the greedy patterns that
``pattern_search.greedy_search`` finds on the calibration files (LM loss), plus the adjacent-layer overlap.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

from fx_indexcache.models.reference import DSAModelConfig, ReferenceDSAModel, corpus
from fx_indexcache.models.reference.checkpoint import load_checkpoint, save_checkpoint
from fx_indexcache.models.reference.evaluation import bits_per_byte, shuffled_indexers
from fx_indexcache.models.reference.training import Attention, next_byte_loss, training_forward
from fx_indexcache.tools.calibration import ProbeTarget
from fx_indexcache.tools.overlap import OverlapResult, overlap_from_records, overlap_of_target, save_heatmap
from fx_indexcache.tools.pattern_search import PatternScorer, greedy_search, uniform_pattern
from fx_indexcache.tools.probe import LayerRecord

FRACTIONS = {"1/2": 2, "1/4": 4, "1/8": 8}


def model_config(smoke: bool) -> DSAModelConfig:
    if smoke:
        return DSAModelConfig(vocab_size=256, hidden_size=32, num_layers=4, num_heads=2, q_lora_rank=16,
                              kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                              index_n_heads=2, index_head_dim=8, index_topk=8, first_k_dense_layers=4,
                              intermediate_size=64, max_seq_len=64)
    return DSAModelConfig(vocab_size=256, hidden_size=128, num_layers=16, num_heads=4, q_lora_rank=64,
                          kv_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
                          index_n_heads=8, index_head_dim=32, index_topk=64, first_k_dense_layers=16,
                          intermediate_size=320, max_seq_len=1024)


def build_model(config: DSAModelConfig, seed: int, device: str) -> ReferenceDSAModel:
    """The reference init, with the residual-branch outputs scaled down by sqrt(2 * layers) for a deep stack."""
    model = ReferenceDSAModel(config, seed=seed).to(device)
    with torch.no_grad():
        for layer in model.layers:
            layer.attn.wo.weight.mul_((2 * config.num_layers) ** -0.5)
            layer.mlp.w2.weight.mul_((2 * config.num_layers) ** -0.5)
    return model.train()


def make_optimizer(model: ReferenceDSAModel, lr: float) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), fused=torch.cuda.is_available())


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class Trainer:
    def __init__(self, args, config: DSAModelConfig, train_tokens: torch.Tensor, device: str) -> None:
        self.args, self.config, self.tokens, self.device = args, config, train_tokens, device
        self.model = build_model(config, args.seed, device)
        self.optimizer = make_optimizer(self.model, args.lr)
        named = list(self.model.named_parameters())
        self.clip_groups = [[p for n, p in named if ".indexer." in n], [p for n, p in named if ".indexer." not in n]]
        self.generator = torch.Generator().manual_seed(args.seed)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))

    def step(self, attention: Attention, lr: float) -> tuple[float, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        ids = corpus.random_windows(self.tokens, self.args.seq_len, self.args.batch, self.generator).to(self.device)
        with self.autocast:
            out = training_forward(self.model, ids, attention)
            lm = next_byte_loss(out.logits, ids)
        (lm + out.indexer_kl).backward()  # the KL reaches only the indexers, the LM loss only the rest
        for group in self.clip_groups:  # clipped apart, so neither loss's gradient scale shrinks the other's
            torch.nn.utils.clip_grad_norm_(group, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lm.item(), out.indexer_kl.item() / self.config.num_layers


def seconds_per_step(args, config, train_tokens, device) -> dict[Attention, float]:
    """Time a few throw-away steps of each kind (after one warm-up each) to size a --time-budget run."""
    probe = Trainer(args, config, train_tokens, device)
    times = {}
    for attention in Attention:
        probe.step(attention, 1e-4)
        sync(device)
        start = time.perf_counter()
        for _ in range(3):
            probe.step(attention, 1e-4)
        sync(device)
        times[attention] = (time.perf_counter() - start) / 3
    return times


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train(args, config, data, device, log) -> tuple[ReferenceDSAModel, dict]:
    steps = args.steps
    if not steps:
        per_step = seconds_per_step(args, config, data["train"], device)
        mean = args.dense_fraction * per_step[Attention.DENSE] + (1 - args.dense_fraction) * per_step[Attention.SPARSE]
        steps = max(10, int(args.time_budget / mean) // 10 * 10)
        log(f"timing: {per_step[Attention.DENSE] * 1e3:.1f} ms/step dense, {per_step[Attention.SPARSE] * 1e3:.1f} "
            f"ms/step sparse -> {steps} steps for a {args.time_budget:.0f} s budget (repeat with --steps {steps})")
    dense_steps = round(args.dense_fraction * steps)
    trainer = Trainer(args, config, data["train"], device)
    val = data["held_out"][: args.val_windows]
    history = {"step": [], "lm_bpb": [], "kl": [], "val_step": [], "val_bpb": [], "dense_steps": dense_steps,
               "steps": steps}
    log(f"training {steps} steps ({dense_steps} dense warm-up, then sparse top-{config.index_topk}), "
        f"batch {args.batch} x {args.seq_len} bytes, peak lr {args.lr}, seed {args.seed}")
    start = time.perf_counter()
    for step in range(steps):
        attention = Attention.DENSE if step < dense_steps else Attention.SPARSE
        lm, kl = trainer.step(attention, learning_rate(step, steps, args.lr, args.warmup))
        history["step"].append(step)
        history["lm_bpb"].append(lm / math.log(2))
        history["kl"].append(kl)
        last = step == steps - 1
        if step % args.log_every == 0 or last or step == dense_steps:
            log(f"step {step:5d} {attention.value:6s} lm {lm / math.log(2):.4f} bits/byte  indexer KL {kl:.4f}  "
                f"({time.perf_counter() - start:.0f} s)")
        if (step + 1) % args.val_every == 0 or last:
            trainer.model.eval()
            value = bits_per_byte(trainer.model, val, batch_size=args.batch)
            trainer.model.train()
            history["val_step"].append(step)
            history["val_bpb"].append(value)
            log(f"           held-out (first {val.shape[0]} windows, sparse top-k, all F): {value:.4f} bits/byte")
        if time.perf_counter() - start > args.hard_stop:
            log(f"stopped at step {step}: past --hard-stop {args.hard_stop:.0f} s (the schedule was cut short)")
            history["steps"] = step + 1
            break
    history["train_seconds"] = time.perf_counter() - start
    return trainer.model.eval(), history


def plot_history(history: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    window = max(1, len(history["step"]) // 100)
    smooth = torch.tensor(history["lm_bpb"]).unfold(0, window, 1).mean(-1) if window > 1 else torch.tensor(history["lm_bpb"])
    ax.plot(history["step"][window - 1 :], smooth.tolist(), label=f"train LM loss (mean of {window} steps)")
    ax.plot(history["val_step"], history["val_bpb"], "o-", label="held-out (sparse top-k)")
    ax.axvline(history["dense_steps"], color="gray", ls="--", lw=1)
    ax.text(history["dense_steps"], 0.98, " dense -> sparse", va="top", fontsize=8, color="gray",
            transform=ax.get_xaxis_transform())
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.set_ylim(top=min(ax.get_ylim()[1], 4.0))
    kl_axis = ax.twinx()
    kl_axis.plot(history["step"], history["kl"], color="tab:red", alpha=0.35, lw=0.8, label="indexer KL / layer")
    kl_axis.set_ylabel("indexer KL per layer (nats)", color="tab:red")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------- the table


class OracleScorer:
    """LM loss (nats/byte) of a pattern run by the hand-written IndexCache: PatternScorer's metric, without a trace."""

    def __init__(self, model, windows: torch.Tensor, batch: int) -> None:
        self.model, self.windows, self.batch, self.evaluations = model, windows, batch, 0

    def __call__(self, pattern: str) -> float:
        self.evaluations += 1
        return bits_per_byte(self.model, self.windows, pattern, self.batch) * math.log(2)


def overlap_of(model, batches: list[torch.Tensor], log) -> OverlapResult:
    """Overlap through the probe (as ``overlap`` measures it); the model's own indices if the probe fails."""
    batches = [ids.to(model.lm_head.weight.device) for ids in batches]
    try:
        return overlap_of_target(ProbeTarget("overlap", model, model.config.num_layers, batches, lambda fn, ids: fn(ids)))
    except Exception:
        log(f"overlap_of_target failed, reading the model's own indices instead:\n{traceback.format_exc()}")
    records = []
    with torch.no_grad():
        for ids in batches:
            _, indices = model(ids, return_indices=True)
            visible = [idx <= torch.arange(ids.shape[1], device=idx.device).view(1, -1, 1) for idx in indices]
            records.append({i: LayerRecord(idx, valid) for i, (idx, valid) in enumerate(zip(indices, visible))})
    return overlap_from_records(records)


def greedy_patterns(model, calibration: torch.Tensor, batch: int, log) -> tuple[dict[str, str], list]:
    """Greedy search (LM loss on the calibration windows) down to 1/8; the patterns it passes at 1/2, 1/4, 1/8."""
    n = model.config.num_layers
    batches = list(calibration.to(model.lm_head.weight.device).split(batch))
    target = ProbeTarget("trained reference", model, n, batches, lambda fn, ids: fn(ids))
    try:
        scorer = PatternScorer(target, "loss")
        layers, fixed = scorer.layers, scorer.fixed
    except Exception:  # one GPU run makes the table: fall back to the hand-written IndexCache, say so
        log(f"PatternScorer failed, scoring with the hand-written IndexCache instead:\n{traceback.format_exc()}")
        scorer = OracleScorer(model, calibration, batch)
        layers, fixed = list(range(n)), {}
    steps = greedy_search(scorer, n, layers, max(1, n // 8), fixed)
    found = {}
    for name, divisor in FRACTIONS.items():
        want = max(1, n // divisor)
        found[name] = next(s.pattern for s in steps if s.pattern.count("F") == want)
    log(f"greedy search: {scorer.evaluations} pattern evaluations on {calibration.shape[0]} calibration windows")
    for s in steps:
        log(f"  step {s.step:2d}: {s.pattern}  calibration loss {s.score:.5f} nats/byte")
    return found, steps


def quality_table(model: ReferenceDSAModel, data: dict, args, log) -> dict:
    held_out = data["held_out"][: args.held_out_windows or None]
    calibration = data["calibration"][: args.calibration_windows]
    n = model.config.num_layers
    greedy, steps = greedy_patterns(model, calibration, args.batch, log)
    rows = [("dense attention (no top-k)", None, "dense")]
    rows.append(("all F (every indexer)", "F" * n, "all-F"))
    for name, divisor in FRACTIONS.items():
        rows.append((f"uniform {name}", uniform_pattern(n, max(1, n // divisor)), f"uniform {name}"))
    for name in FRACTIONS:
        rows.append((f"greedy {name}", greedy[name], f"greedy {name}"))
    table = []
    for label, pattern, key in rows:
        if pattern is None:
            value = bits_per_byte(model, held_out, batch_size=args.batch, attention=Attention.DENSE)
            calib = bits_per_byte(model, calibration, batch_size=args.batch, attention=Attention.DENSE)
        else:
            value = bits_per_byte(model, held_out, pattern, batch_size=args.batch)
            calib = bits_per_byte(model, calibration, pattern, batch_size=args.batch)
        table.append({"row": label, "key": key, "pattern": pattern,
                      "f_layers": None if pattern is None else pattern.count("F"),
                      "held_out_bpb": value, "calibration_bpb": calib})
        log(f"  {label:28s} {pattern or '-':>18s}  held-out {value:.4f} bits/byte  calibration {calib:.4f}")
    overlap_batches = list(held_out[: args.overlap_windows].split(max(1, args.batch // 2)))
    trained = overlap_of(model, overlap_batches, log)
    shuffled = overlap_of(shuffled_indexers(model, args.seed), overlap_batches, log)
    adjacent = [v for _, _, v in trained.adjacent]
    adjacent_shuffled = [v for _, _, v in shuffled.adjacent]
    log(f"adjacent-layer top-{trained.k} overlap on {args.overlap_windows} held-out windows: "
        + " ".join(f"{v:.2f}" for v in adjacent)
        + f"  (mean {sum(adjacent) / len(adjacent):.3f}; indexer weights shuffled: "
        f"mean {sum(adjacent_shuffled) / len(adjacent_shuffled):.3f})")
    return {
        "rows": table,
        "greedy_steps": [{"step": s.step, "pattern": s.pattern, "calibration_nats": s.score, "turned": s.turned}
                         for s in steps],
        "overlap": {"k": trained.k, "layers": trained.layers, "matrix": trained.matrix.tolist(),
                    "adjacent": adjacent, "adjacent_shuffled_indexers": adjacent_shuffled,
                    "windows": args.overlap_windows},
        "heatmap": trained,
    }


def table_markdown(result: dict, meta: dict) -> str:
    rows = result["rows"]
    base = next(r for r in rows if r["key"] == "all-F")["held_out_bpb"]
    lines = [f"# Quality of the shipped DSA checkpoint under IndexCache patterns ({meta['where']})", "",
             f"Held-out: {meta['held_out_windows']} windows of {meta['seq_len']} bytes from "
             f"{', '.join(corpus.HELD_OUT_FILES)}; greedy search (LM loss) on {meta['calibration_windows']} windows "
             f"of {', '.join(corpus.CALIBRATION_FILES)}.", "",
             "| row | pattern | F layers | held-out bits/byte | vs all F | calibration bits/byte |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        delta = "" if r["pattern"] is None else f"{r['held_out_bpb'] - base:+.4f}"
        lines.append(f"| {r['row']} | `{r['pattern'] or '-'}` | {r['f_layers'] if r['f_layers'] else '-'} | "
                     f"{r['held_out_bpb']:.4f} | {delta} | {r['calibration_bpb']:.4f} |")
    ov = result["overlap"]
    mean = sum(ov["adjacent"]) / len(ov["adjacent"])
    mean_shuffled = sum(ov["adjacent_shuffled_indexers"]) / len(ov["adjacent_shuffled_indexers"])
    lines += ["", f"Adjacent-layer top-{ov['k']} overlap (held-out, {ov['windows']} windows): "
              + ", ".join(f"{a}->{a + 1}: {v:.2f}" for a, v in zip(ov["layers"], ov["adjacent"]))
              + f"; mean {mean:.3f} (same model with each indexer's weights shuffled: {mean_shuffled:.3f})."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------- main


def load_data(seq_len: int, log) -> dict:
    root = corpus.stdlib_root()
    differ = corpus.check_digests(root)
    log(f"data: Python {platform.python_version()} standard library at {root}")
    if differ:
        log(f"  warning: these named files differ from the ones the split was made on: {differ}")
    train_bytes = corpus.read_training(root)
    log(f"  training: {len(corpus.training_files(root))} files, {len(train_bytes)} bytes, sha256 {corpus.digest(train_bytes)}")
    data = {"train": corpus.as_tokens(train_bytes)}
    for key, names in (("calibration", corpus.CALIBRATION_FILES), ("held_out", corpus.HELD_OUT_FILES)):
        raw = corpus.read_files(names, root)
        data[key] = corpus.windows(corpus.as_tokens(raw), seq_len)
        log(f"  {key}: {len(names)} files, {len(raw)} bytes -> {data[key].shape[0]} windows of {seq_len}, "
            f"sha256 {corpus.digest(raw)}")
    return data


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for the checkpoint, log, plots and table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=0, help="training steps (0: size them from --time-budget)")
    p.add_argument("--time-budget", type=float, default=270.0, help="seconds of training when --steps is 0")
    p.add_argument("--hard-stop", type=float, default=400.0, help="stop training past this many seconds regardless")
    p.add_argument("--dense-fraction", type=float, default=0.3, help="share of the steps in the dense warm-up")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--val-every", type=int, default=250)
    p.add_argument("--val-windows", type=int, default=32)
    p.add_argument("--calibration-windows", type=int, default=64)
    p.add_argument("--overlap-windows", type=int, default=16)
    p.add_argument("--held-out-windows", type=int, default=0, help="score only the first N held-out windows (0: all)")
    p.add_argument("--no-table", action="store_true", help="train and save only")
    p.add_argument("--eval-only", type=Path, default=None, help="measure the table for this checkpoint, no training")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="tiny model, few steps, CPU: checks that everything runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.device, args.batch, args.seq_len, args.lr, args.warmup = "cpu", 2, 64, 3e-3, 2
        args.steps = args.steps or 6
        args.log_every, args.val_every, args.val_windows = 2, 3, 2
        args.calibration_windows, args.overlap_windows, args.held_out_windows = 2, 2, 8
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    log_file = (args.out / ("eval_log.txt" if args.eval_only else "train_log.txt")).open("w")

    def log(message: str) -> None:
        print(message, flush=True)
        log_file.write(message + "\n")
        log_file.flush()

    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = False
    where = f"torch {torch.__version__}, Python {platform.python_version()}, " + (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({platform.machine()})")
    log(f"{' '.join(sys.argv)}\n{where}")
    data = load_data(args.seq_len, log)
    if args.eval_only:
        model = load_checkpoint(args.eval_only, device=args.device)
        info = {"checkpoint": str(args.eval_only)}
    else:
        config = model_config(args.smoke)
        model, history = train(args, config, data, args.device, log)
        params = sum(p.numel() for p in model.parameters())
        info = {"seed": args.seed, "steps": history["steps"], "dense_steps": history["dense_steps"],
                "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr, "trained_on": where,
                "train_seconds": f"{history['train_seconds']:.0f}", "parameters": params,
                "train_sha256": corpus.digest(corpus.read_training()),
                "final_held_out_bpb_first_windows": f"{history['val_bpb'][-1]:.4f}"}
        path = save_checkpoint(model, args.out / "model.safetensors", info)
        log(f"saved {path} ({path.stat().st_size / 2**20:.2f} MiB, {params} parameters, bf16)")
        (args.out / "train_history.json").write_text(json.dumps(history))
        plot_history(history, args.out / "train_loss.png",
                     f"DSA reference, {config.num_layers} layers, top-{config.index_topk} of {args.seq_len}: {where}")
        model = load_checkpoint(path, device=args.device)  # the table describes the file, bf16 weights as shipped
    if args.no_table:
        return 0
    log("quality table (hand-written IndexCache, fp32):")
    result = quality_table(model, data, args, log)
    heatmap = result.pop("heatmap")
    save_heatmap(heatmap, str(args.out / "overlap_heatmap.png"), f"trained DSA reference: top-{heatmap.k} overlap")
    held_out_windows = min(args.held_out_windows or data["held_out"].shape[0], data["held_out"].shape[0])
    meta = {"where": where, "held_out_windows": held_out_windows, "seq_len": args.seq_len,
            "calibration_windows": min(args.calibration_windows, data["calibration"].shape[0]), **info}
    (args.out / "quality_table.json").write_text(json.dumps({"meta": meta, **result}, indent=1))
    (args.out / "quality_table.md").write_text(table_markdown(result, meta))
    log(table_markdown(result, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
