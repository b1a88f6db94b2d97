"""MUSE core: settings, errors, metadata database, Milvus access, data sources and the CLI.

The three stages (``indexer``, ``retriever``, ``ranker``) depend on this package; it never
imports them at module level.
"""

__version__ = "0.1.0"
