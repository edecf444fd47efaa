"""GRA-M: shapes, gradients, leakage mask, memory building, checkpoints, empty memory."""

from __future__ import annotations

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

from timellm_lib.config import Config, config_from_dict
from timellm_lib.models import build_model
from timellm_lib.models.gram import (
    GRAM,
    PVDR,
    MemoryStateError,
    gate_losses,
    masked_softmax,
    query_positions_for,
    window_statistics,
)
from timellm_lib.models.params import model_params

D_MODEL, LLM_DIM = 16, 24
MEMORY_BUFFERS = (
    "memory_keys",
    "memory_values",
    "memory_windows",
    "memory_positions",
    "memory_size",
)


def n_patches(seq_len: int) -> int:
    return (seq_len - 16) // 8 + 2


def training_series(
    seq_len: int, pred_len: int, channels: int = 3, extra: int = 150, seed: int = 0
):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(seq_len + pred_len + extra, channels, generator=g).cumsum(0) * 0.2


def make_gram(seq_len: int, pred_len: int, seed: int = 0, **kwargs) -> GRAM:
    torch.manual_seed(seed)
    kwargs = {"d_repr": 16, "top_k": 4, "max_memory_size": 64, **kwargs}
    return GRAM(seq_len, pred_len, D_MODEL, LLM_DIM, **kwargs)


def batch_from(series: torch.Tensor, starts: list[int], seq_len: int, patches_seed: int = 0):
    """Channel-independent query windows ``[B*N, L]`` of the given sample starts."""
    x = torch.stack([series[s : s + seq_len] for s in starts])  # [B, L, N]
    batch, _, channels = x.shape
    rows = x.permute(0, 2, 1).reshape(batch * channels, seq_len)
    g = torch.Generator().manual_seed(patches_seed)
    patch_emb = torch.randn(batch * channels, n_patches(seq_len), D_MODEL, generator=g)
    return patch_emb, rows, query_positions_for(torch.tensor(starts), channels)


@pytest.mark.parametrize(
    "batch,channels,seq_len,pred_len", [(2, 3, 64, 16), (1, 7, 96, 24), (4, 1, 512, 96)]
)
def test_output_shapes(batch: int, channels: int, seq_len: int, pred_len: int) -> None:
    gram = make_gram(seq_len, pred_len)
    # long enough that windows far from the queries (not masked) exist
    series = training_series(seq_len, pred_len, channels, extra=2 * (seq_len + pred_len))
    assert gram.build_memory(series, 40, torch.Generator().manual_seed(0)) == 40
    patch_emb, rows, positions = batch_from(series, list(range(0, 10 * batch, 10)), seq_len)
    out = gram(patch_emb, rows, positions)
    n = batch * channels
    assert out.patch_out.shape == patch_emb.shape
    assert out.retrieval_tokens.shape == (n, 2, LLM_DIM)
    assert out.gate.shape == (n,)
    assert out.similarity.shape == out.item_weights.shape == (n, 4)
    assert out.retrieval.values.shape == (n, 4, pred_len)
    assert out.retrieval.valid.all()
    total, parts, diagnostics = gram.loss(out, lambda_retrieval=0.3)
    assert set(parts) == {"gram_gate_entropy", "gram_gate_consistency"}
    torch.testing.assert_close(total, 0.3 * sum(out.losses.values()))
    assert diagnostics["gram_memory_size"] == 40 and diagnostics["gram_memory_empty"] == 0.0
    assert 0.0 < diagnostics["gram_top_similarity"] <= 1.0


def test_every_parameter_gets_a_finite_gradient() -> None:
    gram = make_gram(64, 16).train()
    series = training_series(64, 16)
    gram.build_memory(series, 40, torch.Generator().manual_seed(0))
    patch_emb, rows, positions = batch_from(series, [0, 30], 64)
    out = gram(patch_emb, rows, positions)
    total, _, _ = gram.loss(out)
    (out.patch_out.sum() + out.retrieval_tokens.sum() + total).backward()
    missing = [n for n, p in gram.named_parameters() if p.grad is None]
    broken = [
        n
        for n, p in gram.named_parameters()
        if p.grad is not None and not torch.isfinite(p.grad).all()
    ]
    assert not missing and not broken, (missing, broken)


