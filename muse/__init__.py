"""MUSE core: settings, errors, metadata database, Milvus access and data sources.

The three stages (``indexer``, ``retriever``, ``ranker``) depend on this package; it never
imports them. The command line (``muse_cli``) sits above all of them.
"""

import os as _os

__version__ = "0.1.0"

# OpenMP threads that spin while they wait (GNU OpenMP's default) burn the time slices of a machine
# shared with other jobs: on 2 CPUs at load 8, one scl training step took 18-31 s with spinning
# threads against ~2 s with passive ones (docs/embeddings.md). Read once, when torch loads libgomp,
# so it is set here, before anything imports torch; an explicit OMP_WAIT_POLICY wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
