"""The ``muse`` command line. Each sub-command lives in its own module with a ``register`` function;
heavy imports happen inside the handlers so that ``muse --help`` stays fast."""
