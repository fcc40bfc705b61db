"""Base / novel class split of an Ultralytics data YAML (the few-shot keys ``novel:`` and ``support:``).

``novel`` lists class names or ids; every other class is base. During base training the novel classes' boxes are
removed from the training labels (the standard FSOD protocol: the images stay, so novel objects appear there as
unlabelled background). ``support`` optionally names the split references are drawn from (default: ``train``): a
split key or a folder relative to the dataset root. A YAML whose classes are all novel is valid for evaluation (the
instance protocol of the benchmark); training then needs ``finetune=True``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class FewShotSplit:
    """Class ids of the base and novel classes, and the split references come from."""

    names: dict[int, str]
    novel: tuple[int, ...]
    support: str = "train"

    @property
    def base(self) -> tuple[int, ...]:
        return tuple(i for i in self.names if i not in self.novel)

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> FewShotSplit:
        """Read the split from a (checked) Ultralytics data dict.

        Raises:
            ValueError: A ``novel`` entry names no class, or two classes share a name (compared as reference banks
                compare them: case and surrounding spaces ignored — references are given by class name).
        """
        names = {
            int(k): str(v)
            for k, v in (data["names"].items() if isinstance(data["names"], dict) else enumerate(data["names"]))
        }
        seen: dict[str, int] = {}
        for i, n in names.items():
            key = n.strip().lower()
            if key in seen:
                where = data.get("yaml_file") or "the data YAML"
                raise ValueError(
                    f"{where} names class '{names[seen[key]]}' twice (ids {seen[key]} and {i}); give every class its "
                    "own name (references and results are matched by name)"
                )
            seen[key] = i
        by_name = {v: k for k, v in names.items()}
        raw = data.get("novel") or []
        if isinstance(raw, (str, int)):
            raw = [s.strip() for s in str(raw).split(",")] if isinstance(raw, str) else [raw]
        novel = []
        for x in raw:
            if isinstance(x, int) or (isinstance(x, str) and x.isdigit()):
                if int(x) not in names:
                    raise ValueError(f"novel class id {x} is not in the data YAML's names (ids 0..{len(names) - 1})")
                novel.append(int(x))
            elif x in by_name:
                novel.append(by_name[x])
            else:
                raise ValueError(f"novel class '{x}' is not in the data YAML's names {sorted(by_name)}")
        support = str(data.get("support") or "train")
        return cls(names, tuple(sorted(set(novel))), support)

    def support_source(self, data: dict[str, Any]) -> str:
        """Images of the support split: a split key of the data YAML (``support: val``) or a folder / list file
        relative to the dataset root (``support: images/support``).

        Raises:
            FileNotFoundError: Neither names an existing split or path.
        """
        if data.get(self.support):
            return str(data[self.support])
        p = Path(self.support)
        p = p if p.is_absolute() else Path(data.get("path") or ".") / p
        if not p.exists():
            raise FileNotFoundError(
                f"support: {self.support} is neither a split of the data YAML nor an existing path ({p}); "
                "write e.g. support: val, or support: images/support"
            )
        return str(p)
