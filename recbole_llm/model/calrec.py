r"""CALRec
################################################

Reference:
    Yaoyiran Li, Xiang Zhai, Moustafa Alzantot, Keyi Yu, Ivan Vulić, Anna Korhonen and Mohamed Hammad.
    "CALRec: Contrastive Alignment of Generative LLMs for Sequential Recommendation." RecSys 2024.
    arXiv:2405.02429. No official code was released; see ../shared/METHODS.md §1 for the sources of each detail.

A decoder-only LLM reads a user's purchase history written as text and generates the text of the next item.
Training adds two contrastive terms between mean-pooled hidden states; inference samples N item texts, retrieves
the catalogue by BM25 for each and merges the N rankings quasi-round-robin.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from recbole.data.dataset import SequentialDataset
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType, set_color

from recbole_llm.data.domains import DomainMixture, first_token
from recbole_llm.data.item_text import ItemTextBuilder, read_item_table
from recbole_llm.data.packing import Window, sequence_windows
from recbole_llm.data.sequences import last_items, user_sequences
from recbole_llm.errors import InputFileError, UsageError
from recbole_llm.llm.examples import ExampleBatches
from recbole_llm.llm.backbone import backbone_from_config
from recbole_llm.locks import exclusive
from recbole_llm.llm.generation import left_pad, pad_sequences, row_seed, sample_continuations
from recbole_llm.llm.pooling import decoder_and_head, masked_mean
from recbole_llm.losses import info_nce
from recbole_llm.registry import register_model
from recbole_llm.retrieval.bm25 import BM25Index, tokenize
from recbole_llm.retrieval.merge import quasi_round_robin_merge
from recbole_llm.trainer.checkpoint import META, load_weights, read_meta
from recbole_llm.fingerprint import run_fingerprint
from recbole_llm.trainer.llm_trainer import LLMTrainer

# CALRec §3.1 (METHODS.md §1.2): the user prefix and the per-item prefixes, verbatim.
USER_PREFIX = "This is the summary of a user's purchase history."
FIRST_ITEM_PREFIX = "The first item bought is as follows."
NEXT_ITEM_PREFIX = "The next item bought is as follows."

# Keys that shape Stage II or scoring but not Stage I: a Stage-I cache is shared across them.
STAGE_TWO_KEYS = (
    "calrec_stages", "num_samples", "temperature", "bm25_epsilon", "bm25_index_labels", "bm25_normalization",
    "generation_batch_size", "exclude_history", "metrics", "topk", "valid_metric", "valid_metric_bigger",
    "lr_scheduler", "lr_warmup", "epochs",  # Stage I trains at the constant rate for stage1_steps
    "calrec_window_items", "calrec_window_context", "calrec_window_batch_size",  # Stage II's packing
)

# Above this many training examples per epoch on a CPU, warn that the run will take days (BENCHMARKS.md).
CPU_EXAMPLES_WARNING = 5000


# ------------------------------------------------------------------------------------------------------ text
class CALRecPrompt:
    """Token-level prompt assembly from pre-tokenised pieces.

    Layout (the target slot ends in the next-item prefix; the model generates the target item's text)::

        This is the summary of a user's purchase history. The first item bought is as follows. {item_1}
        The next item bought is as follows. {item_2}
        ...
        The next item bought is as follows. {target}<eos>

    Every item text is tokenised once (``" " + text``, cut to ``max_item_tokens``); a prompt is a concatenation of
    token lists, so building a batch costs no tokenizer calls and the token budget is exact. History is cut from
    the left: the most recent ``max_history_items`` items, fewer if the prompt would exceed ``max_prompt_tokens``
    (the most recent item is always kept).
    """

    def __init__(self, tokenizer, *, max_history_items: int, max_prompt_tokens: int, max_item_tokens: int):
        self.tokenizer = tokenizer
        self.max_history_items = max_history_items
        self.max_prompt_tokens = max_prompt_tokens
        self.max_item_tokens = max_item_tokens
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id
        self.head = self._encode([f"{USER_PREFIX} {FIRST_ITEM_PREFIX}"])[0]
        self.next = self._encode([f"\n{NEXT_ITEM_PREFIX}"])[0]

    def _encode(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=False).input_ids

    def encode_items(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each item text as it appears in a prompt (index = item id; the padding item is empty)."""
        return [ids[: self.max_item_tokens] for ids in self._encode([f" {text}" if text else "" for text in texts])]

    def history(self, item_ids: Sequence[int], items: Sequence[Sequence[int]]) -> list[int]:
        """The prompt for a history of item ids (oldest first), ending in the next-item prefix."""
        budget = self.max_prompt_tokens - len(self.head)
        kept = []
        for item in reversed(last_items(list(item_ids), self.max_history_items)):
            cost = len(items[item]) + len(self.next)  # each item is followed by one next-item prefix
            if kept and cost > budget:
                break
            kept.append(item)
            budget -= cost
        tokens = list(self.head)
        for position, item in enumerate(reversed(kept)):
            if position:
                tokens += self.next
            tokens += items[item]
        return tokens + self.next

    def window(self, sequence: Sequence[int], items: Sequence[Sequence[int]], window: Window):
        """``(tokens, spans)`` of a packed window over a user's item ids: the items ``window.start .. end-1`` laid
        out as in :meth:`history`, and ``(start, end, item id)`` of each target item's tokens (the items from
        ``window.first_target`` on). The tokens before a target are exactly the prompt :meth:`history` writes for
        the window's earlier items, so under a causal mask each target is predicted as in its own example."""
        tokens, spans = list(self.head), []
        for position in range(window.start, window.end):
            if position > window.start:
                tokens += self.next
            start, item = len(tokens), sequence[position]
            tokens += items[item]
            if position >= window.first_target:
                spans.append((start, len(tokens), item))
        return tokens, spans


@dataclass
class TextBatch:
    """Tensors of one CALRec training batch (both towers)."""

    joint_ids: torch.Tensor  # [B, L] prompt + target + eos, right-padded
    joint_mask: torch.Tensor  # [B, L]
    history_mask: torch.Tensor  # [B, L] 1 on the prompt (history) positions
    target_mask: torch.Tensor  # [B, L] 1 on the target positions (target tokens + eos): the tokens with loss
    pool_mask: torch.Tensor  # [B, L] 1 on the target item's tokens (not the eos): the span v_{T|U} pools
    target_ids: torch.Tensor  # [B, T] target + eos alone, right-padded
    target_only_mask: torch.Tensor  # [B, T]

    @classmethod
    def build(cls, prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]], eos: int, pad: int, device):
        item_lengths = torch.tensor([len(t) for t in targets], device=device).unsqueeze(1)
        targets = [list(t) + [eos] for t in targets]
        joint_ids, joint_mask = pad_sequences([list(p) + t for p, t in zip(prompts, targets)], pad, device=device)
        target_ids, target_only_mask = pad_sequences(targets, pad, device=device)
        prompt_lengths = torch.tensor([len(p) for p in prompts], device=device).unsqueeze(1)
        positions = torch.arange(joint_ids.shape[1], device=device)
        history_mask = (positions < prompt_lengths).long()
        pool_mask = ((positions >= prompt_lengths) & (positions < prompt_lengths + item_lengths)).long()
        return cls(joint_ids, joint_mask, history_mask, joint_mask - history_mask, pool_mask, target_ids,
                   target_only_mask)

    @property
    def tokens(self) -> int:
        return int(self.joint_mask.sum() + self.target_only_mask.sum())

    @property
    def targets(self) -> int:
        return len(self.joint_ids)

    @property
    def predictions(self) -> int:  # positions through the LM head: each target token and the eos
        return int(self.target_mask.sum())


