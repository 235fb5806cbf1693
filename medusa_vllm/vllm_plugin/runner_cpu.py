"""medusa_vllm's runner on vLLM's CPU runner (imported by :mod:`.worker_cpu` only)."""

from vllm.v1.worker.cpu_model_runner import CPUModelRunner

from medusa_vllm.vllm_plugin.runner import MedusaRunnerMixin


class MedusaCPUModelRunner(MedusaRunnerMixin, CPUModelRunner):
    pass
