"""Train a dual encoder.

    accelerate launch scripts/train.py                      # embedded digits demo on CPU
    accelerate launch scripts/train.py train.epochs=2 train.batch_size=64
    accelerate launch --config_file configs/accelerate/multi_gpu_8.yaml scripts/train.py \\
        --config my.yaml data.train='shards/{00000..00127}.tar'

A bad input is one line and exit 2. ``accelerate launch`` adds its own CalledProcessError
traceback (exit 1) when the script exits non-zero; ``python -m clipkit.train.launch`` takes the
same options and passes the script's exit status through without it:

    python -m clipkit.train.launch scripts/train.py train.batch_size=64
"""

from clipkit.train.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
