"""Training the toy FLUX model of the toy world, one job a module: ``config`` (what decides the model), ``data``,
``networks`` (the model's parts), ``losses``, ``loop`` (the stages). The command line is ``characonsist.toy.train``."""
