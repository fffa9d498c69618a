"""`python -m timm_alps.data SRC OUT_DIR`: convert a dataset to webdataset shards (see `timm_alps.data.convert`).

A package's `__main__` runs without runpy's "found in sys.modules" RuntimeWarning that a module imported by its
package's `__init__` (as `timm_alps` imports `timm_alps.data`) would print.
"""
from .shards import main

main()
