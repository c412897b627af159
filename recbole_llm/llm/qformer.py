"""A BLIP-2 Q-Former over collaborative vectors: N learned queries read one entity's CF vector, a BERT text branch
shares their self-attention layers (ILM, METHODS.md §4.2 and §4.9).

Built on transformers' ``Blip2QFormerModel`` with ``use_qformer_text_input``: the sequence ``[queries; text]`` runs
through shared self-attention layers, the first ``query_length`` positions get cross-attention (every
``cross_attention_frequency``-th layer) to the encoder states and their own feed-forward blocks (``*_query``), the
text positions the text feed-forward. A prepared 4-D mask passes through unchanged, which is how BLIP-2's three
masks are given (:func:`qformer_mask`):

* ``unimodal``: queries see only queries, text only text (ITC; the separate query and text passes equal it);
* ``bidirectional``: every position sees every other (ITM);
* ``causal`` (multimodal causal): queries see only queries, text token i sees every query and text tokens <= i (ITG).

The CF vector becomes ``encoder_tokens`` encoder states by one linear map (a short sequence, so cross-attention has
something to attend over). Initialisation (:func:`bert_qformer_state`) follows BLIP-2: the text branch and
self-attention from a BERT checkpoint (the bundled all-MiniLM-L6-v2 by default: its width and first ``layers``
layers), every ``*_query`` feed-forward copied from its text twin, cross-attention and queries new (N(0, 0.02)).
The ITG decoder token ``[DEC]`` is added to the BERT vocabulary (its row starts as ``[CLS]``'s) and the text LM
head is BERT's prediction-head shape with the output matrix tied to the word embeddings.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoTokenizer, Blip2QFormerConfig, Blip2QFormerModel
from transformers.models.blip_2.modeling_blip_2 import Blip2TextEmbeddings

MASKS = ("unimodal", "bidirectional", "causal")
DECODER_TOKEN = "[DEC]"


def qformer_mask(n_queries: int, text_mask: torch.Tensor, kind: str, dtype=torch.float32) -> torch.Tensor:
    """Additive attention mask ``[B, 1, Q + L, Q + L]`` (0: may attend, dtype min: may not) over ``[queries; text]``
    with text padding ``text_mask [B, L]`` (1 = token); ``kind`` is one of :data:`MASKS`."""
    if kind not in MASKS:
        raise ValueError(f"unknown Q-Former mask {kind!r}; use one of {', '.join(MASKS)}")
    batch, length = text_mask.shape
    total = n_queries + length
    device = text_mask.device
    is_query = torch.arange(total, device=device) < n_queries
    allowed = torch.ones(total, total, dtype=torch.bool, device=device)
    if kind in ("unimodal", "causal"):
        allowed[is_query.unsqueeze(1) & ~is_query.unsqueeze(0)] = False  # queries never see text
    if kind == "unimodal":
        allowed[~is_query.unsqueeze(1) & is_query.unsqueeze(0)] = False  # text never sees queries
    if kind == "causal":
        position = torch.arange(total, device=device)
        later_text = ~is_query.unsqueeze(0) & (position.unsqueeze(0) > position.unsqueeze(1))
        allowed[later_text & ~is_query.unsqueeze(1)] = False  # text sees only earlier (and its own) text
    keys = torch.cat([torch.ones(batch, n_queries, dtype=torch.bool, device=device), text_mask.bool()], dim=1)
    allowed = allowed.unsqueeze(0) & keys.unsqueeze(1)  # nobody attends to padding
    allowed = allowed | torch.eye(total, dtype=torch.bool, device=device)  # a padding row still sees itself
    return torch.zeros(batch, 1, total, total, dtype=dtype, device=device).masked_fill(
        ~allowed.unsqueeze(1), torch.finfo(dtype).min)


class ItemQFormer(nn.Module):
    """Queries over a CF vector, with a BERT text branch (see the module docstring)."""

    def __init__(self, config: Blip2QFormerConfig, *, cf_dim: int, n_queries: int, encoder_tokens: int):
        super().__init__()
        self.config, self.n_queries, self.encoder_tokens = config, n_queries, encoder_tokens
        self.qformer = Blip2QFormerModel(config)
        self.embeddings = Blip2TextEmbeddings(config)
        self.query_tokens = nn.Parameter(torch.randn(1, n_queries, config.hidden_size) * config.initializer_range)
        self.cf_encoder = nn.Linear(cf_dim, encoder_tokens * config.encoder_hidden_size)
        self.cf_norm = nn.LayerNorm(config.encoder_hidden_size, eps=config.layer_norm_eps)
        hidden = config.hidden_size
        self.lm_transform = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(),
                                          nn.LayerNorm(hidden, eps=config.layer_norm_eps))
        self.lm_bias = nn.Parameter(torch.zeros(config.vocab_size))

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def encoder_states(self, cf: torch.Tensor) -> torch.Tensor:
        """``[B, T, H]``: the CF vectors ``[B, D]`` as ``encoder_tokens`` states the queries cross-attend to."""
        states = self.cf_encoder(cf.float()).view(len(cf), self.encoder_tokens, -1)
        return self.cf_norm(states)

    def encode_queries(self, cf: torch.Tensor) -> torch.Tensor:
        """``[B, N, H]``: the query outputs for CF vectors ``[B, D]`` (queries only, no text)."""
        queries = self.query_tokens.expand(len(cf), -1, -1)
        return self.qformer(query_embeds=queries, encoder_hidden_states=self.encoder_states(cf)).last_hidden_state

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, L, H]``: the text branch alone (BERT over the tokens)."""
        return self.qformer(query_embeds=self.embeddings(input_ids=input_ids), query_length=0,
                            attention_mask=attention_mask).last_hidden_state

    def joint(self, cf: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              kind: str) -> torch.Tensor:
        """``[B, N + L, H]``: queries and text in one pass under the mask ``kind`` (:func:`qformer_mask`)."""
        embeds = self.embeddings(input_ids=input_ids, query_embeds=self.query_tokens.expand(len(cf), -1, -1))
        mask = qformer_mask(self.n_queries, attention_mask, kind, dtype=embeds.dtype)
        return self.qformer(query_embeds=embeds, query_length=self.n_queries, attention_mask=mask,
                            encoder_hidden_states=self.encoder_states(cf)).last_hidden_state

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of text hidden states (BERT's prediction head, output tied to the word embeddings)."""
        return self.lm_transform(hidden) @ self.embeddings.word_embeddings.weight.T + self.lm_bias


# ------------------------------------------------------------------------------------------- construction
def bert_qformer_config(bert_config, *, layers: int, vocab_size: int, cross_attention_frequency: int = 2):
    """The Q-Former config of a BERT config: its width, heads, FFN and dropout, ``layers`` layers."""
    return Blip2QFormerConfig(
        vocab_size=vocab_size, hidden_size=bert_config.hidden_size, num_hidden_layers=layers,
        num_attention_heads=bert_config.num_attention_heads, intermediate_size=bert_config.intermediate_size,
        hidden_act=bert_config.hidden_act, hidden_dropout_prob=bert_config.hidden_dropout_prob,
        attention_probs_dropout_prob=bert_config.attention_probs_dropout_prob,
        max_position_embeddings=bert_config.max_position_embeddings, layer_norm_eps=bert_config.layer_norm_eps,
        pad_token_id=bert_config.pad_token_id, cross_attention_frequency=cross_attention_frequency,
        encoder_hidden_size=bert_config.hidden_size, use_qformer_text_input=True,
    )


def bert_qformer_state(bert_state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """The :class:`ItemQFormer` tensors a BERT ``BertModel`` state dict gives (BLIP-2's initialisation): text
    embeddings (token type 0 folded into the position rows, which every text token adds), the embedding LayerNorm,
    each of the first ``layers`` layers' self-attention and text feed-forward, and the feed-forward again for its
    query twin. Cross-attention, queries, the CF encoder and the heads are not in it (they start new)."""
    state = {k.removeprefix("bert."): v for k, v in bert_state.items()}
    out = {
        "embeddings.word_embeddings.weight": state["embeddings.word_embeddings.weight"],
        "embeddings.position_embeddings.weight": state["embeddings.position_embeddings.weight"]
        + state["embeddings.token_type_embeddings.weight"][0],
        "qformer.layernorm.weight": state["embeddings.LayerNorm.weight"],
        "qformer.layernorm.bias": state["embeddings.LayerNorm.bias"],
    }
    renames = {"attention.self.": ("attention.attention.",), "attention.output.": ("attention.output.",),
               "intermediate.": ("intermediate.", "intermediate_query."), "output.": ("output.", "output_query.")}
    for layer in range(layers):
        prefix = f"encoder.layer.{layer}."
        for key, value in state.items():
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix):]
            for source, targets in renames.items():
                if rest.startswith(source):
                    for target in targets:
                        out[f"qformer.encoder.layer.{layer}.{target}{rest[len(source):]}"] = value
                    break
    return out


