"""Data stages: taxonomy -> sources -> clean -> shards -> loader."""
