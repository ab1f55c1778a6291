"""``d2prune demo``: a generated pool with planted problems, the whole job, scored against the
ground truth it planted.

* :mod:`.run`: the demo itself (:func:`.run.run_demo`);
* :mod:`.pool`, :mod:`.scenes`: the pool and its pictures; :mod:`.evaluate`: the ground-truth figures;
* :mod:`.report_section`: the demo's section of the report; :mod:`.sweep`: how its settings were found;
* :mod:`.train_tiny_clip`: how the shipped tiny CLIP was trained; ``demo.yaml``: the demo's config.
"""
