r"""RALLRec
################################################

Reference:
    Jian Xu et al. "RALLRec: Improving Retrieval Augmented Large Language Model Recommendation with
    Representation Learning." WWW 2025 (companion), arXiv:2502.06101. Official code by JianXu95 (a ReLLa fork);
    ../shared/METHODS.md §2 has its prompts, retrieval and reranking rules, each tagged with its source.

CTR prediction by an LLM: "will the user like this item? Yes/No", scored as P(Yes). The prompt shows the user's
earlier items that matter most for the target, found by similarity in a joint item representation (the LLM's
embedding of an LLM-written item description, collaborative LightGCN vectors, and a text view aligned with the
collaborative one by self-supervision) and reranked for recency; LoRA tunes the LLM on a few thousand prompts.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType
from safetensors.torch import load_file, save_file
from torch import nn

from recbole_llm.collaborative import collaborative_vectors, regress_cold_items
from recbole_llm.cache import cache_root, minilm_dir, write_dir_atomically
from recbole_llm.data.item_text import ItemTextBuilder, read_item_table
from recbole_llm.errors import InputFileError
from recbole_llm.llm.backbone import autocast, autocast_dtype, backbone_from_config
from recbole_llm.locks import build_once
from recbole_llm.llm.descriptions import Decoding, chat_prompt, generation_key, write_texts
from recbole_llm.llm.examples import ExampleBatches, TokenBatch, example, predicted_positions, response_token_losses
from recbole_llm.llm.generation import pad_sequences
from recbole_llm.llm.pooling import decoder_and_head, last_positions, masked_mean, mean_pooled_embeddings
from recbole_llm.losses import info_nce
from recbole_llm.registry import register_model
from recbole_llm.settings import SettingError
from recbole_llm.retrieval.history import history_similarity, select_history
from recbole_llm.fingerprint import backbone_fingerprint
from recbole_llm.trainer.llm_trainer import LLMTrainer

logger = logging.getLogger(__name__)

# [CODE rag/get_text_description.py] (the typo "asistant" is the official code's)
DESCRIPTION_SYSTEM = "You are a friendly and helpful asistant who always responds to the query from users"
_AFTER_ASPECTS = "\n\nKeep the description under 80 words.\n\nPlease only return the description."
# [CODE inference system message, prompts/load_prompt_*.py]
SYSTEM = "You are a friendly and helpful assistant who always responds to the query from users."


@dataclass(frozen=True)
class Domain:
    """The wording of RALLRec's prompts for one kind of item (``item_domain`` of the dataset's YAML).

    ``movie`` and ``book`` are the official code's prompts (METHODS.md §2.2, §2.7), with the book description's
    ISBN / author / publisher sentence replaced by the dataset's own second item field; ``product`` and the
    neutral default ``item`` (a dataset that names no domain) are the movie prompts with the film-specific
    wording taken out (the paper has no such variant)."""

    item: str  # "movie"
    items: str  # "movies"
    consumed: str  # "watched": the past tense in "The user watched the following movies"
    description: str  # format with {title}, {label} (the second item field's label, lower case), {value}
    plain: str  # ReLLa's fixed sentence, the same slots


DOMAINS = {
    "movie": Domain("movie", "movies", "watched", (
        "Write a concise and informative description of the film {title} whose genre is {value}, with "
        "consideration of the following aspects:\n\nThe brief plot overview (without major spoilers).\nThe main "
        "themes and genre.\nThe setting or historical context.\nKey characters and the actors who portray them.\n"
        "The film's director and any notable stylistic elements.\nThe overall tone and mood of the film.\nIts "
        "cultural impact or deeper meaning, if applicable. " + _AFTER_ASPECTS),
        "Here is a movie. Its title is {title}. The movie's genre is {value}."),
    "book": Domain("book", "books", "read", (
        "Write a concise and informative description of the book {title}. Its {label} is {value}. The description "
        "could include the following details:\n\n- A brief plot overview (without major spoilers).\n- The main "
        "themes and genre.\n- The setting or historical context.\n- Key characters and their roles.\n- The "
        "author's name and any notable stylistic elements.\n- The overall tone and style of the writing.\n- Any "
        "cultural or literary impact, if applicable.\n- Basic publication details of year and publisher. "
        + _AFTER_ASPECTS),
        "Here is a book. Its title is {title}. The book's {label} is {value}."),
    "product": Domain("product", "products", "bought", (
        "Write a concise and informative description of the product {title} whose {label} is {value}, with "
        "consideration of the following aspects:\n\nWhat the product is and what it is used for.\nIts main "
        "features and category.\nWho it is made for.\nThe brand or maker and any notable qualities.\nIts overall "
        "quality and reputation, if known. " + _AFTER_ASPECTS),
        "Here is a product. Its title is {title}. The product's {label} is {value}."),
    "item": Domain("item", "items", "interacted with", (
        "Write a concise and informative description of the item {title} whose {label} is {value}, with "
        "consideration of the following aspects:\n\nWhat the item is.\nIts main characteristics and category.\n"
        "Who would enjoy it.\nIts overall character and any notable qualities. " + _AFTER_ASPECTS),
        "Here is an item. Its title is {title}. The item's {label} is {value}."),
}
HISTORY_HEADS = {"rerank": "relevant {items}", "high": "most relevant {items}", "sequential": "{items} in order",
                 "simple": "{items} in order"}
EMBEDDINGS = ("mix3", "text", "colla", "ssl")


# ------------------------------------------------------------------------------------ representations
def pca(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Principal components of the rows of ``x`` (centred), ``[N, min(dim, N, D)]``; deterministic (SVD)."""
    centred = x.double() - x.double().mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    out = centred @ v[: min(dim, v.shape[0])].T
    # a fixed sign per component (SVD's is arbitrary): the largest-magnitude entry is positive
    signs = torch.sign(out.gather(0, out.abs().argmax(0, keepdim=True)))
    return (out * signs).float()


