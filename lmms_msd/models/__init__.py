"""The models: the LLaVA-1.5 target (`target`), how it is loaded from either checkpoint layout
(`loading`, `original_llava`, `checkpoints`), its image preprocessing (`image`) and prompt (`prompt`),
and the MSD draft head (`draft`).
"""
