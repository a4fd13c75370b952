"""One module per backend. Importing any of them first sets what torch must know before it loads
(``_torch_env``: OpenMP threads that do not spin-wait on busy cores), whichever imports torch."""

from pikeclient.backends import _torch_env  # noqa: F401 - its import is the point