@dataclass
class PackedBatch:
    """Packed windows (:meth:`CALRecPrompt.window`): every target of a window trained in one causal pass.

    ``labels[b, p]`` is the token position p of row b predicts, -100 where none: the target item's tokens from
    the position before each, and the end-of-text token from its last token (as a per-prefix example predicts
    ``target + eos``). The target-only tower runs once per distinct target item of the batch."""

    ids: torch.Tensor  # [B, L] windows, right-padded
    mask: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L]
    rows: torch.Tensor  # [T] the window (row) of each target
    starts: torch.Tensor  # [T] first token position of each target item
    ends: torch.Tensor  # [T] one past its last token
    item_ids: torch.Tensor  # [I, M] each distinct target item's tokens + eos, right-padded
    item_mask: torch.Tensor  # [I, M]
    item_index: torch.Tensor  # [T] row of item_ids of each target

    @classmethod
    def build(cls, examples, pad: int, eos: int, items: Sequence[Sequence[int]], device=None) -> "PackedBatch":
        ids, mask = pad_sequences([tokens for tokens, _ in examples], pad, device=device)
        labels = torch.full_like(ids, -100)
        rows, starts, ends, targets = [], [], [], []
        for row, (tokens, spans) in enumerate(examples):
            for start, end, item in spans:
                labels[row, start - 1: end] = torch.tensor(tokens[start:end] + [eos])
                rows.append(row), starts.append(start), ends.append(end), targets.append(item)
        distinct = {item: index for index, item in enumerate(dict.fromkeys(targets))}
        item_ids, item_mask = pad_sequences([list(items[item]) + [eos] for item in distinct], pad, device=device)
        as_tensor = partial(torch.tensor, dtype=torch.long, device=ids.device)
        return cls(ids, mask, labels, as_tensor(rows), as_tensor(starts), as_tensor(ends), item_ids, item_mask,
                   as_tensor([distinct[item] for item in targets]))

    def to(self, device) -> "PackedBatch":
        return PackedBatch(*(getattr(self, field).to(device) for field in self.__dataclass_fields__))

    @property
    def tokens(self) -> int:
        return int(self.mask.sum() + self.item_mask.sum())

    @property
    def targets(self) -> int:
        return len(self.rows)

    @property
    def predictions(self) -> int:
        return int((self.labels != -100).sum())


