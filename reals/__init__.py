"""ReaLS model library: VAE wrapper, teachers, alignment heads, losses, SiT, transport, metrics."""


class ReaLSError(Exception):
    """A model-side problem a user can act on (missing weights, mismatched shapes)."""
