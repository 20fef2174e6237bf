"""Train a dual encoder.

    accelerate launch scripts/train.py                      # embedded digits demo on CPU
    accelerate launch scripts/train.py train.epochs=2 train.batch_size=64
    accelerate launch --config_file configs/accelerate/multi_gpu_8.yaml scripts/train.py \\
        --config my.yaml data.train='shards/{00000..00127}.tar'
"""

from clipkit.train.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
