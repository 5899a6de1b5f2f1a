"""fedsqueeze: federated learning that is cheap on the wire."""

__version__ = "0.1.0"
