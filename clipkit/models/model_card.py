"""The model card (``README.md``) every ``clipkit export`` folder carries.

Hugging Face reads a folder's ``README.md`` as its model card: YAML front matter (library, tags,
pipeline) and Markdown. The card says what the model is (both towers' shapes, from the model
config), how it was trained (data, steps, batch, loss: the run's ``config.yaml`` and final
``metrics.json``, or the last values in ``metrics.jsonl``), the run's final evaluation metrics as
a table, how to load the folder, and the exact command that wrote it. Facts it cannot find (an
export folder outside a run, ``open_clip:ARCH``) are said to be unknown, never guessed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LIBRARY = {"open_clip": "open_clip", "hf": "transformers", "onnx": "onnx"}

USAGE = {
    "open_clip": """```python
import open_clip
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:{path}")
tokenizer = open_clip.get_tokenizer("local-dir:{path}")
```
`clipkit eval ... --model {path}` and `Embedder.load("{path}")` read it too.""",
    "hf": """```python
from transformers import CLIPModel, CLIPProcessor
model = CLIPModel.from_pretrained("{path}")
processor = CLIPProcessor.from_pretrained("{path}", backend="pil")  # transformers >= 5
inputs = processor(text=["a photo of a dog"], images=image, padding="max_length",
                   return_tensors="pt")
image_features = model.get_image_features(pixel_values=inputs["pixel_values"])
```
The weights and tokenizer ids are open_clip's exactly. Preprocessing equals open_clip's with the
PIL image processor (`backend="pil"`; `use_fast=False` before transformers 5), except that
`CLIPImageProcessor` rounds the centre-crop offset down where torchvision rounds half to even (a
one-pixel shift when the resized image exceeds the crop by 3 mod 4 pixels); the torchvision backend
resizes differently (pixel values differ by about 0.015). `CLIPTokenizer` skips open_clip's text
cleaning (ftfy: curly quotes made straight, mojibake fixed; HTML entities such as `&amp;` decoded):
clean such text first for open_clip's ids. `clipkit eval ... --model {path}` reads the folder as the
open_clip model it came from.""",
    "onnx": """```python
from clipkit.embed import Embedder
emb = Embedder.load("{path}")            # onnxruntime; no torch in the forward pass
emb.encode_text(["a photo of a dog"])    # (1, D) float32, L2-normalised
```
`image.onnx`: `pixel_values (B, 3, H, W)` -> `image_embeds (B, D)`; `text.onnx`: `input_ids (B, L)`
-> `text_embeds (B, D)` (unnormalised). `preprocess.json` gives the image size, mean/std, resize
mode and filter, and the tokenizer (`tokenizer.json`, CLIP's BPE) with its context length and
special ids; `clipkit serve --model {path}` serves it.""",
}


def find_run(loaded: str) -> Path | None:
    """The run folder behind a loaded model folder (itself, or the run of ``export/`` or of a
    checkpoint), or None."""
    p = Path(loaded)
    for cand in (p, p.parent, p.parent.parent):
        if (cand / "config.yaml").is_file() and (
            (cand / "metrics.json").is_file() or (cand / "metrics.jsonl").is_file()
        ):
            return cand
    return None


def final_metrics(run: Path) -> dict[str, Any]:
    """The run's final scalars: ``metrics.json``, else the last value of each key in
    ``metrics.jsonl`` (a run stopped before its end)."""
    path = run / "metrics.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            if isinstance(data, dict):
                return data
        except ValueError:
            pass
    out: dict[str, Any] = {}
    path = run / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a torn last line
            if isinstance(rec, dict):
                out.update(rec)
    return out


def _run_config(run: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.to_container(OmegaConf.load(run / "config.yaml"))
    except Exception:  # a damaged config is reported as unknown facts, not an export failure
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v.is_integer():  # counts logged as floats (n, n_classes)
            return str(int(v))
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"
    return str(v)


def architecture_rows(model: Any) -> list[tuple[str, str]]:
    """``(what, value)`` rows describing both towers from the model config."""
    cfg = model.model_cfg
    v, t = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    n_params = sum(p.numel() for p in model.clip.parameters())
    if v.get("timm_model_name"):
        image = f"timm {v['timm_model_name']}"
    elif isinstance(v.get("layers", 12), list | tuple):
        image = f"ModifiedResNet, layers {v['layers']}, width {v.get('width', 64)}"
    else:
        image = (
            f"ViT: {v.get('layers', 12)} layers, width {v.get('width', 768)}, "
            f"patch {v.get('patch_size', 16)}, image {v.get('image_size', 224)}"
        )
    if t.get("hf_model_name"):
        text = f"HF transformers {Path(str(t['hf_model_name'])).name}"
    else:
        text = (
            f"transformer: {t.get('layers', 12)} layers, width {t.get('width', 512)}, "
            f"{t.get('heads', 8)} heads, context {t.get('context_length', 77)}"
        )
    return [
        ("image tower", image),
        ("text tower", text),
        ("embedding dim", str(cfg.get("embed_dim"))),
        ("activation", "QuickGELU" if cfg.get("quick_gelu") else "GELU"),
        ("logit scale (exp)", f"{float(model.clip.logit_scale.detach().exp()):.4f}"),
        ("parameters", f"{n_params:,}"),
    ]


def render(model: Any, loaded: str, fmt: str, command: str, files: list[str]) -> str:
    """The card's Markdown for ``model`` (loaded from ``loaded``) exported as ``fmt``.

    Args:
        model: the :class:`~clipkit.models.DualEncoder` exported.
        loaded: the folder (or ``open_clip:ARCH``) it was loaded from.
        fmt: ``open_clip``, ``hf`` or ``onnx``.
        command: the export command line, as run.
        files: the folder's files (besides the card).
    """
    run = find_run(loaded)
    cfg = _run_config(run) if run else {}
    metrics = final_metrics(run) if run else {}
    data = cfg.get("data", {}) if isinstance(cfg.get("data"), dict) else {}
    train = cfg.get("train", {}) if isinstance(cfg.get("train"), dict) else {}
    loss = cfg.get("loss", {}) if isinstance(cfg.get("loss"), dict) else {}
    source = data.get("train") or (f"built-in: {data['builtin']}" if data.get("builtin") else "")
    lines = [
        "---",
        f"library_name: {LIBRARY[fmt]}",
        "tags:",
        "- clip",
        "- clipkit",
        "- zero-shot-image-classification",
        "pipeline_tag: zero-shot-image-classification",
        "---",
        "",
        f"# {Path(run).name if run else Path(loaded).name or loaded}",
        "",
        f"A CLIP-style image-text dual encoder trained with clipkit, exported as `{fmt}`.",
        "",
        "## Architecture",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in architecture_rows(model)],
        "",
        "## Training",
        "",
    ]
    if run is None:
        lines.append(f"Not known: `{loaded}` is not inside a clipkit run folder.")
    else:
        facts = [
            ("data", source or "not recorded"),
            ("steps", metrics.get("step", "not recorded")),
            ("samples seen", metrics.get("samples_seen", "not recorded")),
            ("batch size (per step)", train.get("batch_size", "not recorded")),
            ("loss", loss.get("name", "not recorded")),
            ("task", cfg.get("task", "not recorded")),
            ("seed", train.get("seed", "not recorded")),
        ]
        lines += ["| | |", "|---|---|", *[f"| {k} | {_fmt(v)} |" for k, v in facts]]
    lines += ["", "## Results", ""]
    evals = {k: v for k, v in metrics.items() if k.startswith("eval/") and _is_number(v)}
    if evals:
        lines += ["Final evaluation of the run (`metrics.json`):", ""]
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| `{k}` | {_fmt(v)} |" for k, v in sorted(evals.items())]
    else:
        lines.append("No evaluation results were recorded for this model.")
    lines += ["", "## Use", "", USAGE[fmt].format(path="path/to/this/folder"), ""]
    lines += ["## Export", "", "Written by:", "", "```bash", command, "```", ""]
    lines += ["Files: " + ", ".join(f"`{f}`" for f in sorted(files)) + ".", ""]
    return "\n".join(lines)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)