def test_overlapping_copies_are_never_retrieved_and_distant_copies_come_first() -> None:
    seq_len, pred_len = 64, 16
    gram = make_gram(seq_len, pred_len).eval()
    series = training_series(seq_len, pred_len, extra=300)
    gram.build_memory(series, 60, torch.Generator().manual_seed(0))
    retriever = gram.retriever
    channel, start = 1, 100
    window = series[start : start + seq_len, channel][None]
    future = series[start + seq_len : start + seq_len + pred_len, channel][None]
    query = window.clone()
    positions = torch.tensor([[channel, start]])

    # an exact copy of the query, stored at an overlapping position of the same channel
    retriever.add_to_memory(
        window, future, torch.tensor([[channel, start + seq_len + pred_len - 1]])
    )
    planted = retriever.size - 1
    assert retriever.retrieve(query).indices[0, 0] == planted  # unmasked, it would win
    masked = retriever.retrieve(query, positions)
    assert planted not in masked.indices[0].tolist()
    assert masked.valid.all()
    # nothing retrieved overlaps the query's [start, start + L + H) on its channel
    for row in masked.indices[0].tolist():
        c, s, e = retriever.memory_positions[row].tolist()
        assert c != channel or e <= start or s >= start + seq_len + pred_len

    # the same copy at a position that does not overlap: retrieved first
    retriever.add_to_memory(window, future, torch.tensor([[channel, start + seq_len + pred_len]]))
    assert retriever.retrieve(query, positions).indices[0, 0] == retriever.size - 1
    # another channel at the very same rows holds the query's future dates: masked too
    retriever.add_to_memory(window, future, torch.tensor([[channel + 1, start]]))
    found = retriever.retrieve(query, positions)
    assert retriever.size - 1 not in found.indices[0].tolist()
    assert found.indices[0, 0] == retriever.size - 2
    # ... while another channel's copy that ends where the horizon begins is fair game
    retriever.add_to_memory(window, future, torch.tensor([[channel + 1, start - pred_len]]))
    found = retriever.retrieve(query, positions)
    assert found.indices[0, :2].sort().values.tolist() == [retriever.size - 3, retriever.size - 1]
    assert found.similarity[0, 0] > 0.999


def test_all_candidates_masked_leaves_invalid_slots_and_zero_gate() -> None:
    gram = make_gram(32, 8)
    series = training_series(32, 8, channels=1, extra=2)  # three windows, all overlapping
    gram.build_memory(series, 3, torch.Generator().manual_seed(0))
    patch_emb, rows, positions = batch_from(series, [1], 32)
    out = gram.eval()(patch_emb, rows, positions)
    assert not out.retrieval.valid.any()
    assert torch.equal(out.gate, torch.zeros(1))
    assert torch.equal(out.patch_out, patch_emb)
    assert torch.isfinite(out.retrieval_tokens).all()
    out = gram(patch_emb, rows)  # without positions: 3 of 4 slots filled
    assert out.retrieval.valid.sum() == 3 and torch.isfinite(out.item_weights).all()
    torch.testing.assert_close(out.item_weights.sum(), torch.tensor(1.0))


def test_query_positions_follow_the_channel_independent_order() -> None:
    positions = query_positions_for(torch.tensor([5, 9]), 3)
    assert positions.tolist() == [[0, 5], [1, 5], [2, 5], [0, 9], [1, 9], [2, 9]]


def test_build_memory_stores_the_sampled_windows_and_normalised_futures() -> None:
    seq_len, pred_len = 32, 8
    gram = make_gram(seq_len, pred_len)
    series = training_series(seq_len, pred_len, channels=2, extra=20)
    n = gram.build_memory(series, 30, torch.Generator().manual_seed(1))
    r = gram.retriever
    assert n == r.size == 30
    pairs = set()
    for row in range(n):
        c, s, e = r.memory_positions[row].tolist()
        assert e == s + seq_len + pred_len
        pairs.add((c, s))
        window = series[s : s + seq_len, c]
        assert torch.equal(r.memory_windows[row], window)
        mean, std = window.mean(), torch.sqrt(window.var(correction=0) + 1e-5)
        torch.testing.assert_close(r.memory_values[row], (series[s + seq_len : e, c] - mean) / std)
    assert len(pairs) == n  # drawn without replacement
    torch.testing.assert_close(
        r.memory_keys[:n], r.encode(r.memory_windows[:n]), atol=1e-5, rtol=1e-5
    )
    assert torch.equal(r.memory_keys[n:], torch.zeros_like(r.memory_keys[n:]))
    other = make_gram(seq_len, pred_len)
    other.build_memory(series, 30, torch.Generator().manual_seed(1))
    assert torch.equal(other.retriever.memory_positions, r.memory_positions)


