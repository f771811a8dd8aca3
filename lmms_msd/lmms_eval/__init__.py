"""The lmms-eval adapter: the registered model (`plugin`), its model_args (`model_args`) and the
speculative statistics it reports (`statistics`). The only part of the package that imports lmms-eval.
"""
