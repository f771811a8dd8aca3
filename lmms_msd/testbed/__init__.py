"""The miniature LLaVA testbed: synthetic task data (`charts`, and the families in `families/`:
MathVista-, AI2D-, MathVerse- and TextVQA-like, written together by `make_data`) and a small LLaVA
target trained on it (`target_training`). Together with an MSD draft trained against that target they
give real acceptance behaviour without real LLaVA weights (DESIGN 4.5).

    lmms-msd make-data --family all --out data/mix           # the data: five families and their mix
    lmms-msd make-charts --out data/charts                   # the charts alone
    lmms-msd train-target --data data/charts --out target    # tokenizer + target
    bash scripts/build_testbed.sh                            # data, target and draft (GPU settings)
"""
