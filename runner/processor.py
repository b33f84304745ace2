"""The family's transformers processor, assembled from its text and image halves.

Training on images needs three things from a processor: the tokenizer, the image processor and the family's
placeholder expansion (`replace_image_token`: how many image tokens an image becomes, and which). transformers
builds a Qwen-VL processor only together with its video processor, which needs torchvision; the runner reads no
videos, so it assembles the processor class itself with the sub-processors it uses and leaves the others None.
The processor's own `__init__` still runs (token ids, patch size, feature strategy), so the expansion is the
class's code, not a copy of it.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

from vlplan.planner.errors import VlplanError

# Sub-processors the runner uses; any other (video_processor, feature_extractor) is left None
USED_SUB_PROCESSORS = ("tokenizer", "image_processor")


def assemble_processor(cls, tokenizer, image_processor, chat_template: str | None = None, **init_kwargs):
    """An instance of the processor class `cls` with only a tokenizer and an image processor."""
    processor = cls.__new__(cls)
    strict = processor.check_argument_for_proper_class

    def check(name, argument):
        # an unused sub-processor may be None; every given one is still checked against its base class
        return None if argument is None else strict(name, argument)

    processor.check_argument_for_proper_class = check
    attributes = {name: None for name in cls.get_attributes()}
    attributes.update(tokenizer=tokenizer, image_processor=image_processor)
    cls.__init__(processor, chat_template=chat_template, **attributes, **init_kwargs)
    del processor.check_argument_for_proper_class
    return processor


def processor_class_name(model_dir: Path, model_type: str) -> str:
    """The processor class a checkpoint names (processor_config.json, else tokenizer_config.json), else the
    family's default in transformers' AutoProcessor mapping."""
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        path = model_dir / name
        if path.is_file():
            try:
                value = json.loads(path.read_text()).get("processor_class")
            except (json.JSONDecodeError, AttributeError):
                raise VlplanError(f"{path} is not a JSON object; fix or replace the checkpoint's {name}") from None
            if value:
                return value
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    if model_type not in PROCESSOR_MAPPING_NAMES:
        raise VlplanError(f"{model_dir}: transformers has no processor for model_type {model_type!r}")
    return PROCESSOR_MAPPING_NAMES[model_type]


def load_processor(model_dir: str | Path, model_type: str):
    """The processor of a local model directory: tokenizer, image processor, chat template and the processor
    class's own settings (processor_config.json), without the sub-processors the runner does not use."""
    import transformers

    model_dir = Path(model_dir)
    name = processor_class_name(model_dir, model_type)
    cls = getattr(transformers, name, None)
    if cls is None:
        raise VlplanError(f"{model_dir}: transformers {transformers.__version__} has no processor class {name}")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        image_processor = transformers.AutoImageProcessor.from_pretrained(model_dir)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise VlplanError(f"{model_dir}: cannot load the tokenizer and image processor ({first})") from None
    processor_dict, _ = cls.get_processor_dict(str(model_dir))
    parameters = inspect.signature(cls.__init__).parameters
    init_kwargs = {key: value for key, value in processor_dict.items()
                   if key in parameters and key not in cls.get_attributes() and key != "chat_template"}
    chat_template = processor_dict.get("chat_template") or getattr(tokenizer, "chat_template", None)
    if isinstance(chat_template, dict):  # several named templates: the default one
        chat_template = chat_template.get("default")
    return assemble_processor(cls, tokenizer, image_processor, chat_template, **init_kwargs)


def save_processor(processor, out: str | Path) -> None:
    """Write the processor files transformers reads back: tokenizer files, preprocessor_config.json,
    processor_config.json (the processor's own settings and its image processor) and chat_template.jinja."""
    out = Path(out)
    processor.tokenizer.save_pretrained(out)
    processor.image_processor.save_pretrained(out)
    parameters = inspect.signature(type(processor).__init__).parameters
    settings = {key: getattr(processor, key) for key in parameters
                if key not in ("self", "args", "kwargs", "chat_template") and key not in processor.get_attributes()
                and isinstance(getattr(processor, key, None), (str, int, float, bool))}
    config = {"processor_class": type(processor).__name__, **settings,
              "image_processor": processor.image_processor.to_dict()}
    (out / "processor_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if processor.chat_template:
        (out / "chat_template.jinja").write_text(processor.chat_template)
