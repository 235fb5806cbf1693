"""CPU worker that builds medusa_vllm's model runner (see :mod:`.worker`). Import it on CPU
machines only: vLLM's CPU worker module patches ``torch.Event`` when imported."""

from __future__ import annotations

from vllm.v1.worker import cpu_worker
from vllm.v1.worker.cpu_worker import CPUWorker

from medusa_vllm.vllm_plugin.worker import MedusaStatsMixin, _swapped


class MedusaCPUWorker(MedusaStatsMixin, CPUWorker):
    def init_device(self) -> None:
        from medusa_vllm.vllm_plugin.attention_cpu import use_cpu_tree_attention
        from medusa_vllm.vllm_plugin.runner_cpu import MedusaCPUModelRunner

        use_cpu_tree_attention()  # CPU always picks CPU_ATTN: override that entry
        with _swapped(cpu_worker, "CPUModelRunner", MedusaCPUModelRunner):
            super().init_device()