def max_norm_scaled(x: torch.Tensor) -> torch.Tensor:
    """``x`` divided by its largest row norm (the official mixture's per-view scaling, not per-row L2)."""
    return x / x.norm(dim=1).max().clamp(min=1e-12)


class Projector(nn.Sequential):
    """Two-layer MLP from the text view to the collaborative space (RALLRec §2.4)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))


def align_views(text: torch.Tensor, colla: torch.Tensor, *, hidden: int = 256, tau: float = 0.1,
                epochs: int = 100, lr: float = 1e-3, batch_size: int = 1024, seed: int = 0):
    """Self-supervised alignment of the text view with the (frozen) collaborative view: a projector trained with
    symmetric InfoNCE (positive pair: the same item; in-batch negatives). Returns ``(normalize(projector(text)),
    losses per epoch)``, the "ssl" view of the mixture."""
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projector = Projector(text.shape[1], hidden, colla.shape[1])
    optimizer = torch.optim.Adam(projector.parameters(), lr=lr)
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(text), generator=generator)
        total = 0.0
        for start in range(0, len(order), batch_size):
            rows = order[start: start + batch_size]
            if len(rows) < 2:
                continue
            loss = info_nce(projector(text[rows]), colla[rows], tau, symmetric=True)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
        losses.append(total / len(order))
    with torch.no_grad():
        return F.normalize(projector(text), dim=1), losses


@torch.no_grad()
def minilm_embeddings(texts: list[str], batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """The bundled all-MiniLM-L6-v2 sentence embeddings (mean-pooled, L2-normalised, as sentence-transformers)."""
    from tqdm.auto import tqdm
    from transformers import AutoModel, AutoTokenizer

    folder = minilm_dir()
    tokenizer, encoder = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    rows = []
    for start in tqdm(range(0, len(texts), batch_size), desc="MiniLM", disable=not progress, ncols=100):
        batch = tokenizer(texts[start: start + batch_size], padding=True, truncation=True, max_length=256,
                          return_tensors="pt")
        rows.append(F.normalize(masked_mean(encoder(**batch).last_hidden_state, batch["attention_mask"]), dim=1))
    return torch.cat(rows)


def _cached_tensor(file: Path, compute) -> torch.Tensor:
    def build():
        value = compute()
        write_dir_atomically(file.parent, lambda tmp: save_file({"value": value.contiguous()}, tmp / file.name),
                             overwrite=True)

    build_once(file.parent, file.is_file, build, "text embeddings")
    return load_file(file)["value"]


# ------------------------------------------------------------------------------------------------ model
@register_model(trainer=LLMTrainer)
class RALLRec(SequentialRecommender):
    r"""RALLRec: retrieval-augmented LLM CTR prediction with aligned text and collaborative item representations.

    Item representation (computed once, cached): the LLM writes a description of every item (or the plain
    template), the LLM's mean-pooled hidden states embed it (or MiniLM), LightGCN trained on the training split
    gives collaborative vectors, a projector aligns the text view with them by InfoNCE; the mixture is
    PCA-128(text) + LightGCN + aligned text, each scaled by its largest row norm, concatenated (``mix3``).
    Prompt: the user's demographics (when the dataset has them) and K earlier items with their stars, chosen by
    similarity to the target and reranked for recency (:mod:`recbole_llm.retrieval.history`). Score: P(Yes) =
    softmax over the Yes/No logits of the first answer token. Training: LoRA on ``rallrec_train_samples``
    prompts from sampled training rows, each in the paper's three prompt variants, loss on the answer.

    NOTE: LightGCN is trained on the CTR training split only (the official code trains it on every interaction
    but each user's last, so test-period interactions shape its vectors); the SSL projector's settings were not
    published (METHODS.md §2.4 defaults). The retrieval compares each target with its row's own history (one
    batched product), where the official code builds an item x item similarity matrix.
    """

    input_type = InputType.POINTWISE
    backbone_modules = ("llm",)

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        full = [phase for phase, mode in config["eval_args"]["mode"].items() if mode == "full"]
        if full:  # RecBole would fall back to predict() on every (user, item): one LLM prompt per catalogue item
            raise SettingError(
                f"RALLRec scores given (user, item) rows, not the whole catalogue, but eval_args.mode is full for "
                f"{' and '.join(full)}. Use its labeled protocol (the default of properties/model/RALLRec.yaml: "
                "--eval_args=\"{split: {RS: [0.8, 0.1, 0.1]}, order: TO, group_by: ~, mode: labeled}\") or a "
                "sampled one (mode: uni100).")
        self.k = int(config["rallrec_history_k"])
        self.alpha = float(config["rallrec_alpha"])
        self.prompt_selection = config["rallrec_prompt"]
        self.train_prompts = list(config["rallrec_train_prompts"])
        self.train_samples = int(config["rallrec_train_samples"])
        self.train_batch_size = int(config["train_batch_size"])
        self.score_batch_size = int(config["rallrec_score_batch_size"])
        self.seed = int(config["seed"] or 0)
        self.LABEL = config["LABEL_FIELD"]
        threshold = dict(config["threshold"] or {})
        rating_field = next(iter(threshold), None)
        self.RATING_LIST = rating_field + config["LIST_SUFFIX"] if rating_field else None
        self.like_above = (float(next(iter(threshold.values()))) - 1) if threshold else 3
        self.llm, self.tokenizer = backbone_from_config(config)
        self.chat = bool(getattr(self.tokenizer, "chat_template", None))
        self.yes, self.no = self._answer_ids()
        self.eos, self.pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id

        rows = ItemTextBuilder.from_config(config).records(dataset)
        fields = list(dict(config["item_text_fields"] or {}).values())
        title_field = fields[0] if fields else None
        genre_field = fields[1] if len(fields) > 1 else None
        text = lambda row, field: str(row.get(field, "") or "").strip() or "unknown"  # noqa: E731
        self.titles = [""] + [text(row, title_field) for row in rows[1:]]
        self.genres = [""] + [text(row, genre_field) for row in rows[1:]]
        labels = list(dict(config["item_text_fields"] or {}))
        self.domain = DOMAINS[config["item_domain"] or "item"]
        self.attribute = labels[1].lower() if len(labels) > 1 else "category"
        self.users = self._user_profiles(config, dataset)

        self.descriptions = self._descriptions(config, dataset)
        vectors, self.representation_report = self._item_vectors(config, dataset)
        self.register_buffer("item_vectors", vectors)  # [n_items, d], L2-normalised rows
        self._train_examples, self._train_source = None, None
        self.scored_rows, self.scoring_seconds = 0, 0.0

    # ---------------------------------------------------------------------------------------------- inputs
    def _answer_ids(self) -> tuple[int, int]:
        """Token ids of the first answer token "Yes" / "No", derived from the tokenizer, each asserted single."""
        lead = "" if self.chat else " "  # a chat turn starts fresh; the plain format ends with "Answer:"
        ids = []
        for word in ("Yes", "No"):
            tokens = self.tokenizer(lead + word, add_special_tokens=False).input_ids
            if len(tokens) != 1:
                raise SettingError(f"llm_path: the backbone's tokenizer splits the answer {lead + word!r} into {len(tokens)} "
                                 f"tokens {tokens}; RALLRec reads P(Yes) from one token. Use a backbone whose "
                                 "tokenizer has single Yes/No tokens (every common chat model has).")
            ids.append(tokens[0])
        return ids[0], ids[1]

    def _user_profiles(self, config, dataset) -> list[tuple[str, str]]:
        """Per internal user id, ``(demographic sentences, subject)``: ("The user is a male. His job is student.
        His age is 24.", "he"), or ("", "the user") where the dataset has no such fields."""
        fields = dict(config["rallrec_user_fields"] or {})
        source = Path(dataset.dataset_path) / f"{dataset.dataset_name}.user"
        tokens = dataset.field2id_token[dataset.uid_field]
        anonymous = ("", "the user")
        if fields and not source.is_file():
            logger.warning("rallrec_user_fields names %s, but %s has no user file (%s): prompts carry no "
                           "demographics. Add the .user file, or set rallrec_user_fields: ~ for this dataset.",
                           sorted(fields), dataset.dataset_name, source)
        if not fields or not source.is_file():
            return [anonymous] * len(tokens)
        table = read_item_table(source).drop_duplicates(dataset.uid_field).set_index(dataset.uid_field)
        missing = [f for f in fields.values() if f not in table.columns]
        if missing:
            raise InputFileError(f"rallrec_user_fields names {missing}, not columns of {source} ({list(table.columns)})")
        records = table.to_dict("index")
        words = {key: {str(code): str(word) for code, word in codes.items()}
                 for key, codes in dict(config["rallrec_user_values"] or {}).items()}

        def value(row, key):  # the file's value, spelled out where the dataset maps its codes to words
            raw = str(row.get(fields.get(key, ""), "") or "").strip()
            raw = raw[:-2] if raw.endswith(".0") else raw  # "25.0" (a float column) is code 25
            return words.get(key, {}).get(raw, raw)

        profiles = [anonymous]
        for token in tokens[1:]:
            row = records.get(str(token), {})
            noun, subject, possessive = {"M": ("male", "he", "His"), "F": ("female", "she", "Her")}.get(
                value(row, "gender").upper()[:1], (None, "the user", "The user's"))
            parts = [f"The user is a {noun}."] if noun else []
            parts += [f"{possessive} {key} is {value(row, key)}." for key in ("job", "age") if value(row, key)]
            profiles.append((" ".join(parts), subject))
        return profiles

    @staticmethod
    def _backbone_id(config) -> str:
        """What identifies the backbone's outputs in cache keys: its content, dtype and quantization, and the
        precision it computes in here (``llm_dtype: auto`` is bf16 autocast on one machine, fp32 on another)."""
        computes_in = autocast_dtype(config["llm_dtype"] or "auto", config["device"])
        return (f"{backbone_fingerprint(config['llm_path'])}|{config['llm_dtype']}|{config['llm_quantization']}"
                f"|{computes_in}")

    def _cache(self, config) -> Path:
        return Path(config["llm_cache_dir"] or cache_root())

    def _descriptions(self, config, dataset) -> list[str]:
        """One description per item (index 0 empty): written by the LLM (cached, resumable) or the plain template."""
        items = range(1, len(self.titles))
        if config["rallrec_descriptions"] == "template":
            return [""] + [self.domain.plain.format(title=self.titles[i], label=self.attribute, value=self.genres[i])
                           for i in items]
        prompts = [chat_prompt(self.tokenizer, self.domain.description.format(
                                   title=self.titles[i], label=self.attribute, value=self.genres[i]),
                               DESCRIPTION_SYSTEM) for i in items]
        decoding = Decoding(max_new_tokens=int(config["rallrec_description_tokens"]),
                            temperature=float(config["rallrec_description_temperature"]),
                            top_p=float(config["rallrec_description_top_p"]), seed=self.seed,
                            batch_size=int(config["rallrec_description_batch_size"]))
        key = generation_key(self._backbone_id(config), prompts, decoding)
        file = self._cache(config) / "descriptions" / f"{config['dataset']}-{key}.jsonl"
        tokens = [str(t) for t in dataset.field2id_token[dataset.iid_field][1:]]
        with autocast(config["llm_dtype"] or "auto", config["device"]):  # bf16 where the hardware has it
            texts = write_texts(self.llm, self.tokenizer, prompts, tokens, file, decoding,
                                progress=bool(config["show_progress"]))
        return [""] + texts

    def _text_vectors(self, config) -> torch.Tensor:
        """The text view's input: each description's embedding, cached by the texts, the encoder and the version."""
        import recbole_llm

        encoder = config["rallrec_text_encoder"]
        texts = self.descriptions[1:]
        model_id = self._backbone_id(config) if encoder == "llm" else "minilm"
        inputs = [recbole_llm.__version__, encoder, model_id, *texts]
        digest = hashlib.sha256("\0".join(inputs).encode()).hexdigest()[:16]
        file = self._cache(config) / "text_embeddings" / digest / "vectors.safetensors"
        progress = bool(config["show_progress"])
        if encoder == "minilm":
            return _cached_tensor(file, lambda: minilm_embeddings(texts, progress=progress))

        def embed():
            with autocast(config["llm_dtype"] or "auto", config["device"]):
                return mean_pooled_embeddings(self.llm, self.tokenizer, texts, batch_size=16, max_tokens=256,
                                              progress=progress)

        return _cached_tensor(file, embed)

    def _item_vectors(self, config, dataset) -> tuple[torch.Tensor, dict]:
        """The retrieval representation of every item (row 0 zeros), and what went into it."""
        kind = config["rallrec_embedding"]
        report = {"embedding": kind, "descriptions": config["rallrec_descriptions"],
                  "text_encoder": config["rallrec_text_encoder"]}
        text = pca(self._text_vectors(config), int(config["rallrec_pca_dim"]))
        views = {"text": text}
        if kind != "text":
            collaborative = collaborative_vectors(
                config, dataset, model=config["rallrec_cf_model"], vectors=config["rallrec_cf_vectors"],
                item_table=config["rallrec_cf_table"], epochs=int(config["rallrec_cf_epochs"]),
                settings=dict(config["rallrec_cf_settings"] or {}))
            cold = collaborative.cold_items[1:]
            # items no training interaction reached keep a random vector: regressed from the text view instead
            colla = regress_cold_items(collaborative.items[1:], cold, text)
            report["cold_items"] = int(cold.sum())
            views["colla"] = colla
            views["ssl"], losses = align_views(
                text, colla, hidden=int(config["rallrec_ssl_hidden"]), tau=float(config["rallrec_ssl_tau"]),
                epochs=int(config["rallrec_ssl_epochs"]), lr=float(config["rallrec_ssl_lr"]), seed=self.seed)
            report["ssl_loss_first_last"] = [round(losses[0], 4), round(losses[-1], 4)] if losses else None
        parts = [views[name] for name in (("text", "colla", "ssl") if kind == "mix3" else (kind,))]
        mixed = torch.cat([max_norm_scaled(p) for p in parts], dim=1)
        vectors = torch.zeros(len(self.titles), mixed.shape[1])
        vectors[1:] = F.normalize(mixed, dim=1)
        report["dim"] = int(mixed.shape[1])
        return vectors, report

    # --------------------------------------------------------------------------------------------- prompts
    def _item_text(self, item: int, rating: float | None) -> str:
        title = self.titles[item]
        if rating is None:
            return title
        stars = int(round(rating))
        return f"{title} ({stars} star{'' if stars == 1 else 's'})"

    def prompt_text(self, user: int, history: list[int], ratings: list[float] | None, target: int,
                    how: str) -> str:
        """The instruction of METHODS.md §2.7 (RALLRec's ML-1M prompt, in the words of the dataset's
        ``item_domain``; demographics when the dataset has them)."""
        profile, subject, d = *self.users[user], self.domain
        items = [self._item_text(item, ratings[i] if ratings is not None else None) for i, item in enumerate(history)]
        lines = [
            (profile + "\n" if profile else "") + f"{subject[0].upper() + subject[1:]} {d.consumed} the following "
            f"{HISTORY_HEADS[how].format(items=d.items)} in the past, and rated them:",
            str(items),
            f"Note that more stars the user rated the {d.item}, the user liked the {d.item} more.",
            f"And we think the user will like a new {d.item} if the rating could be higher than {self.like_above:g} "
            "stars",
            f"Based on the {d.items} {subject} has {d.consumed}, deduce if {subject} will like the {d.item} "
            f"***{self.titles[target]}***.",
            "You should ONLY tell me yes or no.",
        ]
        text = "\n".join(lines)
        return chat_prompt(self.tokenizer, text, SYSTEM) if self.chat else f"{SYSTEM}\n\n{text}\nAnswer:"

    def select(self, interaction, how: str) -> list[list[int]]:
        """Per row, the history positions its prompt shows, in prompt order (only items before the scored one)."""
        histories, lengths = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
        if how == "simple":
            similarity = torch.zeros(histories.shape, dtype=torch.float32)
        else:
            similarity = history_similarity(self.item_vectors, histories, lengths, interaction[self.ITEM_ID]).cpu()
        return [select_history(s, n, self.k, how, self.alpha) for s, n in zip(similarity.numpy(), lengths.tolist())]

    def prompts(self, interaction, how: str) -> list[list[int]]:
        """Token ids of each row's prompt."""
        positions = self.select(interaction, how)
        histories = interaction[self.ITEM_SEQ].tolist()
        ratings = interaction[self.RATING_LIST].tolist() if self.RATING_LIST in interaction.interaction else None
        users, targets = interaction[self.USER_ID].tolist(), interaction[self.ITEM_ID].tolist()
        texts = [self.prompt_text(users[r], [histories[r][p] for p in chosen],
                                  [ratings[r][p] for p in chosen] if ratings else None, targets[r], how)
                 for r, chosen in enumerate(positions)]
        return self.tokenizer(texts, add_special_tokens=False).input_ids

    # -------------------------------------------------------------------------------------------- training
    def training_examples(self, train_dataset) -> list[tuple[list[int], list[int]]]:
        """The few-shot training set (fixed for the run): ``ceil(N / V)`` seeded training rows, each in the V
        prompt variants (interleaved, as ReLLa's "mixed" file), the first N prompts; answer "Yes"/"No" + EOS."""
        inter = train_dataset.inter_feat
        n_rows = min(len(inter), math.ceil(self.train_samples / len(self.train_prompts)))
        rows = np.sort(np.random.default_rng(self.seed).choice(len(inter), size=n_rows, replace=False))
        examples = [[] for _ in rows]
        for start in range(0, len(rows), 256):
            chunk = inter[torch.from_numpy(rows[start: start + 256])]
            labels = chunk[self.LABEL].tolist()
            for how in self.train_prompts:
                for i, (prompt, label) in enumerate(zip(self.prompts(chunk, how), labels)):
                    examples[start + i].append(example(prompt, [self.yes if label > 0.5 else self.no, self.eos]))
        interleaved = [variant for per_row in examples for variant in per_row]
        return interleaved[: self.train_samples]

    def epoch_batches(self, train_dataset, epoch: int) -> ExampleBatches:
        if self._train_examples is None or self._train_source is not train_dataset:
            self._train_examples, self._train_source = self.training_examples(train_dataset), train_dataset
        batches = ExampleBatches(self._train_examples, self.train_batch_size, self.pad, seed=self.seed + epoch)
        positives = sum(tokens[-2] == self.yes for tokens, _ in self._train_examples)
        batches.counts = {"prompts": len(self._train_examples), "yes": positives,
                          "mean_tokens": round(float(np.mean([len(t) for t, _ in self._train_examples])), 1)}
        return batches

    def batch_loss(self, batch: TokenBatch) -> torch.Tensor:
        """Mean cross-entropy of each prompt's answer token; a prompt is one training target (one labelled row)."""
        self.last_batch_tokens, self.last_batch_predictions = int(batch.mask.sum()), predicted_positions(batch)
        self.last_batch_targets = len(batch.ids)
        return response_token_losses(self.llm, batch).mean()

    def calculate_loss(self, interaction):
        """Loss of RecBole's training rows in the inference prompt (the trainer uses the few-shot set)."""
        labels = interaction[self.LABEL].tolist()
        examples = [example(p, [self.yes if y > 0.5 else self.no, self.eos])
                    for p, y in zip(self.prompts(interaction, self.prompt_selection), labels)]
        return self.batch_loss(TokenBatch.build(examples, self.pad, self.device))

    # ---------------------------------------------------------------------------------------------- scoring
    @torch.no_grad()
    def yes_probability(self, prompts: list[list[int]]) -> torch.Tensor:
        """P(Yes) = softmax over the Yes/No logits after each prompt, ``[B]`` in the prompts' order. Prompts of
        similar length share a forward pass (sorted, right-padded: little padding, and every prompt at the positions
        it had in training, whatever the backbone's position encoding); the LM head runs on the last tokens only."""
        decoder, lm_head = decoder_and_head(self.llm)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out = torch.empty(len(prompts), device=self.device)
        for start in range(0, len(order), self.score_batch_size):
            rows = order[start: start + self.score_batch_size]
            ids, mask = pad_sequences([prompts[i] for i in rows], self.pad, device=self.device)
            last = last_positions(decoder(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
            logits = lm_head(last)[:, [self.yes, self.no]].float()
            out[rows] = torch.softmax(logits, dim=-1)[:, 0]
        return out

    def predict(self, interaction):
        start = time.perf_counter()
        probability = self.yes_probability(self.prompts(interaction, self.prompt_selection))
        self.scored_rows += len(probability)
        self.scoring_seconds += time.perf_counter() - start
        return probability

    def run_report(self) -> dict:
        return {**self.representation_report,
                "train_prompts": len(self._train_examples) if self._train_examples else 0,
                "score_prompts_per_second": round(self.scored_rows / self.scoring_seconds, 2)
                if self.scoring_seconds else None,
                "prompt": self.prompt_selection, "history_k": self.k, "alpha": self.alpha}
