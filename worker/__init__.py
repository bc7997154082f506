"""webhook-worker: signed, retried, recorded webhook delivery."""

__version__ = "0.1.0"
