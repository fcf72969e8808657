"""Pruning: unstructured sparsity (:mod:`.sparsity`) and structured channel pruning
(:mod:`.dependency`, :mod:`.importance`, :mod:`.channels`).

Import the pass modules directly; this package imports nothing eagerly, so each family loads alone.
"""