# --------------------------------------------------------------------------------------------------- dataset
def select_training_samples(train, targets_per_user: int, max_samples: int, seed: int):
    """Keep the last ``targets_per_user`` next-item examples of each user (0: all prefixes), then at most
    ``max_samples`` of those drawn uniformly (0: all). A user's rows of RecBole's train split are in time order
    (contiguous under leave-one-out, interleaved with other users' under a global temporal split; the count
    groups by user either way), and valid/test targets are never in it, so nothing leaks from evaluation."""
    users = train.inter_feat[train.uid_field].numpy()
    keep = np.ones(len(users), dtype=bool)
    if targets_per_user > 0:
        from_end = pd.Series(users).groupby(users).cumcount(ascending=False).to_numpy()
        keep &= from_end < targets_per_user
    index = np.flatnonzero(keep)
    if 0 < max_samples < len(index):
        index = np.sort(np.random.default_rng(seed).choice(index, size=max_samples, replace=False))
    if len(index) == len(users):
        return train
    return train.copy(train.inter_feat[torch.from_numpy(index)])


class CALRecDataset(SequentialDataset):
    """RecBole's SequentialDataset whose training split keeps the configured share of next-item examples."""

    def build(self):
        train, valid, test = super().build()
        if self.config["calrec_packing"]:  # the model packs whole sequences and selects targets itself
            return [train, valid, test]
        selected = select_training_samples(
            train, int(self.config["train_targets_per_user"] or 0), int(self.config["train_max_samples"] or 0),
            int(self.config["seed"] or 0),
        )
        self.logger.info(
            set_color("CALRec training examples", "blue") + f": {selected.inter_num} of {train.inter_num} next-item prefixes"
        )
        return [selected, valid, test]


# ----------------------------------------------------------------------------------------------------- model
class CALRecTrainer(LLMTrainer):
    """LLMTrainer with CALRec's two stages (CALRec §3.3, METHODS.md §1.4), run by one ``fit``.

    * Stage I: ``stage1_steps`` batches drawn from a mixture of domains, domain c with p_c proportional to
      n_c^``stage1_power``. Domains are the values of ``stage1_domain_field`` (first token) over the training
      examples' targets, and each dataset in ``stage1_datasets`` (its own RecBole training split).
      The result is cached in ``<checkpoint_dir>/CALRec-<dataset>-stage1-<fingerprint>``: a rerun, and the
      Stage-I-only and full runs of one configuration, load it instead of retraining.
    * Stage II: RecBole's usual epochs on the target dataset, starting from the Stage-I weights.

    ``calrec_stages`` picks the stages ([1, 2], [2] or [1]) for the paper's ablations.
    """

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        stages = calrec_stages(self.config)
        examples = self.model.training_targets(train_data.dataset)
        if self.device.type == "cpu" and examples > CPU_EXAMPLES_WARNING:
            self.logger.warning(
                f"CALRec trains on {examples} next-item targets per epoch on a CPU: at about 200 tokens/s this takes "
                "hours (packed) to days (per prefix). Use a GPU (--gpu_id=0), --preset=cpu, or fewer targets "
                "(train_targets_per_user, train_max_samples)."
            )
        if 1 in stages:
            self._stage_one(train_data, show_progress)
        if 2 in stages:
            return super().fit(train_data, valid_data, verbose, saved, show_progress, callback_fn)
        if saved:
            self._write_checkpoint(self.saved_model_file, self._meta(epoch=-1, stage=1))
        if not valid_data:
            return -math.inf, None
        return self._valid_epoch(valid_data, show_progress=show_progress)

    def stage_one_dir(self) -> Path:
        """Stage I's cache, keyed like the run but without the keys that only Stage II or scoring read."""
        fingerprint = run_fingerprint(self.config, ignore=STAGE_TWO_KEYS)
        return Path(self.checkpoint_dir) / f"CALRec-{self.config['dataset']}-stage1-{fingerprint}"

    def _stage_one(self, train_data, show_progress: bool) -> None:
        stage_dir = self.stage_one_dir()
        with exclusive(stage_dir, "CALRec's Stage I"):  # concurrent identical runs train Stage I once
            self._load_or_train_stage_one(stage_dir, train_data, show_progress)

    def _load_or_train_stage_one(self, stage_dir: Path, train_data, show_progress: bool) -> None:
        if (stage_dir / META).is_file() and read_meta(stage_dir).get("stage") == 1:
            load_weights(stage_dir, self.model)
            self.logger.info(set_color("Stage I", "blue") + f": loaded cached weights from {stage_dir}")
            return
        batches = self.model.stage_one_batches(train_data.dataset, self.config)
        self.logger.info(set_color("Stage I", "blue") + f": {len(batches)} batches from domains {batches.summary()}")
        self.optimizer = self._build_optimizer()
        loss = self._train_epoch(batches, epoch_idx=0, loss_func=self.model.stage_loss, show_progress=show_progress)
        self._write_checkpoint(stage_dir, self._meta(epoch=-1, stage=1, stage1_loss=loss))
        self.logger.info(set_color("Stage I", "blue") + f": done, saved to {stage_dir}")
        self.optimizer = self._build_optimizer()  # Stage II starts with fresh optimizer state


