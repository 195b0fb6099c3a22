"""umbrella-ds: pack brain MRI into shards, train a patched, frozen LLaVA with DeepSpeed ZeRO."""

__version__ = "0.1.0"


def load_trained(path, base=None, **kwargs):
    """Rebuild a patched model from an ``umbrella-export`` directory: ``(model, tokenizer)``.

    Imported lazily so ``import umbrella_ds`` stays light (no torch/DeepSpeed at import time).
    """
    from umbrella_ds.train.export import load_trained as _load_trained

    return _load_trained(path, base=base, **kwargs)
