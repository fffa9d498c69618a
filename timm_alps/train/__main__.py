"""`python -m timm_alps.train` (and `torchrun -m timm_alps.train`): the training command line."""
from .run import console_main

console_main()
