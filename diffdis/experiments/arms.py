"""The arms of a comparison: a name and the config overrides that make it, parsed, read from YAML and validated.

An arm on the command line is ``NAME`` (the method of that name: ``method=NAME``) or ``NAME:key=value,key=value``
(commas inside ``[...]`` or ``{...}`` belong to the value: ``model.unet.block_out_channels=[16,32]``). A YAML file
lists arms under ``arms``, each a mapping of config keys (dotted or nested) or a list of ``key=value`` strings::

    arms:
      diffdis: {method: diffdis}
      gen_only: [method=gen_only]
      lam0.1: {method: diffdis, loss.lambda_ita: 0.1}
      rleg: {method: rleg, model.rleg.generator: "{run:diffdis}"}

An override value may name another arm's trained model of the same seed as ``{run:ARM}`` (that arm must be
listed before it): ``model.rleg.generator={run:diffdis}`` is the diffdis arm's ``<out>/diffdis/seed<k>/model``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import yaml

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*$")  # a folder name on every file system
RUN_REF = re.compile(r"\{run:([^}]*)\}")  # {run:ARM}: that arm's model folder for the same seed
RESERVED = ("train.seed", "train.output_dir")  # set per run by the comparison itself


class CompareError(ValueError):
    """A bad comparison input (arm, override, seeds, a run folder of other settings): reported as one line."""


@dataclass(frozen=True)
class Arm:
    """One arm: its name (the row of the table), its config overrides, and its folder (default: the name)."""

    name: str
    overrides: Tuple[str, ...] = ()
    folder: Optional[str] = None  # folder name of its runs when the name is not one (e.g. "DiffDis (λ=1)")

    @property
    def dirname(self) -> str:
        return self.folder or self.name


def split_overrides(text: str) -> List[str]:
    """``"a=1,b=[1,2]"`` -> ``["a=1", "b=[1,2]"]``: commas split only outside brackets and quotes."""
    parts, depth, quote, current = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    parts.append("".join(current).strip())
    return [p for p in parts if p]


def _check_name(name: str) -> None:
    if not NAME.match(name):
        raise CompareError(f"arm name {name!r} must be letters, digits, '_', '.', '+' or '-' (it names a folder)")


def parse_arm(text: str) -> Arm:
    """An arm from ``NAME`` (meaning ``method=NAME``) or ``NAME:key=value,...``.

    Raises:
        CompareError: a bad name, or an override that is not ``key=value``.
    """
    name, sep, rest = text.partition(":")
    name = name.strip()
    _check_name(name)
    overrides = split_overrides(rest) if sep else [f"method={name}"]
    bad = [o for o in overrides if "=" not in o]
    if bad or (sep and not overrides):
        raise CompareError(f"arm {name!r}: {bad[0] if bad else 'nothing'!r} is not key=value (write NAME:key=value,...)")
    return Arm(name, tuple(overrides))


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def arms_from_file(path: Union[str, Path]) -> List[Arm]:
    """The arms listed in a YAML file (see the module docstring).

    Raises:
        CompareError: a missing or malformed file.
    """
    path = Path(path)
    if not path.is_file():
        raise CompareError(f"arms file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise CompareError(f"arms file '{path}' is not YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, Mapping) or not isinstance(data.get("arms"), Mapping) or not data["arms"]:
        raise CompareError(f"arms file '{path}' must hold a non-empty mapping 'arms: {{NAME: {{key: value}}}}'")
    arms = []
    for name, spec in data["arms"].items():
        name = str(name)
        _check_name(name)
        if isinstance(spec, Mapping):  # values as JSON, which the config's YAML dotlist reads back as they were
            overrides = [f"{k}={json.dumps(v)}" for k, v in _flatten(spec).items()]
        elif isinstance(spec, list) and all(isinstance(o, str) and "=" in o for o in spec):
            overrides = list(spec)
        elif spec is None:
            overrides = []
        else:
            raise CompareError(f"arms file '{path}': arm {name!r} must be a mapping of config keys or a list of key=value")
        arms.append(Arm(name, tuple(overrides)))
    return arms


LEFT_OUT = ("prior",)  # methods with no default arm: a prior is scored by the rleg run that reads it, not on its own
NEEDS_RUN = {"rleg": ("model.rleg.generator", "diffdis")}  # method: (key, the arm whose model it reads)


def default_arms() -> List[Arm]:
    """One arm per registered training method (``diffdis.methods.available()``, less :data:`LEFT_OUT`), each
    ``method=NAME``; a method that reads another method's trained model (:data:`NEEDS_RUN`) comes after that arm and
    reads its run of the same seed."""
    from ..methods import available

    names = [name for name in available() if name not in LEFT_OUT]
    arms = {name: Arm(name, (f"method={name}",)) for name in names}
    for name, (key, source) in NEEDS_RUN.items():
        if name in arms and source in arms:
            arms[name] = Arm(name, (f"method={name}", f"{key}={{run:{source}}}"))
            names.remove(name)
            names.insert(names.index(source) + 1, name)
    return [arms[name] for name in names]


def resolve_runs(arms: Sequence[Arm], arm: Arm, model_dir: Callable[[Arm], str]) -> List[str]:
    """``arm``'s overrides with every ``{run:NAME}`` replaced by ``model_dir(<arm NAME>)``.

    Raises:
        CompareError: NAME is not an arm listed before ``arm``.
    """
    earlier = {a.name: a for a in arms[: list(arms).index(arm)]}

    def swap(match: "re.Match[str]") -> str:
        name = match.group(1)
        if name not in earlier:
            where = "is not an arm" if name not in {a.name for a in arms} else "must be listed before it"
            raise CompareError(f"arm {arm.name!r}: {{run:{name}}}: {name!r} {where}")
        return model_dir(earlier[name])

    return [RUN_REF.sub(swap, o) for o in arm.overrides]


def validate_arms(arms: Sequence[Arm], config: Optional[str], overrides: Sequence[str]) -> Dict[str, Any]:
    """Load every arm's config (``config``, then ``overrides``, then the arm's) before anything trains.

    Returns:
        ``{arm name: resolved config}``.

    Raises:
        CompareError: no arm, a name or folder used twice, a reserved key, or a config error, naming the arm.
    """
    from ..config import ConfigError, load_config

    if not arms:
        raise CompareError("no arm to compare")
    for attr in ("name", "dirname"):
        seen = [getattr(a, attr) for a in arms]
        twice = sorted({n for n in seen if seen.count(n) > 1})
        if twice:
            raise CompareError(f"arm {twice[0]!r} is given twice")
    configs = {}
    for arm in arms:
        for o in list(overrides) + list(arm.overrides):
            if o.split("=", 1)[0].strip() in RESERVED:
                raise CompareError(f"arm {arm.name!r}: {o.split('=', 1)[0]} is set per run by the comparison (use --seeds)")
        mine = resolve_runs(arms, arm, lambda other: f"{other.dirname}/seed0/model")  # checked now, trained later
        try:
            configs[arm.name] = load_config(config, [*overrides, *mine])
        except ConfigError as err:
            raise CompareError(f"arm {arm.name!r}: {err}") from None
    return configs
