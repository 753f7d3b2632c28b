"""`edgesparse` CLI with the sparsebytenn plugin's interim BlockSparseConv densify installed when
the core lacks it (see edgesparse_sparsebytenn/compat.py); otherwise exactly the `edgesparse` CLI.

    python samples/sparsebytenn/es.py build samples/sparsebytenn/model.py:build --target x86 \
        --pass sparsebytenn:sparsity=0.7,recovery=train,dispatch=measure -o out/fashion-70
    python samples/sparsebytenn/es.py bench out/fashion-70 --threads 1,2
"""
import sys

from edgesparse.cli import main
from edgesparse.plugins import registry
from edgesparse_sparsebytenn.compat import ensure_conv_densify

if __name__ == "__main__":
    if ensure_conv_densify(registry()):
        print("(es.py: core lacks a BlockSparseConv densify; using the sparsebytenn plugin's)", file=sys.stderr)
    sys.exit(main(sys.argv[1:]))
