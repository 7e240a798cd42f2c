"""The one exception type of the on-disk format."""

from __future__ import annotations


class FormatError(ValueError):
    """A checkpoint on disk, or a value headed for one, does not follow the ckptd/1 format.

    The message names the file and says what is wrong with it, e.g.
    ``…/checkpoint-8/checkpoint_manifest.json: is a FIFO, not a regular file; …``.
    """
