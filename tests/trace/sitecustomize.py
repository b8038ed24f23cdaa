"""Loaded at start-up by every Python process whose PYTHONPATH holds this folder (tests only).

With ``MLSAE_TRACE_DIR`` set, records each file the process opens (Python's ``open`` audit
event: builtin ``open``, ``io.open_code`` for imports, ``os.open``) as ``r|w <absolute path>``
lines in ``$MLSAE_TRACE_DIR/<tag>.log``. The tag is the executed notebook a papermill process
writes (its last notebook argument); papermill's kernel inherits it through the environment, so a
stage's notebook and its kernel share one log. `tests/test_dvc_graph.py` compares the logs with
the stages' declared dependencies and outputs.
"""

import os
import sys

_DIR = os.environ.get("MLSAE_TRACE_DIR")
if _DIR:
    _notebooks = [a for a in sys.argv if a.endswith(".ipynb")]
    if _notebooks:  # papermill: its kernel inherits the tag
        os.environ["MLSAE_TRACE_TAG"] = os.path.basename(_notebooks[-1]).removesuffix(".ipynb")
    _fd = os.open(
        os.path.join(_DIR, os.environ.get("MLSAE_TRACE_TAG", "other") + ".log"),
        os.O_WRONLY | os.O_CREAT | os.O_APPEND,
        0o644,
    )
    _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def _hook(event, args, _write=os.write, _fspath=os.fspath, _abspath=os.path.abspath):
        if event != "open" or args[0] is None or isinstance(args[0], int):
            return
        path, mode, flags = args[0], args[1], args[2]
        try:
            path = _abspath(_fspath(path))
        except TypeError:
            return
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & _WRITE)
        _write(_fd, f"{'w' if writes else 'r'} {path}\n".encode())

    sys.addaudithook(_hook)