def test_build_memory_rejects_impossible_requests() -> None:
    gram = make_gram(32, 8)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        gram.build_memory(torch.randn(39, 2), 5)
    with pytest.raises(ValueError, match="capacity"):
        gram.build_memory(torch.randn(200, 2), 65)
    with pytest.raises(ValueError, match=r"\[T, C\]"):
        gram.build_memory(torch.randn(200), 5)


def test_memory_of_another_horizon_is_resized_with_a_warning() -> None:
    gram = make_gram(32, 8)
    series = training_series(32, 16)
    with pytest.warns(UserWarning, match="resizing"):
        gram.build_memory(series, 10, torch.Generator().manual_seed(0), pred_len=16)
    r = gram.retriever
    assert r.memory_values.shape == (64, 8)
    assert (r.memory_positions[:10, 2] - r.memory_positions[:10, 1] == 48).all()  # true extent kept


def test_memory_survives_a_checkpoint_file_bit_identically(tmp_path) -> None:
    gram = make_gram(64, 16).eval()
    series = training_series(64, 16)
    gram.build_memory(series, 50, torch.Generator().manual_seed(0))
    path = tmp_path / "gram.pt"
    torch.save(gram.state_dict(), path)
    fresh = make_gram(64, 16, seed=1).eval()
    fresh.load_state_dict(torch.load(path, weights_only=True))
    for name in MEMORY_BUFFERS:
        assert torch.equal(getattr(fresh.retriever, name), getattr(gram.retriever, name)), name
    patch_emb, rows, positions = batch_from(series, [0, 40], 64)
    a, b = gram(patch_emb, rows, positions), fresh(patch_emb, rows, positions)
    assert torch.equal(a.patch_out, b.patch_out) and torch.equal(
        a.retrieval_tokens, b.retrieval_tokens
    )


@pytest.mark.parametrize(
    "change,buffer",
    [
        ({"d_repr": 8}, "memory_keys"),
        ({"max_memory_size": 32}, "memory_keys"),
        ({"seq_len": 48}, "memory_windows"),
    ],
)
def test_incompatible_memory_raises_a_clear_error(change: dict, buffer: str) -> None:
    source = make_gram(64, 16)
    source.build_memory(training_series(64, 16), 20, torch.Generator().manual_seed(0))
    settings = {"seq_len": 64, "pred_len": 16, "d_model": D_MODEL, "llm_dim": LLM_DIM}
    settings |= {"d_repr": 16, "top_k": 4, "max_memory_size": 64} | change
    target = GRAM(**settings)
    state = source.state_dict()
    want = tuple(getattr(target.retriever, buffer).shape)
    got = tuple(state[f"retriever.{buffer}"].shape)
    with pytest.raises(MemoryStateError) as info:
        target.load_state_dict(state)
    message = str(info.value)
    assert f"retriever.{buffer}" in message and str(got) in message and str(want) in message


def test_loading_a_memory_of_another_horizon_resizes_with_a_warning() -> None:
    source = make_gram(64, 16)
    source.build_memory(training_series(64, 16), 20, torch.Generator().manual_seed(0))
    state = {k: v for k, v in source.state_dict().items() if k.startswith("retriever.")}
    target = make_gram(64, 8).retriever
    with pytest.warns(UserWarning, match="resizing"):
        target.load_state_dict({k.removeprefix("retriever."): v for k, v in state.items()})
    assert target.memory_values.shape == (64, 8) and target.size == 20
    first, last = (
        state["retriever.memory_values"][:20, 0],
        state["retriever.memory_values"][:20, -1],
    )
    torch.testing.assert_close(target.memory_values[:20, 0], first)
    torch.testing.assert_close(target.memory_values[:20, -1], last)


