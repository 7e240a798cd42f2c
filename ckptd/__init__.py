"""ckptd: the node-side checkpoint daemon and the on-disk format shared with the client."""

__version__ = "0.1.0"
