"""Train a SimCSE sentence encoder (task=simcse) with the shared training loop.

    # unsupervised (one sentence per line), CPU toy run:
    accelerate launch --config_file configs/accelerate/cpu.yaml scripts/train_simcse.py \\
        --config configs/simcse_unsup.yaml train.max_steps=5 eval.every=0
    # supervised (CSV sent0,sent1,hard_neg):
    accelerate launch scripts/train_simcse.py --config configs/simcse_sup.yaml
    # 2 CPU processes:
    accelerate launch --config_file configs/accelerate/multi_cpu.yaml scripts/train_simcse.py \\
        --config configs/simcse_sup.yaml

Outputs in ``train.output_dir``: ``export/`` and ``best/`` (sentence-transformers folders),
``sts_dev.png`` (STS-B dev over steps), ``metrics.jsonl``, ``checkpoints/``.
"""

from pathlib import Path

from clipkit.train.cli import main

DEFAULT = Path(__file__).resolve().parents[1] / "configs" / "simcse_unsup.yaml"

if __name__ == "__main__":
    raise SystemExit(main(task="simcse", default=DEFAULT))
