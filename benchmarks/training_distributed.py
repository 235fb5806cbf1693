"""One process against torchrun DDP and FSDP: the same Medusa-1 heads on the same data, loss curves
side by side, and tokens/s scaling.

    # two GPUs, the self-distilled data of training/gpu_recipe.sh (STAGES=2 makes only the data)
    python benchmarks/training_distributed.py --data /tmp/medusa_train/selfdistill.jsonl \\
        --model /tmp/smol_hf --out $OUT/training_distributed_h200.json
    # split over calls on a warm machine: runs already in --work are read back with --reuse
    python benchmarks/training_distributed.py ... --modes single reseed
    python benchmarks/training_distributed.py ... --modes ddp fsdp --reuse
    # CPU (gloo): a small model and data (e.g. those of tests/training/conftest.py) and tiny steps
    python benchmarks/training_distributed.py --data d.jsonl --model tiny/ --dtype fp32 \\
        --epochs 1 --max-steps 20 --log-every 5 --batch-tokens 256 --eval-max-examples 64

Runs (python -m training.train, one after the other, the same seed, steps and global batch):
  single   one process, --batch-tokens B cached rows a step
  ddp      torchrun --nproc-per-node P, B/P rows a step on each process (--weak-scaling: B each)
  fsdp     the same with --fsdp (FSDP2)
  reseed   one process with --seed + 1 (another data order): the run-to-run noise that the
           distributed runs' loss differences are judged against
Each run trains Medusa-1 heads (frozen base, hidden states cached), logs every --log-every steps
(losses reduced over ranks) and writes <work>/<mode>/training.json; this script reads those back.
Summary: max relative loss difference to `single` over logged steps and heads per run, whether it
is within --noise-factor times the reseed run's, held-out top-1 per head, train tokens/s (rows
through the heads per second of step time, all processes; `steady`: the median logged interval
after the first) and the scaling over `single`. A run that fails is named in `errors`; the others
still run and compare.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, device_name, device_tag, write_envelope  # noqa: E402

MODES = ("single", "ddp", "fsdp", "reseed")
# multi-GPU hosts of this workplace: NVLink multicast stays off in every process (KINDS.md)
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                "NVSHMEM_DISABLE_NVLS": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_args(args, mode: str) -> list[str]:
    """training.train's arguments for one run (the same for every mode but batch, seed, FSDP)."""
    per_process = args.batch_tokens if mode in ("single", "reseed") or args.weak_scaling \
        else args.batch_tokens // args.nproc
    cmd = ["--data", args.data, "--output-dir", str(Path(args.work) / mode),
           "--medusa-only-heads", "--medusa-num-heads", str(args.heads), "--medusa-num-layers", "1",
           "--epochs", str(args.epochs), "--batch-tokens", str(per_process), "--lr", str(args.lr),
           "--seed", str(args.seed + (mode == "reseed")), "--log-every", str(args.log_every),
           "--eval-max-examples", str(args.eval_max_examples), "--eval-tau-prompts", "0",
           "--save-every", "1000000", "--no-progress", "--dtype", args.dtype]
    if args.model:
        cmd += ["--model", args.model]
    if args.max_steps:
        cmd += ["--max-steps", str(args.max_steps)]
    if mode == "fsdp":
        cmd.append("--fsdp")
    return cmd + shlex.split(args.train_args)


def launcher(args, mode: str) -> list[str]:
    if mode in ("single", "reseed"):
        return [sys.executable, "-m", "training.train"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "training.train"]


