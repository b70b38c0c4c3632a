"""The runnable experiments built on :mod:`tbt.train`: ``tbt demo`` (:mod:`tbt.demo.demo`),
``tbt ablate`` (:mod:`tbt.demo.ablate`) and ``tbt replicate`` (:mod:`tbt.demo.replicate`), with
what they share: the offline docstring corpus (:mod:`tbt.demo.corpus`) and the plots
(:mod:`tbt.demo.plots`). ``docs/architecture.md`` says where this layer sits.
"""
