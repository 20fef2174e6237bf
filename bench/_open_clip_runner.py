"""Run open_clip's own trainer (``open_clip_train.main``) on a clipkit model config.

Used by bench/train.py. Two things are added, nothing else is changed: the JSON model config is
registered with open_clip (its trainer only takes names), and webdataset 1.x's end-of-shard
marker is turned off in open_clip_train.data (else ``KeyError: 'fname'``; see ANCHORS.md).

    python bench/_open_clip_runner.py MODEL.json|ARCH -- <open_clip_train.main arguments>
"""

import sys
from functools import partial
from pathlib import Path


def main() -> None:
    cfg_path, rest = sys.argv[1], sys.argv[sys.argv.index("--") + 1 :]
    import open_clip
    import open_clip_train.data as ocd
    from webdataset.tariterators import tar_file_expander

    if cfg_path.endswith(".json"):
        open_clip.add_model_config(Path(cfg_path))
    ocd.tar_file_expander = partial(tar_file_expander, eof_value=None)
    from open_clip_train.main import main as oc_main

    oc_main(rest)
    import torch

    if torch.cuda.is_available():
        print(f"open_clip peak_mem_gb {torch.cuda.max_memory_allocated() / 2**30:.3f}")


if __name__ == "__main__":
    main()
