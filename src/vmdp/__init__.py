"""vmdp: incremental-forever VM backups with resilient change tracking."""

__version__ = "0.1.0"
