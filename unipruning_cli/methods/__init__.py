"""Pruning methods, one module each (:mod:`.local`, :mod:`.sparsegpt`, :mod:`.unipruning`): the unit of extension.

A new method is one module here and one ``configs/method/<name>.yaml`` (docs/extending.md), or one module in a
folder of ``$UNIPRUNING_PLUGINS``. The names a method module needs are re-exported here: the interface
(:class:`Method`, :class:`Cuts`, :func:`register_method`, :mod:`..pruning.method`) and the run it is handed
(:class:`RunContext`, :mod:`..core.context`).
"""

from ..core.context import RunContext
from ..pruning.method import METHODS, Cuts, Method, register_method

__all__ = ["METHODS", "Cuts", "Method", "RunContext", "register_method"]
