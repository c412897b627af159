r"""ILM
################################################

Reference:
    Li Yang, Anushya Subbiah, Hardik Patel, Judith Yue Li, Yanwei Song, Reza Mirghaderi, Vikram Aggarwal.
    "Item-Language Model for Conversational Recommendation." arXiv:2406.02844 (Google); later "Item-Language Model:
    Improving LLM for Recommendation via Item-Language Representation Learning", IJCNLP-AACL 2025. No public code
    exists; ../shared/METHODS.md §4 tags each detail with its source, and where the paper is silent the choice is a
    key of properties/model/ILM.yaml.

A frozen LLM reads items and users as soft tokens: a BLIP-2 Q-Former turns an entity's collaborative vector (BPR,
trained on this run's training split) into N query outputs, a linear projection writes them into the LLM's input
embeddings at slot positions. Phase 1 aligns the Q-Former with item text without the LLM (ITC, ITM, ITG) and
regularises it with item-item and user-item contrast (IIC, UIC); phase 2 trains only the Q-Former and the
projection through the frozen LLM on conversational tasks. Recommendation writes the next item's title by beam
search constrained to the catalogue's titles.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType, set_color
from torch import nn

from recbole_llm.collaborative import collaborative_vectors, regress_cold_items
from recbole_llm.cache import minilm_dir
from recbole_llm.data.item_text import ItemTextBuilder
from recbole_llm.data.sequences import last_items, user_sequences
from recbole_llm.llm.backbone import backbone_from_config
from recbole_llm.llm.chat_format import chat_frame
from recbole_llm.llm.examples import ExampleBatches, predicted_positions, response_token_losses
from recbole_llm.llm.generation import beam_search, pad_sequences, row_seed
from recbole_llm.llm.qformer import DECODER_TOKEN, load_item_qformer
from recbole_llm.llm.token_trie import TokenTrie, TrieConstrainedLogitsProcessor
from recbole_llm.locks import exclusive
from recbole_llm.model.beam_ranking import BeamRanking
from recbole_llm.registry import register_model
from recbole_llm.settings import ILM_TASKS, SettingError
from recbole_llm.trainer.checkpoint import META, load_optimizer, load_weights, read_meta
from recbole_llm.fingerprint import run_fingerprint
from recbole_llm.trainer.llm_trainer import LLMTrainer

logger = logging.getLogger(__name__)

# Prompts after the paper's Fig. 1 examples (METHODS.md §4.4): each {user}, {item} is N soft tokens, {history} the
# soft tokens of each history item. The paper's "user_123" id text is left out: a frozen LLM cannot read ids.
SEQUENTIAL = "The user {user} has interacted with items {history}. What is the next recommendation?"
ITEM = "What are the title and genres of the item {item}?"
USER = "The user {user} liked an item. Which one?"
TEMPLATES = {"sequential": SEQUENTIAL, "item": ITEM, "user": USER}
SLOT = re.compile(r"\{(user|item|history)\}")

ITEM_SLOT, USER_SLOT = 0, 1
PHASE_TWO_KEYS = (  # keys that shape phase 2 or scoring only: the phase-1 cache is shared across them
    "learning_rate", "learner", "weight_decay", "train_batch_size", "epochs", "lr_scheduler", "lr_warmup",
    "ilm_task_weights", "ilm_history_titles", "max_history_items", "max_item_tokens", "ilm_beams",
    "generation_batch_size", "exclude_history", "metrics", "topk", "valid_metric", "valid_metric_bigger",
    "train_neg_sample_args", "MAX_ITEM_LIST_LENGTH", "eval_batch_size", "eval_max_users",
)


# ------------------------------------------------------------------------------------------- phase-1 losses
def max_query_similarity(queries: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """``[B, B]``: s(i, j) = max_n <q_{i,n}, t_j> for query features ``[B, N, d]`` and text features ``[B, d]``
    (BLIP-2's ITC similarity: the query closest to the text stands for the item)."""
    return torch.einsum("ind,jd->ijn", queries, texts).amax(-1)


def pair_similarity(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``[B, B]``: s(i, j) = max_{n, m} <a_{i,n}, b_{j,m}> for query features ``[B, N, d]`` on both sides (IIC/UIC:
    the closest pair of queries, METHODS.md §4.3)."""
    return torch.einsum("ind,jmd->ijnm", left, right).flatten(2).amax(-1)


def contrastive_loss(similarity: torch.Tensor, temperature, label_smoothing: float = 0.0) -> torch.Tensor:
    """Symmetric InfoNCE over a ``[B, B]`` similarity matrix with the positives on its diagonal:

        L = 1/2 [ CE(S / tau, diag) + CE(S^T / tau, diag) ]   (in-batch negatives, both directions)
    """
    logits = similarity / temperature
    labels = torch.arange(len(similarity), device=similarity.device)
    return 0.5 * (F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
                  + F.cross_entropy(logits.T, labels, label_smoothing=label_smoothing))


def hard_negatives(similarity: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """ITM's hard negatives (BLIP-2): for each item i a text j != i drawn with probability softmax_j S(i, j), and
    for each text j an item i != j drawn with probability softmax_i S(i, j). Returns ``(text for each item, item
    for each text)``."""
    eye = torch.eye(len(similarity), dtype=torch.bool, device=similarity.device)
    weights_i2t = similarity.detach().float().softmax(1).masked_fill(eye, 0.0) + 1e-12 * ~eye
    weights_t2i = similarity.detach().float().softmax(0).masked_fill(eye, 0.0).T + 1e-12 * ~eye
    texts = torch.multinomial(weights_i2t.cpu(), 1, generator=generator).squeeze(1)
    items = torch.multinomial(weights_t2i.cpu(), 1, generator=generator).squeeze(1)
    return texts.to(similarity.device), items.to(similarity.device)


def itm_loss(positive_logits: torch.Tensor, negative_logits: torch.Tensor) -> torch.Tensor:
    """Binary match cross-entropy: ``positive_logits [P, 2]`` labelled 1 (match), ``negative_logits [Q, 2]`` 0."""
    logits = torch.cat([positive_logits, negative_logits])
    labels = torch.cat([torch.ones(len(positive_logits)), torch.zeros(len(negative_logits))]).long()
    return F.cross_entropy(logits.float(), labels.to(logits.device))


def itg_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Item-grounded text generation: mean cross-entropy of each real token t >= 1 given the text state at t - 1.
    ``logits``: ``[T, V]`` for the T positions that predict a token (``mask[:, 1:]``, row-major), as
    :func:`itg_positions` selects them (the vocabulary projection runs on those rows only)."""
    return F.cross_entropy(logits.float(), ids[:, 1:][mask[:, 1:].bool()])


def itg_positions(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[T, H]``: the text states ``hidden [B, L, H]`` at positions t - 1 of every real token t >= 1."""
    return hidden[:, :-1][mask[:, 1:].bool()]


# ------------------------------------------------------------------------------------------------ batches
class SlotExample(NamedTuple):
    tokens: list[int]
    targets: list[int]  # 1 on response tokens
    slot_flags: list[int]  # 1 on positions that receive soft tokens
    slots: list[tuple[int, int]]  # (kind, id) of each slot, in order of appearance


@dataclass
class SlotBatch:
    """Right-padded prompts whose slot positions receive soft tokens; ``slot_kinds/slot_ids`` list the slots
    row by row in order of appearance (the order ``masked_scatter`` fills the flagged positions)."""

    ids: torch.Tensor
    mask: torch.Tensor
    targets: torch.Tensor
    slot_flags: torch.Tensor
    slot_kinds: torch.Tensor
    slot_ids: torch.Tensor

    @classmethod
    def build(cls, examples: list[SlotExample], pad: int, device=None, left: bool = False) -> "SlotBatch":
        ids, mask = pad_sequences([e.tokens for e in examples], pad, left=left, device=device)
        targets, _ = pad_sequences([e.targets for e in examples], 0, left=left, device=device)
        flags, _ = pad_sequences([e.slot_flags for e in examples], 0, left=left, device=device)
        slots = [slot for e in examples for slot in e.slots]
        kinds = torch.tensor([k for k, _ in slots], dtype=torch.long, device=device)
        entity = torch.tensor([i for _, i in slots], dtype=torch.long, device=device)
        return cls(ids, mask, targets, flags.bool(), kinds, entity)

    def to(self, device) -> "SlotBatch":
        return SlotBatch(*(t.to(device) for t in (self.ids, self.mask, self.targets, self.slot_flags,
                                                   self.slot_kinds, self.slot_ids)))


class SlotExampleBatches(ExampleBatches):
    def __iter__(self):
        for rows in self.batches:
            yield SlotBatch.build([self.examples[i] for i in rows], self.pad)


@dataclass
class PhaseOneBatch:
    kind: str  # "text": items and their texts; "item_item" / "user_item": contrastive pairs
    left: torch.Tensor  # item ids ("text", "item_item") or user ids ("user_item")
    right: torch.Tensor | None = None  # the paired item ids
    text_ids: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    seed: int = 0  # of this batch's ITM negatives

    def to(self, device) -> "PhaseOneBatch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PhaseOneBatch(self.kind, move(self.left), move(self.right), move(self.text_ids), move(self.text_mask),
                             self.seed)


class PhaseOneBatches:
    """One phase-1 epoch: the text of every item with a training interaction once, in batches, each followed by an
    item-item and a user-item batch (when their losses are on), drawn afresh; a list-like for the trainer. Items
    without interactions are left out: they share one stand-in vector, which no text can be told apart by."""

    def __init__(self, model: "ILM", epoch: int):
        self.model, self.epoch = model, epoch
        size = model.phase_one_batch_size
        rng = np.random.default_rng([model.seed, epoch, 1])
        items = rng.permutation(model.warm_items)
        if len(items) % size == 1:
            items = items[:-1]  # a one-item batch has no in-batch negative
        self.text_batches = [items[i: i + size] for i in range(0, len(items), size)]
        kinds = ["text"] + [kind for kind, loss in (("item_item", "iic"), ("user_item", "uic"))
                            if model.phase_one_weights.get(loss, 0) > 0 and len(model.pairs[kind]) > 1]
        if not any(model.phase_one_weights.get(loss, 0) > 0 for loss in ("itc", "itm", "itg")):
            kinds.remove("text")
        self.kinds = kinds
        self.pair_draws = {kind: rng.integers(0, len(model.pairs[kind]), size=(len(self.text_batches), size))
                           for kind in kinds if kind != "text"}

    def __len__(self):
        return len(self.text_batches) * len(self.kinds)

    def __iter__(self):
        for step, items in enumerate(self.text_batches):
            for kind in self.kinds:
                if kind == "text":
                    ids, mask = pad_sequences([self.model.phase_one_text[i] for i in items], self.model.text_pad)
                    yield PhaseOneBatch("text", torch.as_tensor(items), text_ids=ids, text_mask=mask,
                                        seed=row_seed(self.model.seed, "itm", self.epoch, step))
                else:
                    pairs = self.model.pairs[kind][self.pair_draws[kind][step]]
                    yield PhaseOneBatch(kind, torch.as_tensor(pairs[:, 0]), torch.as_tensor(pairs[:, 1]))


# ------------------------------------------------------------------------------------------------ trainer
class ILMTrainer(LLMTrainer):
    """LLMTrainer with ILM's phase 1 before RecBole's epochs (which are phase 2).

    Phase 1 runs ``ilm_phase1_epochs`` epochs of :class:`PhaseOneBatches` at ``ilm_phase1_lr`` (constant), cached
    in ``<checkpoint_dir>/ILM-<dataset>-phase1-<fingerprint>`` (keyed by everything but the phase-2 keys) after each
    epoch with its optimizer, so an interrupted phase 1 resumes at the next epoch and a finished one is loaded by
    every run that shares it. Phase 2 then starts with a fresh optimizer. ``ilm_phase1: False`` skips it (ILM-rand);
    the MLP adaptor has no Q-Former to pretrain.
    """

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        if self.model.runs_phase_one:
            self._phase_one(show_progress)
        return super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)

    def phase_one_dir(self) -> Path:
        fingerprint = run_fingerprint(self.config, ignore=PHASE_TWO_KEYS)
        return Path(self.checkpoint_dir) / f"ILM-{self.config['dataset']}-phase1-{fingerprint}"

    def _phase_one(self, show_progress: bool) -> None:
        folder = self.phase_one_dir()
        with exclusive(folder, "ILM's phase 1"):
            meta = read_meta(folder) if (folder / META).is_file() else None
            if meta is not None and meta.get("stage") == "phase1" and meta.get("finished"):
                load_weights(folder, self.model)
                self.logger.info(set_color("Phase 1", "blue") + f": loaded cached weights from {folder}")
                return
            self.optimizer = self._build_optimizer(learning_rate=float(self.config["ilm_phase1_lr"]))
            start = 0
            if meta is not None and meta.get("stage") == "phase1":
                load_weights(folder, self.model)
                load_optimizer(folder, self.model, self.optimizer)
                start = int(meta["epoch"]) + 1
                self.logger.info(set_color("Phase 1", "blue") + f": resuming after epoch {meta['epoch']} ({folder})")
            epochs = int(self.config["ilm_phase1_epochs"])
            for epoch in range(start, epochs):
                batches = PhaseOneBatches(self.model, epoch)
                loss = self._train_epoch(batches, epoch, loss_func=self.model.phase_one_loss,
                                         show_progress=show_progress)
                self.logger.info(set_color("Phase 1", "blue") + f": epoch {epoch} loss {loss:.4f}, "
                                 f"{len(batches)} batches ({', '.join(batches.kinds)})")
                self._write_checkpoint(folder, self._meta(epoch, stage="phase1", finished=epoch + 1 == epochs,
                                                          phase1_loss=loss), self.optimizer)
        self.optimizer = self._build_optimizer()  # phase 2 starts with fresh optimizer state


# -------------------------------------------------------------------------------------------------- model
@register_model(trainer=ILMTrainer)
class ILM(BeamRanking, SequentialRecommender):
    r"""ILM: a frozen LLM that reads users and items as Q-Former soft tokens and writes item titles.

    Phase 1 (no LLM; METHODS.md §4.3), loss weights ``ilm_phase1_losses``:

    * ITC: S(i, j) = max_n cos(q_{i,n}, t_j) between item i's query features and text j's [CLS] feature, symmetric
      InfoNCE with a learnable temperature tau (init 0.07);
    * ITM: a binary head on the mean of the query outputs of a joint (bidirectional) pass; hard negatives drawn
      from softmax(S) with the diagonal masked;
    * ITG: the item's text generated from the queries under the multimodal causal mask ([CLS] -> [DEC]);
    * IIC: items consumed consecutively by a user as positives, in-batch negatives, S = max over query pairs;
    * UIC: a user's vector against an item the user rated >= ``ilm_uic_min_rating``, the same loss.

    Phase 2 (METHODS.md §4.4): the LLM frozen; tasks ``sequential`` (user and history slots -> the next item's
    title), ``item`` (item slot -> its title and genres), ``user`` (user slot -> the title of an item the user
    liked); loss on the responses only; only the Q-Former and the projection train.

    Scoring: beam search constrained to the catalogue's titles (:mod:`recbole_llm.llm.token_trie`; two items with
    one title get their item token appended), the beams' items score their log-probabilities, others -inf.

    NOTE: the paper's PaLM-2 is any Hugging Face causal LM here (the bundled SmolLM2-135M by default) and its prompts
    go through the model's chat template; the paper's BERT-base Q-Former is any BERT checkpoint (the bundled
    all-MiniLM-L6-v2 by default: 6 layers of width 384, not the paper's 8 of 768); one CF vector becomes
    ``ilm_encoder_tokens`` encoder states by a linear map (the paper does not say how the vector is fed). ILM's
    comparisons are switches: ``ilm_adaptor: mlp`` (CoLLM-style MLP instead of the Q-Former) and ``ilm_phase1:
    False`` (ILM-rand).
    """

    input_type = InputType.POINTWISE
    backbone_modules = ("llm",)

    @staticmethod
    def input_backbones(config) -> dict[str, str]:
        """The Q-Former's BERT checkpoint shapes every result: its content is part of each fingerprint."""
        if config["ilm_adaptor"] != "qformer":
            return {}
        return {"qformer": str(config["ilm_qformer_path"] or minilm_dir())}

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.adaptor = config["ilm_adaptor"]
        self.n_queries = int(config["ilm_queries"])
        self.phase_one_weights = {k: float(v) for k, v in dict(config["ilm_phase1_losses"]).items()}
        self.phase_one_batch_size = int(config["ilm_phase1_batch_size"])
        self.runs_phase_one = bool(config["ilm_phase1"]) and self.adaptor == "qformer"
        self.task_weights = {k: float(v) for k, v in dict(config["ilm_task_weights"]).items()}
        self.history_titles = bool(config["ilm_history_titles"])
        self.max_history_items = min(int(config["max_history_items"]), self.max_seq_length)
        self.max_item_tokens = int(config["max_item_tokens"])
        self.beams = int(config["ilm_beams"])
        self.generation_batch_size = int(config["generation_batch_size"])
        self.train_batch_size = int(config["train_batch_size"])
        self.seed = int(config["seed"] or 0)
        self.setup_beam_ranking(config, dataset, "ilm_beams")

        # collaborative vectors (rebuilt from their cache, never saved in a checkpoint)
        cf = collaborative_vectors(
            config, dataset, model=config["ilm_cf_model"], vectors=config["ilm_cf_vectors"],
            item_table=config["ilm_cf_item_table"], user_table=config["ilm_cf_user_table"],
            epochs=int(config["ilm_cf_epochs"]), settings=dict(config["ilm_cf_settings"] or {}))
        if cf.users is None:
            raise SettingError(f"ilm_cf_model={config['ilm_cf_model']} has no user embedding table named "
                               f"{config['ilm_cf_user_table']!r}: ILM reads users as vectors too; use a model with "
                               "user and item tables, e.g. --ilm_cf_model=BPR")
        self.register_buffer("cf_items", regress_cold_items(cf.items, cf.cold_items), persistent=False)
        self.register_buffer("cf_users", cf.users, persistent=False)
        self.cold_items = int(cf.cold_items.sum())
        self.warm_items = np.flatnonzero(~cf.cold_items[1:].numpy()) + 1  # items with a training interaction

        self.llm, self.tokenizer = backbone_from_config(config, frozen=True)
        llm_hidden = self.llm.get_input_embeddings().embedding_dim
        cf_dim = cf.items.shape[1]
        if self.adaptor == "qformer":
            self.qformer, self.text_tokenizer = load_item_qformer(
                config["ilm_qformer_path"] or minilm_dir(), cf_dim=cf_dim, n_queries=self.n_queries,
                encoder_tokens=int(config["ilm_encoder_tokens"]), layers=int(config["ilm_qformer_layers"]),
                init=config["ilm_qformer_init"], seed=self.seed)
            hidden, itc_dim = self.qformer.hidden_size, int(config["ilm_itc_dim"])
            self.projection = nn.Linear(hidden, llm_hidden)
            self.itc_query = nn.Linear(hidden, itc_dim)
            self.itc_text = nn.Linear(hidden, itc_dim)
            self.itm_head = nn.Linear(hidden, 2)
            self.log_temperature = nn.Parameter(torch.tensor(math.log(0.07)))
        else:  # CoLLM-style: CF vector -> Linear -> ReLU -> Linear -> N soft tokens
            width = int(config["ilm_mlp_hidden"])
            self.mlp = nn.Sequential(nn.Linear(cf_dim, width), nn.ReLU(), nn.Linear(width, self.n_queries * llm_hidden))

        self._item_text(config, dataset)
        self._prepare_prompts()
        self._training_data(config, dataset)
        self.last_task_counts = None

    # ------------------------------------------------------------------------------------------- item text
    def _item_text(self, config, dataset) -> None:
        builder = ItemTextBuilder.from_config(config)
        rows = builder.records(dataset)
        self.item_texts = builder.texts(rows)
        fields = dict(config["item_text_fields"] or {})
        if fields:
            first = next(iter(fields.values()))
            titles = ItemTextBuilder(fields={"t": first}, template="{%s}" % first).texts(rows)
        else:
            titles = list(self.item_texts)
        self.titles = disambiguated_titles(titles, list(dataset.field2id_token[dataset.iid_field]))
        if self.adaptor == "qformer":
            encoded = self.text_tokenizer(self.item_texts, truncation=True,
                                          max_length=int(config["ilm_phase1_text_tokens"])).input_ids
            self.phase_one_text = encoded
            self.text_pad = self.text_tokenizer.pad_token_id
            self.decoder_token = self.text_tokenizer.convert_tokens_to_ids(DECODER_TOKEN)

    def _prepare_prompts(self) -> None:
        encode = lambda text: self.tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
        self.encode = encode
        self.eos, self.pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        self.title_tokens = [[]] + [encode(title) for title in self.titles[1:]]
        self.text_tokens = [[]] + [encode(text)[: self.max_item_tokens] for text in self.item_texts[1:]]
        self.separator = encode(",")
        self.trie = TokenTrie(self.title_tokens[1:], end_token=self.eos)  # trie rows are items 1..n-1
        self.frame = chat_frame(self.tokenizer)
        self.templates = {name: self._split(template, self.frame) for name, template in TEMPLATES.items()}

    def _split(self, template: str, frame: tuple[str, str]) -> tuple[list[list[int]], list[str]]:
        """A template's token pieces around its slots (the chat frame around the whole), and the slot names."""
        parts = SLOT.split(template)
        texts, names = parts[0::2], parts[1::2]
        texts[0], texts[-1] = frame[0] + texts[0], texts[-1] + frame[1]
        return [self.encode(text) for text in texts], names

    # ----------------------------------------------------------------------------------------------- prompts
    def _slot(self, kind: int, entity: int):
        return [self.pad] * self.n_queries, [1] * self.n_queries, [(kind, entity)]

    def render(self, pieces_and_names, *, user: int | None = None, items=(), history=()) -> SlotExample:
        """A prompt as tokens and slots: ``{user}`` the user's soft tokens, ``{item}`` the next of ``items``,
        ``{history}`` each history item's (``ilm_history_titles``: followed by its title), comma-separated."""
        pieces, names = pieces_and_names
        tokens, flags, slots = list(pieces[0]), [0] * len(pieces[0]), []
        queue = list(items)

        def add(part):
            tokens.extend(part[0])
            flags.extend(part[1])
            slots.extend(part[2])

        for name, piece in zip(names, pieces[1:]):
            if name == "user":
                add(self._slot(USER_SLOT, int(user)))
            elif name == "item":
                add(self._slot(ITEM_SLOT, int(queue.pop(0))))
            else:
                for position, item in enumerate(history):
                    if position:
                        add((self.separator, [0] * len(self.separator), []))
                    add(self._slot(ITEM_SLOT, int(item)))
                    if self.history_titles:
                        title = self.encode(" " + self.titles[item])
                        add((title, [0] * len(title), []))
            add((piece, [0] * len(piece), []))
        return SlotExample(tokens, [0] * len(tokens), flags, slots)

    @staticmethod
    def with_response(prompt: SlotExample, response: list[int]) -> SlotExample:
        return SlotExample(prompt.tokens + response, prompt.targets + [1] * len(response),
                           prompt.slot_flags + [0] * len(response), prompt.slots)

    def sequential_prompt(self, user: int, history: list[int]) -> SlotExample:
        return self.render(self.templates["sequential"], user=user,
                           history=last_items(history, self.max_history_items))

    # ------------------------------------------------------------------------------------------- soft tokens
    def slot_embeddings(self, kinds: torch.Tensor, entities: torch.Tensor) -> torch.Tensor:
        """``[S, N, H_llm]``: the soft tokens of S slots (kind ITEM_SLOT / USER_SLOT, entity id)."""
        cf = torch.zeros(len(kinds), self.cf_items.shape[1], device=self.cf_items.device)
        is_user = kinds == USER_SLOT
        cf[~is_user] = self.cf_items[entities[~is_user]]
        cf[is_user] = self.cf_users[entities[is_user]]
        if self.adaptor == "qformer":
            return self.projection(self.qformer.encode_queries(cf))
        return self.mlp(cf).view(len(cf), self.n_queries, -1)

    def input_embeddings(self, batch: SlotBatch) -> torch.Tensor:
        """The LLM's input embeddings of ``batch`` with every slot position overwritten by its soft token (one
        ``masked_scatter`` for the batch: slots fill the flagged positions row by row, in order)."""
        embeds = self.llm.get_input_embeddings()(batch.ids)
        if len(batch.slot_ids) == 0:
            return embeds
        soft = self.slot_embeddings(batch.slot_kinds, batch.slot_ids).to(embeds.dtype)
        return embeds.masked_scatter(batch.slot_flags.unsqueeze(-1), soft)

    def train(self, mode: bool = True):
        super().train(mode)
        self.llm.eval()  # the frozen LLM never runs in training mode (no dropout)
        return self

    # ----------------------------------------------------------------------------------------------- phase 1
    def _training_data(self, config, dataset) -> None:
        self.sequences = list(user_sequences(dataset).items())
        self._known_items = dict(self.sequences)
        self.user_tokens = list(dataset.field2id_token[dataset.uid_field])
        self.item_tokens = list(dataset.field2id_token[dataset.iid_field])
        self.positions = np.array([(u, p) for u, (_, seq) in enumerate(self.sequences) for p in range(1, len(seq))])
        item_item = [(seq[p - 1], seq[p]) for _, seq in self.sequences for p in range(1, len(seq))]
        self.pairs = {"item_item": np.array(item_item, dtype=np.int64).reshape(-1, 2),
                      "user_item": liked_interactions(dataset, [(u, i) for u, seq in self.sequences for i in seq],
                                                      config["RATING_FIELD"], float(config["ilm_uic_min_rating"]))}

    def user_history(self, user: int) -> list[int]:
        """The user's items of the training split, in time order (what the model knows of the user)."""
        return list(self._known_items.get(user, []))

    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp().clamp(0.001, 0.5)

    def query_features(self, cf: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.itc_query(self.qformer.encode_queries(cf)), dim=-1)

    def phase_one_loss(self, batch: PhaseOneBatch) -> torch.Tensor:
        if batch.kind == "text":
            return self.item_text_loss(batch)
        left = self.cf_users[batch.left] if batch.kind == "user_item" else self.cf_items[batch.left]
        weight = self.phase_one_weights["uic" if batch.kind == "user_item" else "iic"]
        similarity = pair_similarity(self.query_features(left), self.query_features(self.cf_items[batch.right]))
        return weight * contrastive_loss(similarity, self.temperature())

    def item_text_loss(self, batch: PhaseOneBatch) -> torch.Tensor:
        """w_itc ITC + w_itm ITM + w_itg ITG of one batch of items and their texts (see the class docstring)."""
        w = self.phase_one_weights
        cf = self.cf_items[batch.left]
        ids, mask = batch.text_ids, batch.text_mask
        loss = torch.zeros((), device=cf.device)
        similarity = None
        if w.get("itc", 0) > 0 or w.get("itm", 0) > 0:
            texts = F.normalize(self.itc_text(self.qformer.encode_text(ids, mask)[:, 0]), dim=-1)
            similarity = max_query_similarity(self.query_features(cf), texts)
            if w.get("itc", 0) > 0:
                loss = loss + w["itc"] * contrastive_loss(similarity, self.temperature())
        if w.get("itm", 0) > 0:
            generator = torch.Generator().manual_seed(batch.seed)
            negative_text, negative_item = hard_negatives(similarity, generator)
            match = lambda c, i, m: self.itm_head(  # noqa: E731
                self.qformer.joint(c, i, m, "bidirectional")[:, : self.n_queries]).mean(1)
            loss = loss + w["itm"] * itm_loss(
                match(cf, ids, mask),
                torch.cat([match(cf, ids[negative_text], mask[negative_text]), match(cf[negative_item], ids, mask)]))
        if w.get("itg", 0) > 0:
            decoder_ids = ids.clone()
            decoder_ids[:, 0] = self.decoder_token
            hidden = self.qformer.joint(cf, decoder_ids, mask, "causal")[:, self.n_queries:]
            logits = self.qformer.text_logits(itg_positions(hidden, mask))
            loss = loss + w["itg"] * itg_loss(logits, decoder_ids, mask)
        return loss

    # ----------------------------------------------------------------------------------------------- phase 2
    def epoch_batches(self, train_dataset, epoch: int) -> SlotExampleBatches:
        rng = np.random.default_rng([self.seed, epoch])
        examples, counts = [], {}
        n_targets = len(self.positions)
        for task in ILM_TASKS:
            n = round(self.task_weights.get(task, 0.0) * n_targets)
            if n <= 0:
                continue
            made = getattr(self, f"_{task}_examples")(rng, n)
            counts[task] = len(made)
            examples += made
        if not examples:
            raise SettingError("ilm_task_weights give no training examples; set a positive weight for a task")
        batches = SlotExampleBatches(examples, self.train_batch_size, self.pad, seed=self.seed + epoch)
        batches.counts = self.last_task_counts = counts
        return batches

    def _sequential_examples(self, rng, n):
        chosen = rng.choice(len(self.positions), size=min(n, len(self.positions)), replace=False)
        out = []
        for u, p in self.positions[chosen]:
            user, sequence = self.sequences[u]
            target = sequence[p]
            out.append(self.with_response(self.sequential_prompt(user, sequence[:p]),
                                          self.title_tokens[target] + [self.eos]))
        return out

    def _item_examples(self, rng, n):
        return [self.with_response(self.render(self.templates["item"], items=[item]),
                                   self.text_tokens[item] + [self.eos])
                for item in rng.integers(1, self.n_items, size=n).tolist()]

    def _user_examples(self, rng, n):
        pairs = self.pairs["user_item"]
        if not len(pairs):
            return []
        return [self.with_response(self.render(self.templates["user"], user=user), self.title_tokens[item] + [self.eos])
                for user, item in pairs[rng.integers(0, len(pairs), size=n)].tolist()]

    def batch_loss(self, batch: SlotBatch) -> torch.Tensor:
        """Mean cross-entropy of the response tokens, the soft tokens written into the frozen LLM's inputs."""
        self.last_batch_tokens, self.last_batch_predictions = int(batch.mask.sum()), predicted_positions(batch)
        self.last_batch_targets = len(batch.ids)  # one response (a next item, an item's text, a liked item) each
        return response_token_losses(self.llm, batch, inputs_embeds=self.input_embeddings(batch)).mean()

    def calculate_loss(self, interaction):
        """The sequential task on RecBole's training rows (the trainer uses :meth:`epoch_batches`)."""
        examples = [self.with_response(self.sequential_prompt(u, h), self.title_tokens[t] + [self.eos])
                    for u, h, t in zip(interaction[self.USER_ID].tolist(), self._histories(interaction),
                                       interaction[self.POS_ITEM_ID].tolist())]
        return self.batch_loss(SlotBatch.build(examples, self.pad, self.device))

    # ----------------------------------------------------------------------------------------------- scoring
    @torch.no_grad()
    def generate_titles(self, prompts: list[SlotExample], banned: torch.Tensor | None = None, beams: int | None = None):
        """The ``beams`` best catalogue titles after each prompt: ``(item ids [B, K], log-probabilities [B, K])``."""
        beams = beams or self.beams
        batch = SlotBatch.build(prompts, self.pad, self.device, left=True)
        self.trie.to(self.device)
        processor = TrieConstrainedLogitsProcessor(self.trie, batch.ids.shape[1], self.eos,
                                                   banned=banned[:, 1:] if banned is not None else None)
        found = beam_search(self.llm, batch.ids, batch.mask, num_beams=beams, max_new_tokens=self.trie.max_length,
                            logits_processor=processor, eos_token_id=self.eos,
                            inputs_embeds=self.input_embeddings(batch))
        items = self.trie.items(found.tokens.flatten(0, 1))
        return torch.where(items >= 0, items + 1, -1).view(found.scores.shape), found.scores

    def beam_items(self, users: list[int], histories: list[list[int]], banned: torch.Tensor | None = None):
        """:class:`BeamRanking`'s hook: the next-item titles after each user's sequential prompt."""
        return self.generate_titles([self.sequential_prompt(u, h) for u, h in zip(users, histories)], banned)

    def run_report(self) -> dict:
        return {"tasks": self.last_task_counts, "cold_items": self.cold_items, "adaptor": self.adaptor,
                "phase1": self.runs_phase_one}


def liked_interactions(dataset, interactions: list[tuple[int, int]], rating_field: str | None,
                       min_rating: float) -> np.ndarray:
    """``[M, 2]``: the (user id, item id) ``interactions`` whose rating in the raw ``.inter`` file is at least
    ``min_rating`` (UIC's positives). The raw file is read because RecBole normalises float fields in place
    (``normalize_all``: ml-100k's ratings become 0..1); without a rating column every interaction counts."""
    import pandas as pd

    pairs = np.array(interactions, dtype=np.int64).reshape(-1, 2)
    source = Path(dataset.dataset_path) / f"{dataset.dataset_name}.inter"
    header = pd.read_csv(source, sep="\t", nrows=0).columns
    columns = {name.split(":")[0]: name for name in header}
    if not rating_field or rating_field not in columns:
        return pairs
    raw = pd.read_csv(source, sep="\t", dtype=str, usecols=[columns[dataset.uid_field], columns[dataset.iid_field],
                                                             columns[rating_field]])
    raw.columns = ["user", "item", "rating"]
    raw["rating"] = raw["rating"].astype(float)
    best = raw.groupby(["user", "item"])["rating"].max()
    liked = set(best[best >= min_rating].index)
    user_tokens = dataset.field2id_token[dataset.uid_field]
    item_tokens = dataset.field2id_token[dataset.iid_field]
    keep = np.array([(user_tokens[u], item_tokens[i]) in liked for u, i in pairs.tolist()], dtype=bool)
    return pairs[keep] if len(pairs) else pairs


def disambiguated_titles(titles: list[str], item_tokens: list[str]) -> list[str]:
    """``titles`` with every title that two items share suffixed by the item's token (``Heat [item 2481]``), so
    the title trie names one item per title. Index 0 (RecBole's padding item) is kept as it is."""
    counts: dict[str, int] = {}
    for title in titles[1:]:
        counts[title] = counts.get(title, 0) + 1
    return titles[:1] + [f"{title} [item {token}]" if counts[title] > 1 else title
                         for title, token in zip(titles[1:], item_tokens[1:])]
