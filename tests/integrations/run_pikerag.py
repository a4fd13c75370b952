"""``python tests/integrations/run_pikerag.py SCRIPT ARGS...``: one of PIKE-RAG's own entry scripts
(``examples/qa.py config.yml``), run as its users run it, with PIKE-RAG imported by pikerag_env."""

import runpy
import sys

from pikerag_env import checkout, import_pikerag

if __name__ == "__main__":
    import_pikerag(checkout())
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
