"""torchrun with 2 CPU processes (gloo): DDP and FSDP train the same heads; ranks split the data."""
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch

from medusa_vllm.checkpoint import load_heads

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(args: list[str], timeout: float = 150) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "training.train", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its two workers
        out, _ = proc.communicate()
        raise AssertionError(f"torchrun did not finish in {timeout} s:\n{out[-4000:]}") from None
    assert proc.returncode == 0, out[-4000:]
    return out


def test_ddp_and_fsdp_give_the_same_heads(tmp_path, tiny_model_dir, tiny_data):
    common = ["--model", str(tiny_model_dir), "--data", str(tiny_data), "--max-steps", "6", "--epochs", "5",
              "--batch-tokens", "64", "--log-every", "3", "--no-progress", "--lr", "1e-2"]
    ddp = torchrun([*common, "--output-dir", str(tmp_path / "ddp")])
    fsdp = torchrun([*common, "--output-dir", str(tmp_path / "fsdp"), "--fsdp"])
    assert "world 2" in ddp and "world 2" in fsdp
    a = load_heads(tmp_path / "ddp" / "heads", dtype=torch.float32).state_dict()
    b = load_heads(tmp_path / "fsdp" / "heads", dtype=torch.float32).state_dict()
    assert any(v.abs().sum() > 0 for k, v in a.items() if "weight" in k)  # trained (zero-initialised)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-2, atol=1e-3)  # saved in bf16


def test_rank_shares_are_disjoint_and_equal_in_steps():
    from training.batching import plan_sequence_batches, shard_batches, shard_examples

    lengths = list(range(3, 103))
    plan = plan_sequence_batches(lengths, 200, seed=0, epoch=3)
    for world in (2, 3, 4):
        shards = [shard_batches(plan, r, world) for r in range(world)]
        assert len({len(s) for s in shards}) == 1
        seen = [i for s in shards for b in s for i in b]
        assert len(seen) == len(set(seen))
        examples = [shard_examples(list(range(10)), r, world) for r in range(world)]
        assert sorted(sum(examples, [])) == list(range(10))
