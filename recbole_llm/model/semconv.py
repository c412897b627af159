r"""SemConv
################################################

Reference:
    "Semantic Convergence: Harmonizing Recommender Systems via Two-Stage Alignment and Behavioral Semantic
    Tokenization." AAAI 2025, arXiv:2412.13771 (Meituan). No official code; see
    ../shared/METHODS.md §3 for the sources of each detail (LC-Rec's public code supplies the defaults where the
    paper is silent).

Items become short codes from cascaded residual codebooks over collaborative embeddings, aligned with the LLM's
text space (stage 1, :mod:`recbole_llm.semantic_ids`); the code tokens join the LLM's vocabulary and four
alignment tasks fine-tune it (stage 2); recommendation is beam search constrained to the catalogue's codes.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType, set_color
from safetensors.torch import load_file, save_file

from recbole_llm.collaborative import collaborative_vectors, regress_cold_items
from recbole_llm.cache import cache_root, write_dir_atomically
from recbole_llm.data.item_text import ItemTextBuilder
from recbole_llm.data.packing import pack_window, sequence_windows
from recbole_llm.data.sequences import last_items, user_sequences
from recbole_llm.llm.backbone import backbone_from_config
from recbole_llm.locks import build_once
from recbole_llm.llm.generation import beam_search, left_pad
from recbole_llm.llm.new_tokens import add_trainable_tokens
from recbole_llm.llm.examples import ExampleBatches, TokenBatch, example, predicted_positions, response_token_losses
from recbole_llm.llm.pooling import mean_pooled_embeddings
from recbole_llm.llm.token_trie import TokenTrie, TrieConstrainedLogitsProcessor, reference_allowed_tokens_fn
from recbole_llm.model.beam_ranking import BeamRanking
from recbole_llm.registry import register_model
from recbole_llm.settings import SEMCONV_TASKS as TASKS
from recbole_llm.settings import SettingError
from recbole_llm.semantic_ids.quantizer import (
    CodebookStats,
    ResidualCodebook,
    learn_semantic_ids,
    random_semantic_ids,
)
from recbole_llm.semantic_ids.tokens import CodeVocabulary, code_token_names
from recbole_llm.fingerprint import run_fingerprint
from recbole_llm.trainer.llm_trainer import LLMTrainer

logger = logging.getLogger(__name__)

# Prompts in LC-Rec's wording (METHODS.md §3.3; the paper's own prompts were not found). The sequential task states
# its instruction *before* the history, so that one causal pass over a user's items is every per-prefix example
# at once (recbole_llm.data.packing); LC-Rec's instruction-after-history form cannot be packed.
SEQUENTIAL_HEAD = "The user has interacted with the following items in chronological order:"
TITLE_TO_CODE = 'Which item has the title: "{title}"? Item:'
CODE_TO_TITLE = "What is the title of item {code}? Title:"
QUERY = ("The user has interacted with items {history}. The user's preferences are: {query}. "
         "Recommend an item that matches them. Item:")
NEGATIVE = "The user has interacted with items {history}. Will the user interact with item {code} next? Answer:"

# Keys that do not shape the semantic IDs: a codebook cache is shared across them (stage 2 and scoring keys).
STAGE_TWO_KEYS = (
    "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "learning_rate", "learner", "weight_decay",
    "train_batch_size", "gradient_accumulation_steps", "clip_grad_norm", "llm_gradient_checkpointing",
    "semconv_task_weights", "semconv_window_items", "semconv_window_context", "semconv_query_history",
    "max_history_items", "max_item_tokens", "semconv_beams", "generation_batch_size", "exclude_history",
    "metrics", "topk", "valid_metric", "valid_metric_bigger", "train_neg_sample_args", "MAX_ITEM_LIST_LENGTH",
    "lr_scheduler", "lr_warmup", "epochs", "semconv_code_softmax",
)


# ------------------------------------------------------------------------------------------- semantic IDs
def semantic_ids_dir(config) -> Path:
    """Cache folder of this configuration's codes: keyed by every input that shapes them (not the stage-2 keys)."""
    fingerprint = run_fingerprint(config, ignore=STAGE_TWO_KEYS)
    return Path(config["llm_cache_dir"] or cache_root()) / "semantic_ids" / f"{config['dataset']}-{fingerprint}"


