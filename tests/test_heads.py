import pytest
import torch
import torch.nn.functional as F

from medusa_vllm.heads import MedusaHeads, MedusaHeadsConfig, ResBlock

H, V, K = 16, 50, 3


def _randomize(heads: MedusaHeads) -> MedusaHeads:
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0.0, 0.2)
    return heads


@pytest.mark.parametrize("own", [False, True])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_shapes(own, num_layers):
    heads = MedusaHeads(MedusaHeadsConfig(H, V, num_heads=K, num_layers=num_layers, own_lm_heads=own))
    x = torch.randn(7, H)
    assert heads(x).shape == (7, K, H)
    assert heads.logits(x, torch.randn(V, H)).shape == (7, K, V)
    assert heads(torch.randn(2, 7, H)).shape == (2, 7, K, H)  # any leading dims
    assert len(heads.blocks) == K and all(len(b) == num_layers for b in heads.blocks)
    assert (heads.lm_heads is not None) == own


def test_state_dict_keys_and_distinct_blocks():
    heads = MedusaHeads(MedusaHeadsConfig(H, V, num_heads=2, num_layers=2, own_lm_heads=True))
    assert set(heads.state_dict()) == {
        f"blocks.{h}.{l}.linear.{p}" for h in range(2) for l in range(2) for p in ("weight", "bias")
    } | {"lm_heads.0.weight", "lm_heads.1.weight"}
    params = [p.data_ptr() for p in heads.parameters()]
    assert len(params) == len(set(params))  # no module shared between layers or heads
    no_bias = MedusaHeads(MedusaHeadsConfig(H, V, num_heads=2, bias=False))
    assert not any(k.endswith("bias") for k in no_bias.state_dict())


def test_zero_init_heads_reproduce_base_hidden_state():
    heads = MedusaHeads(MedusaHeadsConfig(H, V, num_heads=K, num_layers=2))
    x, w = torch.randn(5, H), torch.randn(V, H)
    out = heads(x)
    for k in range(K):
        torch.testing.assert_close(out[:, k], x, rtol=0, atol=0)
    torch.testing.assert_close(heads.logits(x, w), (x @ w.T)[:, None].expand(5, K, V))


def test_resblock_formula_and_layer_order():
    block = ResBlock(H)
    with torch.no_grad():
        block.linear.weight.normal_(), block.linear.bias.normal_()
    x = torch.randn(4, H)
    torch.testing.assert_close(block(x), x + F.silu(x @ block.linear.weight.T + block.linear.bias))
    heads = _randomize(MedusaHeads(MedusaHeadsConfig(H, V, num_heads=1, num_layers=2)))
    first, second = heads.blocks[0]
    torch.testing.assert_close(heads(x)[:, 0], second(first(x)))


def test_logits_shared_vs_own_lm_heads():
    shared = _randomize(MedusaHeads(MedusaHeadsConfig(H, V, num_heads=K)))
    own = MedusaHeads(MedusaHeadsConfig(H, V, num_heads=K, own_lm_heads=True))
    own.blocks.load_state_dict(shared.blocks.state_dict())
    x, w = torch.randn(6, H), torch.randn(V, H)
    expected = torch.stack([F.linear(shared.blocks[k](x), w) for k in range(K)], dim=1)
    torch.testing.assert_close(shared.logits(x, w), expected)
    own.init_lm_heads_(w)
    torch.testing.assert_close(own.logits(x), expected)
    torch.testing.assert_close(own.logits(x, torch.zeros(V, H)), expected)  # ignored when own
    with torch.no_grad():
        own.lm_heads[1].weight.add_(1.0)  # only head 1 changes
    out = own.logits(x)
    torch.testing.assert_close(out[:, [0, 2]], expected[:, [0, 2]])
    assert not torch.allclose(out[:, 1], expected[:, 1])


def test_logits_argument_errors():
    heads = MedusaHeads(MedusaHeadsConfig(H, V, num_heads=K))
    with pytest.raises(ValueError, match="pass lm_head_weight"):
        heads.logits(torch.randn(2, H))
    with pytest.raises(ValueError, match=r"\[vocab_size, hidden_size\] = \[50, 16\]"):
        heads.logits(torch.randn(2, H), torch.randn(H, V))
    with pytest.raises(ValueError, match="expected hidden_size=16"):
        heads(torch.randn(2, H + 1))
    with pytest.raises(ValueError, match="own_lm_heads=False"):
        heads.init_lm_heads_(torch.randn(V, H))


@pytest.mark.parametrize("kwargs, message", [
    (dict(hidden_size=0), "hidden_size must be a positive int"),
    (dict(vocab_size=-3), "vocab_size must be a positive int"),
    (dict(num_heads=2.0), "num_heads must be a positive int"),
    (dict(num_layers=True), "num_layers must be a positive int"),
    (dict(own_lm_heads=1), "own_lm_heads must be a bool"),
    (dict(tree=[[0], [0, 0, 0, 0, 0]]), "1..num_heads=4"),
    (dict(tree=[[0], []]), "1..num_heads=4"),
    (dict(tree=[[0, -1]]), "non-negative ints"),
    (dict(head_accuracies=[[0.5]] * 3), "one per head"),
    (dict(head_accuracies=[[0.5, 1.5]] * 4), r"in \[0, 1\]"),
])
def test_config_validation(kwargs, message):
    base = dict(hidden_size=H, vocab_size=V)
    with pytest.raises(ValueError, match=message):
        MedusaHeadsConfig(**{**base, **kwargs})


def test_config_dict_round_trip_is_strict():
    cfg = MedusaHeadsConfig(H, V, num_heads=2, tree=[[0], [1], [0, 0]],
                            head_accuracies=[[0.5, 0.7], [0.3, 0.4]], base_model="x")
    assert MedusaHeadsConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown MedusaHeadsConfig fields"):
        MedusaHeadsConfig.from_dict({**cfg.to_dict(), "num_head": 3})
