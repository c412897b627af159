"""The one token trie behind constrained decoding: fixed-length item codes (SemConv) and variable-length titles
(ILM) alike, against hand-built catalogues and transformers' PrefixConstrainedLogitsProcessor as the reference."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import PrefixConstrainedLogitsProcessor

from recbole_llm.llm.token_trie import TokenTrie, TrieConstrainedLogitsProcessor, reference_allowed_tokens_fn

EOS = 1
# SemConv-like: 3 levels, level l's code k is token 10 + 4 l + k
CODES = torch.tensor([[0, 1, 2], [0, 1, 3], [0, 2, 0], [3, 3, 3], [1, 0, 2]])
CODE_TOKENS = (10 + 4 * torch.arange(3) + CODES).tolist()
# ILM-like titles: different lengths, one a prefix of another ("Heat" / "Heat (1995)")
TITLES = [[20, 21], [20, 21, 22, 23], [24], [25, 21, 26]]


def _allowed_tokens(trie, prefix, vocab=40):
    nodes = trie.walk(torch.tensor([prefix], dtype=torch.long).view(1, -1))
    return trie.allowed(nodes, vocab)[0].nonzero().flatten().tolist()


def test_trie_admits_exactly_the_catalogue_codes():
    trie = TokenTrie(CODE_TOKENS, end_token=EOS)
    assert sorted(trie.sequences()) == sorted(tuple(c) + (EOS,) for c in CODE_TOKENS)
    assert trie.items(torch.tensor(CODE_TOKENS)).tolist() == [0, 1, 2, 3, 4]
    every = 10 + 4 * torch.arange(3) + torch.tensor(list(itertools.product(range(4), repeat=3)))
    found = trie.items(every)
    assert int((found >= 0).sum()) == 5
    assert {tuple(row) for row in every[found >= 0].tolist()} == {tuple(c) for c in CODE_TOKENS}


def test_trie_allows_the_children_of_each_prefix_then_only_the_end_token():
    trie = TokenTrie(CODE_TOKENS, end_token=EOS)
    assert _allowed_tokens(trie, []) == [10, 11, 13]  # first codes 0, 1, 3
    assert _allowed_tokens(trie, [10, 15]) == [20, 21]  # after codes (0, 1): level-2 codes 2, 3
    assert _allowed_tokens(trie, [10, 15, 20]) == [EOS]
    assert _allowed_tokens(trie, [12]) == []  # no item starts with code 2
    assert _allowed_tokens(trie, [10, 15, 20, EOS]) == []  # finished
    with pytest.raises(ValueError, match="share a token sequence"):
        TokenTrie([[5, 6], [5, 6]], end_token=EOS)


def test_titles_of_different_lengths_and_a_title_that_prefixes_another_stay_distinct():
    trie = TokenTrie(TITLES, end_token=EOS)
    assert _allowed_tokens(trie, []) == [20, 24, 25]
    assert _allowed_tokens(trie, [20, 21]) == [EOS, 22]  # "Heat" may end here or go on to "Heat (1995)"
    assert _allowed_tokens(trie, [20, 21, 22]) == [23]
    padded = torch.tensor([[20, 21, EOS, EOS, EOS], [20, 21, 22, 23, EOS], [24, EOS, EOS, EOS, EOS],
                           [25, 21, 26, EOS, EOS], [20, 21, 22, EOS, EOS], [24, 21, EOS, EOS, EOS]])
    assert trie.items(padded).tolist() == [0, 1, 2, 3, -1, -1]
    assert trie.items(torch.tensor([[20, 21], [24, 9]])).tolist() == [0, -1]  # no end token yet: still item 0


def test_banned_items_close_the_prefixes_that_lead_only_to_them():
    trie = TokenTrie(CODE_TOKENS, end_token=EOS)
    banned = torch.tensor([[True, True, False, False, False],  # row 0: items (0,1,2) and (0,1,3)
                           [False, False, False, False, False]])
    open_nodes = trie.open_nodes(banned)
    walk = lambda prefix: trie.walk(torch.tensor([prefix, prefix], dtype=torch.long).view(2, -1))  # noqa: E731
    allowed = lambda prefix: [row.nonzero().flatten().tolist()  # noqa: E731
                              for row in trie.allowed(walk(prefix), 40, open_nodes)]
    assert allowed([]) == [[10, 11, 13], [10, 11, 13]]  # row 0 may still start with code 0: item (0,2,0)
    assert allowed([10]) == [[16], [15, 16]]  # but (0,1) leads only to banned items in row 0
    assert allowed([10, 15]) == [[], [20, 21]]


def _random_catalogue(generator, variable: bool):
    if variable:
        lengths = torch.randint(1, 6, (40,), generator=generator)
        rows = {tuple(torch.randint(5, 12, (int(n),), generator=generator).tolist()) for n in lengths}
        return [list(r) for r in sorted(rows)]
    codes = torch.unique(torch.randint(6, (30, 3), generator=generator), dim=0)
    return (10 + 6 * torch.arange(3) + codes).tolist()


@pytest.mark.parametrize("variable", [False, True], ids=["codes", "titles"])
def test_vectorised_constraint_allows_exactly_what_the_reference_allows(variable):
    generator = torch.Generator().manual_seed(0)
    catalogue = _random_catalogue(generator, variable)
    vocab, prompt, beams = 40, 5, 4
    trie = TokenTrie(catalogue, end_token=EOS)
    reference = PrefixConstrainedLogitsProcessor(reference_allowed_tokens_fn(catalogue, prompt, EOS), beams)
    ours = TrieConstrainedLogitsProcessor(trie, prompt, EOS)
    longest = max(map(len, catalogue)) + 1
    for step in range(longest + 2):
        # beams on prefixes of catalogue items (padded with EOS once finished), and one on a prefix no item has
        chosen = [catalogue[i] + [EOS] * (longest + 2) for i in torch.randint(len(catalogue), (2 * beams,),
                                                                               generator=generator).tolist()]
        generated = torch.tensor([row[:step] for row in chosen], dtype=torch.long).view(2 * beams, step)
        if step:
            generated[-1, 0] = 39  # no item starts with token 39
        input_ids = torch.cat([torch.randint(2, 10, (2 * beams, prompt), generator=generator), generated], dim=1)
        scores = torch.randn(2 * beams, vocab, generator=generator)
        expected, actual = reference(input_ids, scores.clone()), ours(input_ids, scores.clone())
        assert torch.equal(torch.isfinite(expected), torch.isfinite(actual)), step
        assert torch.equal(expected[torch.isfinite(expected)], actual[torch.isfinite(actual)])


def test_title_beam_search_is_exhaustive_exact_and_never_feeds_a_finished_beam():
    """With as many beams as titles, constrained beam search must return every title, ranked by its log-probability
    under the model (computed here by one plain forward pass per title), whatever else shares the batch; a beam
    that wrote EOS leaves the model's batch (fed again, it would cost a decoding step per beam for nothing)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from recbole_llm.llm.generation import beam_search, left_pad

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                         eos_token_id=EOS, pad_token_id=0)).eval()
    titles = TITLES + [[27], [28, 29, 30, 31, 32, 33]]
    trie = TokenTrie(titles, end_token=EOS)
    prompts = [[5, 6, 7, 8], [9, 2]]
    fed = []
    forward = model.forward

    def recording_forward(*args, **kwargs):
        if kwargs.get("cache") is not None:  # a decoding step (the prefill has no cache yet)
            fed.append(kwargs["input_ids"])
        return forward(*args, **kwargs)

    model.forward = recording_forward

    def search(batch_prompts):
        ids, mask = left_pad(batch_prompts, 0)
        processor = TrieConstrainedLogitsProcessor(trie, ids.shape[1], EOS)
        return beam_search(model, ids, mask, num_beams=len(titles), max_new_tokens=trie.max_length,
                           logits_processor=processor, eos_token_id=EOS)

    found = search(prompts)
    assert fed and all(EOS not in step.flatten().tolist() for step in fed)
    assert min(len(step) for step in fed) < len(prompts) * len(titles)
    for row, prompt in enumerate(prompts):
        expected = {}
        for index, title in enumerate(titles):
            sequence = torch.tensor([prompt + title + [EOS]])
            with torch.no_grad():
                logits = forward(input_ids=sequence).logits[0]
            log_probs = torch.log_softmax(logits[len(prompt) - 1:-1].float(), -1)
            expected[index] = float(log_probs.gather(1, sequence[0, len(prompt):, None]).sum())
        items = trie.items(found.tokens[row]).tolist()
        assert sorted(items) == list(range(len(titles)))  # every title once, nothing else
        assert items == sorted(expected, key=expected.get, reverse=True)
        assert found.scores[row].tolist() == pytest.approx([expected[i] for i in items], abs=1e-4)
        alone = search([prompt])
        assert trie.items(alone.tokens[0]).tolist() == items
