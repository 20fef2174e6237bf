"""Tools to make and check WebDataset shards: ``python -m data_tools.build_shards`` and
``python -m data_tools.verify`` (``data_tools.inspect`` prints the same report, exit 0)."""
