"""The per-shard stages after download, each a thin wrapper over the Ray-free logic in filters/."""
