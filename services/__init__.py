"""The services around the ``orl`` library: api, miner, trainer (and ``common``, shared by all)."""
