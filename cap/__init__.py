"""cap: complexity-aware training of ResNets that prune their own units and blocks while they train."""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "load_compact":  # lazy: `import cap` stays cheap
        from cap.deploy import load_compact

        return load_compact
    raise AttributeError(f"module 'cap' has no attribute {name!r}")
