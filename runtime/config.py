"""Prompt configs: what a user tells SAA+ about a part (P^L words, P^P properties, P^C top-K).

Shipped sets (MVTec AD, VisA, MTD, parsed from the reference code) are selected by
dataset and category; a user's own YAML or JSON file has the same keys. Where the
reference code and the paper differ, the reference is the default and the paper's
form is one setting away (see `AlgorithmOptions`).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .values import is_finite_number, is_integer

DATASETS = ("mvtec", "visa", "mtd")
GENERAL_TEMPLATES = ("defect on {}", "damage on {}", "flaw on {}")


@dataclass(frozen=True)
class DefectPrompt:
    text: str  # caption sent to GroundingDINO, e.g. "crack. black hole."
    exclude: str  # a box whose phrase contains this word is dropped (usually the object's name)


@dataclass(frozen=True)
class AlgorithmOptions:
    """Choices where the reference code and the paper disagree (reference first)."""

    # One-object saliency: a preset ("reference": the code's farthest 400 at 256 px, layers 1-3;
    # "tuned": docs/saliency-study.md), None = the profile's default (lite: tuned, full: reference).
    saliency_preset: str | None = None
    saliency_mode: str | None = None  # overrides the preset: "farthest" (reference code) or "nearest" (paper)
    saliency_n: int | None = None  # overrides the preset: neighbours averaged per position (reference: 400)
    rescore_gain: float = 3.0  # reference: exp(3 * mean saliency); paper: exp(mean) -> 1.0
    fusion_plus_one: bool = True  # reference starts the weight map at 1; paper divides by sum(mask)
    object_iou_threshold: float | None = None  # paper's location rule (IoU with the object box); off in the reference
    reference_object_caption: bool = True  # reference's word split leaves "bottle," -> caption "bottle,."
    box_threshold: float = 0.1
    text_threshold: float = 0.1
    decoder_chunk: int = 32  # SAM boxes per decoder call (bounded memory with many boxes)
    max_boxes_per_prompt: int | None = None  # None: as the reference, keep every box that passes
    # GroundingDINO's multi-phrase captions: one head run for every caption (runtime.stages.text.join_captions).
    # Not the reference algorithm (it runs one caption at a time): the image meets all phrases at once.
    joined_captions: bool = False


@dataclass(frozen=True)
class PromptConfig:
    name: str
    object_prompt: str
    object_count: int
    defect_prompts: tuple[DefectPrompt, ...]
    top_k: int
    defect_area_ratio: float
    general_prompts: bool = True  # prepend "defect on {c}", "damage on {c}", "flaw on {c}"
    options: AlgorithmOptions = field(default_factory=AlgorithmOptions)

    @property
    def object_max_area(self) -> float:
        return 1.0 / self.object_count

    @property
    def object_caption(self) -> str:
        return self.object_prompt + ("," if self.options.reference_object_caption else "")

    def all_defect_prompts(self) -> list[DefectPrompt]:
        """General prompts (about the category name) first, then the category's own, as the reference."""
        general = [DefectPrompt(t.format(self.name), self.name) for t in GENERAL_TEMPLATES] if self.general_prompts else []
        return general + list(self.defect_prompts)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["defect_prompts"] = [asdict(p) for p in self.defect_prompts]
        return data


_TOP_KEYS = {f.name for f in fields(PromptConfig)} | {"similar", "category"}
_OPTION_KEYS = {f.name for f in fields(AlgorithmOptions)}


def config_from_dict(data: Any, source: str = "config") -> PromptConfig:
    """Validate a config mapping; every problem is a ConfigError naming the key and the source."""
    if data is None:
        raise ConfigError(f"{source}: empty (no settings)")
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"{source}: unknown keys {unknown} (known: {sorted(_TOP_KEYS - {'options'})} and 'options')")
    for key in ("object_prompt", "defect_prompts"):
        if key not in data:
            raise ConfigError(f"{source}: missing required key {key!r}")

    def need(key: str, kind: type, default: Any, check, rule: str) -> Any:
        value = data.get(key, default)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool or not check(value):
            raise ConfigError(f"{source}: {key} = {value!r} is invalid ({rule})")
        return value

    object_prompt = need("object_prompt", str, None, lambda v: v.strip() != "", "a non-empty word")
    name = data.get("name", data.get("category", object_prompt))
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{source}: name = {name!r} is invalid (a non-empty string)")
    object_count = need("object_count", int, 1, lambda v: 1 <= v <= 1000, "an integer from 1 to 1000")
    top_k = need("top_k", int, 5, lambda v: 1 <= v <= 1000, "an integer from 1 to 1000")
    ratio = need("defect_area_ratio", float, 0.9, lambda v: 0.0 < v <= 1.0, "a fraction in (0, 1]")
    general = need("general_prompts", bool, True, lambda v: True, "true or false")

    raw_prompts = data["defect_prompts"]
    if not isinstance(raw_prompts, list) or not raw_prompts and not general:
        raise ConfigError(f"{source}: defect_prompts must be a list (non-empty when general_prompts is false)")
    prompts = []
    for index, item in enumerate(raw_prompts):
        if isinstance(item, str):
            item = {"text": item, "exclude": name}
        if not isinstance(item, dict) or set(item) - {"text", "exclude"} or not isinstance(item.get("text"), str):
            raise ConfigError(f"{source}: defect_prompts[{index}] must be a string or {{text, exclude}}, got {item!r}")
        if not item["text"].strip():
            raise ConfigError(f"{source}: defect_prompts[{index}].text is empty")
        exclude = item.get("exclude", name)
        if not isinstance(exclude, str) or not exclude.strip():
            # "" is in every phrase: it would drop every box of the prompt
            raise ConfigError(f"{source}: defect_prompts[{index}].exclude must be a non-empty word (leave it out "
                              "for the object's name)")
        prompts.append(DefectPrompt(item["text"], exclude))

    raw_options = data.get("options", {}) or {}
    if not isinstance(raw_options, dict):
        raise ConfigError(f"{source}: options must be a mapping")
    unknown = sorted(set(raw_options) - _OPTION_KEYS)
    if unknown:
        raise ConfigError(f"{source}: unknown options {unknown} (known: {sorted(_OPTION_KEYS)})")
    options = _validate_options(AlgorithmOptions(**raw_options), source)
    return PromptConfig(name.strip(), object_prompt.strip(), object_count, tuple(prompts), top_k, ratio, general, options)


