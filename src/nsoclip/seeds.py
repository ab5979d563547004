"""Runs that differ only in their seed, and when a difference between two settings survives a
change of seed: Welch's t-test on the per-seed values, two-sided at 95%. With few seeds the
seed-level standard error is itself uncertain, so the threshold is the Student-t quantile at the
Welch-Satterthwaite degrees of freedom (rounded down, which errs towards "not significant"):
4.30 standard errors with 2 seeds per setting, 2.78 with 3, 2.45 with 4. No torch here: the
report uses it."""
import math
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

# params.txt entries that may differ between seeds of one setting: the seed itself and where or
# under which name the run was written.
SEED_INDEPENDENT = ("seed", "name", "logs", "resume")
# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom; beyond 30 the value at 30
# (conservative: the quantile falls towards 1.96).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)
SEED_SUFFIX = re.compile(r"[-_.]?seed[-_]?\d+$")


def setting_key(params: Dict[str, str]) -> Tuple:
    """What runs of one setting share: every params.txt entry but the seed-independent ones."""
    return tuple(sorted((k, v) for k, v in params.items() if k not in SEED_INDEPENDENT))


def group_label(names: Sequence[str]) -> str:
    """The names without a trailing seed tag ('nso-seed0', 'nso-seed1' -> 'nso') when that
    leaves one name; else their common prefix; else the names joined."""
    stripped = {SEED_SUFFIX.sub("", name) for name in names}
    if len(stripped) == 1:
        return stripped.pop() or names[0]
    prefix = _common_prefix(names).rstrip("-_. ")
    return prefix or "+".join(names)


def _common_prefix(names: Sequence[str]) -> str:
    first, last = min(names), max(names)
    length = next((i for i, (a, b) in enumerate(zip(first, last)) if a != b), min(len(first), len(last)))
    return first[:length]


def mean_and_stderr(values: Sequence[float]) -> Tuple[Optional[float], Optional[float]]:
    """Mean and its standard error s / sqrt(n) (sample standard deviation s); no error below two values."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))


def t_critical(degrees_of_freedom: float) -> float:
    """Two-sided 95% Student-t quantile at floor(df) degrees of freedom (at least 1)."""
    return T_975[min(max(int(math.floor(degrees_of_freedom)), 1), len(T_975)) - 1]


@dataclass(frozen=True)
class Welch:
    difference: float          # mean(b) - mean(a)
    stderr: float              # sqrt(se_a^2 + se_b^2)
    degrees_of_freedom: float  # Welch-Satterthwaite
    threshold: float           # t quantile x stderr: what |difference| must exceed

    @property
    def significant(self) -> bool:
        return self.stderr > 0 and abs(self.difference) > self.threshold


def welch(a: Sequence[float], b: Sequence[float]) -> Optional[Welch]:
    """b - a with Welch's standard error and threshold; None unless both have two or more values."""
    if len(a) < 2 or len(b) < 2:
        return None
    mean_a, se_a = mean_and_stderr(a)
    mean_b, se_b = mean_and_stderr(b)
    variance = se_a ** 2 + se_b ** 2
    denominator = se_a ** 4 / (len(a) - 1) + se_b ** 4 / (len(b) - 1)
    degrees = variance ** 2 / denominator if denominator > 0 else len(a) + len(b) - 2
    stderr = math.sqrt(variance)
    return Welch(mean_b - mean_a, stderr, degrees, t_critical(degrees) * stderr)


def group_by_setting(params: Sequence[Dict[str, str]]) -> List[List[int]]:
    """Indices of runs grouped by setting, in order of first appearance; a run without params.txt
    is a group of its own."""
    groups: Dict[Tuple, List[int]] = {}
    alone = []
    for index, run_params in enumerate(params):
        if run_params:
            groups.setdefault(setting_key(run_params), []).append(index)
        else:
            alone.append([index])
    return sorted([*groups.values(), *alone], key=lambda indices: indices[0])
