"""Semantic-ID libraries: the ResidualVQ API we build on, unique codes and their statistics, packed windows, and trainable new tokens."""

from __future__ import annotations

import math

import pytest
import torch

from recbole_llm.data.packing import pack_window, prefix_example, sequence_windows
from recbole_llm.llm.backbone import load_backbone
from recbole_llm.llm.new_tokens import ExtendedEmbedding, ExtendedHead, add_trainable_tokens
from recbole_llm.losses import info_nce
from recbole_llm.semantic_ids import code_token_names
from recbole_llm.semantic_ids.quantizer import (
    code_statistics,
    collision_rate,
    learn_semantic_ids,
    random_semantic_ids,
    resolve_collisions,
)


# ---------------------------------------------------------------------------------------------- quantizer
def test_residual_vq_api_we_rely_on():
    # vector-quantize-pytorch is pinned; these are the calls recbole_llm.semantic_ids.quantizer makes.
    from vector_quantize_pytorch import ResidualVQ

    torch.manual_seed(0)
    rvq = ResidualVQ(dim=8, num_quantizers=3, codebook_size=16, kmeans_init=True, kmeans_iters=5,
                     threshold_ema_dead_code=1, decay=0.9, commitment_weight=0.25, rotation_trick=False)
    x = torch.randn(100, 8)
    quantized, indices, commitment = rvq(x)
    assert quantized.shape == (100, 8) and indices.shape == (100, 3) and indices.dtype == torch.long
    assert commitment.shape == (3,)
    assert len(rvq.layers) == 3 and rvq.layers[0].codebook.shape == (16, 8)
    rvq.eval()
    quantized, indices, _ = rvq(x)
    assert torch.allclose(rvq.get_output_from_indices(indices), quantized, atol=1e-6)
    # the output is the sum of each level's chosen code
    summed = sum(layer.codebook[indices[:, level]] for level, layer in enumerate(rvq.layers))
    assert torch.allclose(summed, quantized, atol=1e-5)


def _clustered(n_per_cluster=40, clusters=12, dim=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=generator) * 4
    return (centres.repeat_interleave(n_per_cluster, 0)
            + torch.randn(clusters * n_per_cluster, dim, generator=generator))


def test_learned_codes_are_unique_with_statistics_that_describe_them():
    items = _clustered()
    codes, stats, model = learn_semantic_ids(items, None, levels=3, codebook_size=16, epochs=60, lambda_align=0.0,
                                             seed=0)
    assert codes.shape == (480, 3) and len(torch.unique(codes, dim=0)) == 480
    assert stats.items == 480 and stats.levels == 3 and stats.codebook_size == 16
    assert 0 < stats.collision_rate < 1 and stats.reassigned > 0  # 480 items in 16^3 codes do collide
    assert all(0 < u <= 1 for u in stats.usage) and all(1 <= p <= 16 for p in stats.perplexity)
    assert stats.reconstruction_error < 1.0  # standardised inputs: below the variance of a constant guess
    # the first level separates the 12 clusters: items of one cluster mostly share their first code
    first = codes[:, 0].view(12, 40)
    assert (first.mode(dim=1).values.unsqueeze(1) == first).float().mean() > 0.8
    # the encoder reproduces the codes the module assigns (before resolution only re-assignments differ)
    raw, _ = model.encode(model.standardise(items))
    assert (raw == codes).all(1).float().mean() == pytest.approx(1 - stats.reassigned / 480)


def test_alignment_term_pulls_the_quantized_vectors_towards_the_text_embeddings():
    items = _clustered(seed=1)
    generator = torch.Generator().manual_seed(2)
    text = items @ torch.randn(16, 24, generator=generator) + 0.1 * torch.randn(480, 24, generator=generator)

    def alignment(lambda_align: float) -> float:
        """InfoNCE of the trained module's projected codes against the text, measured afresh (not the training
        log), so a loss whose sign is flipped shows up as an alignment worse than chance."""
        _, stats, codebook = learn_semantic_ids(items, text, levels=3, codebook_size=16, epochs=80,
                                                lambda_align=lambda_align, seed=0)
        with torch.no_grad():
            z_hat = codebook(codebook.standardise(items))[0]
            measured = float(info_nce(codebook.align(z_hat), text, 0.1, symmetric=True))
        assert stats.alignment_loss == pytest.approx(measured, rel=0.01)
        return measured

    chance = math.log(480)  # InfoNCE of an alignment that tells no item from another
    aligned, weak = alignment(1.0), alignment(0.01)
    assert aligned < 0.7 * chance and aligned < weak
    _, none, _ = learn_semantic_ids(items, None, levels=3, codebook_size=16, epochs=5, lambda_align=0.0, seed=0)
    assert none.alignment_loss is None