MAX_RESCORE_GAIN = 50.0  # exp(gain * mean saliency) with a mean in [0, 1]: beyond ~88 float32 overflows to inf


def _validate_options(options: AlgorithmOptions, source: str) -> AlgorithmOptions:
    iou = options.object_iou_threshold
    checks = [
        (options.saliency_preset in (None, "reference", "tuned"), "saliency_preset must be null, 'reference' or 'tuned'"),
        (options.saliency_mode in (None, "farthest", "nearest"), "saliency_mode must be 'farthest' or 'nearest'"),
        (options.saliency_n is None or is_integer(options.saliency_n) and options.saliency_n >= 1,
         "saliency_n must be an integer >= 1"),
        (is_finite_number(options.rescore_gain) and 0 <= options.rescore_gain <= MAX_RESCORE_GAIN,
         f"rescore_gain must be a number from 0 to {MAX_RESCORE_GAIN:g}"),
        (isinstance(options.fusion_plus_one, bool), "fusion_plus_one must be true or false"),
        (iou is None or is_finite_number(iou) and 0.0 <= iou <= 1.0, "object_iou_threshold must be null or a number in [0, 1]"),
        (isinstance(options.reference_object_caption, bool), "reference_object_caption must be true or false"),
        (isinstance(options.joined_captions, bool), "joined_captions must be true or false"),
        (is_finite_number(options.box_threshold) and 0.0 <= options.box_threshold < 1.0, "box_threshold must be a number in [0, 1)"),
        (is_finite_number(options.text_threshold) and 0.0 <= options.text_threshold < 1.0, "text_threshold must be a number in [0, 1)"),
        (is_integer(options.decoder_chunk) and options.decoder_chunk >= 1, "decoder_chunk must be an integer >= 1"),
        (options.max_boxes_per_prompt is None or is_integer(options.max_boxes_per_prompt) and options.max_boxes_per_prompt >= 1,
         "max_boxes_per_prompt must be null or an integer >= 1"),
    ]
    for ok, rule in checks:
        if not ok:
            raise ConfigError(f"{source}: options: {rule}")
    return options


def load_config_file(path: str | Path) -> PromptConfig:
    """A user's YAML or JSON prompt file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml  # only needed for YAML files

            data = yaml.safe_load(text)
    except Exception as err:  # JSON and YAML parsers raise different types
        raise ConfigError(f"{path}: cannot parse ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    return config_from_dict(data, source=str(path))


def shipped_categories(dataset: str) -> dict[str, dict[str, Any]]:
    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r} (shipped prompt sets: {', '.join(DATASETS)})")
    text = resources.files("runtime").joinpath("data", "prompts", f"{dataset}.json").read_text()
    return json.loads(text)["categories"]


def load_shipped_config(dataset: str, category: str, options: dict[str, Any] | None = None) -> PromptConfig:
    categories = shipped_categories(dataset)
    if category not in categories:
        raise ConfigError(f"dataset {dataset!r} has no category {category!r} (has: {', '.join(sorted(categories))})")
    data = {key: value for key, value in categories[category].items()}
    data["name"] = category
    if options:
        data["options"] = options
    return config_from_dict(data, source=f"{dataset}/{category}")


def add_config_arguments(parser) -> None:
    """--engine-dir and the prompt config (--dataset/--category or --config): every runtime command takes them."""
    parser.add_argument("--engine-dir", required=True, help="folder written by `python -m export`")
    parser.add_argument("--dataset", help="shipped prompt set: mvtec, visa or mtd")
    parser.add_argument("--category", help="category within --dataset, e.g. bottle")
    parser.add_argument("--config", help="your own prompt file (YAML or JSON)")


def resolve_config(dataset: str | None = None, category: str | None = None, config: str | Path | None = None,
                   options: dict[str, Any] | None = None) -> PromptConfig:
    """The one entry point the CLI, Python API and C ABI share."""
    if config is not None:
        if dataset or category:
            raise ConfigError("give either --config FILE or --dataset D --category C, not both")
        loaded = load_config_file(config)
        if options:
            merged = {**asdict(loaded.options), **options}
            loaded = config_from_dict({**loaded.to_dict(), "options": merged}, source=str(config))
        return loaded
    if bool(dataset) != bool(category):
        missing = "--category C" if dataset else "--dataset D"
        raise ConfigError(f"{missing} is missing: a shipped prompt config is named by both --dataset D and --category C")
    if not dataset:
        raise ConfigError("a prompt config is needed: --dataset D --category C, or --config FILE")
    return load_shipped_config(dataset, category, options)