@dataclass
class StageBatch:
    prompts: list[list[int]]
    targets: list[list[int]]

    def to(self, device):  # the trainer moves every batch; token lists are moved when the tensors are built
        return self


class StageOneBatches:
    """``steps`` batches of ``batch_size`` examples drawn from a :class:`DomainMixture` (a list-like for the trainer)."""

    def __init__(self, sources: dict, mixture: DomainMixture, steps: int, batch_size: int):
        self.sources, self.mixture = sources, mixture
        self.draws = mixture.sample(steps * batch_size)
        self.batch_size = batch_size

    def __len__(self):
        return math.ceil(len(self.draws) / self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.draws), self.batch_size):
            prompts, targets = [], []
            for domain, index in self.draws[start: start + self.batch_size]:
                prompt, target = self.sources[domain][index]
                prompts.append(prompt)
                targets.append(target)
            yield StageBatch(prompts, targets)

    def summary(self) -> str:
        return ", ".join(f"{name} p={p:.3f}" for name, p in self.mixture.probabilities.items())


class _DomainExamples:
    """Lazy ``(prompt tokens, target tokens)`` for rows of a training split."""

    def __init__(self, prompt: CALRecPrompt, items, histories, targets):
        self.prompt, self.items, self.histories, self.targets = prompt, items, histories, targets

    def __getitem__(self, index):
        return self.prompt.history(self.histories[index], self.items), self.items[self.targets[index]]


