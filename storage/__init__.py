"""Where bytes live: URLs -> filesystems, atomic markers, WebDataset shards, the Zarr latent store."""


class StorageError(Exception):
    """A storage problem a user can act on (bad URL, missing artifact, mismatched store)."""
