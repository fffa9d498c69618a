"""The ALPS training engine behind `train_timm.py` and the `timm-alps-train` console script.

Modules, in the order a run uses them:

* `config`: every flag declared once; `parse_args` (command line over a -c YAML) and `resolve_config` (checks,
  the method's preset, dataset and precision defaults) give the frozen `Config` saved as args.yaml.
* `env`: device, process group (`torchrun`), determinism.
* `data`: what the dataset is (`inspect_data`, shards checked), which loader reads it (`choose_loader`), the loaders.
* `mixing`: the mixer, the criterion it calls for, the eps ramp (`timm_alps.EpsWarmup`).
* `loop`: one training epoch, one evaluation.
* `resume`: checkpoint contents and continuing from one.
* `output`: the output folder (a lock, one run per folder), args.yaml, log.txt, curves.png.
* `run`: `main`, the table of contents, and `cli`.
"""
from .config import Config, cpu_has_native_bf16, parse_args, resolve_config, resolve_precision
from .errors import TrainError
from .run import cli, main

__all__ = ['Config', 'TrainError', 'cli', 'cpu_has_native_bf16', 'main', 'parse_args', 'resolve_config',
           'resolve_precision']