class AlignmentTasks:
    """Builds the four alignment tasks' examples (METHODS.md §3.3) from users' training sequences.

    Sizes per epoch are relative to the number of sequential targets T (every training item after a user's
    first): the sequential task uses the share ``weights["sequential"]`` of its windows; every other task t has
    ``round(weights[t] * T)`` examples.
    """

    def __init__(self, model: "SemConv", sequences: list[list[int]], weights: dict, seed: int):
        self.model, self.sequences, self.weights, self.seed = model, sequences, weights, seed
        self.windows = [(user, w) for user, seq in enumerate(sequences)
                        for w in sequence_windows(len(seq), model.window_items, model.window_context)]
        self.positions = np.array([(user, p) for user, seq in enumerate(sequences) for p in range(1, len(seq))])
        self.n_targets = len(self.positions)

    def examples(self, epoch: int) -> tuple[list, dict[str, int]]:
        rng = np.random.default_rng([self.seed, epoch])
        out, counts = [], {}
        for task in TASKS:
            weight = float(self.weights.get(task, 0.0))
            if weight <= 0:
                continue
            made = getattr(self, f"_{task}")(rng, weight)
            counts[task] = len(made)
            out += made
        return out, counts

    def _sequential(self, rng, weight):
        n = min(len(self.windows), round(weight * len(self.windows)))
        chosen = rng.choice(len(self.windows), size=n, replace=False) if n < len(self.windows) else range(n)
        codes = self.model.code_tokens
        return [pack_window(self.model.sequential_head, [codes[i] for i in self.sequences[user]], window)
                for user, window in (self.windows[c] for c in chosen)]

    def _sample_positions(self, rng, weight):
        n = round(weight * self.n_targets)
        return self.positions[rng.integers(0, len(self.positions), size=n)] if n else []

    def _text(self, rng, weight):
        n = round(weight * self.n_targets)
        items = rng.integers(1, self.model.n_items, size=n)
        directions = rng.integers(0, 2, size=n)
        return [self.model.text_example(int(item), bool(d)) for item, d in zip(items, directions)]

    def _query(self, rng, weight):
        return [self.model.query_example(self.sequences[u][:p], self.sequences[u][p])
                for u, p in self._sample_positions(rng, weight)]

    def _negative(self, rng, weight):
        made = []
        for u, p in self._sample_positions(rng, weight):
            sequence = self.sequences[u]
            if rng.random() < 0.5:
                made.append(self.model.negative_example(sequence[:p], sequence[p], True))
                continue
            seen = set(sequence)
            negative = int(rng.integers(1, self.model.n_items))
            while negative in seen:
                negative = int(rng.integers(1, self.model.n_items))
            made.append(self.model.negative_example(sequence[:p], negative, False))
        return made


def training_sequences(dataset) -> list[list[int]]:
    """Each user's training sequence (:func:`recbole_llm.data.sequences.user_sequences`), users in id order."""
    return list(user_sequences(dataset).values())


