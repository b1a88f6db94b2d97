"""The CTR ranker: layers (:mod:`ranker.layers`), models by name (:mod:`ranker.models`), the data
pipeline (:mod:`ranker.data`), training (:mod:`ranker.train`), evaluation (:mod:`ranker.evaluate`,
:mod:`ranker.metrics`), runs and checkpoints (:mod:`ranker.runs`), the scoring API
(:mod:`ranker.scoring`) and the source x model comparison (:mod:`ranker.compare`).

Nothing heavy is imported here, so ``import ranker`` stays cheap.
"""
