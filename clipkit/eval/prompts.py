"""Class names and prompt templates for zero-shot classification: built-ins or files.

Built-ins ship as text files under ``clipkit/eval/data/`` (one entry per line), written from the
lists OpenAI published with CLIP (``data/prompts.md`` and the ImageNet prompt-engineering notebook
of github.com/openai/CLIP): CIFAR-10/100 class names with their 18 templates, ImageNet's 1,000
class names with the 80 templates and the 7-template subset found by forward selection. ``digits``
comes from :mod:`clipkit.data.digits` (the built-in demo data set).
"""

from __future__ import annotations

import json
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"

BUILTIN_CLASSNAMES = {
    "cifar10": "cifar10_classnames.txt",
    "cifar100": "cifar100_classnames.txt",
    "imagenet": "imagenet_classnames.txt",
}
BUILTIN_TEMPLATES = {
    "cifar10": "cifar_templates.txt",
    "cifar100": "cifar_templates.txt",
    "imagenet": "imagenet_templates.txt",
    "imagenet7": "imagenet_templates_7.txt",
}


def _read_lines(path: Path, what: str) -> list[str]:
    """Entries of a ``.txt`` (one per line) or ``.json`` (a list of strings) file."""
    if not path.is_file():
        raise ValueError(f"{what} file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{what} file {path}: invalid JSON ({err.msg})") from None
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise ValueError(f"{what} file {path}: expected a JSON list of strings")
    else:
        items = [line.strip() for line in text.splitlines()]
        items = [x for x in items if x]
    if not items:
        raise ValueError(f"{what} file {path} is empty")
    return items


def load_classnames(spec: str) -> list[str]:
    """Class names from a built-in name or a file.

    Args:
        spec: ``"cifar10"``, ``"cifar100"``, ``"imagenet"``, ``"digits"``, or a path to a
            ``.txt`` file (one class name per line, in label order) or a JSON list.

    Returns:
        The class names; index ``i`` is the name of label ``i``.

    Raises:
        ValueError: unknown built-in name, or a missing or empty file.
    """
    if spec == "digits":
        from clipkit.data.digits import CLASSNAMES

        return list(CLASSNAMES)
    if spec in BUILTIN_CLASSNAMES:
        return _read_lines(DATA_DIR / BUILTIN_CLASSNAMES[spec], "class-name")
    path = Path(spec).expanduser()
    if not path.suffix and not path.exists():
        valid = ", ".join(sorted([*BUILTIN_CLASSNAMES, "digits"]))
        raise ValueError(f"unknown class names '{spec}': not a file and not a built-in ({valid})")
    # Duplicates are allowed: OpenAI's ImageNet list names two pairs of classes alike
    # ("missile", "sunglasses"), and the label order must stay intact.
    return _read_lines(path, "class-name")


def check_template(template: str, where: str = "template") -> str:
    """Validate one template and return it in ``{}`` form.

    CLIP_benchmark writes templates with ``{c}``; OpenAI's lists use ``{}``. Both are accepted.

    Raises:
        ValueError: the template has no ``{}``/``{c}`` placeholder or has another field.
    """
    t = template.replace("{c}", "{}")
    if "{}" not in t:
        raise ValueError(f"{where} '{template}' has no '{{}}' placeholder for the class name")
    try:
        t.format("x")
    except (IndexError, KeyError, ValueError):
        raise ValueError(
            f"{where} '{template}' must contain only '{{}}' placeholders (escape braces as "
            "'{{' and '}}')"
        ) from None
    return t


def load_templates(spec: str) -> list[str]:
    """Prompt templates from a built-in name or a file.

    Args:
        spec: ``"cifar10"``/``"cifar100"`` (18 templates), ``"imagenet"`` (80),
            ``"imagenet7"`` (the 7-template subset), ``"digits"``, or a path to a ``.txt``
            (one template per line) or JSON list. Each template holds ``{}`` (or ``{c}``) where
            the class name goes.

    Returns:
        Templates in ``{}`` form, e.g. ``"a photo of a {}."``.

    Raises:
        ValueError: unknown built-in name, missing/empty file, or a template without ``{}``
            (the message names the file and line).
    """
    if spec == "digits":
        from clipkit.data.digits import EVAL_TEMPLATES

        return [check_template(t) for t in EVAL_TEMPLATES]
    if spec in BUILTIN_TEMPLATES:
        path = DATA_DIR / BUILTIN_TEMPLATES[spec]
    else:
        path = Path(spec).expanduser()
        if not path.suffix and not path.exists():
            valid = ", ".join(sorted([*BUILTIN_TEMPLATES, "digits"]))
            raise ValueError(f"unknown templates '{spec}': not a file and not a built-in ({valid})")
    items = _read_lines(path, "template")
    return [check_template(t, f"{path} entry {i + 1}: template") for i, t in enumerate(items)]


def build_prompts(classnames: list[str], templates: list[str]) -> list[str]:
    """All prompts, class-major: ``[t.format(c) for c in classnames for t in templates]``."""
    return [t.format(c) for c in classnames for t in templates]
