"""Built-in and file-based class names / templates, and their one-line errors."""

from __future__ import annotations

import pytest

from clipkit.eval import load_classnames, load_templates
from clipkit.eval.prompts import build_prompts, check_template


@pytest.mark.parametrize(
    ("spec", "n_classes", "n_templates"),
    [("cifar10", 10, 18), ("cifar100", 100, 18), ("imagenet", 1000, 80)],
)
def test_builtins_have_published_sizes(spec: str, n_classes: int, n_templates: int) -> None:
    names = load_classnames(spec)
    templates = load_templates(spec)
    assert len(names) == n_classes
    # OpenAI's ImageNet list repeats "missile" and "sunglasses" (two class pairs share a name).
    assert len(set(names)) == n_classes - (2 if spec == "imagenet" else 0)
    assert len(templates) == n_templates and len(set(templates)) == n_templates
    assert all(t.count("{}") == 1 for t in templates)


def test_cifar10_order_and_imagenet7_subset() -> None:
    # CIFAR-10's label order is alphabetical, which is also ImageFolder's directory order.
    names = load_classnames("cifar10")
    assert names == sorted(names) and names[0] == "airplane" and names[-1] == "truck"
    seven = load_templates("imagenet7")
    assert len(seven) == 7 and seven[0] == "itap of a {}."
    assert set(seven) <= set(load_templates("imagenet"))


def test_digits_builtin_comes_from_the_demo_data() -> None:
    from clipkit.data.digits import CLASSNAMES, EVAL_TEMPLATES

    assert load_classnames("digits") == list(CLASSNAMES)
    assert load_templates("digits") == list(EVAL_TEMPLATES)


def test_files_txt_and_json(tmp_path) -> None:
    (tmp_path / "c.txt").write_text("cat\n\ndog\n")
    (tmp_path / "t.json").write_text('["a photo of a {c}.", "a {} drawing"]')
    assert load_classnames(str(tmp_path / "c.txt")) == ["cat", "dog"]
    assert load_templates(str(tmp_path / "t.json")) == ["a photo of a {}.", "a {} drawing"]
    prompts = build_prompts(["cat", "dog"], ["a {}", "the {}!"])
    assert prompts == ["a cat", "the cat!", "a dog", "the dog!"]


def test_template_without_placeholder_names_file_and_line(tmp_path) -> None:
    f = tmp_path / "t.txt"
    f.write_text("a photo of a {}.\na photo without a slot\n")
    with pytest.raises(ValueError, match=r"t\.txt entry 2.*'a photo without a slot'.*\{\}"):
        load_templates(str(f))
    with pytest.raises(ValueError, match="only"):
        check_template("a {} and a {}")


@pytest.mark.parametrize("loader", [load_classnames, load_templates])
def test_bad_specs(loader, tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown .* 'nope'.*cifar10"):
        loader("nope")
    with pytest.raises(ValueError, match="not found"):
        loader(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        loader(str(tmp_path / "empty.txt"))