def test_empty_memory_contributes_nothing_and_says_so() -> None:
    gram = make_gram(64, 16).train()
    patch_emb, rows, _ = batch_from(training_series(64, 16), [0, 10], 64)
    out = gram(patch_emb, rows)
    assert torch.equal(out.patch_out, patch_emb)
    assert torch.equal(out.gate, torch.zeros(6))
    assert (
        out.retrieval_tokens.shape == (6, 2, LLM_DIM) and torch.isfinite(out.retrieval_tokens).all()
    )
    assert (
        out.diagnostics["gram_memory_empty"] == 1.0 and out.diagnostics["gram_memory_size"] == 0.0
    )
    total, _, _ = gram.loss(out)
    assert total == 0
    (out.patch_out.sum() + out.retrieval_tokens.sum() + total).backward()  # still trainable


def test_keys_are_refreshed_every_n_training_passes_only() -> None:
    gram = make_gram(32, 8, refresh_every=2).train()
    series = training_series(32, 8)
    gram.build_memory(series, 20, torch.Generator().manual_seed(0))
    r = gram.retriever
    patch_emb, rows, positions = batch_from(series, [0], 32)
    with torch.no_grad():
        for p in r.pattern.parameters():
            p.add_(0.1)  # the encoder trains on: stored keys go stale
    stale = r.memory_keys.clone()
    gram.eval()(patch_emb, rows, positions)
    assert r.forward_count == 0 and torch.equal(r.memory_keys, stale)
    gram.train()(patch_emb, rows, positions)
    assert r.forward_count == 1 and torch.equal(r.memory_keys, stale)
    gram(patch_emb, rows, positions)
    assert r.forward_count == 2 and not torch.equal(r.memory_keys, stale)
    torch.testing.assert_close(
        r.memory_keys[:20], r.encode(r.memory_windows[:20]), atol=1e-5, rtol=1e-5
    )


def test_evaluation_retrieves_with_keys_of_the_current_encoders() -> None:
    """Between refreshes the stored keys lag the encoders; evaluation does not: it ranks the
    memory by keys encoded now, and leaves the stored keys (resumable state) alone."""
    gram = make_gram(32, 8, refresh_every=50).train()
    series = training_series(32, 8, extra=200)
    gram.build_memory(series, 60, torch.Generator().manual_seed(0))
    r = gram.retriever
    with torch.no_grad():
        for p in [*r.pattern.parameters(), *r.value.parameters()]:
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    stale = r.memory_keys.clone()
    _, rows, _ = batch_from(series, [3, 70, 140], 32)
    found = gram.eval().retriever.retrieve(rows)
    with torch.no_grad():
        query, fresh = r.encode(rows), r.encode(r.memory_windows[: r.size])
    expected = torch.cdist(query, fresh).pow(2).topk(r.top_k, largest=False)
    assert torch.equal(found.indices, expected.indices)
    torch.testing.assert_close(found.similarity, torch.exp(-expected.values), atol=1e-5, rtol=1e-4)
    assert torch.equal(r.memory_keys, stale) and r.forward_count == 0
    stale_order = torch.cdist(query, stale[: r.size]).pow(2).topk(r.top_k, largest=False)
    assert not torch.equal(stale_order.indices, found.indices)  # stale keys would rank others

    with torch.no_grad():  # new weights loaded in eval mode: evaluation encodes anew
        state = {k: v + 0.05 if "value.mlp" in k else v for k, v in gram.state_dict().items()}
    gram.load_state_dict(state)
    with torch.no_grad():
        query, fresh = r.encode(rows), r.encode(r.memory_windows[: r.size])
    again = torch.cdist(query, fresh).pow(2).topk(r.top_k, largest=False)
    assert torch.equal(r.retrieve(rows).indices, again.indices)


def test_training_without_query_positions_warns() -> None:
    gram = make_gram(32, 8).train()
    series = training_series(32, 8)
    gram.build_memory(series, 10, torch.Generator().manual_seed(0))
    patch_emb, rows, _ = batch_from(series, [0], 32)
    with pytest.warns(UserWarning, match="query_positions"):
        gram(patch_emb, rows)


