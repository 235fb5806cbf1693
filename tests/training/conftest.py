"""Small models and data sets for the training tests (no vLLM, no network)."""
import random

import pytest

from training.conversations import Conversation, render_conversation
from training.dataset import Example, split_of, write_examples

QA = [("What is the capital of France?", "The capital of France is Paris."),
      ("Count to ten.", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10."),
      ("Name the days of the week.", "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday."),
      ("Say the alphabet.", "A B C D E F G H I J K L M N O P"),
      ("What color is the sky?", "The sky is blue on a clear day."),
      ("Greet me.", "Hello! How can I help you today?")]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random 2-layer Llama (hidden 32, vocab 256, tied embeddings): fast on CPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, eos_token_id=2, bos_token_id=1)
    path = tmp_path_factory.mktemp("tiny_model")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """40 token-id records (prompt + a counting answer), about 20% held out by hash."""
    rng = random.Random(0)
    examples = []
    for i in range(40):
        prompt = [rng.randrange(3, 256) for _ in range(rng.randint(3, 8))]
        start = rng.randrange(256)
        answer = [(start + j) % 256 for j in range(rng.randint(12, 30))]
        examples.append(Example(f"ex{i}", split_of(str(i), 0.2), prompt + answer,
                                [(len(prompt), len(prompt) + len(answer))]))
    path = tmp_path_factory.mktemp("tiny_data") / "data.jsonl"
    write_examples(path, examples)
    return path


@pytest.fixture(scope="session")
def smol_data(tmp_path_factory, bundled_model_dir):
    """Six chat Q/A pairs rendered with SmolLM2's chat template (the last one held out)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bundled_model_dir)
    examples = [render_conversation(tok, Conversation(f"q{i}", "heldout" if i == len(QA) - 1 else "train",
                                                      [{"role": "user", "content": q},
                                                       {"role": "assistant", "content": a}]))
                for i, (q, a) in enumerate(QA)]
    path = tmp_path_factory.mktemp("smol_data") / "data.jsonl"
    write_examples(path, examples)
    return path