def load_item_qformer(bert_dir: str | Path, *, cf_dim: int, n_queries: int, encoder_tokens: int, layers: int,
                      init: str = "bert", cross_attention_frequency: int = 2, seed: int = 0):
    """``(ItemQFormer, tokenizer)`` from a BERT-architecture checkpoint directory: the first ``layers`` of its
    layers (all of them when it has fewer), weights copied when ``init`` is ``bert``, only its shape and vocabulary
    when ``random``. The tokenizer gains ``[DEC]``."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    folder = Path(bert_dir)
    bert_config = AutoConfig.from_pretrained(folder)
    if bert_config.model_type != "bert":
        raise ValueError(f"{folder} holds a {bert_config.model_type} model; the Q-Former starts from a BERT "
                         "checkpoint (model_type bert)")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"additional_special_tokens": [DECODER_TOKEN]})
    layers = min(layers, bert_config.num_hidden_layers)
    config = bert_qformer_config(bert_config, layers=layers, vocab_size=len(tokenizer),
                                 cross_attention_frequency=cross_attention_frequency)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ItemQFormer(config, cf_dim=cf_dim, n_queries=n_queries, encoder_tokens=encoder_tokens)
    if init == "bert":
        weights = sorted(folder.glob("*.safetensors"))
        if not weights:
            raise FileNotFoundError(f"{folder} has no .safetensors weights to initialise the Q-Former from")
        bert_state = {}
        for file in weights:
            bert_state.update(load_file(file))
        state = bert_qformer_state(bert_state, layers)
        words = state["embeddings.word_embeddings.weight"]
        extended = model.embeddings.word_embeddings.weight.detach().clone()
        extended[: len(words)] = words
        extended[len(words):] = words[tokenizer.cls_token_id]  # [DEC] starts as [CLS]
        state["embeddings.word_embeddings.weight"] = extended
        missing = set(state) - set(model.state_dict())
        if missing:
            raise ValueError(f"BERT tensors with no Q-Former place: {sorted(missing)[:5]}")
        model.load_state_dict(state, strict=False)
    elif init != "random":
        raise ValueError(f"unknown Q-Former initialisation {init!r}; use bert or random")
    return model, tokenizer
