"""vLLM's compiled async spec-decode helper is compiled at start-up for every batch-size case
(medusa_vllm.vllm_plugin.compile_warmup), so no step meets a recompile. Runs in a fresh process:
dynamo's caches are process-wide and other tests' engines share this one."""

import subprocess
import sys
import textwrap

CHECK = textwrap.dedent("""
    import torch, torch._dynamo
    from medusa_vllm.vllm_plugin.compile_warmup import warm_batch_change_compiles
    from vllm.v1.spec_decode.utils import update_num_computed_tokens_for_batch_change as fn

    R = 64  # the runner's buffers: max_num_reqs entries
    bufs = (torch.zeros(R, dtype=torch.int32), torch.ones(R, dtype=torch.int32),
            torch.zeros(R, dtype=torch.int64), torch.zeros(R, dtype=torch.int32))

    def step(n, m):  # as GPUModelRunner._prepare_inputs calls it
        computed, accepted, positions, drafts = bufs
        fn(computed, accepted[:n], positions[:n], torch.ones(m, dtype=torch.int32), drafts,
           torch.zeros(n, dtype=torch.int32))

    # control: after the first compile alone, a batch of one request recompiles
    assert warm_batch_change_compiles(*bufs, combos=((2, 2),)) == 1
    torch._dynamo.config.error_on_recompile = True
    try:
        step(1, 1)
    except Exception as e:
        assert "ecompil" in type(e).__name__ + str(e), e
    else:
        raise SystemExit("control: expected a recompile for one request")
    torch._dynamo.config.error_on_recompile = False

    assert warm_batch_change_compiles(*bufs) == 5
    torch._dynamo.config.error_on_recompile = True
    for n, m in ((64, 64), (17, 16), (16, 17), (1, 5), (5, 1), (1, 1), (64, 1), (1, 64), (3, 3)):
        step(n, m)
    torch._dynamo.config.error_on_recompile = False  # buffers of 1 entry: compiles of their own
    assert warm_batch_change_compiles(*(b[:1] for b in bufs)) == 1  # max_num_reqs 1: (1, 1) only
    print("ok")
""")


def test_batch_change_helper_never_recompiles_after_warmup():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=600,
                         check=False)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout[-2000:] + out.stderr[-4000:]
