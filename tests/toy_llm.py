"""A minimal LLM recommender used to test the shared machinery (trainer, checkpoints, load_model).

It reads the titles of a user's last two items with the tiny-random backbone (LoRA adapters), mean-pools the
last hidden states, and scores items against a trainable item-embedding table. Not a method: a test fixture.
"""

import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType
from torch import nn

from recbole_llm.data.item_text import ItemTextBuilder
from recbole_llm.llm.backbone import backbone_from_config
from recbole_llm.registry import register_model
from recbole_llm.trainer import LLMTrainer

TITLE_TOKENS = 6


@register_model(trainer=LLMTrainer)
class ToyLLMRec(SequentialRecommender):
    input_type = InputType.POINTWISE
    backbone_modules = ("llm",)

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.llm, self.tokenizer = backbone_from_config(config)
        titles = ItemTextBuilder(fields={"Title": "movie_title"}).build(dataset)
        encoded = self.tokenizer(
            titles, add_special_tokens=False, truncation=True, max_length=TITLE_TOKENS, padding="max_length",
            return_tensors="pt",
        )
        self.register_buffer("item_tokens", encoded.input_ids, persistent=False)
        self.register_buffer("item_mask", encoded.attention_mask, persistent=False)
        hidden = self.llm.config.hidden_size
        self.head = nn.Linear(hidden, hidden)
        self.item_embedding = nn.Embedding(self.n_items, hidden, padding_idx=0)
        self.loss_fct = nn.CrossEntropyLoss()

    def forward(self, item_seq, item_seq_len):
        last = torch.stack([self.gather_indexes(item_seq.unsqueeze(-1), (item_seq_len - k).clamp(min=0)).squeeze(-1)
                            for k in (2, 1)], dim=1)  # [B, 2] item ids
        tokens = self.item_tokens[last].flatten(1)
        mask = self.item_mask[last].flatten(1) * (last > 0).repeat_interleave(TITLE_TOKENS, 1)
        mask[:, -1] = 1  # never an all-masked row
        hidden = self.llm(input_ids=tokens, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        self.last_batch_tokens = int(mask.sum())
        return self.head(pooled)

    def calculate_loss(self, interaction):
        user = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        self.last_batch_targets = len(user)  # one next item a row
        return self.loss_fct(user @ self.item_embedding.weight.T, interaction[self.POS_ITEM_ID])

    def predict(self, interaction):
        user = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return (user * self.item_embedding(interaction[self.ITEM_ID])).sum(-1)

    def full_sort_predict(self, interaction):
        user = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return user @ self.item_embedding.weight.T
