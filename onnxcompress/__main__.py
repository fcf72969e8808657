"""``python -m onnxcompress`` is the ``onnxcompress`` command."""

import sys

from onnxcompress.cli import main

if __name__ == "__main__":
    sys.exit(main())
