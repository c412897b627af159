"""Every recbole_llm key (and the RecBole keys users most often mistype), checked in one place.

A :class:`recbole_llm.Config` validates itself as soon as all its layers are merged, before any data or model
loads, so a bad value fails in a second with a message naming the key, the value, what is allowed and how to fix
it, instead of hours later inside torch or as a silently wrong run. Values arrive already typed: YAML files are
typed by YAML, and ``config_dict`` / command-line strings are parsed by :func:`parse_value` (Python literals,
then YAML for ``[...]`` / ``{...}``, never ``eval``), so the three sources give the same value.

A model's own keys are declared here too, next to the shared ones: the schema is the contract that
``properties/model/<Model>.yaml`` documents in words.
"""

from __future__ import annotations

import ast
import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import yaml

from recbole_llm.errors import UsageError


class SettingError(UsageError, ValueError):
    """A configuration value that recbole_llm refuses, with the key, the value, what is allowed and the fix."""


# ------------------------------------------------------------------------------------------------ parsing
def parse_value(text: str):
    """A command-line / ``config_dict`` string as a typed value, without evaluating code.

    Python literals (``0.001``, ``[1, 2]``, ``{'a': 1}``, ``None``, ``True``) first, as RecBole's ``eval`` read
    them; then YAML for ``[...]`` and ``{...}`` (``[ml-1m]``, ``{Title: movie_title}``); ``true``/``false`` in any
    case as booleans; anything else stays the string it is.
    """
    stripped = text.strip()
    try:
        return ast.literal_eval(stripped)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    if stripped.startswith(("[", "{")):
        try:
            return yaml.safe_load(stripped)
        except yaml.YAMLError:
            return text
    if stripped.lower() in ("true", "false"):
        return stripped.lower() == "true"
    return text


