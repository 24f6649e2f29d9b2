"""Which adapter class a method patches a model's Cell class with: one registry per method family.

The prefix methods (``register_attention``: how an attention cell takes prefix key/values) and prompt tuning
(``register_prompt_model``: how a model puts virtual tokens before its input) keep one each. A key is a Cell
class or its dotted name ("pkg.module.QualName", so a registration need not import the model's package); a
cell is looked up through its class's MRO, the nearest registered base winning; a cell whose class was
already patched by the method (its flag attribute set) is not a target again.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

from mindspore import nn

from ..errors import PetConfigError

__all__ = ["CellAdapterRegistry", "dotted_name"]


def dotted_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class CellAdapterRegistry:
    """Cell class (or dotted name) -> adapter class, with the checks a public ``register_*`` function makes.

    ``register_name`` names the public function in errors (its counterpart is ``"un" + register_name``);
    ``example`` is a dotted name shown when a string key is not dotted; an adapter must subclass ``base``
    (``base_name``: how users reach it) and define each of ``required`` itself; ``patched_flag`` is the class
    attribute the method's generated classes carry.
    """

    def __init__(self, register_name: str, example: str, base: type, base_name: str, required: Sequence[str],
                 patched_flag: str, builtin: Dict[str, type]):
        self._name, self._example, self._base, self._base_name = register_name, example, base, base_name
        self._required, self._flag = tuple(required), patched_flag
        self._adapters: Dict[Union[type, str], type] = dict(builtin)

    def register(self, cls: Union[type, str], adapter: type) -> None:
        if isinstance(cls, str):
            if "." not in cls:
                raise PetConfigError(f"{self._name}: {cls!r} is not a dotted class name such as {self._example!r}")
        elif not (isinstance(cls, type) and issubclass(cls, nn.Cell)):
            raise TypeError(f"{self._name}: {cls!r} is not a mindspore.nn.Cell class")
        if not (isinstance(adapter, type) and issubclass(adapter, self._base)):
            raise TypeError(f"{self._name}: adapter {adapter!r} must be a subclass of {self._base_name}")
        missing = [name for name in self._required if name not in vars(adapter)]
        if missing:
            raise TypeError(f"{self._name}: adapter {adapter.__name__} must define {missing}")
        self._adapters[cls] = adapter

    def unregister(self, cls: Union[type, str]) -> None:
        if self._adapters.pop(cls, None) is None:
            raise KeyError(f"un{self._name}: {cls!r} was not registered")

    def adapter_for(self, cell: nn.Cell) -> Optional[type]:
        """The adapter registered for the class of ``cell`` (or its nearest registered base); None when there
        is none or the class is already the method's patched one."""
        for klass in type(cell).__mro__:
            if getattr(klass, self._flag, False):
                return None
            found = self._adapters.get(klass) or self._adapters.get(dotted_name(klass))
            if found is not None:
                return found
        return None

    def known(self) -> List[str]:
        """The registered classes by dotted name, sorted (for messages)."""
        return sorted(k if isinstance(k, str) else dotted_name(k) for k in self._adapters)
