"""Adapters in the engine: the base model and two adapters in one batch give what each gives alone, and an
adapter's output equals the base model with the update merged into its weights."""

from __future__ import annotations

import copy

import torch

from souverain.engine.adapters import AdapterCache
from souverain.engine.request import Request, SamplingParams
from souverain.model.lora import LoraArgs, LoraBatch, LoraWeights
from tests.engine.toy import make_engine, run_all, tiny_model, tokens_of


def random_adapter(model: torch.nn.Module, seed: int) -> LoraWeights:
    torch.manual_seed(seed)
    adapter = LoraWeights(model.args, LoraArgs(rank=4, alpha=8))
    with torch.no_grad():
        for b in adapter.b.values():
            b.normal_(0, 0.3)  # a trained adapter: B is no longer zero
    return adapter


def merged(model: torch.nn.Module, adapter: LoraWeights) -> torch.nn.Module:
    """The reference: W + scale * B @ A written into a copy of the weights."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for key, a in adapter.a.items():
            layer, target = key.split("_", 1)
            block = out.layers[int(layer)]
            proj = getattr(block.attention if target in ("wq", "wk", "wv", "wo") else block.feed_forward, target)
            proj.weight += adapter.args.scale * adapter.b[key] @ a
    return out


def test_adapter_equals_merged_weights() -> None:
    model = tiny_model("dense")
    adapter = random_adapter(model, 1)
    tokens = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        ours = model(tokens, lora=LoraBatch.single(adapter))
        reference = merged(model, adapter)(tokens)
        base = model(tokens)
    assert torch.allclose(ours, reference, atol=1e-4)
    assert not torch.allclose(ours, base, atol=1e-2)  # the adapter does change the answer


def test_mixed_batch_equals_each_alone() -> None:
    model = tiny_model("dense")
    adapters = {"a": random_adapter(model, 1), "b": random_adapter(model, 2)}

    def engine() -> object:
        return make_engine(model, adapters=AdapterCache(adapters.__getitem__, capacity=1))  # forces evictions

    def request(rid: str, adapter: str | None) -> Request:
        return Request(rid, list(b"the same prompt for everyone"), SamplingParams(max_tokens=12, temperature=0,
                                                                                  ignore_eos=True),
                       adapter=adapter)

    alone = {}
    for rid, name in (("base", None), ("a", "a"), ("b", "b")):
        e = engine()
        alone[rid] = tokens_of(run_all(e, {0: [request(rid, name)]})[(rid, 0)])
    assert len({tuple(v) for v in alone.values()}) == 3  # the adapters do differ from the base and each other
    e = engine()
    together = run_all(e, {0: [request("base", None), request("a", "a"), request("b", "b")]})
    for rid in alone:
        assert tokens_of(together[(rid, 0)]) == alone[rid], rid
    assert e.adapters.loads > 2  # capacity 1 with two adapters in the batch: evicted and reloaded, still right


def test_prefix_cache_is_not_shared_across_adapters() -> None:
    model = tiny_model("dense")
    adapters = {"a": random_adapter(model, 1)}
    e = make_engine(model, adapters=AdapterCache(adapters.__getitem__))
    prompt = list(b"a long shared system prompt, long enough for several blocks")
    first = Request("x", prompt, SamplingParams(max_tokens=4, temperature=0))
    run_all(e, {0: [first]})
    second = Request("y", prompt, SamplingParams(max_tokens=4, temperature=0), adapter="a")
    run_all(e, {0: [second]})
    reference = make_engine(model, adapters=AdapterCache(adapters.__getitem__))
    again = Request("y", prompt, SamplingParams(max_tokens=4, temperature=0), adapter="a")
    expected = tokens_of(run_all(reference, {0: [again]})[("y", 0)])
    third = Request("z", prompt, SamplingParams(max_tokens=4, temperature=0), adapter="a")
    assert tokens_of(run_all(e, {0: [third]})[("z", 0)]) == expected
