"""umbrella-ds: pack brain MRI into shards, train a patched, frozen LLaVA with DeepSpeed ZeRO."""

__version__ = "0.1.0"