def run_mode(args, mode: str) -> float:
    """Runs one training; its output goes to <work>/<mode>.log. Returns the wall time (s)."""
    cmd = launcher(args, mode) + train_args(args, mode)
    env = {**NO_MULTICAST, **os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    log = Path(args.work) / f"{mode}.log"
    print(f"[{mode}] {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers
            proc.wait()
            raise RuntimeError(f"[{mode}] did not finish in {args.timeout:.0f} s; see {log}") from None
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"[{mode}] exit code {rc}; last lines of {log}:\n{tail}")
    print(f"[{mode}] done in {wall:.1f} s", flush=True)
    return wall


def read_run(work: Path, mode: str, wall: float | None) -> dict:
    """What one run's training.json says: its logged curve, speed and held-out accuracy."""
    data = json.loads((work / mode / "training.json").read_text())
    cfg, summary = data["config"], data["summary"]
    log = [r for r in data["rows"] if r.get("kind") == "train_log"]
    return {"curve": {r["step"]: r["loss"] for r in log}, "top1_curve": {r["step"]: r["top1"] for r in log},
            "train_tokens_per_s": summary["train_tokens_per_s"], "steady_tokens_per_s": steady(log),
            "head_top1_acc": summary["head_top1_acc"],
            "world_size": cfg["world_size"], "total_steps": cfg["total_steps"], "train_s": cfg["train_s"],
            "cache_build_s": cfg["cache_build_s"], "batch_tokens_per_process": cfg["batch_tokens"],
            "seed": cfg["seed"], "fsdp": cfg["fsdp"], "wall_s": wall, "command": data["command"]}


def steady(log: list[dict]) -> float | None:
    """Median tokens/s of the logged intervals after the first (which holds first-step set-up)."""
    rates = sorted(r["tokens_per_s"] for r in log[1:])
    return rates[len(rates) // 2] if rates else None


def rel_diff(curve: dict[int, list[float]], ref: dict[int, list[float]]) -> tuple[float, float]:
    """(max, mean) over the steps both logged and every head of |loss - ref| / ref."""
    diffs = [abs(a - b) / b for s in sorted(set(curve) & set(ref)) for a, b in zip(curve[s], ref[s])]
    if not diffs:
        raise ValueError("no logged step in common: the runs differ in --max-steps / --log-every")
    return max(diffs), sum(diffs) / len(diffs)


def compare(runs: dict[str, dict], noise_factor: float) -> tuple[list[dict], dict]:
    """Rows: one per logged step, every run's per-head losses side by side; the summary figures."""
    if "single" not in runs:
        raise ValueError("the comparison needs the single-process run (--modes single, or --reuse)")
    single = runs["single"]
    steps = sorted(set.intersection(*(set(r["curve"]) for r in runs.values())))
    rows = [{"step": s, **{f"loss_{m}": r["curve"][s] for m, r in runs.items()},
             **{f"top1_{m}": r["top1_curve"][s] for m, r in runs.items()}} for s in steps]
    diffs = {m: rel_diff(r["curve"], single["curve"]) for m, r in runs.items() if m != "single"}
    noise = diffs.get("reseed", (None,))[0]
    summary = {
        "max_rel_loss_diff_vs_single": {m: d[0] for m, d in diffs.items()},
        "mean_rel_loss_diff_vs_single": {m: d[1] for m, d in diffs.items()},
        "loss_within_noise": {m: d[0] <= noise_factor * noise for m, d in diffs.items()
                              if m != "reseed"} if noise is not None else None,
        "noise_rule": f"max relative difference <= {noise_factor} x the reseed run's",
        "max_abs_top1_diff_vs_single": {m: max(abs(a - b) for a, b in zip(r["head_top1_acc"],
                                                                           single["head_top1_acc"]))
                                        for m, r in runs.items() if m != "single"},
        "head_top1_acc": {m: r["head_top1_acc"] for m, r in runs.items()},
        "train_tokens_per_s": {m: r["train_tokens_per_s"] for m, r in runs.items()},
        "steady_tokens_per_s": {m: r["steady_tokens_per_s"] for m, r in runs.items()},
        "scaling_vs_single": {m: r["train_tokens_per_s"] / single["train_tokens_per_s"]
                              for m, r in runs.items() if m in ("ddp", "fsdp")},
        "steady_scaling_vs_single": {m: r["steady_tokens_per_s"] / single["steady_tokens_per_s"]
                                     for m, r in runs.items() if m in ("ddp", "fsdp")
                                     if r["steady_tokens_per_s"] and single["steady_tokens_per_s"]},
        "wall_s": {m: r["wall_s"] for m, r in runs.items()},
        "runs": {m: {k: v for k, v in r.items() if k not in ("curve", "top1_curve", "head_top1_acc",
                                                              "train_tokens_per_s", "steady_tokens_per_s")}
                 for m, r in runs.items()},
        "device": device_name(),
    }
    return rows, summary


def default_out() -> Path:
    folder = Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS
    return folder / f"training_distributed_{device_tag()}.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", required=True, help="token-id JSONL (python -m training.data)")
    ap.add_argument("--model", default=None, help="base model HF folder (default: bundled SmolLM2)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--nproc", type=int, default=2, help="processes (GPUs) of the torchrun runs")
    ap.add_argument("--epochs", type=float, default=4.0, help="as training/gpu_recipe.sh")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--batch-tokens", type=int, default=8192, help="cached rows a step, all processes")
    ap.add_argument("--weak-scaling", action="store_true",
                    help="every process takes --batch-tokens rows (a P times larger global batch)")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--eval-max-examples", type=int, default=1000)
    ap.add_argument("--train-args", default="", help="more training.train arguments, one string")
    ap.add_argument("--noise-factor", type=float, default=1.5)
    ap.add_argument("--work", default="/tmp/medusa_distcheck", help="run folders and logs")
    ap.add_argument("--reuse", action="store_true",
                    help="read back runs already in --work instead of running them again")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per run")
    ap.add_argument("--out", default=None,
                    help="JSON (default $OUT/training_distributed_<dev>.json, else benchmarks/results/)")
    return ap.parse_args(argv)


def run_modes(args, work: Path) -> tuple[dict[str, float], dict[str, str]]:
    """Runs the requested trainings (or reuses them): wall times (kept in <work>/walls.json) and
    the errors of runs that failed (the others still run)."""
    path = work / "walls.json"
    walls = json.loads(path.read_text()) if path.exists() else {}
    errors = {}
    for mode in args.modes:
        if args.reuse and (work / mode / "training.json").exists():
            print(f"[{mode}] reusing {work / mode}", flush=True)
            continue
        (work / mode / "training.json").unlink(missing_ok=True)
        try:
            walls[mode] = run_mode(args, mode)
        except RuntimeError as e:
            print(e, file=sys.stderr, flush=True)
            errors[mode] = str(e)[-2000:]
        path.write_text(json.dumps(walls))
    return walls, errors


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.batch_tokens % args.nproc and not args.weak_scaling:
        raise SystemExit(f"--batch-tokens {args.batch_tokens} does not split over {args.nproc} processes")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    walls, errors = run_modes(args, work)
    present = [m for m in MODES if (work / m / "training.json").exists()
               and (m in args.modes or args.reuse)]
    runs = {m: read_run(work, m, walls.get(m)) for m in present}
    try:
        rows, summary = compare(runs, args.noise_factor)
    except ValueError as e:
        raise SystemExit(f"error: {e}; failed runs: {errors}") from None
    summary["errors"] = errors
    out = Path(args.out) if args.out else default_out()
    write_envelope(out, "training_distributed", vars(args) | {"modes_present": present}, rows, summary)
    print(json.dumps({k: summary[k] for k in ("max_rel_loss_diff_vs_single", "loss_within_noise",
                                              "train_tokens_per_s", "scaling_vs_single",
                                              "steady_scaling_vs_single", "wall_s", "errors")},
                     indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
