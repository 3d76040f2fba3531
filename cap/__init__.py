"""cap: complexity-aware training of ResNets that prune their own units and blocks while they train."""

__version__ = "0.1.0"
