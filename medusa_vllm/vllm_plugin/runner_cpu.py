"""medusa_vllm's runner on vLLM's CPU runner (imported by :mod:`.worker_cpu` only)."""

import numpy as np
from vllm.v1.worker.cpu_model_runner import CPUModelRunner

from medusa_vllm.vllm_plugin.runner import MedusaRunnerMixin


class MedusaCPUModelRunner(MedusaRunnerMixin, CPUModelRunner):
    """Also fixes seeded requests prefilled in chunks on CPU.

    vLLM 0.26 rewinds the generator of a request whose sampled token is thrown away (a partial
    prefill) with ``gen.set_offset(gen.get_offset() - 4)``; CPU generators have no offset, so the
    first seeded request longer than the step budget kills the engine. Here the generator states
    of those requests are saved before sampling and put back after it, which is the same rewind.
    """

    _medusa_gen_states: dict = {}

    def _discarded_generators(self):
        num_reqs = self.input_batch.num_reqs
        idx = np.nonzero(self.discard_request_mask.np[:num_reqs])[0]
        gens = self.input_batch.generators
        return {int(i): gens[int(i)] for i in idx if int(i) in gens}

    def _sample(self, logits, spec_decode_metadata):
        self._medusa_gen_states = {
            i: g.get_state() for i, g in self._discarded_generators().items()
        }
        return super()._sample(logits, spec_decode_metadata)

    def _bookkeeping_sync(self, *args, **kwargs):
        gens = self.input_batch.generators
        hidden = {i: gens.pop(i) for i in self._discarded_generators()}
        for i, gen in hidden.items():
            state = self._medusa_gen_states.get(i)
            if state is not None:
                gen.set_state(state)
        try:
            return super()._bookkeeping_sync(*args, **kwargs)
        finally:
            gens.update(hidden)
            self._medusa_gen_states = {}
