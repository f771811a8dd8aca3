"""The calibrator, in the order data flows through it (DESIGN 4.4): `observations` (labelled tree
nodes recorded during decoding) -> `isotonic` (the grouped isotonic estimator and its torch predictor)
-> `scorer` (node scorers that put it into the tree) -> `online` (observe, fit, switch within a run);
`quality` measures it; `token_types` classifies vocabulary entries.
"""