def test_collisions_move_to_the_nearest_unused_last_level_code():
    codes = torch.tensor([[0, 1, 2], [0, 1, 2], [0, 1, 2], [0, 1, 3], [1, 1, 2]])
    distances = torch.tensor([[5.0, 0, 1, 9], [0.5, 0, 3, 9], [9, 0, 2, 1], [0, 0, 0, 0], [0, 0, 0, 0]])
    resolved, moved = resolve_collisions(codes, distances, codebook_size=4)
    # item 0 is closest to code 2 among the three and keeps it; item 1 takes its nearest free code, 1; item 2's
    # nearest are 1 (now taken), 3 (item 3's) and 2, so it gets 0. Item 4 has prefix (1, 1): no collision.
    assert resolved.tolist() == [[0, 1, 2], [0, 1, 1], [0, 1, 0], [0, 1, 3], [1, 1, 2]] and moved == 2
    assert collision_rate(codes) == pytest.approx(3 / 5) and collision_rate(resolved) == 0.0


def test_a_full_prefix_moves_the_extra_items_up_one_level():
    codes = torch.tensor([[0, 0], [0, 0], [0, 0], [1, 1]])
    resolved, moved = resolve_collisions(codes, torch.tensor([[0.0, 1.0]] * 4), codebook_size=2)
    assert resolved.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]] and moved == 2  # (0, *) is full: item 2 -> (1, 0)
    with pytest.raises(ValueError, match="no free code .*semconv_codebook_size"):
        resolve_collisions(torch.zeros(5, 2, dtype=torch.long), torch.rand(5, 2), codebook_size=2)


def test_random_codes_are_unique_and_spread():
    codes, stats = random_semantic_ids(500, levels=3, codebook_size=8, seed=0)
    assert len(torch.unique(codes, dim=0)) == 500 and stats.usage == [1.0, 1.0, 1.0]
    usage, perplexity = code_statistics(torch.tensor([[0], [0], [1], [1]]), 4)
    assert usage == [0.5] and perplexity[0] == pytest.approx(2.0)


# ---------------------------------------------------------------------------------------------- packing
def test_windows_train_every_target_once_with_context():
    for length in (1, 2, 5, 20, 21, 47):
        windows = sequence_windows(length, window=10, context=3)
        targets = [p for w in windows for p in range(w.first_target, w.end)]
        assert targets == list(range(1, length))
        assert all(w.end - w.start <= 10 for w in windows)
        assert all(w.first_target - w.start >= min(3, w.first_target) for w in windows)
    with pytest.raises(ValueError, match="below the window size"):
        sequence_windows(5, window=4, context=4)


def test_a_packed_window_marks_exactly_the_target_items_tokens():
    items = [[10, 11], [20, 21], [30, 31], [40, 41]]
    windows = sequence_windows(4, window=3, context=1)
    assert [(w.start, w.end, w.first_target) for w in windows] == [(0, 3, 1), (2, 4, 3)]
    tokens, targets = pack_window([1, 2], items, windows[1])
    assert tokens == [1, 2, 30, 31, 40, 41] and targets == [0, 0, 0, 0, 1, 1]
    assert prefix_example([1], items, 2) == ([1, 10, 11, 20, 21, 30, 31], [0, 0, 0, 0, 0, 1, 1])


# ------------------------------------------------------------------------------------------- new tokens
def test_new_token_rows_train_alone_and_extend_embedding_and_head():
    model, tokenizer = load_backbone("tiny-random", dtype="fp32")
    base_vocab = len(tokenizer)
    for p in model.parameters():
        p.requires_grad_(False)
    ids = add_trainable_tokens(model, tokenizer, code_token_names(2, 3))
    assert ids == list(range(base_vocab, base_vocab + 6)) and len(tokenizer) == base_vocab + 6
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embedding, ExtendedEmbedding) and isinstance(head, ExtendedHead)
    assert head.new_rows is embedding.new_rows  # tied like the base rows
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["model.embed_tokens.new_rows"]
    ids_tensor = torch.tensor([[5, ids[0], ids[5]]])
    logits = model(input_ids=ids_tensor).logits
    assert logits.shape == (1, 3, base_vocab + 6)
    assert torch.equal(embedding(ids_tensor)[0, 1], embedding.new_rows[0])
    assert torch.equal(embedding(ids_tensor)[0, 0], embedding.base.weight[5])
    logits[0, -1, ids[2]].backward()
    assert embedding.new_rows.grad is not None and embedding.base.weight.grad is None
    assert tokenizer.convert_ids_to_tokens(ids[:2]) == ["<a_0>", "<a_1>"]
    assert tokenizer(" <b_2><a_0>", add_special_tokens=False).input_ids[-2:] == [ids[5], ids[0]]