def test_gate_losses_reward_diversity_and_decisiveness_when_confident() -> None:
    valid = torch.ones(2, 4, dtype=torch.bool)
    uniform, one_hot = torch.full((2, 4), 0.25), torch.eye(4)[:2]
    confident, unsure = torch.ones(2), torch.zeros(2)
    assert gate_losses(uniform, valid, unsure)["gate_entropy"].abs() < 1e-6
    assert gate_losses(one_hot, valid, unsure)["gate_entropy"] > 0.99
    assert gate_losses(one_hot, valid, confident)["gate_consistency"] < 1e-6
    assert gate_losses(uniform, valid, confident)["gate_consistency"] > 0.99
    assert gate_losses(uniform, valid, unsure)["gate_consistency"] < 1e-6


def test_window_statistics() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    mean, std, low, high, last, slope = window_statistics(x)[0].tolist()
    assert (mean, low, high, last) == (3.0, 1.0, 5.0, 5.0)
    assert std == pytest.approx(2.0**0.5)
    assert slope == pytest.approx(4.0, rel=1e-4)  # the change across the whole window


def test_same_seed_gives_same_outputs() -> None:
    series = training_series(64, 16)

    def run(seed: int) -> torch.Tensor:
        gram = make_gram(64, 16, seed=seed)
        gram.build_memory(series, 40, torch.Generator().manual_seed(seed))
        patch_emb, rows, positions = batch_from(series, [0, 40], 64)
        out = gram(patch_emb, rows, positions)
        return torch.cat([out.patch_out.flatten(), out.retrieval_tokens.flatten()])

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_from_config_uses_model_settings() -> None:
    cfg = Config()
    cfg.model.use_gram, cfg.data.seq_len, cfg.data.pred_len = True, 64, 16
    cfg.model.d_repr, cfg.model.top_k, cfg.model.max_memory_size = 32, 3, 100
    gram = GRAM.from_params(model_params(cfg).gram, llm_dim=20)
    r = gram.retriever
    assert r.memory_keys.shape == (100, 32) and r.memory_windows.shape == (100, 64) and r.top_k == 3
    assert isinstance(r, PVDR)


def test_no_leakage_on_real_etth1_training_windows(etth1_path) -> None:
    """On real data, near-duplicate neighbours of a training window are its own shifted
    copies; unmasked they are retrieved, masked they never are."""
    import pandas as pd

    seq_len, pred_len = 96, 24
    train = torch.tensor(pd.read_csv(etth1_path).iloc[:8640, 1:].to_numpy(), dtype=torch.float32)
    train = (train - train.mean(0)) / train.std(0)
    gram = make_gram(seq_len, pred_len, max_memory_size=3000).eval()
    gram.build_memory(train, 3000, torch.Generator().manual_seed(0))
    starts = torch.randperm(8640 - seq_len - pred_len, generator=torch.Generator().manual_seed(1))[
        :16
    ]
    _, rows, positions = batch_from(train, starts.tolist(), seq_len)
    r = gram.retriever

    def overlapping(found) -> torch.Tensor:
        mem = r.memory_positions[found.indices.clamp_min(0)]  # [BN, K, 3]
        q_channel, q_start = positions[:, None, 0], positions[:, None, 1]
        return (
            found.valid
            & (mem[..., 0] == q_channel)
            & (mem[..., 1] < q_start + seq_len + pred_len)
            & (q_start < mem[..., 2])
        )

    def into_horizon(found) -> torch.Tensor:
        """Items of any channel whose rows reach into the query's forecast horizon."""
        mem = r.memory_positions[found.indices.clamp_min(0)]
        q_start = positions[:, None, 1]
        q_end = q_start + seq_len + pred_len
        return found.valid & (mem[..., 1] < q_end) & (q_start + seq_len < mem[..., 2])

    unmasked = r.retrieve(rows)
    assert overlapping(unmasked).any()  # the leak is real without the mask
    other_channel = into_horizon(unmasked) & ~overlapping(unmasked)
    assert other_channel.any()  # ... through correlated channels of the same dates too
    masked = r.retrieve(rows, positions)
    assert masked.valid.all() and not overlapping(masked).any()
    assert not into_horizon(masked).any()


