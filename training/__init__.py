"""Training Medusa heads (Medusa-1: frozen base; Medusa-2: joint) for medusa_vllm.

    python -m training.data generate ...    # self-distillation set through vLLM (token-id JSONL)
    python -m training.train ...            # heads training: one process, or torchrun DDP / FSDP
    python -m training.evaluate ...         # top-k accuracies, calibrated tree, tau

Rooms: `dataset.py` (record format, held-out split, labels), `conversations.py` (chat JSONL and
prompt files), `data.py` (the data CLI, vLLM generation), `batching.py` (batch plans, rank
shares), `fused_ce.py` (chunked linear + cross-entropy), `model.py` (base + heads + loss),
`sources.py` (sequence batches or a hidden-state cache), `distributed.py` (DDP / FSDP),
`state.py` (resumable checkpoints), `train.py` (config and CLI), `loop.py` (the loop),
`finish.py` (final save, evaluation, report), `evaluate.py`, `report.py` (results envelope).
"""
