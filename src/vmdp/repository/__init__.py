"""The repository: content-addressed chunks, per-disk indexes, manifests and the catalog.

It knows nothing of hypervisors. See docs/architecture.md for the on-disk format.
"""

from vmdp.repository.repo import Repository

__all__ = ["Repository"]
