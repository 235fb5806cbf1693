"""Untrained (zero-initialised) heads for a model folder: python make_zero_heads.py MODEL OUT"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from medusa_vllm.checkpoint import save_heads  # noqa: E402
from medusa_vllm.heads import MedusaHeads, MedusaHeadsConfig  # noqa: E402

model, out = sys.argv[1], sys.argv[2]
cfg = json.loads((Path(model) / "config.json").read_text())
cfg = cfg.get("text_config", cfg)
save_heads(MedusaHeads(MedusaHeadsConfig(hidden_size=cfg["hidden_size"], vocab_size=cfg["vocab_size"])), out)
print("zero heads ->", out)
