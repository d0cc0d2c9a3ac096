"""balspec: self-speculative decoding with Balcony exits (arXiv 2503.05005).

    import balspec
    bm = balspec.load()
    out = bm.generate("What is the capital of France?", mode="speculative")
"""

__version__ = "0.1.0"


def load(*args, **kwargs):
    """Load a base model and its exits: see `balspec.generate.load`."""
    from balspec.generate import load as _load

    return _load(*args, **kwargs)


def __getattr__(name):
    if name in ("BalconyModel", "GenerationOutput", "GenerationStats"):
        from balspec import generate

        return getattr(generate, name)
    raise AttributeError(name)
