"""How a packed layer runs in torch: one path, on the runtime's ``PackedLinearNP``.

:mod:`tbt.inference.packed` holds the packed modules (``PackedLinear``, ``PackedEmbedding``)
and ``set_backend``; :mod:`tbt.inference.cached` their shared cache base. ``docs/architecture.md``
says where this layer sits.
"""