# ------------------------------------------------------------------------------------------------- model
@register_model(trainer=LLMTrainer)
class SemConv(BeamRanking, SequentialRecommender):
    r"""Semantic Convergence: an LLM that reads and writes items as residual-codebook codes.

    Stage 1 (alignment tokenization): collaborative item embeddings (RecBole's LightGCN on the training split,
    standing in for the paper's DCCF) are quantized by L cascaded codebooks of C codes into unique codes,
    with an alignment term towards the LLM's text embeddings (:mod:`recbole_llm.semantic_ids.quantizer`).
    Stage 2: L x C code tokens join the vocabulary (only their rows train, beside LoRA), and the LLM is tuned
    on four tasks, loss on responses only: sequential (history codes -> next code, packed windows), text
    (title <-> code), query (preference text -> code), negative sampling (will the user take this item? Yes/No).
    Scoring: beam search constrained by the prefix trie of the catalogue's codes; the top-B items score their
    beam log-probabilities, every other item -inf.

    NOTE: the paper's DCCF is not in RecBole (any RecBole model with an item embedding table works); its
    alignment loss, prompts and negative-sampling format were not published; the choices here are marked in
    properties/model/SemConv.yaml. The paper's per-user top-K cache is :mod:`recbole_llm.serving`.
    """

    input_type = InputType.POINTWISE
    backbone_modules = ("llm",)

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.levels = int(config["semconv_levels"])
        self.codebook_size = int(config["semconv_codebook_size"])
        self.task_weights = dict(config["semconv_task_weights"])
        self.window_items = int(config["semconv_window_items"])
        self.window_context = int(config["semconv_window_context"])
        self.query_history = int(config["semconv_query_history"])
        self.max_history_items = min(int(config["max_history_items"]), self.max_seq_length)
        self.max_item_tokens = int(config["max_item_tokens"])
        self.beams = int(config["semconv_beams"])
        self.generation_batch_size = int(config["generation_batch_size"])
        self.train_batch_size = int(config["train_batch_size"])
        self.seed = int(config["seed"] or 0)
        if self.window_context >= self.window_items:
            raise SettingError(
                f"semconv_window_context={self.window_context} must be below semconv_window_items={self.window_items} "
                "(a window repeats that many items as context); e.g. --semconv_window_context=5"
            )
        self._check_catalogue_fits(config)
        self.setup_beam_ranking(config, dataset, "semconv_beams")
        # (every value was checked against recbole_llm.settings when the Config was built)
        self.llm, self.tokenizer = backbone_from_config(config)
        text_builder = ItemTextBuilder.from_config(config)
        rows = text_builder.records(dataset)
        self.item_texts = text_builder.texts(rows)
        fields = dict(config["item_text_fields"] or {})
        title = dict(list(fields.items())[:1]) or None
        self.titles = ItemTextBuilder(fields=title, template="{%s}" % next(iter(title.values()))).texts(rows) \
            if title else self.item_texts
        rest = dict(list(fields.items())[1:])
        self.queries = ItemTextBuilder(fields=rest).texts(rows) if rest else self.item_texts

        codes, self.codebook, self.codebook_stats = self._semantic_ids(config, dataset)
        self.register_buffer("item_codes", codes)  # [n_items, L]; row 0 (padding item) is -1
        ids = add_trainable_tokens(self.llm, self.tokenizer, code_token_names(self.levels, self.codebook_size),
                                   seed=self.seed)
        self.vocabulary = CodeVocabulary(ids, self.levels, self.codebook_size, len(self.tokenizer))
        if ids != list(range(ids[0], ids[0] + len(ids))):
            raise RuntimeError(f"code tokens got non-contiguous ids {ids[:3]}...: the tokenizer already knew some")
        # the code tokens' block of the vocabulary: with semconv_code_softmax: codes, code targets are scored over it
        self.code_ids = range(ids[0], ids[0] + len(ids))
        self.code_rows = self.code_ids if config["semconv_code_softmax"] == "codes" else None
        self._prepare_tokens()
        self.trie = TokenTrie(self.code_tokens[1:], end_token=self.eos)  # trie rows are items 1..n-1
        self.last_task_counts = None

    def _check_catalogue_fits(self, config) -> None:
        """Refuse, before any model trains, settings the catalogue cannot satisfy."""
        items = self.n_items - 1
        if self.codebook_size ** self.levels < items or self.codebook_size > items:
            raise SettingError(
                f"semconv_levels={self.levels} x semconv_codebook_size={self.codebook_size} cannot give the {items} "
                f"items unique codes learnt by k-means: the codes must number at least the items "
                f"({self.codebook_size}^{self.levels} = {self.codebook_size ** self.levels}) and each codebook at most "
                f"the items; e.g. --semconv_codebook_size={max(2, min(items, math.ceil(items ** (1 / self.levels)) * 2))}")

    # ------------------------------------------------------------------------------------ stage 1: codes
    def _semantic_ids(self, config, dataset):
        """``(codes [n_items, L], codebook module or None, stats)``, from the cache when its inputs match."""
        folder = semantic_ids_dir(config)
        learned = config["semconv_codes"] == "learned"
        build_once(folder, (folder / "codes.safetensors").is_file, lambda: write_dir_atomically(
            folder, lambda tmp: self._compute_semantic_ids(config, dataset, tmp), overwrite=True), "semantic IDs")
        stats = json.loads((folder / "stats.json").read_text())
        tensors = load_file(folder / "codes.safetensors")
        codebook = None
        if learned:
            codebook = ResidualCodebook(**stats.pop("module"))
            codebook.load_state_dict({k[len("codebook."):]: v for k, v in tensors.items() if k.startswith("codebook.")})
            codebook.eval().requires_grad_(False)
        stats = CodebookStats(**stats["codebook"])
        logger.info(set_color("Semantic IDs", "blue") + f" ({folder.name}): collision rate before resolution "
                    f"{stats.collision_rate:.3f}, {stats.reassigned} re-assigned, usage per level "
                    f"{[round(u, 3) for u in stats.usage]}, perplexity {[round(p, 1) for p in stats.perplexity]}, "
                    f"reconstruction error {stats.reconstruction_error:.4f}, {stats.cold_items} cold items "
                    "(no training interaction; vectors regressed from their text)")
        return tensors["codes"].long(), codebook, stats

    def _compute_semantic_ids(self, config, dataset, folder: Path) -> None:
        n_items = dataset.item_num
        codes = torch.full((n_items, self.levels), -1, dtype=torch.long)
        if config["semconv_codes"] == "random":
            codes[1:], stats = random_semantic_ids(n_items - 1, levels=self.levels, codebook_size=self.codebook_size,
                                                   seed=self.seed)
            save_file({"codes": codes}, folder / "codes.safetensors")
            (folder / "stats.json").write_text(json.dumps({"codebook": stats.to_dict()}, indent=2))
            return
        collaborative = collaborative_vectors(
            config, dataset, model=config["semconv_cf_model"], vectors=config["semconv_cf_vectors"],
            item_table=config["semconv_cf_table"], epochs=int(config["semconv_cf_epochs"]),
            settings=dict(config["semconv_cf_settings"] or {}),
        )
        cold = collaborative.cold_items[1:]
        lambda_align = float(config["semconv_lambda_align"])
        text = None
        if lambda_align > 0 or bool(cold.any()):
            text = mean_pooled_embeddings(self.llm, self.tokenizer, self.item_texts[1:])
        # items no training interaction reached keep a random vector: regressed from their text instead
        items = regress_cold_items(collaborative.items[1:], cold, text)
        text = text if lambda_align > 0 else None  # the codebooks align with it only under a positive weight
        hidden = int(config["semconv_rq_hidden"])
        code_dim = int(config["semconv_rq_code_dim"])
        codes[1:], stats, codebook = learn_semantic_ids(
            items, text, levels=self.levels, codebook_size=self.codebook_size, epochs=int(config["semconv_rq_epochs"]),
            lambda_align=lambda_align, seed=self.seed, lr=float(config["semconv_rq_lr"]),
            beta=float(config["semconv_rq_beta"]), tau=float(config["semconv_align_tau"]), hidden=hidden,
            code_dim=code_dim, progress=bool(config["show_progress"]),
        )
        stats.cold_items = int(cold.sum())
        module = dict(input_dim=items.shape[1], levels=self.levels, codebook_size=self.codebook_size,
                      code_dim=code_dim, hidden=hidden, text_dim=text.shape[1] if text is not None else None)
        state = {f"codebook.{k}": v.detach().contiguous() for k, v in codebook.state_dict().items()}
        save_file({"codes": codes, **state}, folder / "codes.safetensors")
        (folder / "stats.json").write_text(json.dumps({"codebook": stats.to_dict(), "module": module}, indent=2))

    def run_report(self) -> dict:
        """What a run record keeps besides metrics: the codebook statistics and the last epoch's task mixture."""
        return {"codebook": self.codebook_stats.to_dict(), "tasks": self.last_task_counts}

    # --------------------------------------------------------------------------------- stage 2: prompts
    def _prepare_tokens(self) -> None:
        """Token lists of every prompt piece and item (a prompt is a concatenation: no tokenizer calls per batch)."""
        encode = lambda text: self.tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
        self.eos, self.pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        token_rows = self.vocabulary.tokens(self.item_codes[1:].cpu())
        self.code_tokens = [[]] + token_rows.tolist()  # index = item id
        self.sequential_head = encode(SEQUENTIAL_HEAD)
        self.title_tokens = [encode(" " + t)[: self.max_item_tokens] if t else [] for t in self.titles]
        self.query_tokens = [encode(" " + t)[: self.max_item_tokens] if t else [] for t in self.queries]

        def split(template: str) -> list[list[int]]:  # the template's text pieces around its {slots}
            parts = re.split(r"\{(\w+)\}", template)  # text, slot, text, slot, ..., text
            texts, slots = parts[0::2], parts[1::2]
            # title and query slots carry their own leading space (" Toy Story"), code slots none
            return [encode(text.rstrip(" ") if i < len(slots) and slots[i] in ("title", "query") else text)
                    for i, text in enumerate(texts)]

        self.pieces = {name: split(template) for name, template in (
            ("title_to_code", TITLE_TO_CODE), ("code_to_title", CODE_TO_TITLE), ("query", QUERY),
            ("negative", NEGATIVE))}
        self.answers = {True: encode(" Yes"), False: encode(" No")}

    def _history_tokens(self, history: list[int]) -> list[int]:
        return [token for item in history for token in self.code_tokens[item]]

    def _fill(self, name: str, *slots: list[int]) -> list[int]:
        pieces = self.pieces[name]
        tokens = list(pieces[0])
        for slot, piece in zip(slots, pieces[1:]):
            tokens += slot + piece
        return tokens

    _example = staticmethod(example)

    def text_example(self, item: int, title_to_code: bool):
        if title_to_code:
            return self._example(self._fill("title_to_code", self.title_tokens[item]), self.code_tokens[item])
        return self._example(self._fill("code_to_title", self.code_tokens[item]), self.title_tokens[item] + [self.eos])

    def query_example(self, history: list[int], target: int):
        recent = self._history_tokens(last_items(history, self.query_history))
        return self._example(self._fill("query", recent, self.query_tokens[target]), self.code_tokens[target])

    def negative_example(self, history: list[int], item: int, positive: bool):
        recent = self._history_tokens(last_items(history, self.query_history))
        return self._example(self._fill("negative", recent, self.code_tokens[item]), self.answers[positive] + [self.eos])

    def sequential_prompt(self, history: list[int]) -> list[int]:
        """The scoring prompt: the sequential head and the codes of the last ``max_history_items`` items."""
        return self.sequential_head + self._history_tokens(last_items(history, self.max_history_items))

    # -------------------------------------------------------------------------------------------- training
    def epoch_batches(self, train_dataset, epoch: int) -> ExampleBatches:
        if getattr(self, "_tasks", None) is None or self._tasks_source is not train_dataset:
            self._tasks = AlignmentTasks(self, training_sequences(train_dataset), self.task_weights, self.seed)
            self._tasks_source = train_dataset
        examples, counts = self._tasks.examples(epoch)
        if not examples:
            raise ValueError("semconv_task_weights give no training examples; set a positive weight for a task")
        batches = ExampleBatches(examples, self.train_batch_size, self.pad, seed=self.seed + epoch)
        batches.counts = self.last_task_counts = counts
        return batches

    def batch_loss(self, batch: TokenBatch) -> torch.Tensor:
        """Mean token cross-entropy over the response tokens (``targets``) of a batch. Its targets, for the run's
        throughput: the items it writes (code-token targets / levels: every window's next items, title-to-code and
        query answers)."""
        self.last_batch_tokens, self.last_batch_predictions = int(batch.mask.sum()), predicted_positions(batch)
        written = batch.ids[:, 1:][batch.targets[:, 1:].bool()]
        self.last_batch_targets = int(((written >= self.code_ids.start) & (written < self.code_ids.stop)).sum()) \
            // self.levels
        return self.token_losses(batch).mean()

    def token_losses(self, batch: TokenBatch) -> torch.Tensor:
        """Cross-entropy of every response token (flattened, in order); the LM head runs on those positions only,
        over the whole vocabulary (``semconv_code_softmax: full``, LC-Rec's training) or, for code targets, over the
        code tokens only (``codes``: what constrained decoding chooses among; no 49k-row head at those positions)."""
        return response_token_losses(self.llm, batch, rows=self.code_rows)

    def calculate_loss(self, interaction):
        """Per-prefix loss of RecBole's training rows (the trainer uses the packed tasks; this serves RecBole's API)."""
        examples = [self._example(self.sequential_prompt(h), self.code_tokens[t])
                    for h, t in zip(self._histories(interaction), interaction[self.POS_ITEM_ID].tolist())]
        return self.batch_loss(TokenBatch.build(examples, self.pad, self.device))

    # --------------------------------------------------------------------------------------------- scoring
    def generation_config(self):
        from transformers import GenerationConfig

        return GenerationConfig(num_beams=self.beams, num_return_sequences=self.beams, do_sample=False,
                                max_new_tokens=self.levels, early_stopping=True, length_penalty=0.0,
                                pad_token_id=self.pad, eos_token_id=self.eos, bos_token_id=None,
                                return_dict_in_generate=True, output_scores=True)

    @torch.no_grad()
    def generate_code_tokens(self, histories: list[list[int]], constraint: str = "trie", decoder: str = "prefill",
                             banned: torch.Tensor | None = None):
        """The ``semconv_beams`` best code-token sequences per history: ``(tokens [B, beams, L], log-probs [B, beams])``.

        ``constraint``: ``trie`` (the vectorised prefix-trie processor), ``reference`` (transformers'
        PrefixConstrainedLogitsProcessor over the same codes, a Python call per beam: slow, for checks) or
        ``none`` (free beam search). ``decoder``: ``prefill`` (:func:`recbole_llm.llm.generation.beam_search`, each
        prompt encoded once) or ``generate`` (transformers' ``generate`` with :meth:`generation_config`, which
        encodes each prompt once per beam); both return the same beams. ``banned [B, n_items]`` (trie only): items
        a history's beams may not end on."""
        from transformers import LogitsProcessorList, PrefixConstrainedLogitsProcessor

        ids, mask = left_pad([self.sequential_prompt(h) for h in histories], self.pad, self.device)
        self.trie.to(self.device)
        processors = LogitsProcessorList({
            "trie": lambda: [TrieConstrainedLogitsProcessor(
                self.trie, ids.shape[1], self.eos, banned=banned[:, 1:] if banned is not None else None)],
            "reference": lambda: [PrefixConstrainedLogitsProcessor(reference_allowed_tokens_fn(
                self.code_tokens[1:], ids.shape[1], self.eos), self.beams)],
            "none": lambda: [],
        }[constraint]())
        if decoder == "prefill":
            beams = beam_search(self.llm, ids, mask, num_beams=self.beams, max_new_tokens=self.levels,
                                logits_processor=processors or None)
            return beams.tokens, beams.scores
        out = self.llm.generate(input_ids=ids, attention_mask=mask, generation_config=self.generation_config(),
                                logits_processor=processors)
        tokens = out.sequences[:, ids.shape[1]:]
        if tokens.shape[1] < self.levels:  # every beam ended early (only possible without a constraint)
            tokens = F.pad(tokens, (0, self.levels - tokens.shape[1]), value=self.eos)
        return tokens[:, : self.levels].reshape(len(histories), -1, self.levels), \
            out.sequences_scores.float().view(len(histories), -1)

    def beam_search(self, histories: list[list[int]], constraint: str = "trie", decoder: str = "prefill",
                    banned: torch.Tensor | None = None):
        """Top ``semconv_beams`` items per history: ``(item ids [B, beams], log-probabilities [B, beams])``, best
        first; item id -1 marks a code that is no item (only possible with ``constraint="none"``); ``banned [B,
        n_items]``: items a row may not get (their scores stay -inf where fewer items are left than beams)."""
        tokens, scores = self.generate_code_tokens(histories, constraint, decoder, banned)
        self.trie.to(tokens.device)
        items = self.trie.items(tokens.flatten(0, 1))
        items = torch.where(items >= 0, items + 1, -1)  # trie rows are items 1..n-1
        return items.view(scores.shape), scores

    def beam_items(self, users: list[int], histories: list[list[int]], banned: torch.Tensor | None = None):
        """:class:`BeamRanking`'s hook: the beams of each history (SemConv's prompt holds no user)."""
        return self.beam_search(histories, banned=banned)
