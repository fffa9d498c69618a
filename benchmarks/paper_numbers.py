"""Published numbers of the ALPS paper (Guo, Zhang, Zheng, Mao, IJCAI 2021) that `benchmarks.reproduce` compares to.

Top-1 test error in %, as (mean, std) over the paper's runs, copied from Tables 2 and 3 (clean error, PreActResNet18
and VGG16 on CIFAR-10 / CIFAR-100) and Tables 5 and 6 (FGSM eps=4/255 and PGD-10 step 1/255 eps=4/255, white-box and
black-box from the ERM model; PreActResNet18 only, as Section 5.3 says).

`PAPER_ERRORS[(dataset, model)][method][metric]` with dataset in {'cifar10', 'cifar100'}, model in
{'preact_resnet18', 'vgg16_cifar'}, method in {'erm', 'dropout', 'ls', 'mixup', 'alps'} and metric in
`METRICS`. A missing key means the paper reports no such number.
"""
from typing import Dict, Optional, Tuple

__all__ = ['PAPER_ERRORS', 'METRICS', 'paper_error']

# metric keys shared with benchmarks.reproduce's table
METRICS = ('clean', 'white-box/fgsm', 'white-box/pgd', 'black-box/fgsm', 'black-box/pgd')

Stat = Tuple[float, float]

_T2_CIFAR10 = {  # Table 2
    'preact_resnet18': dict(erm=(6.13, 0.212), dropout=(5.91, 0.148), ls=(5.66, 0.135), mixup=(4.22, 0.117),
                            alps=(4.15, 0.129)),
    'vgg16_cifar': dict(erm=(6.75, 0.193), dropout=(6.42, 0.147), ls=(6.63, 0.157), mixup=(5.46, 0.112),
                        alps=(5.19, 0.144)),
}
_T3_CIFAR100 = {  # Table 3
    'preact_resnet18': dict(erm=(25.97, 0.303), dropout=(25.46, 0.351), ls=(24.85, 0.256), mixup=(22.07, 0.210),
                            alps=(21.75, 0.208)),
    'vgg16_cifar': dict(erm=(28.87, 0.297), dropout=(27.84, 0.337), ls=(28.69, 0.179), mixup=(26.50, 0.254),
                        alps=(26.18, 0.233)),
}
# Tables 5 (FGSM) and 6 (PGD), PreActResNet18: dataset -> method -> (white-box, black-box)
_T5_FGSM = {
    'cifar10': dict(erm=((39.02, 1.908), (12.41, 0.916)), dropout=((38.41, 0.844), (12.20, 0.900)),
                    ls=((27.38, 0.427), (10.86, 0.507)), mixup=((31.96, 0.384), (9.79, 0.340)),
                    alps=((24.00, 0.572), (7.91, 0.576))),
    'cifar100': dict(erm=((68.67, 0.699), (37.99, 0.750)), dropout=((65.70, 0.549), (35.94, 0.536)),
                     ls=((63.26, 0.410), (34.29, 0.364)), mixup=((68.33, 0.498), (33.74, 0.477)),
                     alps=((56.93, 0.515), (32.84, 0.237))),
}
_T6_PGD = {
    'cifar10': dict(erm=((58.33, 2.296), (15.98, 1.784)), dropout=((59.19, 1.088), (16.17, 1.003)),
                    ls=((42.78, 0.443), (13.80, 0.853)), mixup=((71.02, 1.018), (12.78, 1.122)),
                    alps=((44.55, 0.650), (8.55, 0.584))),
    'cifar100': dict(erm=((83.03, 0.770), (41.29, 0.892)), dropout=((79.15, 1.081), (39.82, 0.909)),
                     ls=((79.65, 0.700), (40.24, 0.936)), mixup=((88.80, 0.596), (35.85, 0.417)),
                     alps=((68.34, 0.488), (33.79, 0.470))),
}


def _build() -> Dict[Tuple[str, str], Dict[str, Dict[str, Stat]]]:
    table: Dict[Tuple[str, str], Dict[str, Dict[str, Stat]]] = {}
    for dataset, clean in (('cifar10', _T2_CIFAR10), ('cifar100', _T3_CIFAR100)):
        for model, per_method in clean.items():
            entry = table.setdefault((dataset, model), {})
            for method, stat in per_method.items():
                entry.setdefault(method, {})['clean'] = stat
    for attack, source in (('fgsm', _T5_FGSM), ('pgd', _T6_PGD)):
        for dataset, per_method in source.items():
            entry = table[(dataset, 'preact_resnet18')]
            for method, (white, black) in per_method.items():
                entry[method][f'white-box/{attack}'] = white
                entry[method][f'black-box/{attack}'] = black
    return table


PAPER_ERRORS = _build()


def paper_error(dataset: str, model: str, method: str, metric: str) -> Optional[Stat]:
    """The paper's (mean, std) top-1 error in % for this setting, or None when the paper has no such number.

    Narrow CPU variants (`preact_resnet18_w16`, a `width` override) are not the paper's model; callers decide
    whether to show the full-width number beside them.
    """
    return PAPER_ERRORS.get((dataset, model), {}).get(method, {}).get(metric)
