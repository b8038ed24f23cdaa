"""One module per DVC stage (family): the stage's compute, importing only the concepts it uses.

A notebook in ``notebooks/`` calls its stage's function, then draws and explains. DVC reruns a
stage when a module it imports changes (``dvc.yaml`` lists them; ``python -m mlsae deps`` derives
the lists from the imports and a test holds the two equal), so these modules stay narrow: the
training stages never import evaluation, statistics, plotting or prose.
"""