@register_model(trainer=CALRecTrainer, dataset=CALRecDataset)
class CALRec(SequentialRecommender):
    r"""CALRec: an LLM that generates the next item's text, aligned by two contrastive terms.

    Training loss (CALRec §3.2):

        L = (1 - alpha - beta) L_NIG + alpha L_TT + beta L_UT

    * L_NIG: next-item generation, token cross-entropy on the target item's tokens only.
    * L_TT = InfoNCE(v_{T|U}, v_T), L_UT = InfoNCE(v_U, v_T), cosine similarity / tau, in-batch negatives.
      v_T mean-pools the last hidden states of a pass over the target text alone; v_U and v_{T|U} mean-pool the
      history and the target item's tokens in the joint pass. beta is negative in the paper (-0.025): L_UT is
      pushed *up*.

    Stage II trains every target of a user in one causal pass over a window of the user's items
    (``calrec_packing``, :meth:`packed_losses`): the same three terms as the paper's one example per prefix
    when a history fits the window, at about one item's tokens per target instead of the whole prefix's.

    Scoring (CALRec §3.4): ``num_samples`` texts sampled at ``temperature`` from one shared prefill, BM25 of each
    against the catalogue's item texts, merged by :func:`quasi_round_robin_merge`.

    NOTE: the paper fully fine-tunes PaLM-2 XXS; here any Hugging Face causal LM works (full fine-tuning with
    ``lora_r: 0``, the default, or LoRA / QLoRA). No projection heads (none are described). Whether items already
    in the history are ranked is the evaluation protocol's ``exclude_history``, the same for every model of a
    comparison (the paper does not say). BM25 indexes the items' attribute values, not their labels
    (``bm25_index_labels``), and ``bm25_normalization: self`` offers an alternative to the paper's min-max.
    """

    input_type = InputType.POINTWISE
    backbone_modules = ("llm",)

    @staticmethod
    def input_datasets(config) -> dict[str, Path]:
        """Stage I also reads the datasets of ``stage1_datasets``: their files are part of every fingerprint."""
        root = Path(config["data_path"]).parent  # RecBole appended this run's dataset name
        return {name: root / name for name in list_setting(config, "stage1_datasets")}

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.alpha = float(config["calrec_alpha"])
        self.beta = float(config["calrec_beta"])
        self.tau = float(config["contrastive_tau"])
        self.contrastive = bool(config["contrastive"])
        self.symmetric = bool(config["contrastive_symmetric"])
        self.num_samples = int(config["num_samples"])
        self.temperature = float(config["temperature"])
        self.seed = int(config["seed"] or 0)
        self.epsilon = float(config["bm25_epsilon"])
        self.index_labels = bool(config["bm25_index_labels"])
        self.self_normalise = config["bm25_normalization"] == "self"
        self.generation_batch_size = int(config["generation_batch_size"])
        self.packing = bool(config["calrec_packing"])
        self.window_items = int(config["calrec_window_items"])
        self.window_context = int(config["calrec_window_context"])
        if self.packing and self.window_context >= self.window_items:
            raise UsageError(
                f"calrec_window_context={self.window_context} must be below calrec_window_items={self.window_items} "
                "(a window repeats that many earlier items as context); e.g. --calrec_window_context=10")
        self.targets_per_user = int(config["train_targets_per_user"] or 0)
        self.max_samples = int(config["train_max_samples"] or 0)
        self.window_batch_size = int(config["calrec_window_batch_size"])
        # (every value was checked against recbole_llm.settings when the Config was built)
        self.llm, self.tokenizer = backbone_from_config(config)
        self.prompt = CALRecPrompt(
            self.tokenizer,
            max_history_items=min(int(config["max_history_items"]), self.max_seq_length),
            max_prompt_tokens=int(config["max_prompt_tokens"]),
            max_item_tokens=int(config["max_item_tokens"]),
        )
        text_builder = ItemTextBuilder.from_config(config)
        rows = text_builder.records(dataset)  # the .item file is read once for both renderings
        self.item_texts = text_builder.texts(rows)
        self.item_tokens = self.prompt.encode_items(self.item_texts)
        documents = self.item_texts if self.index_labels else text_builder.texts(rows, values_only=True)
        # Labels are cut from generated texts too, so that "Title" in a sample never matches a title word.
        self.label_pattern = re.compile(
            r"\b(?:" + "|".join(map(re.escape, text_builder.labels)) + r")\s*:", re.IGNORECASE
        ) if text_builder.labels and not self.index_labels else None
        self.bm25 = BM25Index([tokenize(text) for text in documents[1:]])  # column j is item j + 1
        self._packed, self._packed_source = None, None

    # ---------------------------------------------------------------------------------------------- towers
    def forward(self, batch: TextBatch):
        """Both towers: ``(joint last hidden states [B, L, H], target-only last hidden states [B, T, H] or None)``."""
        decoder, _ = decoder_and_head(self.llm)  # looked up, not stored: a second attribute would save it twice
        joint = decoder(input_ids=batch.joint_ids, attention_mask=batch.joint_mask).last_hidden_state
        target = None
        if self.contrastive:
            target = decoder(input_ids=batch.target_ids, attention_mask=batch.target_only_mask).last_hidden_state
        return joint, target

    def losses(self, batch: TextBatch) -> dict[str, torch.Tensor]:
        """The unweighted terms: ``{"nig": L_NIG, "tt": L_TT, "ut": L_UT}`` (contrastive terms only if enabled)."""
        joint, target = self.forward(batch)
        predicts_target = batch.target_mask[:, 1:].bool()  # position t predicts token t + 1
        _, lm_head = decoder_and_head(self.llm)
        logits = lm_head(joint[:, :-1][predicts_target])
        terms = {"nig": F.cross_entropy(logits.float(), batch.joint_ids[:, 1:][predicts_target])}
        if self.contrastive:
            v_t = masked_mean(target, batch.target_only_mask)
            v_u = masked_mean(joint, batch.history_mask)
            v_tu = masked_mean(joint, batch.pool_mask)
            terms["tt"] = info_nce(v_tu, v_t, self.tau, self.symmetric)
            terms["ut"] = info_nce(v_u, v_t, self.tau, self.symmetric)
        return terms

    def loss_from_tokens(self, prompts, targets):
        """:meth:`weighted_loss` for prompt / target token lists."""
        return self.weighted_loss(TextBatch.build(prompts, targets, self.prompt.eos, self.prompt.pad, self.device))

    def weighted_loss(self, batch: "TextBatch | PackedBatch"):
        """Weighted loss terms (a tuple, so RecBole logs each; L_NIG alone without the contrastive terms) of
        per-prefix examples or packed windows."""
        self.last_batch_tokens, self.last_batch_targets = batch.tokens, batch.targets
        self.last_batch_predictions = batch.predictions
        terms = self.packed_losses(batch) if isinstance(batch, PackedBatch) else self.losses(batch)
        if not self.contrastive:
            return terms["nig"]
        return (1 - self.alpha - self.beta) * terms["nig"], self.alpha * terms["tt"], self.beta * terms["ut"]

    def packed_losses(self, batch: PackedBatch) -> dict[str, torch.Tensor]:
        """:meth:`losses` of every target of packed windows from one pass per window: L_NIG on each target's
        tokens and end-of-text, v_U and v_{T|U} of each target from running sums of the hidden states (the mean
        of the positions before the target, and of its own tokens), v_T from one pass per distinct target item.
        Equal to :meth:`losses` on the per-prefix examples of the same targets when every history fits its
        window (tests/test_calrec.py)."""
        decoder, lm_head = decoder_and_head(self.llm)
        hidden = decoder(input_ids=batch.ids, attention_mask=batch.mask).last_hidden_state
        predicts = batch.labels != -100
        terms = {"nig": F.cross_entropy(lm_head(hidden[predicts]).float(), batch.labels[predicts])}
        if self.contrastive:
            alone = decoder(input_ids=batch.item_ids, attention_mask=batch.item_mask).last_hidden_state
            v_t = masked_mean(alone, batch.item_mask)[batch.item_index]
            sums = F.pad(hidden.float().cumsum(1), (0, 0, 1, 0))  # sums[:, j]: the sum over positions < j
            before, through = sums[batch.rows, batch.starts], sums[batch.rows, batch.ends]
            v_u = (before / batch.starts.unsqueeze(1)).to(hidden.dtype)
            v_tu = ((through - before) / (batch.ends - batch.starts).clamp(min=1).unsqueeze(1)).to(hidden.dtype)
            terms["tt"] = info_nce(v_tu, v_t, self.tau, self.symmetric)
            terms["ut"] = info_nce(v_u, v_t, self.tau, self.symmetric)
        return terms

    # ------------------------------------------------------------------------------------------- packing
    def packed_examples(self, train_dataset) -> list[tuple[list[int], list[tuple[int, int, int]]]]:
        """Every user's training sequence (:func:`user_sequences`: grouped by user, in time order) cut into
        windows of ``calrec_window_items`` items overlapping by ``calrec_window_context``
        (:func:`recbole_llm.data.packing.sequence_windows`), each target once: every item after a user's first,
        or the last ``train_targets_per_user``. ``train_max_samples`` keeps a seeded draw of whole windows
        holding at most that many targets."""
        examples = []
        for sequence in user_sequences(train_dataset).values():
            first = max(1, len(sequence) - self.targets_per_user) if self.targets_per_user else 1
            for window in sequence_windows(len(sequence), self.window_items, self.window_context, first):
                examples.append(self.prompt.window(sequence, self.item_tokens, window))
        if self.max_samples and sum(len(spans) for _, spans in examples) > self.max_samples:
            kept, count = [], 0
            for index in np.random.default_rng(self.seed).permutation(len(examples)):
                if count + len(examples[index][1]) <= self.max_samples:
                    kept.append(index)
                    count += len(examples[index][1])
            examples = [examples[index] for index in sorted(kept)]
        return examples

    def epoch_batches(self, train_dataset, epoch: int) -> ExampleBatches | None:
        """Stage II's batches of packed windows (``calrec_packing``), ``calrec_window_batch_size`` each, in a
        seeded order per epoch; None (the per-prefix rows of RecBole's split) without packing."""
        if not self.packing:
            return None
        self._pack(train_dataset)
        if not self._packed:
            raise UsageError("CALRec's packed windows hold no training target: every user's training sequence has "
                             "a single item. Use more interactions per user or --calrec_packing=False.")
        build = partial(PackedBatch.build, eos=self.prompt.eos, items=self.item_tokens)
        batches = ExampleBatches(self._packed, self.window_batch_size, self.prompt.pad, seed=self.seed + epoch,
                                 build=build)
        batches.counts = {"windows": len(self._packed), "targets": sum(len(spans) for _, spans in self._packed)}
        return batches

    def _pack(self, train_dataset) -> None:
        if self._packed_source is not train_dataset:
            self._packed, self._packed_source = self.packed_examples(train_dataset), train_dataset

    def training_targets(self, train_dataset) -> int:
        """How many next-item targets an epoch of Stage II trains."""
        if not self.packing:
            return train_dataset.inter_num
        self._pack(train_dataset)
        return sum(len(spans) for _, spans in self._packed)

    def batch_loss(self, batch: PackedBatch):
        return self.weighted_loss(batch)

    def _histories(self, interaction) -> list[list[int]]:
        return _trimmed(interaction[self.ITEM_SEQ].tolist(), interaction[self.ITEM_SEQ_LEN].tolist())

    def text_batch(self, interaction) -> TextBatch:
        """Both towers' tensors for a RecBole training batch (history -> next item)."""
        prompts = [self.prompt.history(history, self.item_tokens) for history in self._histories(interaction)]
        targets = [self.item_tokens[item] for item in interaction[self.POS_ITEM_ID].tolist()]
        return TextBatch.build(prompts, targets, self.prompt.eos, self.prompt.pad, self.device)

    def calculate_loss(self, interaction):
        return self.weighted_loss(self.text_batch(interaction))

    def stage_loss(self, batch: StageBatch):
        return self.loss_from_tokens(batch.prompts, batch.targets)

    # ------------------------------------------------------------------------------------------- Stage I
    def stage_one_batches(self, train_dataset, config) -> StageOneBatches:
        """Stage-I batches: the target dataset's examples split by ``stage1_domain_field``, plus every dataset in
        ``stage1_datasets`` as a domain of its own."""
        sources, users = {}, {}
        field = config["stage1_domain_field"]
        histories, targets, user_ids = _split_rows(train_dataset)
        if field:
            domain_of_item = _item_domains(train_dataset, field)
            labels = np.array([domain_of_item[t] for t in targets])
            for name in np.unique(labels):
                rows = np.flatnonzero(labels == name)
                key = f"{config['dataset']}:{name}"
                sources[key] = _DomainExamples(self.prompt, self.item_tokens, [histories[r] for r in rows],
                                               [targets[r] for r in rows])
                users[key] = len(np.unique(user_ids[rows]))
        else:
            sources[config["dataset"]] = _DomainExamples(self.prompt, self.item_tokens, histories, targets)
            users[config["dataset"]] = len(np.unique(user_ids))
        for name in list_setting(config, "stage1_datasets"):
            other = _training_split(name, config)
            items = self.prompt.encode_items(ItemTextBuilder.from_config(other.config).build(other))
            histories, targets, user_ids = _split_rows(other)
            sources[name] = _DomainExamples(self.prompt, items, histories, targets)
            users[name] = len(np.unique(user_ids))
        mixture = DomainMixture({name: range(len(src.targets)) for name, src in sources.items()},
                                power=float(config["stage1_power"]), users=users, seed=int(config["seed"] or 0))
        return StageOneBatches(sources, mixture, int(config["stage1_steps"]), int(config["train_batch_size"]))

    # -------------------------------------------------------------------------------------------- scoring
    def full_sort_predict(self, interaction):
        """``[B, n_items]``: each user's merged BM25 ranking of sampled item texts, ``-inf`` for unreached items."""
        histories = self._histories(interaction)
        scores = torch.full((len(histories), self.n_items), float("-inf"), device=self.device)
        self.last_generations = []
        for start in range(0, len(histories), self.generation_batch_size):
            chunk = histories[start: start + self.generation_batch_size]
            texts, log_probs = self.generate_item_texts(chunk)
            self.last_generations += texts
            scores[start: start + len(chunk), 1:] = self.rank_texts(texts, log_probs).to(self.device)
        return scores

    def generate_item_texts(self, histories: list[list[int]]) -> tuple[list[str], torch.Tensor]:
        """``num_samples`` item texts per history (flat, user-major) and their log-probabilities ``[B, N]``."""
        prompts = [self.prompt.history(history, self.item_tokens) for history in histories]
        ids, mask = left_pad(prompts, self.prompt.pad, self.device)
        samples = sample_continuations(  # seeded by the history: a user's samples never depend on the batching
            self.llm, ids, mask, num_samples=self.num_samples, temperature=self.temperature,
            max_new_tokens=self.prompt.max_item_tokens + 1, eos_token_id=self.prompt.eos,
            seeds=[row_seed(self.seed, *history) for history in histories],
        )
        flat = samples.tokens.flatten(0, 1).tolist()
        texts = self.tokenizer.batch_decode(
            [row[:length] for row, length in zip(flat, samples.lengths.flatten().tolist())], skip_special_tokens=True
        )
        return [first_item_text(text) for text in texts], samples.log_probs.float().cpu()

    def rank_texts(self, texts: list[str], log_probs: torch.Tensor) -> torch.Tensor:
        """``[B, n_items - 1]`` merged BM25 scores of ``texts`` (``N`` per user, user-major) against the catalogue."""
        queries = [tokenize(self.label_pattern.sub(" ", text) if self.label_pattern else text) for text in texts]
        users, samples = log_probs.shape
        bm25 = torch.from_numpy(self.bm25.scores(queries)).float().view(users, samples, -1)
        self_scores = (torch.from_numpy(self.bm25.self_scores(queries)).float().view(users, samples)
                       if self.self_normalise else None)
        return quasi_round_robin_merge(bm25, log_probs, self.epsilon, self_scores)

    def predict(self, interaction):
        """Scores of the given items (sampled-candidate evaluation), taken from one full ranking per distinct
        history: the rows of one user's candidates are scored against the same generations."""
        keys = torch.cat([interaction[self.ITEM_SEQ_LEN].unsqueeze(1), interaction[self.ITEM_SEQ]], dim=1)
        distinct, inverse = torch.unique(keys, dim=0, return_inverse=True)
        # one row per distinct history (any of its rows: they share the history)
        representative = inverse.new_empty(len(distinct)).scatter_(0, inverse, torch.arange(len(inverse)).to(inverse))
        scores = self.full_sort_predict(interaction[representative])
        return scores[inverse, interaction[self.ITEM_ID]]


