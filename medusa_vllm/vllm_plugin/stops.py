"""Stop strings that end inside a multi-token step.

vLLM's front end detokenizes all tokens of a step and then looks for stop strings: the text is cut
at the stop string, but the step's token ids are kept whole, so a request can return token ids
past its stop (with any speculative method: a tree step emits several tokens at once). We check
after every token instead, and cut the step's token ids right after the token that completed
the stop string: the same tokens and text as decoding one token at a time.
"""

from __future__ import annotations

import functools


def patch_stop_strings() -> None:
    from vllm.v1.engine import detokenizer, output_processor

    base = detokenizer.BaseIncrementalDetokenizer
    if getattr(base.update, "_medusa_vllm", False):
        return
    update_all = base.update

    @functools.wraps(update_all)
    def update(self, new_token_ids, stop_terminated):
        self._medusa_kept = None
        if not self.stop or len(new_token_ids) <= 1:
            return update_all(self, new_token_ids, stop_terminated)
        last = len(new_token_ids) - 1
        for k, token in enumerate(new_token_ids):
            stop = update_all(self, [token], stop_terminated and k == last)
            if stop:
                self._medusa_kept = k + 1
                return stop
        return None

    update._medusa_vllm = True
    base.update = update

    make_output = output_processor.RequestState.make_request_output

    @functools.wraps(make_output)
    def make_request_output(self, new_token_ids, *args, **kwargs):
        kept = getattr(self.detokenizer, "_medusa_kept", None)
        if kept is not None:
            new_token_ids = new_token_ids[:kept]
        return make_output(self, new_token_ids, *args, **kwargs)

    output_processor.RequestState.make_request_output = make_request_output