# ------------------------------------------------------------------------------------------------ schema
@dataclass(frozen=True)
class Setting:
    """What one key accepts. ``check`` returns None when the (typed) value is fine, else the reason."""

    allowed: str  # shown to the user: "an integer >= 1", "one of none | 8bit | 4bit"
    check: Callable[[object], str | None]
    nullable: bool = False
    example: str = ""  # a valid command-line value, for the fix

    def problem(self, value) -> str | None:
        if value is None:
            return None if self.nullable else "it is empty"
        return self.check(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def integer(minimum: int | None = None, nullable: bool = False) -> Setting:
    def check(value):
        if not _is_int(value):
            return "it is not an integer"
        if minimum is not None and value < minimum:
            return f"it is below {minimum}"
        return None

    allowed = "an integer" + (f" >= {minimum}" if minimum is not None else "")
    return Setting(allowed, check, nullable, example=str(max(minimum or 0, 1)))


def number(*, above: float | None = None, at_least: float | None = None, below: float | None = None,
           example: str = "0.1") -> Setting:
    def check(value):
        if not _is_number(value):
            return "it is not a number"
        if above is not None and not value > above:
            return f"it is not above {above}"
        if at_least is not None and value < at_least:
            return f"it is below {at_least}"
        if below is not None and not value < below:
            return f"it is not below {below}"
        return None

    bounds = [f"> {above}" if above is not None else "", f">= {at_least}" if at_least is not None else "",
              f"< {below}" if below is not None else ""]
    return Setting(" ".join(["a number", *filter(None, bounds)]), check, example=example)


def boolean(nullable: bool = False) -> Setting:
    return Setting("True or False" + (" or ~" if nullable else ""),
                   lambda value: None if isinstance(value, bool) else "it is not True or False", nullable, "True")


def choice(*options: str) -> Setting:
    return Setting("one of " + " | ".join(options),
                   lambda value: None if value in options else "it is not one of them", example=options[0])


def text(nullable: bool = False, example: str = "name") -> Setting:
    return Setting("a string" + (" or ~" if nullable else ""),
                   lambda value: None if isinstance(value, str) and value.strip() else "it is not a non-empty string",
                   nullable, example)


def string_list(nullable: bool = False, non_empty: bool = False, example: str = "[a,b]",
                items: Callable[[object], str | None] | None = None) -> Setting:
    def check(value):
        if not isinstance(value, (list, tuple)):
            return "it is not a list"
        if non_empty and not value:
            return "it is empty"
        for item in value:
            reason = items(item) if items else (None if isinstance(item, str) else f"{item!r} is not a string")
            if reason:
                return reason
        return None

    return Setting("a list" + (" (not empty)" if non_empty else ""), check, nullable, example)


def string_mapping(example: str) -> Setting:
    def check(value):
        if not isinstance(value, Mapping) or not value:
            return "it is not a non-empty mapping"
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            return "its labels and fields must be strings"
        return None

    return Setting("a mapping {label: field} or ~", check, nullable=True, example=example)


def mapping(example: str) -> Setting:
    return Setting("a mapping or ~", lambda value: None if isinstance(value, Mapping) else "it is not a mapping",
                   nullable=True, example=example)


def _stage(value) -> str | None:
    return None if value in (1, 2) else f"{value!r} is not 1 or 2"


SEMCONV_TASKS = ("sequential", "text", "query", "negative")
ILM_TASKS = ("sequential", "item", "user")
ILM_PHASE_ONE_LOSSES = ("itc", "itm", "itg", "iic", "uic")


def _weights(names: tuple[str, ...], what: str) -> Callable[[object], str | None]:
    def check(value) -> str | None:
        if not isinstance(value, Mapping):
            return "it is not a mapping"
        unknown = [key for key in value if key not in names]
        if unknown:
            return f"{unknown[0]!r} is not a {what}{closest(str(unknown[0]), names)}"
        if not all(_is_number(w) and w >= 0 for w in value.values()):
            return "every weight must be a number >= 0"
        if not any(value.values()):
            return "every weight is 0, so there is nothing to train on"
        return None

    return check


# Keys of every model: RecBole's training keys users most often set by hand, and recbole_llm's shared keys.
COMMON: dict[str, Setting] = {
    "train_batch_size": integer(1),
    "eval_batch_size": integer(1),
    "learning_rate": number(above=0, example="0.0001"),
    "weight_decay": number(at_least=0, example="0.0"),
    "epochs": integer(0),
    "eval_step": integer(0),
    "stopping_step": integer(1),
    "seed": integer(),
    "MAX_ITEM_LIST_LENGTH": integer(1),
    "load_col": mapping("{inter: [user_id, item_id, timestamp]}"),
    # properties/overall.yaml
    "llm_path": text(example="smollm2-135m"),
    "llm_dtype": choice("auto", "fp32", "bf16", "fp16"),
    "llm_quantization": choice("none", "8bit", "4bit"),
    "llm_gradient_checkpointing": boolean(),
    "llm_trim_memory": boolean(),
    "llm_cache_dir": text(nullable=True, example="~/.cache/recbole_llm"),
    "lora_r": integer(0),
    "lora_alpha": number(above=0, example="16"),
    "lora_dropout": number(at_least=0, below=1, example="0.05"),
    "lora_target_modules": string_list(non_empty=True, example="[q_proj,v_proj]"),
    "gradient_accumulation_steps": integer(1),
    "lr_scheduler": choice("constant", "linear", "cosine"),
    "lr_warmup": number(at_least=0, example="0.01"),
    "resume": boolean(),
    "valid_curve_steps": integer(0),
    "dist_backend": choice("auto", "gloo", "nccl"),
    "llm_parallel": choice("ddp", "fsdp"),
    "tune_cpus_per_trial": number(above=0, example="1"),
    "tune_gpus_per_trial": number(at_least=0, example="0.5"),
    "item_text_fields": string_mapping("{Title: movie_title, Year: release_year}"),
    "item_text_template": text(nullable=True, example="'{movie_title} ({release_year})'"),
    "item_domain": Setting("one of movie | book | product, or ~ (neutral wording)",
                           lambda v: None if v in ("movie", "book", "product") else "it is not one of them",
                           nullable=True, example="movie"),
    "item_text_missing": Setting("a string", lambda v: None if isinstance(v, str) else "it is not a string",
                                 example="unknown"),
    "exclude_history": boolean(nullable=True),
    "min_history_length": integer(0),
    "eval_max_interactions": integer(1, nullable=True),
    "eval_max_users": integer(1, nullable=True),
    "threshold": mapping("{rating: 4}"),
    "preset": text(nullable=True, example="cpu"),
}

# Each plugin model's own keys (properties/model/<Model>.yaml).
MODEL_KEYS: dict[str, dict[str, Setting]] = {
    "CALRec": {
        "max_history_items": integer(1),
        "max_prompt_tokens": integer(16),
        "max_item_tokens": integer(1),
        "train_targets_per_user": integer(0),
        "train_max_samples": integer(0),
        "calrec_packing": boolean(),
        "calrec_window_items": integer(2),
        "calrec_window_context": integer(0),
        "calrec_window_batch_size": integer(1),
        "calrec_alpha": number(example="0.125"),
        "calrec_beta": number(example="-0.025"),
        "contrastive_tau": number(above=0, example="0.5"),
        "contrastive_symmetric": boolean(),
        "contrastive": boolean(),
        "calrec_stages": string_list(non_empty=True, example="[1,2]", items=_stage),
        "stage1_steps": integer(1),
        "stage1_power": number(at_least=0, example="0.3"),
        "stage1_domain_field": text(nullable=True, example="class"),
        "stage1_datasets": string_list(nullable=True, example="[ml-1m]"),
        "num_samples": integer(1),
        "temperature": number(at_least=0, example="0.5"),
        "bm25_epsilon": number(at_least=0, example="0.0002"),
        "bm25_index_labels": boolean(),
        "bm25_normalization": choice("minmax", "self"),
        "generation_batch_size": integer(1),
    },
    "SemConv": {
        "semconv_cf_model": text(example="LightGCN"),
        "semconv_cf_table": text(example="item_embedding"),
        "semconv_cf_vectors": choice("scoring", "table"),
        "semconv_cf_epochs": integer(1),
        "semconv_cf_settings": mapping("{embedding_size: 64}"),
        "semconv_codes": choice("learned", "random"),
        "semconv_code_softmax": choice("full", "codes"),
        "semconv_levels": Setting("an integer from 1 to 26", lambda v: None if _is_int(v) and 1 <= v <= 26
                                  else "it is not an integer from 1 to 26", example="4"),
        "semconv_codebook_size": integer(2),
        "semconv_rq_epochs": integer(1),
        "semconv_rq_lr": number(above=0, example="0.001"),
        "semconv_rq_beta": number(at_least=0, example="0.25"),
        "semconv_rq_hidden": integer(1),
        "semconv_rq_code_dim": integer(1),
        "semconv_lambda_align": number(at_least=0, example="0.1"),
        "semconv_align_tau": number(above=0, example="0.1"),
        "semconv_task_weights": Setting(
            f"a mapping of {' | '.join(SEMCONV_TASKS)} to weights >= 0", _weights(SEMCONV_TASKS, "task"),
            example="{sequential: 1.0}"),
        "semconv_window_items": integer(2),
        "semconv_window_context": integer(0),
        "semconv_query_history": integer(0),
        "max_history_items": integer(1),
        "max_item_tokens": integer(1),
        "semconv_beams": integer(1),
        "generation_batch_size": integer(1),
    },
}


_SELECTIONS = ("rerank", "high", "sequential", "simple")  # recbole_llm.retrieval.history.SELECTIONS


def _selection(value) -> str | None:
    return None if value in _SELECTIONS else f"{value!r} is not one of {' | '.join(_SELECTIONS)}"


MODEL_KEYS["RALLRec"] = {
    "rallrec_descriptions": choice("llm", "template"),
    "rallrec_description_tokens": integer(1),
    "rallrec_description_temperature": number(at_least=0, example="0.8"),
    "rallrec_description_top_p": number(above=0, example="0.9"),
    "rallrec_description_batch_size": integer(1),
    "rallrec_text_encoder": choice("llm", "minilm"),
    "rallrec_pca_dim": integer(1),
    "rallrec_cf_model": text(example="LightGCN"),
    "rallrec_cf_table": text(example="item_embedding"),
    "rallrec_cf_vectors": choice("scoring", "table"),
    "rallrec_cf_epochs": integer(1),
    "rallrec_cf_settings": mapping("{embedding_size: 64}"),
    "rallrec_ssl_hidden": integer(1),
    "rallrec_ssl_tau": number(above=0, example="0.1"),
    "rallrec_ssl_epochs": integer(1),
    "rallrec_ssl_lr": number(above=0, example="0.001"),
    "rallrec_embedding": choice("mix3", "text", "colla", "ssl"),
    "rallrec_history_k": integer(1),
    "rallrec_alpha": Setting("a number from 0 to 1", lambda v: None if _is_number(v) and 0 <= v <= 1
                             else "it is not a number from 0 to 1", example="0.6667"),
    "rallrec_prompt": Setting("one of " + " | ".join(_SELECTIONS), _selection, example="rerank"),
    "rallrec_train_prompts": string_list(non_empty=True, example="[high,sequential,simple]", items=_selection),
    "rallrec_train_samples": integer(1),
    "rallrec_score_batch_size": integer(1),
    "rallrec_user_fields": string_mapping("{gender: gender, age: age, job: occupation}"),
    "rallrec_user_values": mapping("{age: {1: under 18}}"),
}


MODEL_KEYS["ILM"] = {
    "ilm_adaptor": choice("qformer", "mlp"),
    "ilm_phase1": boolean(),
    "ilm_queries": integer(1),
    "ilm_encoder_tokens": integer(1),
    "ilm_qformer_path": text(nullable=True, example="bert-base-uncased"),
    "ilm_qformer_init": choice("bert", "random"),
    "ilm_qformer_layers": integer(1),
    "ilm_mlp_hidden": integer(1),
    "ilm_cf_model": text(example="BPR"),
    "ilm_cf_item_table": text(example="item_embedding"),
    "ilm_cf_user_table": text(example="user_embedding"),
    "ilm_cf_vectors": choice("scoring", "table"),
    "ilm_cf_epochs": integer(1),
    "ilm_cf_settings": mapping("{embedding_size: 64}"),
    "ilm_phase1_epochs": integer(1),
    "ilm_phase1_batch_size": integer(2),
    "ilm_phase1_lr": number(above=0, example="0.0001"),
    "ilm_phase1_losses": Setting(f"a mapping of {' | '.join(ILM_PHASE_ONE_LOSSES)} to weights >= 0",
                                 _weights(ILM_PHASE_ONE_LOSSES, "phase-1 loss"), example="{itc: 1, itg: 1}"),
    "ilm_phase1_text_tokens": integer(4),
    "ilm_itc_dim": integer(1),
    "ilm_uic_min_rating": number(example="4"),
    "ilm_task_weights": Setting(f"a mapping of {' | '.join(ILM_TASKS)} to weights >= 0",
                                _weights(ILM_TASKS, "task"), example="{sequential: 1.0}"),
    "ilm_history_titles": boolean(),
    "max_history_items": integer(1),
    "max_item_tokens": integer(1),
    "ilm_beams": integer(1),
    "generation_batch_size": integer(1),
}


@dataclass
class Problems:
    lines: list[str] = field(default_factory=list)

    def add(self, key: str, value, reason: str, setting: Setting) -> None:
        fix = f"--{key}={setting.example}" if setting.example else f"--{key}=..."
        self.lines.append(f"{key}={value!r}: {reason}; allowed: {setting.allowed} (fix: e.g. {fix}, or the YAML key)")


def schema_for(model: str) -> dict[str, Setting]:
    return {**COMMON, **MODEL_KEYS.get(model, {})}


def validate(values: Mapping, model: str) -> None:
    """Raise :class:`SettingError` listing every key of ``values`` whose value the schema refuses."""
    problems = Problems()
    for key, setting in schema_for(model).items():
        if key not in values:
            continue
        reason = setting.problem(values[key])
        if reason:
            problems.add(key, values[key], reason, setting)
    if problems.lines:
        raise SettingError(f"invalid setting{'s' if len(problems.lines) > 1 else ''} for {model}: "
                           + "; ".join(problems.lines))


def closest(name: str, known) -> str:
    """' (did you mean X?)' for a near miss among ``known``, else ''."""
    lowered = {k.lower(): k for k in known}
    if name.lower() in lowered:
        return f" (did you mean {lowered[name.lower()]}?)"
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.75)
    return f" (did you mean {match[0]}?)" if match else ""