# ----------------------------------------------------------------------------------------------- helpers
def list_setting(config, key: str) -> list:
    """A list-valued key (parsed and checked by recbole_llm.settings); ``~`` is the empty list."""
    return list(config[key] or [])


def first_item_text(text: str) -> str:
    """A generated item text cut at the first line break or item prefix (a sample may run on into the next item)."""
    text = text.split("\n", 1)[0]
    for prefix in (NEXT_ITEM_PREFIX, FIRST_ITEM_PREFIX, USER_PREFIX):
        text = text.split(prefix, 1)[0]
    return text.strip()


def calrec_stages(config) -> list[int]:
    """The stages to run, e.g. ``[1, 2]`` (values checked by recbole_llm.settings)."""
    return [int(stage) for stage in config["calrec_stages"]]


def _split_rows(dataset):
    """(histories, targets, user ids) of a sequential RecBole split."""
    inter = dataset.inter_feat
    histories = _trimmed(inter[dataset.item_id_list_field].tolist(), inter[dataset.item_list_length_field].tolist())
    return histories, inter[dataset.iid_field].tolist(), inter[dataset.uid_field].numpy()


def _trimmed(sequences: list[list[int]], lengths: list[int]) -> list[list[int]]:
    """Padded item-id sequences cut to their lengths."""
    return [seq[:length] for seq, length in zip(sequences, lengths)]


