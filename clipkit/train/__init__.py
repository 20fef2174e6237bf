"""The training loop (``train``), exact accumulation, checkpoints and the task contract."""


def train(cfg):  # noqa: ANN001 - thin lazy re-export keeps `import clipkit.train` light
    """See :func:`clipkit.train.loop.train`."""
    from clipkit.train.loop import train as _train

    return _train(cfg)


__all__ = ["train"]