def test_gate_losses_have_finite_gradients_when_some_items_are_masked():
    from timellm_lib.models.gram import gate_losses

    weights = torch.tensor([[0.7, 0.3, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]], requires_grad=True)
    valid = torch.tensor([[True, True, False, False], [True, True, True, True]])
    losses = gate_losses(weights, valid, torch.tensor([0.7, 0.25]))
    (losses["gate_entropy"] + losses["gate_consistency"]).backward()
    assert torch.isfinite(weights.grad).all()


class HostReads(TorchFunctionMode):
    """Records every tensor method that copies a value to the host (a device sync on a GPU)."""

    READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy"}

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_a_training_forward_of_tapr_and_gram_reads_nothing_back_to_the_host() -> None:
    """No device sync per step: memory size and pass count are host ints fixed at build/load
    time, and every diagnostic stays a tensor until the trainer reads them all at once. The
    no_llm ablation has no prompt (whose text needs the statistics on the host)."""
    model = {"llm_ablation": "no_llm", "use_tapr": True, "use_gram": True, "d_model": 8}
    model |= {"n_heads": 2, "d_repr": 8, "patch_len": 8, "stride": 4}
    model |= {"max_memory_size": 50, "memory_windows": 40}
    data = {"seq_len": 32, "label_len": 8, "pred_len": 8, "features": "M"}
    torch.manual_seed(0)
    net = build_model(config_from_dict({"data": data, "model": model}), 2, 2)
    assert net.build_memory(training_series(32, 8, channels=2)) == 40
    assert net.gram.retriever.size == 40 and isinstance(net.gram.retriever.size, int)
    net.gram.retriever.refresh_every = 2  # a key refresh happens inside the recorded passes
    x, y = torch.randn(4, 32, 2), torch.randn(4, 8, 2)
    with HostReads() as reads:
        for _ in range(2):
            out = net.train()(x, y, window_index=torch.arange(4))
    assert reads.seen == []
    assert out.diagnostics and all(isinstance(v, torch.Tensor) for v in out.diagnostics.values())


def test_memory_size_and_pass_count_are_restored_with_the_state_dict() -> None:
    series = training_series(64, 16)
    gram = make_gram(64, 16, refresh_every=3)
    gram.build_memory(series, 30)
    patch_emb, rows, positions = batch_from(series, [5, 40], 64)
    for _ in range(2):
        gram.train()(patch_emb, rows, positions)
    keys_before = gram.retriever.memory_keys[:30].clone()
    fresh = make_gram(64, 16, seed=1, refresh_every=3)
    assert fresh.retriever.size == 0
    fresh.load_state_dict(gram.state_dict())
    assert fresh.retriever.size == gram.retriever.size == 30
    # the encoders move (as a training step would), then the third pass refreshes the keys in
    # both: the restored pass count says when
    for module in (gram, fresh):
        with torch.no_grad():
            module.retriever.shape_logit.add_(1.0)
        module.train()(patch_emb, rows, positions)
    assert torch.equal(fresh.retriever.memory_keys, gram.retriever.memory_keys)
    assert not torch.equal(fresh.retriever.memory_keys[:30], keys_before)
    fresh.retriever.clear_memory()
    assert fresh.retriever.size == 0


def test_gate_losses_match_a_row_by_row_computation() -> None:
    """Masked means over the rows with two or more valid items (no boolean indexing)."""
    g = torch.Generator().manual_seed(0)
    valid = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    weights = masked_softmax(torch.randn(4, 4, generator=g), valid)
    top = torch.rand(4, generator=g)
    entropies, consistencies = [], []
    for row in range(4):
        p = weights[row][valid[row]]
        if len(p) < 2:
            continue
        h = float(-(p * p.log()).sum() / math.log(len(p)))
        entropies.append(1 - h)
        consistencies.append((h - (1 - float(top[row]))) ** 2)
    losses = gate_losses(weights, valid, top)
    assert losses["gate_entropy"].item() == pytest.approx(sum(entropies) / 2, rel=1e-5)
    assert losses["gate_consistency"].item() == pytest.approx(sum(consistencies) / 2, rel=1e-5)
    none = gate_losses(weights[1:3], valid[1:3], top[1:3])
    assert none["gate_entropy"].item() == 0.0 and none["gate_consistency"].item() == 0.0