def _item_domains(dataset, field: str) -> list[str]:
    """Domain of every internal item id: the first token of ``field`` in the ``.item`` file."""
    source = Path(dataset.dataset_path) / f"{dataset.dataset_name}.item"
    table = read_item_table(source)
    if field not in table.columns:
        raise InputFileError(
            f"stage1_domain_field '{field}' is not a column of {source} (columns: {list(table.columns)}). "
            "Set stage1_domain_field to an item field such as a genre or category, or ~ for one domain."
        )
    values = table.drop_duplicates(dataset.iid_field).set_index(dataset.iid_field)[field].to_dict()
    return [first_token(values.get(str(token), "")) for token in dataset.field2id_token[dataset.iid_field]]


def _training_split(name: str, config):
    """RecBole's training split of another dataset, under this run's split and sample settings."""
    from recbole_llm.quick_start import make_config

    keys = ("eval_args", "MAX_ITEM_LIST_LENGTH", "train_targets_per_user", "train_max_samples", "seed",
            "load_col", "user_inter_num_interval", "item_inter_num_interval", "checkpoint_dir", "gpu_id", "state")
    settings = {key: config[key] for key in keys if config[key] is not None}
    settings["data_path"] = str(Path(config["data_path"]).parent)  # RecBole appended this run's dataset name
    other = make_config("CALRec", name, config_dict=settings)
    return CALRecDataset(other).build()[0]
